"""Every stage's loss with the whole module in bf16 and no autocast: how DeepSpeed's bf16
engine runs it (it casts the LightningModule's parameters to bf16). Lightning's plain
``bf16-mixed`` keeps float32 weights under autocast instead, so only this path catches a
float32 tensor meeting a bf16 weight (found on an H200: the shipped configs crashed at step 1)."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.stages import SFT, Stage1
from tests.stage_helpers import batch_for, tiny_stage2


class Shadow:
    """Stands in for the EMA callback: ready, nothing swapped (the teacher is the module)."""

    ready = True

    def swapped_in(self, module, names):
        return nullcontext()


def stage(name: str, tmp_path):
    torch.manual_seed(0)
    if name == "sft":
        module = SFT(Emu3Adapter.tiny(), middle_layers=(3, 6), trainable_layers=(3, 6))
    elif name == "stage1":
        module = Stage1(Emu3Adapter.tiny(), middle_layers=(3, 6), shared_dim=16, readout_rank=4,
                        shared_only_steps=0, export_dir=str(tmp_path / "enc"))  # fmt: skip
    else:
        module = tiny_stage2(tmp_path, targets=name.removeprefix("stage2-"))
        if module.targets == "ema":
            module.ema = Shadow()
    module.configure_trainable()
    return module


def losses_and_grads(name, tmp_path, dtype):
    module = stage(name, tmp_path).to(dtype)
    terms = module.loss_terms(batch_for(module.backbone, bs=3))
    sum(terms.values()).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    return {k: float(v) for k, v in terms.items()}, grads


@pytest.mark.parametrize("name", ["sft", "stage1", "stage2-online", "stage2-ema"])
def test_losses_and_gradients_with_bf16_weights(name, tmp_path):
    """The same terms as in float32 (to bf16's precision), and gradients for the same
    parameters (the critic is trained by its own step in both), in bf16 and finite."""
    reference, ref_grads = losses_and_grads(name, tmp_path / "f32", torch.float32)
    terms, grads = losses_and_grads(name, tmp_path / "bf16", torch.bfloat16)
    assert terms.keys() == reference.keys()
    for key, value in terms.items():
        assert value == pytest.approx(reference[key], rel=0.02, abs=0.01), key
    assert grads.keys() == ref_grads.keys() and grads
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads.values())
