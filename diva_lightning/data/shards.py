"""Shard lists: expand patterns, check them before training, split them over ranks and workers.

Patterns: a string or a list of strings; each may use braces (``data/shard-{000000..000009}.tar``),
shell globs (``data/*.tar``) or name a directory (all its shards: ``SHARD_SUFFIXES``, plain and
compressed tars; other files are listed in a warning). Local paths are checked to
exist; remote URLs (``scheme://``, ``pipe:``) are passed through unchecked.

Splitting (``split_shards``): rank ``r`` of ``R`` takes ``shards[r::R]``; worker ``w`` of ``W``
takes that list's ``[w::W]`` (WebDataset's ``split_by_node`` then ``split_by_worker``), so one pass
reads every shard with exactly one (rank, worker). Requirements, checked with a message naming the
pattern before any training step (``check_shard_count``):

* training: at least ``R * W`` shards, so that no worker (and no rank) has nothing to read;
* validation: at least ``R`` shards (a rank without batches hangs in the epoch-end collective);
  the loader uses at most ``len(shards) // R`` workers.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import braceexpand
import webdataset as wds

from diva_lightning.backbones.tokenizers import tokenizer_identity
from diva_lightning.data.skips import SkipCounter, TarErrorHandler

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http:", "https:", "s3:", "gs:", "ais:", "sftp:", "scp:")
# What WebDataset's tar reader opens (``tarfile`` in stream mode "r|*": plain, gzip, bz2, xz).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES) or "://" in url


def bounded_stream(url: str, timeout: float | None) -> str:
    """``url`` as WebDataset should open it so that it cannot stall a rank: a ``pipe:`` command
    runs under coreutils ``timeout`` (killed 10 s after the TERM), an ``http(s)://`` URL
    through ``curl`` with ``--max-time`` (WebDataset's own curl has retries but no overall
    limit). A stream cut this way exits non-zero and is counted as a ``stream_error``. Object
    stores are read through a ``pipe:`` command (``pipe:aws s3 cp s3://bucket/shard.tar -``)."""
    if timeout is None:
        return url
    seconds = f"{timeout:g}"
    if url.startswith("pipe:"):
        return f"pipe:timeout -k 10 {seconds} sh -c {shlex.quote(url[len('pipe:') :])}"
    if url.startswith(("http://", "https://")):
        return (f"pipe:curl --fail --silent --show-error --location --connect-timeout 30 "
                f"--retry 3 --max-time {seconds} {shlex.quote(url)}")  # fmt: skip
    return url


def _expand_one(pattern: str, name: str) -> list[str]:
    out: list[str] = []
    for path in braceexpand.braceexpand(os.path.expanduser(pattern)):
        if _is_remote(path):
            out.append(path)
        elif os.path.isdir(path):
            out += _folder_shards(path, name)
        elif glob.has_magic(path):
            found = sorted(glob.glob(path))
            if not found:
                raise FileNotFoundError(f"{name}: pattern '{pattern}' matches no file")
            out += found
        elif not os.path.isfile(path):
            raise FileNotFoundError(
                f"{name}: shard '{path}' does not exist (from pattern '{pattern}')"
            )
        else:
            out.append(path)
    return out


def _folder_shards(path: str, name: str) -> list[str]:
    """Every shard of a folder (``SHARD_SUFFIXES``), with a warning listing what else it holds
    (e.g. ``.tar.zst``, which the tar reader cannot open)."""
    files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    found = [os.path.join(path, f) for f in files if f.endswith(SHARD_SUFFIXES)]
    ignored = [f for f in files if not f.endswith(SHARD_SUFFIXES) and f != "summary.json"]
    if not found:
        kinds = ", ".join(f"*{suffix}" for suffix in SHARD_SUFFIXES)
        raise FileNotFoundError(f"{name}: directory '{path}' holds no shard ({kinds})")
    if ignored:
        log.warning(
            "%s: %d file(s) in '%s' are not shards and are not read: %s", name, len(ignored),
            path, ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""),
        )  # fmt: skip
    return found


def any_shard_exists(patterns: str | Sequence[str] | None) -> bool:
    """Does any path of ``patterns`` exist (a file, a glob match, a directory with a ``*.tar``)?
    Remote urls count as existing. Used to tell "matches nothing" from "partly missing"."""
    if patterns is None:
        return False
    items = [patterns] if isinstance(patterns, str | Path) else list(patterns)
    for pattern in items:
        for path in braceexpand.braceexpand(os.path.expanduser(str(pattern))):
            if _is_remote(path) or os.path.isfile(path):
                return True
            if os.path.isdir(path) and any(f.endswith(SHARD_SUFFIXES) for f in os.listdir(path)):
                return True
            if glob.has_magic(path) and glob.glob(path):
                return True
    return False


def resolve_shards(patterns: str | Sequence[str] | None, name: str = "shards") -> list[str]:
    """Expand ``patterns`` to a list of shard urls; raise naming ``name`` if any part is empty."""
    if patterns is None or (not isinstance(patterns, str) and not list(patterns)):
        raise ValueError(f"{name}: no shard pattern given")
    items = [patterns] if isinstance(patterns, str | Path) else list(patterns)
    shards: list[str] = []
    for pattern in items:
        shards += _expand_one(str(pattern), name)
    duplicates = sorted({s for s in shards if shards.count(s) > 1})
    if duplicates:
        raise ValueError(f"{name}: shards listed more than once: {duplicates[:5]}")
    return shards


def check_shard_count(
    shards: Sequence[str], world_size: int, num_workers: int, name: str, train: bool
) -> None:
    """Fail before training when some rank (train: some worker) would get no shard."""
    workers = max(1, num_workers)
    needed = world_size * workers if train else world_size
    if len(shards) >= needed:
        return
    what = f"{world_size} rank(s) x {workers} worker(s)" if train else f"{world_size} rank(s)"
    raise ValueError(
        f"{name}: {len(shards)} shard(s) for {what}; every {'worker' if train else 'rank'} "
        f"needs at least one shard, so at least {needed} are needed. Write more, smaller "
        f"shards (`diva-cli prepare --max_count ...`) or lower num_workers / the device count."
    )


def split_shards(
    shards: Sequence[str], rank: int, world_size: int, worker: int, num_workers: int
) -> list[str]:
    """The shards of (rank, worker): ``shards[rank::world_size][worker::num_workers]``."""
    return list(shards)[rank::world_size][worker :: max(1, num_workers)]


def probe_first_sample(url: str, stream_timeout: float | None = None) -> dict | None:
    """Raw members of the first sample of shard ``url`` (None if it yields none); a streamed
    shard is bounded by ``stream_timeout`` like the loader's."""
    counter = SkipCounter()
    opened = iter([{"url": bounded_stream(url, stream_timeout)}])
    samples = wds.tarfile_to_samples(handler=TarErrorHandler(counter))(opened)
    try:
        return next(iter(samples), None)
    finally:
        samples.close()


def check_codes_tokenizer(shards: Sequence[str], adapter, split: str) -> None:
    """Refuse codes written by another image tokenizer than ``adapter``'s: the
    ``summary.json`` beside each local shard folder records the tokenizer's class and weight
    hash (``diva-cli prepare``). Folders without that record are reported, not refused."""
    folders = sorted({os.path.dirname(s) for s in shards if not _is_remote(s)})
    own = None
    for folder in folders:
        summary = Path(folder) / "summary.json"
        try:
            recorded = json.loads(summary.read_text())["codes"]["tokenizer"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s_shards: %s records no image tokenizer; the codes are not checked "
                        "against %s's", split, summary, type(adapter).__name__)  # fmt: skip
            continue
        own = own or tokenizer_identity(adapter.vq)
        if recorded != own:
            raise ValueError(
                f"{split}_shards: {summary} says the codes were written by the image tokenizer "
                f"{recorded.get('class')} (weights {str(recorded.get('sha256'))[:12]}), but the "
                f"backbone {type(adapter).__name__} has {own['class']} (weights "
                f"{own['sha256'][:12]}). Re-run `diva-cli prepare` with this backbone, or set "
                "data check_tokenizer: false to use them anyway."
            )
