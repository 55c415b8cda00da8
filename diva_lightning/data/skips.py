"""Skip accounting for bad samples: count by reason, keep a few culprits, never crash the run.

A real crawl has corrupt images, missing captions, truncated tars... Each bad sample (or bad
shard read) is recorded in a ``SkipCounter`` under a reason (see ``REASONS``) with its key, shard
url and cause, and the stream goes on. Across DataLoader workers, every worker owns its own
counter (a pickled copy); it ``drain()``-s the counts recorded since its previous batch into that
batch, and the main-process loader ``merge()``-s them into the split's counter. Every skip is thus
counted exactly once, whatever the number of workers.

The skipped fraction is lost samples over samples read (lost + decoded), counted where the
samples are read: a sample waiting in a shuffle buffer has been read, so the fraction is the
same for any buffer size and worker count. Shard-level events (``EVENTS``) are counted apart.
A configurable ceiling on the fraction aborts the run with ``DataQualityError`` and a summary
naming culprits.

``TarErrorHandler`` is the handler given to WebDataset's tar reading; unlike
``webdataset.warn_and_continue`` it does not sleep, and it records the shard url and cause.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

REASONS = {
    "missing_shard": "the shard file does not exist (any more)",
    "shard_open_error": "the shard could not be opened",
    "bad_tar": "truncated or corrupt tar archive (samples before the damage are kept)",
    "stream_error": "a streamed shard (pipe: command or URL) failed or timed out (samples read before are kept)",
    "duplicate_member": "two members with the same key and extension in one tar",
    "dotted_name": "member names with more dots than their extension (WebDataset keys end at the first dot)",
    "missing_image": "no image member in the sample",
    "empty_image": "zero-byte image member",
    "not_an_image": "bytes that are no image format (whatever the extension says)",
    "corrupt_image": "the image does not decode (truncated, broken data)",
    "too_large": "more pixels than the ceiling (decompression bomb guard)",
    "too_small": "image side below the minimum (e.g. 1x1 tracking pixels)",
    "missing_caption": "no caption member / json field",
    "empty_caption": "caption empty or whitespace only",
    "bad_caption_encoding": "caption bytes are not UTF-8",
    "bad_json": "the json member does not parse",
    "missing_codes": "pre-tokenised run, but the sample has no codes.npy",
    "bad_codes": "codes.npy of the wrong shape, dtype or range",
    "corrupt_codes": "codes.npy does not load (damaged bytes)",
    "other": "any other per-sample error (see the recorded cause)",
    "tar_error": "any other error while reading a tar shard (see the recorded cause)",
    "unnamed_member": "a tar member without a key.extension name (WebDataset cannot group it)",
}
# Shard-level events: each is one record, not one lost sample (a duplicated member, a cut
# end-of-archive or an unreadable shard says nothing about how many samples it held), so they
# are reported apart and never enter the skipped fraction.
EVENTS = frozenset(
    {"missing_shard", "shard_open_error", "bad_tar", "duplicate_member", "tar_error",
     "unnamed_member", "stream_error"}
)  # fmt: skip
EXAMPLES_PER_REASON = 3


class DataQualityError(RuntimeError):
    """Too large a fraction of the samples was skipped."""


@dataclass
class SkipRecord:
    """One skipped sample or shard read."""

    reason: str
    key: str | None
    url: str | None
    cause: str

    def __str__(self) -> str:
        where = " / ".join(part for part in (self.url, self.key) if part) or "?"
        return f"{where}: {self.cause}"


@dataclass
class SkipCounter:
    """Skipped samples by reason, kept samples, and a few example culprits per reason."""

    counts: Counter = field(default_factory=Counter)
    kept: int = 0  # samples served in batches (the loader's count)
    read: int = 0  # samples decoded where they were read (merged from the workers)
    examples: dict[str, list[SkipRecord]] = field(default_factory=dict)
    kept_total: int = 0  # never drained: a worker's progress check reads it
    _pending: Counter = field(default_factory=Counter, repr=False)
    _pending_read: int = field(default=0, repr=False)
    _pending_examples: dict = field(default_factory=dict, repr=False)
    _warned: set = field(default_factory=set, repr=False)

    # ---- recording (in the process that reads the data) ------------------------------------
    def add(self, reason: str, key: str | None = None, url: str | None = None, cause="") -> None:
        """Record one skip; the first occurrence of each reason is logged as a warning."""
        reason = reason if reason in REASONS else "other"
        record = SkipRecord(reason, key, url, str(cause)[:300])
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("skipping bad data (%s): %s", reason, record)
        self._pending[reason] += 1
        examples = self._pending_examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(record)

    def add_kept(self, n: int = 1) -> None:
        """``n`` samples read and decoded (shipped as ``read``; the loader counts ``kept``)."""
        self.kept_total += n
        self._pending_read += n

    def drain(self) -> dict:
        """Counts, examples and reads recorded since the last drain (to ship with a batch)."""
        delta = {"counts": dict(self._pending), "examples": self._pending_examples,
                 "read": self._pending_read}  # fmt: skip
        self._pending, self._pending_examples, self._pending_read = Counter(), {}, 0
        return delta

    # ---- aggregation (main process) ----------------------------------------------------------
    def merge(self, delta: dict) -> None:
        """Add a drained delta (from any worker) to this counter."""
        self.counts.update(delta.get("counts", {}))
        self.read += delta.get("read", 0)
        for reason, records in delta.get("examples", {}).items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(records[: EXAMPLES_PER_REASON - len(kept)])

    @property
    def skipped(self) -> int:
        """Every record: lost samples and shard events."""
        return sum(self.counts.values())

    @property
    def lost(self) -> int:
        """Samples read but skipped."""
        return sum(n for reason, n in self.counts.items() if reason not in EVENTS)

    @property
    def events(self) -> int:
        """Shard-level events (``EVENTS``), not counted as samples."""
        return self.skipped - self.lost

    @property
    def seen(self) -> int:
        return self.lost + self.read

    @property
    def fraction(self) -> float:
        """Lost samples over samples read."""
        return self.lost / self.seen if self.seen else 0.0

    def as_dict(self) -> dict[str, int]:
        """Skips per reason (only reasons that occurred)."""
        return {reason: n for reason, n in sorted(self.counts.items()) if n}

    def log_dict(self, prefix: str = "data/") -> dict[str, float]:
        """Flat metrics for ``LightningModule.log_dict`` / a logger's ``log_metrics``."""
        out = {f"{prefix}skipped_{reason}": float(n) for reason, n in self.as_dict().items()}
        out[f"{prefix}skipped"] = float(self.skipped)
        out[f"{prefix}lost"] = float(self.lost)
        out[f"{prefix}events"] = float(self.events)
        out[f"{prefix}read"] = float(self.read)
        out[f"{prefix}kept"] = float(self.kept)
        out[f"{prefix}skipped_fraction"] = self.fraction
        return out

    def summary(self) -> str:
        """Human-readable report: totals, then per reason the count, meaning and examples."""
        plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
        lines = [
            f"read {plural(self.read, 'sample')}, lost {plural(self.lost, 'sample')} "
            f"({self.fraction:.1%} of those read), {plural(self.events, 'shard event')}"
        ]
        for reason, n in self.as_dict().items():
            kind = "event: " if reason in EVENTS else ""
            lines.append(f"  {reason}: {n} ({kind}{REASONS[reason]})")
            lines += [f"      e.g. {record}" for record in self.examples.get(reason, [])]
        return "\n".join(lines)

    def check_ceiling(self, max_fraction: float, min_seen: int, split: str = "train") -> None:
        """Raise ``DataQualityError`` once ``min_seen`` samples were seen and too many skipped."""
        if self.seen >= min_seen and self.fraction > max_fraction:
            raise DataQualityError(
                f"{split} data: skipped fraction {self.fraction:.1%} exceeds the ceiling "
                f"max_skip_fraction={max_fraction:.1%}; fix the shards or raise the ceiling.\n"
                + self.summary()
            )


def exception_url(exn: BaseException) -> str | None:
    """WebDataset appends the shard url to ``exn.args``; return the last string-like one."""
    for arg in reversed(getattr(exn, "args", ())):
        if isinstance(arg, str) and arg:
            return arg
    return None


def classify_tar_error(exn: BaseException, url: str | None = None) -> str:
    """Skip reason of an exception raised while opening / reading a tar shard."""
    streamed = url is not None and (url.startswith("pipe:") or "://" in url)
    if streamed and isinstance(exn, OSError) and not isinstance(exn, FileNotFoundError):
        return "stream_error"  # WebDataset's Pipe: the command exited non-zero
    if streamed and isinstance(exn, tarfile.ReadError) and "empty file" in str(exn):
        return "stream_error"  # no byte came: failed or timed out before its exit status is read
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, tarfile.TarError | EOFError):
        return "bad_tar"
    if isinstance(exn, ValueError) and "duplicate file name" in str(exn):
        return "duplicate_member"
    if isinstance(exn, OSError):
        return "shard_open_error"
    return "tar_error"


@dataclass
class TarErrorHandler:
    """WebDataset ``handler``: record the error in ``counter`` and continue.

    ``current`` is a dict whose ``"url"`` the shard stream sets before each shard, so errors
    raised deep inside the tar reader (which carry no url) are attributed to their shard. An
    error inside a tar (truncated or corrupt data) stops reading THAT shard (returns False at
    the member level: the stream is broken anyway, and WebDataset would otherwise report the
    same damage a second time one level up); samples read before the damage are kept. Errors
    at the shard level (missing file, unreadable header) skip the shard and go on.
    """

    counter: SkipCounter
    current: dict = field(default_factory=dict)

    def __call__(self, exn: BaseException) -> bool:
        message = str(exn.args[0]) if exn.args else str(exn)
        inner = len(exn.args) == 1 and " @ " in message  # raised by tar_file_iterator
        url = self.current.get("url") or exception_url(exn)
        reason = classify_tar_error(exn, url)
        self.counter.add(reason, None, url, f"{type(exn).__name__}: {message}")
        return not inner


@dataclass
class MemberNames:
    """WebDataset ``select_files``: a member whose name is not ``key.extension`` (no dot, or
    nothing before the first dot) would be dropped by WebDataset's grouping without a word;
    here it is recorded as an ``unnamed_member`` event first."""

    counter: SkipCounter
    current: dict = field(default_factory=dict)

    def __call__(self, fname: str) -> bool:
        if base_plus_ext(fname)[0] is not None:
            return True
        cause = f"member '{fname}' has no key.extension name, so it belongs to no sample"
        self.counter.add("unnamed_member", fname, self.current.get("url"), cause)
        return False
