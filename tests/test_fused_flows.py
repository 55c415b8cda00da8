"""Both flows in one forward (``fused_flows``) compute what two forwards compute."""

from __future__ import annotations

import pytest
import torch

from diva_lightning.backbones.chameleon import ChameleonAdapter
from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.janus import JanusAdapter
from diva_lightning.backbones.liquid import LiquidAdapter
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.stages import SFT
from tests.stage_helpers import batch_for, tiny_stage2

TOL = dict(atol=1e-5, rtol=1e-5)


def flows_and_grads(module, batch, layers):
    module.zero_grad()
    out_u, out_g = module.run_flows(batch, layers)
    loss = out_u.loss + out_g.loss + out_u.hidden.square().mean() + out_g.hidden.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out_u, out_g, grads


@pytest.mark.parametrize("adapter_class", [Emu3Adapter, ChameleonAdapter, LiquidAdapter])
@pytest.mark.parametrize("gen_pooling", ["all", "unmasked"])
def test_fused_flows_equal_two_forwards(adapter_class, gen_pooling):
    torch.manual_seed(0)
    adapter = adapter_class.tiny()
    module = SFT(adapter, middle_layers=(3, 6), trainable_layers=(3, 6))
    module.configure_trainable()
    module.gen_pooling = gen_pooling  # a stage-2 / stage-1 option; the flows honour it alike
    batch = batch_for(adapter, bs=3)
    results = {}
    for fused in (False, True):
        module.fused_flows = fused
        results[fused] = flows_and_grads(module, batch, [3, 6])
    (u0, g0, grads0), (u1, g1, grads1) = results[False], results[True]
    for a, b in ((u0, u1), (g0, g1)):
        torch.testing.assert_close(b.hidden, a.hidden, **TOL)
        torch.testing.assert_close(b.logits, a.logits, **TOL)
        torch.testing.assert_close(b.targets, a.targets)
        torch.testing.assert_close(b.loss, a.loss, **TOL)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], **TOL, msg=name)


def test_fused_flows_give_the_same_ema_teacher_targets(tmp_path):
    torch.manual_seed(0)
    module = tiny_stage2(tmp_path, targets="ema", trainable_layers=(2, 6))
    module.ema = _FakeEMA()
    batch = batch_for(module.backbone, bs=3)
    targets = {}
    for fused in (False, True):
        module.fused_flows = fused
        out_u, out_g = module.run_flows(batch, module.layers, record=module.teacher.block_range)
        assert ("UG" in module.recorded) == fused
        targets[fused] = module.teacher_targets(out_u, out_g)
    for a, b in zip(targets[False], targets[True], strict=True):
        torch.testing.assert_close(b, a, **TOL)


class _FakeEMA:
    """The online weights as 'EMA' weights: the teacher path runs, the values are known."""

    ready = True

    def swapped_in(self, module, names):
        from contextlib import nullcontext

        return nullcontext()


@pytest.mark.parametrize("adapter_class", [ShowoAdapter, JanusAdapter])
def test_backbones_that_cannot_fuse_run_two_forwards_with_a_warning(adapter_class):
    adapter = adapter_class.tiny()
    assert not adapter.supports_fused_flows
    with pytest.warns(UserWarning, match="cannot fuse"):
        module = SFT(adapter, middle_layers=(3, 6), fused_flows=True)
    assert not module.fused_flows
