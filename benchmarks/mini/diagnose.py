"""Why DIVA did or did not help: the gradient each stage-2 term puts on the trainable blocks.

    python -m benchmarks.mini.diagnose --run runs/mini/full

On the base checkpoint, with the stage-1 encoders of a finished Base+DIVA run, over a few
training batches: the norm of the gradient of the native losses (what SFT follows), of
``lambda_sha (L_U->G + L_G->U)`` and of ``lambda_uni L_uni`` (at their final weights), the cosine
between the alignment and native gradients (negative: the alignment pulls against captioning
and inpainting; near 0: it spends the step on directions they do not need), and how often the
step's total gradient norm exceeds the clip (1.0), which then shrinks the native part too.
The gradients are those of the library's ``GradientBalance`` callback (``measure``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.mini.backbone import load_base
from benchmarks.mini.config import ARMS, MODES, MiniConfig
from benchmarks.mini.train import loaders, stage1_key
from diva_lightning.stages import Stage2
from diva_lightning.stages.balance import GradientBalance, cosine


def term_gradients(module: Stage2, batch, clip: float = 1.0) -> dict[str, float]:
    """The stage's per-term gradient figures on ``batch`` (``GradientBalance.measure``)."""
    stats = GradientBalance.measure(module, batch, clip)
    return {
        "native_norm": stats["norm/native"],
        "alignment_norm": stats["norm/alignment"],
        "unique_norm": stats["norm/uni"],
        "cos_alignment_native": cosine(stats, "alignment", "native"),
        "cos_unique_native": cosine(stats, "uni", "native"),
        "diva_clipped": float(stats["norm/total"] > clip),
        "sft_clipped": float(stats["norm/native"] > clip),
        "native_share_after_clip": stats["clipped_norm/native"],
        "sft_norm_after_clip": min(clip, stats["norm/native"]),
    }


def diagnose(cfg: MiniConfig, run_dir: Path, batches: int = 8, seed: int = 0) -> dict:
    """Average ``term_gradients`` over ``batches`` training batches -> ``gradients.json``."""
    root = run_dir.parent / f"base-{cfg.base_key()}"
    base = root / "base" / "model"
    encoders = run_dir / stage1_key(ARMS["Base+DIVA"]) / f"seed{seed}" / "stage1_encoders"
    module = Stage2(
        load_base(cfg, base), stage1_encoders=str(encoders), targets="online",
        middle_layers=cfg.middle_layers, tau=cfg.tau, critic_hidden=cfg.critic_hidden,
        lambda_sha=cfg.lambda_sha, lambda_uni=cfg.lambda_uni, ramp_steps=0,
    )  # fmt: skip
    module.configure_trainable()
    module.backbone.train()
    shards = {split: root / "shards" / split for split in ("train", "val")}
    train, _ = loaders(cfg, shards, seed, batches, cfg.post_mask)
    rows = [
        term_gradients(module, b)
        for _, b in zip(range(batches), train, strict=False)  # the stream is endless
    ]
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    summary["batches"], summary["seed"] = len(rows), seed
    (run_dir / "gradients.json").write_text(json.dumps(summary, indent=1))
    return summary


def gradient_table(g: dict) -> str:
    """Markdown summary of ``diagnose``'s numbers."""
    return "\n".join([
        f"Gradients on the trainable blocks at the base (stage-1 encoders of Base+DIVA seed "
        f"{g['seed']}, final lambdas, mean of {g['batches']} training batches):\n",
        "| native (SFT's step) | lambda_sha x alignment | lambda_uni x L_uni | cos(alignment, native) "
        "| DIVA steps clipped | native part of a DIVA step after the clip |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {g['native_norm']:.3f} | {g['alignment_norm']:.3f} | {g['unique_norm']:.3f} | "
        f"{g['cos_alignment_native']:+.3f} | {g['diva_clipped']:.0%} | "
        f"{g['native_share_after_clip']:.3f} (SFT: {g['sft_norm_after_clip']:.3f}) |",
    ])  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", default="runs/mini/full", help="a finished DIVA-mini results folder"
    )
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    mode = json.loads((run_dir / "results.json").read_text())["config"]["mode"]
    summary = diagnose(MODES[mode](), run_dir, args.batches)
    print(gradient_table(summary))


if __name__ == "__main__":
    main()
