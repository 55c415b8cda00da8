"""Pieces the benchmarks share: a synthetic batch, stage-1 encoders to start stage 2 from, and
the EMA callback's stand-in for steps run outside a Trainer. Run the benchmarks as scripts
(``python benchmarks/<name>.py``): this folder is then on ``sys.path``."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path


def synthetic_batch(backbone, batch_size: int, mask_ratio: float = 0.4):
    """The same pre-tokenised batch every time (seeded codes and generation mask)."""
    import torch

    from diva_lightning.data import DualFlowBatch

    g = torch.Generator().manual_seed(0)
    n = backbone.tokens_per_image
    return DualFlowBatch(
        keys=[str(i) for i in range(batch_size)],
        captions=["a red circle at the top left and a blue square at the center."] * batch_size,
        prompts=["Please describe this image in detail."] * batch_size,
        codes=torch.randint(0, backbone.codebook_size, (batch_size, n), generator=g),
        gen_mask=torch.rand(batch_size, n, generator=g) < mask_ratio,
    )


def random_encoders(hidden_size: int, middle: tuple[int, int], shared_dim: int = 64) -> str:
    """Random stage-1 encoders for ``middle``, saved as stage 1 saves them -> their folder."""
    from diva_lightning.objectives import FactorEncoders
    from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders

    encoders = FactorEncoders(hidden_size, shared_dim=shared_dim)
    layers = list(range(middle[0], middle[1] + 1))
    folder = Path(tempfile.mkdtemp()) / "enc"
    return str(save_factor_encoders(folder, encoders, factor_config(encoders, layers)))


class OnlineAsEMA:
    """Stands in for the ``EMA`` callback outside a Trainer: ready, nothing swapped. The swap
    re-points parameters, which costs nothing next to the teacher replay it enables."""

    ready = True

    def swapped_in(self, module, names):
        return nullcontext()
