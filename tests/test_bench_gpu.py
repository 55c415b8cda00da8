"""The GPU benchmark's code path on CPU (``--tiny``), and its FLOP formula against PyTorch's
own FLOP counter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


def test_tiny_run_reports_throughput_mfu_and_the_stage2_ratio(tmp_path):
    out = tmp_path / "gpu.json"
    args = ["--tiny", "--steps", "1", "--warmup", "0", "--rounds", "1", "--peak-tflops", "1"]
    report = bench_gpu.main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["arms"].keys() == {"sft", "stage2"}
    for arm in report["arms"].values():
        assert arm["tokens_per_s"] > 0 and arm["mfu"] > 0 and arm["peak_gib"] is None
    assert "stage 2 / SFT: step x" in report["text"]
    # the planner's prediction for the capped ZeRO runs is computed by the same code on CPU
    assert set(report["planned_gib"]) == {2, 3}
    assert all(0 < gib < 1 for gib in report["planned_gib"].values())  # a tiny model


def test_model_flops_match_pytorchs_flop_counter():
    """The formula's matmuls against PyTorch's count of the SFT step's (its CPU attention
    kernel is not counted there, so the attention term is left out of the comparison)."""
    module, spec = bench_gpu.build("tiny", "sft", "cpu", "float32")
    batch = bench_gpu.batch_of(module, spec["batch"], "cpu")
    with FlopCounterMode(display=False) as counter:
        sum(module.loss_terms(batch).values()).backward()
    parts = bench_gpu.step_flops(module, batch, padded=True)
    formula = parts["blocks"] + parts["head"]
    assert formula == pytest.approx(counter.get_total_flops(), rel=0.1)
    assert parts["attention"] > 0
