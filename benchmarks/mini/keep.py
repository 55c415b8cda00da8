"""Keep DIVA-mini's run artifacts in the repository, and put them back.

    python -m benchmarks.mini.keep save      # runs/mini -> docs/mini/v2/kept (small files only)
    python -m benchmarks.mini.keep restore   # docs/mini/v2/kept -> runs/mini

``runs/`` is not versioned, and a new checkout starts without it: the final phase's records
and the base it post-trains (80 minutes to rebuild on 2 cores) would be lost between sessions.
``save`` copies what the report and a resumed phase need: the base's tokenizer, weights,
analysis, curves and probes, each finished stage-1 run's encoders (shared by the DIVA arms of
its seed), and each finished run's ``record.json``, ``gradient_balance.json`` and
``samples.pt`` (re-saved compact: the run's file is a view that drags the storage of all its
generated images, 6.8 MB instead of 0.2 MB). It leaves out the shards (217 MB, rebuilt from the
tokenizer in a minute) and the post-trained models (7.7 MB a run, 300 MB for the final phase);
of the models it records the SHA-256 in ``weights.sha256`` (``sha256sum`` format, paths under
``runs/mini``), so that a run rebuilt from the kept base and the protocol's commit is checked
bit for bit: ``cd runs/mini && sha256sum -c ../../docs/mini/v2/kept/weights.sha256``.

``restore`` copies the kept files back without overwriting anything already there, so the
protocol reuses the base (its cache is keyed by the settings' hash) and skips every finished
run.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import torch

KEPT = Path("docs/mini/v2/kept")
BASE_FILES = ("config.json", "tokenizer.pt", "base/model", "base/analysis/divergence.json",
              "base/facts.json", "base/plateau.json", "base/probes.json", "base/logs/metrics.csv")  # fmt: skip
STAGE1_FILES = ("stage1_encoders", "overrides.json")  # shared by the DIVA arms of a seed
RUN_FILES = ("record.json", "gradient_balance.json", "samples.pt")
MANIFEST = "weights.sha256"


def _copy(src: Path, dst: Path, overwrite: bool) -> bool:
    if not src.exists() or (dst.exists() and not overwrite):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return True
    partial = dst.with_name(dst.name + ".partial")
    if src.name == "samples.pt":
        torch.save(torch.load(src, weights_only=True).clone(), partial)  # (n, 3, H, W)
    else:
        shutil.copyfile(src, partial)
    partial.rename(dst)
    return True


def pairs(runs: Path, mode: str = "v2"):
    """(path under runs/mini, path under kept) of every file ``save`` keeps."""
    for root in sorted(runs.glob("base-*")):
        if (root / "base" / "model").exists():
            for name in BASE_FILES:
                yield root / name, Path(root.name) / name
        for seed in sorted(root.glob("stage1-*/stage1-*/seed*[0-9]")):  # finished stage-1 runs
            for name in STAGE1_FILES:
                yield seed / name, (seed / name).relative_to(runs)
    for record in sorted((runs / mode).glob("*/*/seed*/record.json")):
        for name in RUN_FILES:
            src = record.parent / name
            yield src, src.relative_to(runs)


def save(runs: Path, kept: Path) -> int:
    """Copies finished artifacts (a kept file is refreshed) and records the finished runs'
    weight hashes -> the number of files copied."""
    copied = sum(_copy(src, kept / rel, overwrite=True) for src, rel in pairs(runs))
    write_manifest(runs, kept / MANIFEST)
    return copied


def write_manifest(runs: Path, path: Path, mode: str = "v2") -> None:
    """Adds the SHA-256 of every finished run's weights to ``path`` (entries of runs whose
    weights are gone, as after a ``restore``, are kept as they were)."""
    entries = {}
    if path.exists():
        entries = dict(reversed(line.split("  ", 1)) for line in path.read_text().splitlines())
    for record in sorted((runs / mode).glob("*/*/seed*/record.json")):
        for weights in sorted((record.parent / "model").rglob("*.safetensors")):
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            entries[str(weights.relative_to(runs))] = digest
    if entries:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(f"{h}  {name}\n" for name, h in sorted(entries.items())))
        partial.rename(path)


def restore(kept: Path, runs: Path) -> int:
    """Copies kept files back, never over a file that is there -> the number copied."""
    files = [p for p in sorted(kept.rglob("*")) if p.is_file() and p.name != MANIFEST]
    return sum(_copy(p, runs / p.relative_to(kept), overwrite=False) for p in files)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("--runs", default="runs/mini")
    parser.add_argument("--kept", default=str(KEPT))
    args = parser.parse_args(argv)
    runs, kept = Path(args.runs), Path(args.kept)
    if args.action == "save":
        print(f"kept {save(runs, kept)} files under {kept}")
    else:
        print(f"restored {restore(kept, runs)} files under {runs}")


if __name__ == "__main__":
    main()
