"""Stage-2 step time and peak memory, side by side: SFT, Stage 2 with online targets, with EMA
targets, and with ``balance: cap``, on the tiny backbone and on a medium Show-o shape.

Each (shape, arm) runs in its own subprocess (so peak memory is that arm's alone) through a
Lightning ``Trainer`` as a user's run would: the same synthetic batch every step, the ``EMA``
callback in every arm (the paper evaluates every arm with EMA weights), gradient clip 1.0.
Step time is the wall time between consecutive ``on_train_batch_end`` calls after ``--warmup``
steps; the mean is what a run pays, the median the typical step. ``balance: cap`` measures its
scale every ``--balance-every`` steps in the timed window (so a short run sees several
measurements), and each measurement is also timed alone. Between measurements a ``cap`` step
runs the same operations as an ``ema`` step (plus one scalar product), so its row reports the
``ema`` mean plus one measurement per ``Stage2``'s default ``balance_every`` steps; the directly
timed mean of the ``cap`` run (many more measurements) is printed under the table. Arms run in ``--rounds`` rounds in
alternating order and each arm keeps its fastest round (a shared machine only ever slows a run
down). Peak memory is tensor memory: after the timed steps one more step (for ``cap``, one that
measures its scale) runs under ``torch.profiler`` with memory profiling, and its peak is added
to what lives between steps (parameters, optimizer states, EMA weights); on CUDA it is
``max_memory_allocated``. Process RSS, which includes torch itself, is reported beside it.

    python benchmarks/bench_stages.py [--shapes tiny medium] [--device cpu] [--rounds 2]

Shapes: ``tiny`` = the embedded default's tiny Emu3 (8 blocks of width 64, 64 image tokens,
middle/trainable blocks 3..6); ``medium`` = Show-o (Phi) with hidden 512, 12 blocks, 8 heads,
256 image tokens (16 x 16), 4 middle/trainable blocks (5..8).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("sft", "online", "ema", "cap")
SHAPES = {
    "tiny": {"batch": 8, "steps": 20, "warmup": 3, "middle": (3, 6)},
    "medium": {"batch": 2, "steps": 10, "warmup": 2, "middle": (5, 8)},
    # real vocabularies (--real): 12 Llama-style blocks of 512, 256 image tokens
    "showo-vocab": {"batch": 2, "steps": 3, "warmup": 1, "vocab": 58498},
    "liquid-vocab": {"batch": 2, "steps": 3, "warmup": 1, "vocab": 264192},
}
REAL_SHAPES = ("showo-vocab", "liquid-vocab")
# middle (= trained) blocks for 2, 6 and 11 middle layers; SFT trains the same blocks
REAL_LAYERS = {2: (5, 6), 6: (3, 8), 11: (1, 11)}
REAL_ARMS = tuple(f"{arm}@{n}" for n in REAL_LAYERS for arm in ("sft", "stage1", "online", "ema"))
MEDIUM_LLAMA = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
MEDIUM_PHI = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
}


def build_backbone(shape: str):
    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.backbones.showo import ShowoAdapter

    if shape == "tiny":
        return Emu3Adapter.tiny()
    if shape in REAL_SHAPES:  # the LM head and embedding at the real vocabulary's width
        backbone = Emu3Adapter.tiny(text_config=MEDIUM_LLAMA, image_size=64)
        backbone.model.resize_token_embeddings(SHAPES[shape]["vocab"], mean_resizing=False)
        return backbone
    return ShowoAdapter(config_overrides={"phi": MEDIUM_PHI, "image_size": 64})


def synthetic_batch(backbone, batch_size: int):
    import torch

    from diva_lightning.data import DualFlowBatch

    g = torch.Generator().manual_seed(0)
    n = backbone.tokens_per_image
    return DualFlowBatch(
        keys=[str(i) for i in range(batch_size)],
        captions=["a red circle at the top left and a blue square at the center."] * batch_size,
        prompts=["Please describe this image in detail."] * batch_size,
        codes=torch.randint(0, backbone.codebook_size, (batch_size, n), generator=g),
        gen_mask=torch.rand(batch_size, n, generator=g) < 0.4,
    )


def build_module(arm: str, backbone, middle: tuple[int, int], balance_every: int):
    from diva_lightning.objectives import FactorEncoders
    from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders
    from diva_lightning.stages import SFT, Stage1, Stage2

    if "@" in arm:  # real-vocabulary arms: "<arm>@<middle layers>"
        arm, count = arm.split("@")
        middle = REAL_LAYERS[int(count)]
    if arm == "sft":
        return SFT(backbone, middle_layers=middle, trainable_layers=middle, lr=1e-4,
                   warmup_steps=1)  # fmt: skip
    if arm == "stage1":
        return Stage1(backbone, middle_layers=middle, shared_dim=64, lr=1e-4, warmup_steps=1,
                      shared_only_steps=0)  # fmt: skip
    enc = FactorEncoders(backbone.hidden_size, shared_dim=64)
    layers = list(range(middle[0], middle[1] + 1))
    path = save_factor_encoders(Path(tempfile.mkdtemp()) / "enc", enc, factor_config(enc, layers))
    options = {"online": {"targets": "online"}, "ema": {}, "cap": {"balance": "cap"}}[arm]
    return Stage2(
        backbone, stage1_encoders=str(path), middle_layers=middle, ramp_steps=0, lr=1e-4,
        warmup_steps=1, balance_every=balance_every, critic_hidden=64, **options,
    )  # fmt: skip


def run_arm(shape: str, arm: str, device: str, balance_every: int) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from diva_lightning.stages.ema import EMA

    spec = SHAPES[shape]
    torch.manual_seed(0)
    backbone = build_backbone(shape)
    module = build_module(arm, backbone, spec.get("middle"), balance_every)
    total = spec["warmup"] + spec["steps"]
    batches = DataLoader([synthetic_batch(backbone, spec["batch"])] * total, batch_size=None)
    ends: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *args):
            if device == "cuda":
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ema = EMA()
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=total, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
        callbacks=[ema, Clock()], num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tempfile.mkdtemp(),  # stage 1 writes its encoders there, not in cwd
    )  # fmt: skip
    measurements: list[float] = []
    if arm == "cap":
        measure = module.measure_balance_scale

        def timed_measure(terms):
            start = time.perf_counter()
            scale = measure(terms)
            measurements.append(time.perf_counter() - start)
            return scale

        module.measure_balance_scale = timed_measure
    trainer.fit(module, batches)
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)][spec["warmup"] - 1 :]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        batch = synthetic_batch(backbone, spec["batch"])
        peak = tensor_peak_mib(module, batch, trainer.optimizers[0], ema, arm)
    return {
        "shape": shape,
        "arm": arm,
        "steps": len(steps),
        "mean_step_s": statistics.fmean(steps),
        "median_step_s": statistics.median(steps),
        "peak_mib": peak,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "balance_scale": getattr(module, "balance_scale", None),
        "measurement_s": statistics.median(measurements) if measurements else None,
    }


def tensor_peak_mib(module, batch, optimizer, ema, arm: str) -> float:
    """Peak tensor memory of one training step on CPU: what lives between steps (parameters,
    optimizer states, EMA weights) plus the step's own peak from the profiler's memory timeline.
    """
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    states = [v for state in optimizer.state.values() for v in state.values()]
    resident = nbytes(module.parameters()) + nbytes(states) + nbytes(ema.shadow.values())
    optimizer.zero_grad(set_to_none=True)
    kwargs = dict(profile_memory=True, record_shapes=True, with_stack=True)
    with profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
        if arm.startswith("sft"):
            loss = sum(module.loss_terms(batch).values())
        elif arm.startswith("stage1"):
            loss = module.diva_losses(batch)["loss"]
        else:
            terms = module.diva_losses(batch)
            if arm == "cap":
                module.measure_balance_scale(terms)
            loss = module.total(terms)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(module)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return (resident + float(np.asarray(sizes).sum(1).max())) / 2**20


def report(results: dict, args) -> str:
    from diva_lightning.stages import Stage2

    lines = [f"stage-2 step time and peak tensor memory ({args.device}, EMA callback in every "
             f"arm, balance_every {args.balance_every}, best of {args.rounds} rounds)"]  # fmt: skip
    for shape in args.shapes:
        spec = SHAPES[shape]
        rows = results[shape]
        sft, ema = rows["sft"], rows["ema"]
        lines += [
            "",
            f"{shape}: batch {spec['batch']}, {spec['steps']} timed steps after {spec['warmup']}",
            f"{'arm':<8}{'mean step (ms)':>15}{'median':>9}{'x SFT':>7}{'x ema':>7}"
            f"{'peak (MiB)':>12}{'x SFT':>7}{'x ema':>7}{'RSS (MiB)':>11}",
        ]
        for arm in ARMS:
            r = dict(rows[arm])
            if arm == "cap":  # an ema step, plus one measurement per default interval
                every = inspect.signature(Stage2).parameters["balance_every"].default
                r["mean_step_s"] = ema["mean_step_s"] + r["measurement_s"] / every
                r["median_step_s"] = ema["median_step_s"] + r["measurement_s"] / every
                arm = f"cap/{every}"
            lines.append(
                f"{arm:<8}{1000 * r['mean_step_s']:>15.1f}{1000 * r['median_step_s']:>9.1f}"
                f"{r['mean_step_s'] / sft['mean_step_s']:>7.2f}"
                f"{r['mean_step_s'] / ema['mean_step_s']:>7.2f}{r['peak_mib']:>12.1f}"
                f"{r['peak_mib'] / sft['peak_mib']:>7.2f}{r['peak_mib'] / ema['peak_mib']:>7.2f}"
                f"{r['rss_mib']:>11.1f}"
            )
        cap = rows["cap"]
        lines.append(
            f"one balance measurement: {1000 * cap['measurement_s']:.0f} ms "
            f"({cap['measurement_s'] / ema['mean_step_s']:.2f} ema steps); the cap run itself, "
            f"measuring every {args.balance_every} steps: {1000 * cap['mean_step_s']:.1f} ms "
            f"mean (x{cap['mean_step_s'] / ema['mean_step_s']:.2f} ema)"
        )
    return "\n".join(lines)


def report_real(results: dict, args) -> str:
    """The real-vocabulary table: per middle-layer count, each arm against SFT on the same
    trained blocks, with the goals (stage 2 <= 1.10x step and <= 1.05x peak; stage 1 <= 0.7x
    step)."""
    lines = [f"real vocabularies ({args.device}; best of {args.rounds} rounds; 12 blocks of "
             "512, 256 image tokens; SFT trains the same blocks as the middle range)"]  # fmt: skip
    for shape in REAL_SHAPES:
        rows = results.get(shape)
        if not rows:
            continue
        lines += ["", f"{shape} (vocabulary {SHAPES[shape]['vocab']:,}, batch "
                  f"{SHAPES[shape]['batch']})", f"{'layers':<8}{'SFT ms':>9}{'SFT MiB':>9}"
                  + "".join(f"{a + ' step':>13}{a + ' peak':>13}" for a in ("stage1", "online", "ema"))]  # fmt: skip
        for count in REAL_LAYERS:
            sft = rows[f"sft@{count}"]
            cells = "".join(
                f"{rows[f'{a}@{count}']['mean_step_s'] / sft['mean_step_s']:>12.2f}x"
                f"{rows[f'{a}@{count}']['peak_mib'] / sft['peak_mib']:>12.2f}x"
                for a in ("stage1", "online", "ema")
            )
            lines.append(
                f"{count:<8}{1000 * sft['mean_step_s']:>9.0f}{sft['peak_mib']:>9.0f}{cells}"
            )
    lines.append("goals: stage 2 (online, ema) <= 1.10x SFT step and <= 1.05x its peak; "
                 "stage 1 <= 0.70x SFT step")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "medium"], choices=list(SHAPES))
    parser.add_argument("--real", action="store_true",
                        help="real vocabularies: SFT, stage 1 and stage 2 at 2, 6, 11 layers")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--balance-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/stages.json", help="results JSON")
    parser.add_argument("--report-only", action="store_true", help="re-render --out's results")
    parser.add_argument("--arm", choices=ARMS + REAL_ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.shape, args.arm, args.device, args.balance_every)))
        return
    render = report_real if args.real else report
    if args.real:
        args.shapes = list(REAL_SHAPES)
        if args.out == parser.get_default("out"):
            args.out = "runs/bench/stages-real.json"
    if args.report_only:
        print(render(json.loads(Path(args.out).read_text())["results"], args))
        return
    arms = REAL_ARMS if args.real else ARMS
    results: dict = {}
    for shape in args.shapes:
        for round_ in range(args.rounds):
            for arm in arms if round_ % 2 == 0 else arms[::-1]:
                cmd = [sys.executable, __file__, "--shape", shape, "--arm", arm, "--device",
                       args.device, "--balance-every", str(args.balance_every)]  # fmt: skip
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                print(f"  {shape}/{arm} round {round_}: {1000 * row['mean_step_s']:.1f} ms/step, "
                      f"{row['peak_mib']:.1f} MiB", flush=True)  # fmt: skip
                best = results.setdefault(shape, {}).get(arm)
                if best is None or row["mean_step_s"] < best["mean_step_s"]:
                    results[shape][arm] = row
    text = render(results, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "report": text}, indent=1))


if __name__ == "__main__":
    main()
