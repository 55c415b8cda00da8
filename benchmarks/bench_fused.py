"""Fused flows vs two forwards: training-step time of the same stage, side by side.

Both flows of a batch as one forward of stacked rows (``fused_flows: true``) against one forward
per flow (the default), for SFT and stage 2 with EMA targets, on backbones that can fuse
(Emu3-style token layouts). Each (shape, arm, mode) times ``--steps`` optimizer steps after
``--warmup`` in this process, in alternating order over ``--rounds`` rounds; each keeps its
fastest round's median step (a shared machine only slows a run down). The ratio fused / two is what decides
the default.

    python benchmarks/bench_fused.py [--shapes tiny medium] [--device cpu] [--rounds 3]

Shapes: ``tiny`` = the embedded default's Emu3 (8 blocks of 64, 64 image tokens, batch 8);
``medium`` = an Emu3 of hidden 512, 12 blocks, 8 heads, MLP 2048, 256 image tokens (batch 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import OnlineAsEMA, random_encoders, synthetic_batch

SHAPES = {
    "tiny": {"batch": 8, "middle": (3, 6), "text": {}, "image_size": 32},
    "medium": {
        "batch": 2,
        "middle": (5, 8),
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "num_key_value_heads": 8},
        "image_size": 64,
    },
}  # fmt: skip
ARMS = ("sft", "ema")


def build(shape: str, arm: str):
    import torch

    from diva_lightning.backbones.emu3 import Emu3Adapter
    from diva_lightning.stages import SFT, Stage2

    spec = SHAPES[shape]
    torch.manual_seed(0)
    backbone = Emu3Adapter.tiny(text_config=spec["text"], image_size=spec["image_size"])
    middle = spec["middle"]
    if arm == "sft":
        module = SFT(backbone, middle_layers=middle, trainable_layers=middle)
    else:
        encoders = random_encoders(backbone.hidden_size, middle)
        module = Stage2(backbone, stage1_encoders=encoders, middle_layers=middle, ramp_steps=0,
                        critic_hidden=64, targets="ema")  # fmt: skip
        module.ema = OnlineAsEMA()  # the teacher replay runs as under the EMA callback
    module.configure_trainable()
    backbone.train()
    return module, synthetic_batch(backbone, spec["batch"])


def time_steps(module, batch, fused: bool, steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step (forward, backward, AdamW) after ``warmup``."""
    import torch

    module.fused_flows = fused
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        terms = module.loss_terms(batch)
        sum(terms.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/fused.json")
    args = parser.parse_args()
    best: dict = {}
    for shape in args.shapes:
        for arm in ARMS:
            module, batch = build(shape, arm)
            for round_ in range(args.rounds):
                for fused in (False, True) if round_ % 2 == 0 else (True, False):
                    steps = time_steps(module, batch, fused, args.steps, args.warmup)
                    mean = statistics.median(steps)
                    key = f"{shape}/{arm}/{'fused' if fused else 'two'}"
                    best[key] = min(best.get(key, mean), mean)
                    print(f"  {key} round {round_}: {1000 * mean:.1f} ms/step", flush=True)
    lines = [f"fused flows vs two forwards (best median of {args.rounds} rounds, "
             f"{args.steps} steps each)", f"{'shape/arm':<14}{'two (ms)':>10}{'fused (ms)':>12}"
             f"{'fused/two':>11}"]  # fmt: skip
    for shape in args.shapes:
        for arm in ARMS:
            two, fused = best[f"{shape}/{arm}/two"], best[f"{shape}/{arm}/fused"]
            lines.append(f"{shape + '/' + arm:<14}{1000 * two:>10.1f}{1000 * fused:>12.1f}"
                         f"{fused / two:>11.2f}")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"best_mean_s": best, "report": text}, indent=1))


if __name__ == "__main__":
    main()
