"""``diva-cli analyze``: the Section 2 divergence curves of a backbone over image-text pairs.

    diva-cli analyze --out runs/analyze                              # tiny Emu3, synthetic world
    diva-cli analyze --backbone diva_lightning.backbones.emu3.Emu3Adapter \\
        --backbone.init_args.pretrained_path ckpt/ --shards 'data/val/shard-{000000..000003}.tar'
    diva-cli analyze --run_config runs/tiny/stage2/config.yaml --checkpoint runs/tiny/stage2/checkpoints/X.ckpt

Writes ``divergence.json`` (all curves and the suggested range), three PNGs in the style of
Figure 2 (a, b, c) and ``summary.txt``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from diva_lightning.analysis.divergence import divergence_curves
from diva_lightning.analysis.plots import plot_divergence, summary_text
from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.sizes import check_sizes


def _backbone(backbone, run_config, checkpoint) -> BackboneAdapter:
    if run_config is not None or checkpoint is not None:
        if run_config is None or checkpoint is None:
            raise ValueError("analyze: give both --run_config and --checkpoint, or neither")
        from diva_lightning.export import load_trained_model

        return load_trained_model(run_config, checkpoint)[0].backbone
    if backbone is None:
        from diva_lightning.backbones.emu3 import Emu3Adapter

        torch.manual_seed(0)
        return Emu3Adapter.tiny()
    return backbone


def _batches(
    adapter: BackboneAdapter,
    shards: str | None,
    out: Path,
    samples: int,
    batch_size: int,
    seed: int,
    check_tokenizer: bool = True,
):
    from diva_lightning.data import DualFlowDataModule
    from diva_lightning.data.prepare import prepare

    if shards is None:
        shards = str(out / "shapes")
        prepare(
            shards,
            synthetic=samples,
            max_count=max(samples, 1),
            seed=seed,
            synthetic_image_size=adapter.image_size,
            overwrite=True,
            quiet=True,
        )
    data = DualFlowDataModule(
        val_shards=shards,
        val_batch_size=batch_size,
        num_workers=0,
        seed=seed,
        check_tokenizer=check_tokenizer,
    )
    data.bind_backbone(adapter)
    try:
        data.setup("validate")
    except FileNotFoundError as error:  # the data module names its own key; here it is --shards
        raise FileNotFoundError(str(error).replace("val_shards:", "analyze --shards:", 1)) from None
    n_batches = math.ceil(samples / batch_size)
    return list(itertools.islice(iter(data.val_dataloader()), n_batches))


def analyze(
    *,
    out: Path = Path("runs/analyze"),
    backbone: BackboneAdapter | None = None,
    run_config: Path | None = None,
    checkpoint: Path | None = None,
    shards: str | None = None,
    samples: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    variance_threshold: float = 0.95,
    freq_cutoff: float = 0.5,
    check_tokenizer: bool = True,
) -> dict:
    """Per-layer gradient conflict, reconstruction residual, rank increment and frequency share.

    Args:
        out: output directory (JSON, PNGs, summary).
        backbone: an adapter by class_path (default: the tiny random Emu3).
        run_config: a trained run's config.yaml (with ``checkpoint``) to analyse its backbone.
        checkpoint: that run's ``.ckpt`` (EMA weights are used when present).
        shards: WebDataset shards to read (default: synthetic shapes world written to ``out``).
        samples: number of image-text pairs.
        batch_size: pairs per forward.
        seed: seed of masks, prompts and the synthetic world.
        variance_threshold: explained variance kept by U's PCA basis in R_res (Eq. 2).
        freq_cutoff: normalised radial frequency above which energy counts as high (Fig. 2c).
        check_tokenizer: refuse shard codes written by another image tokenizer (see
            ``DualFlowDataModule``).
    """
    check_sizes("analyze", **{"--samples": samples, "--batch_size": batch_size})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = _backbone(backbone, run_config, checkpoint)
    batches = _batches(adapter, shards, out, samples, batch_size, seed, check_tokenizer)
    result = divergence_curves(
        adapter, batches, variance_threshold, freq_cutoff, total=len(batches)
    )
    (out / "divergence.json").write_text(json.dumps(result, indent=2))
    plots = plot_divergence(result, out)
    summary = summary_text(result)
    (out / "summary.txt").write_text(summary + "\n")
    print(summary)
    print("plots: " + ", ".join(str(p) for p in plots))
    return result
