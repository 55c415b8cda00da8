"""Stage-2 step time and peak memory: DIVA (Stage2) vs SFT on the tiny backbone, side by side.

Each arm runs in its own subprocess (so peak memory is that arm's alone): build the tiny Emu3
backbone, run ``--warmup`` then ``--steps`` optimizer steps on identical synthetic batches, and
report the median step time and the peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS). Usage: ``python benchmarks/bench_stages.py [--steps 20] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def synthetic_batch(batch_size: int, device: str):
    import torch

    from diva_lightning.data import DualFlowBatch

    g = torch.Generator().manual_seed(0)
    return DualFlowBatch(
        keys=[str(i) for i in range(batch_size)],
        captions=["a red circle at the top left and a blue square at the center."] * batch_size,
        prompts=["Please describe this image in detail."] * batch_size,
        pixels=torch.rand(batch_size, 3, 32, 32, generator=g),
        codes=None,
        gen_mask=torch.rand(batch_size, 64, generator=g) < 0.4,
    ).to(device)


def run_arm(arm: str, steps: int, warmup: int, batch_size: int, device: str) -> dict:
    import torch

    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.objectives import FactorEncoders
    from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders
    from diva_lightning.stages import SFT, Stage2

    torch.manual_seed(0)
    backbone = Emu3Adapter.tiny().to(device)
    if arm == "sft":
        module = SFT(backbone, middle_layers=(3, 6))
    else:
        enc = FactorEncoders(backbone.hidden_size, shared_dim=64)
        path = save_factor_encoders(
            Path(tempfile.mkdtemp()) / "enc", enc, factor_config(enc, [3, 6])
        )
        module = Stage2(backbone, stage1_encoders=str(path), middle_layers=(3, 6), ramp_steps=0)
    module = module.to(device)
    module.configure_trainable()
    module.backbone.train()
    optimizer = torch.optim.AdamW([p for g in module.param_groups() for p in g["params"]], lr=1e-4)
    batch = synthetic_batch(batch_size, device)
    step = module.training_step
    module.log = lambda *a, **k: None  # no trainer attached
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step(batch, i) if arm == "sft" else module.diva_losses(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"arm": arm, "median_step_s": statistics.median(times), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arm", choices=["sft", "diva"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.steps, args.warmup, args.batch_size, args.device)))
        return
    results = {}
    for arm in ("sft", "diva"):
        cmd = [
            sys.executable,
            __file__,
            "--arm",
            arm,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[arm] = json.loads(out.strip().splitlines()[-1])
    sft, diva = results["sft"], results["diva"]
    print(
        f"stage-2 step on the tiny backbone ({args.device}, batch {args.batch_size}, {args.steps} steps)"
    )
    print(f"{'arm':<6} {'median step (ms)':>18} {'peak memory (MiB)':>18}")
    for r in (sft, diva):
        print(f"{r['arm']:<6} {1000 * r['median_step_s']:>18.1f} {r['peak_mib']:>18.1f}")
    print(
        f"DIVA / SFT: step time x{diva['median_step_s'] / sft['median_step_s']:.2f}, "
        f"peak memory x{diva['peak_mib'] / sft['peak_mib']:.2f}"
    )


if __name__ == "__main__":
    main()
