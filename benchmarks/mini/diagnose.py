"""Why DIVA did or did not help: the gradient each stage-2 term puts on the trainable blocks.

    python -m benchmarks.mini.diagnose --run runs/mini/full

On the base checkpoint, with the stage-1 encoders of a finished Base+DIVA run, over a few
training batches: the norm of the gradient of the native losses (what SFT follows), of
``lambda_sha (L_U->G + L_G->U)`` and of ``lambda_uni L_uni`` (at their final weights), the cosine
between the alignment and native gradients (negative: the alignment pulls against captioning
and inpainting; near 0: it spends the step on directions they do not need), and how often the
step's total gradient norm exceeds the clip (1.0), which then shrinks the native part too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.mini.backbone import load_base
from benchmarks.mini.config import ARMS, MODES, MiniConfig
from benchmarks.mini.train import loaders, stage1_key
from diva_lightning.stages import Stage2


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).flatten()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def term_gradients(module: Stage2, batch, lambda_sha: float, lambda_uni: float) -> dict[str, float]:
    terms = module.diva_losses(batch)
    params = [p for p in module.backbone.parameters() if p.requires_grad]
    native = flat_grad(terms["loss_und"] + terms["loss_gen"], params)
    align = flat_grad(lambda_sha * (terms["loss_u2g"] + terms["loss_g2u"]), params)
    unique = flat_grad(lambda_uni * terms["loss_uni"], params)
    total = native + align + unique
    return {
        "native_norm": float(native.norm()),
        "alignment_norm": float(align.norm()),
        "unique_norm": float(unique.norm()),
        "cos_alignment_native": float(torch.nn.functional.cosine_similarity(align, native, dim=0)),
        "cos_unique_native": float(torch.nn.functional.cosine_similarity(unique, native, dim=0)),
        "diva_clipped": float(total.norm() > 1.0),
        "sft_clipped": float(native.norm() > 1.0),
        "native_share_after_clip": float(min(1.0, 1.0 / total.norm()) * native.norm()),
        "sft_norm_after_clip": float(min(1.0, native.norm())),
    }


def diagnose(cfg: MiniConfig, run_dir: Path, batches: int = 8, seed: int = 0) -> dict:
    """Average ``term_gradients`` over ``batches`` training batches -> ``gradients.json``."""
    root = run_dir.parent / f"base-{cfg.base_key()}"
    base = root / "base" / "model"
    encoders = run_dir / stage1_key(ARMS["Base+DIVA"]) / f"seed{seed}" / "stage1_encoders"
    module = Stage2(
        load_base(cfg, base), stage1_encoders=str(encoders),
        middle_layers=cfg.middle_layers, tau=cfg.tau, critic_hidden=cfg.critic_hidden,
    )  # fmt: skip
    module.configure_trainable()
    module.backbone.train()
    shards = {split: root / "shards" / split for split in ("train", "val")}
    train, _ = loaders(cfg, shards, seed, batches, cfg.post_mask)
    rows = [
        term_gradients(module, b, cfg.lambda_sha, cfg.lambda_uni)
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
