"""Keep DIVA-mini's run artifacts in the repository, and put them back.

    python -m benchmarks.mini.keep save      # runs/mini -> docs/mini/v2/kept (small files only)
    python -m benchmarks.mini.keep restore   # docs/mini/v2/kept -> runs/mini

``runs/`` is not versioned, and a new checkout starts without it: the final phase's records
would be lost between sessions. ``save`` copies what the report and a resumed phase need: the
base's tokenizer, analysis, curves and probes, each finished stage-1 run's encoders (shared by
the DIVA arms of its seed), and each finished run's ``record.json``, ``gradient_balance.json``
and ``samples.pt`` (re-saved compact: the run's file is a view that drags the storage of all
its generated images, 6.8 MB instead of 0.2 MB). It leaves out the shards (217 MB, rebuilt
from the tokenizer in a minute) and all model weights: the base's (8 MB) and the post-trained
runs' (7.7 MB a run). Of the weights it records the SHA-256 in ``weights.sha256``
(``sha256sum`` format, paths under ``runs/mini``), so that a rebuilt base or run is checked
bit for bit: ``cd runs/mini && sha256sum -c ../../docs/mini/v2/kept/weights.sha256``.

``restore`` copies the kept files back without overwriting anything already there, so the
protocol skips every finished run. It leaves out the base's own records (``base-*/base/``):
without its weights the protocol would take that folder for a cached base. The base is rebuilt
by ``python -m benchmarks.mini.base --mode v2 --probe-every 1000`` (80 minutes on 2 cores, from
the protocol's commit), which writes those records again.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import torch

KEPT = Path("docs/mini/v2/kept")
BASE_FILES = ("config.json", "tokenizer.pt", "base/analysis/divergence.json",
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
    """Adds the SHA-256 of the base's and every finished run's weights to ``path`` (entries
    whose weights are gone, as after a ``restore``, are kept as they were)."""
    entries = {}
    if path.exists():
        entries = dict(reversed(line.split("  ", 1)) for line in path.read_text().splitlines())
    models = [r.parent / "model" for r in sorted((runs / mode).glob("*/*/seed*/record.json"))]
    models += sorted(runs.glob("base-*/base/model"))
    for model in models:
        for weights in sorted(model.rglob("*.safetensors")):
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
    base_records = [p for p in files if p.relative_to(kept).parts[1:2] == ("base",)]
    if base_records:
        print("the base's weights are not kept: rebuild the base with `python -m "
              "benchmarks.mini.base --mode v2 --probe-every 1000` (its records are in "
              f"{kept}; the rebuild writes them again)")  # fmt: skip
    files = [p for p in files if p not in base_records]
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
