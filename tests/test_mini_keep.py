"""DIVA-mini's artifacts survive a new checkout: ``keep save`` copies the base's and the finished
runs' small files into the repository with the hashes of their weights, ``keep restore`` puts
them back without overwriting."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import torch

from benchmarks.mini.keep import restore, save


def write(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_save_keeps_records_and_weight_hashes_but_no_weights_and_restore_puts_them_back(
    tmp_path, capsys
):
    runs, kept = tmp_path / "runs", tmp_path / "kept"
    base = runs / "base-abc"
    for name in ("config.json", "tokenizer.pt", "base/model/model.safetensors",
                 "base/analysis/divergence.json", "base/probes.json", "shards/train/s.tar"):  # fmt: skip
        write(base / name)
    done = runs / "v2/final/Base_SFT/seed0"
    for name in ("record.json", "gradient_balance.json", "model/w.safetensors"):
        write(done / name)
    images = torch.rand(64, 3, 8, 8)
    torch.save(images[:4], done / "samples.pt")  # a view: saving it drags all 64 images
    write(runs / "v2/final/Base_SFT/seed1/samples.pt")  # unfinished: no record.json
    write(runs / "base-unbuilt/tokenizer.pt")  # a base still training: nothing kept
    stage1 = base / "stage1-v2/stage1-1234"
    write(stage1 / "seed0/stage1_encoders/factors.json")
    write(stage1 / "seed0/overrides.json")
    write(stage1 / "seed0/logs/events")  # logs stay behind
    write(stage1 / "seed1.partial/stage1_encoders/factors.json")  # interrupted: not kept
    assert save(runs, kept) == 9
    assert files(kept) == {
        "base-abc/config.json", "base-abc/tokenizer.pt",  # not the base's weights (8 MB)
        "base-abc/base/analysis/divergence.json", "base-abc/base/probes.json",
        "base-abc/stage1-v2/stage1-1234/seed0/stage1_encoders/factors.json",
        "base-abc/stage1-v2/stage1-1234/seed0/overrides.json",
        "v2/final/Base_SFT/seed0/record.json", "v2/final/Base_SFT/seed0/samples.pt",
        "v2/final/Base_SFT/seed0/gradient_balance.json", "weights.sha256",
    }  # fmt: skip
    base_weights = "base-abc/base/model/model.safetensors"  # not kept: their hashes are
    weights = "v2/final/Base_SFT/seed0/model/w.safetensors"
    digest = hashlib.sha256(b"x").hexdigest()
    manifest = f"{digest}  {base_weights}\n{digest}  {weights}\n"
    assert (kept / "weights.sha256").read_text() == manifest
    check = subprocess.run(["sha256sum", "-c", kept / "weights.sha256"], cwd=runs)
    assert check.returncode == 0  # the format sha256sum checks a rebuilt run against
    kept_samples = kept / "v2/final/Base_SFT/seed0/samples.pt"
    torch.testing.assert_close(torch.load(kept_samples), images[:4])
    assert kept_samples.stat().st_size < (done / "samples.pt").stat().st_size / 8
    fresh = tmp_path / "fresh"
    base_records = {"base-abc/base/analysis/divergence.json", "base-abc/base/probes.json"}
    assert restore(kept, fresh) == 7  # not the base's records: they would pass for a cached base
    assert files(fresh) == files(kept) - {"weights.sha256"} - base_records
    assert "benchmarks.mini.base --mode v2" in capsys.readouterr().out  # how to rebuild it
    write(fresh / "v2/final/Base_SFT/seed0/record.json", "newer")
    (fresh / "base-abc/tokenizer.pt").unlink()
    assert restore(kept, fresh) == 1  # only the missing file; the newer record stays
    assert (fresh / "v2/final/Base_SFT/seed0/record.json").read_text() == "newer"
    assert save(fresh, kept) == 5  # no base and no weights in `fresh`: the hashes stay
    assert (kept / "weights.sha256").read_text() == manifest
