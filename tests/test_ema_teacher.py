"""Stage 2's EMA-teacher targets (paper App. B.2): equal to a separate EMA copy of the model, no
gradient into the teacher, no block above the last middle layer, equal to online at decay 0."""

import copy

import pytest
import torch

from diva_lightning.backbones.chameleon import ChameleonAdapter
from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.janus import JanusAdapter
from diva_lightning.backbones.liquid import LiquidAdapter
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.stages import Stage2
from diva_lightning.stages.ema import EMA
from tests.stage_helpers import LossRecorder, batch_for, encoders_for, loader_for, trainer

ADAPTERS = [Emu3Adapter, ShowoAdapter, JanusAdapter, ChameleonAdapter, LiquidAdapter]


def stage2_with_drifted_ema(adapter_cls, tmp_path, seed=0, **kwargs):
    """Stage 2 (middle 3..6, trainable 4..7) whose EMA weights differ from the online ones."""
    torch.manual_seed(seed)
    backbone = adapter_cls.tiny()
    options = dict(middle_layers=(3, 6), trainable_layers=(4, 7), ramp_steps=0, critic_hidden=16)
    options.update(kwargs)
    module = Stage2(backbone, stage1_encoders=encoders_for(backbone, tmp_path / "enc"), **options)
    module.configure_trainable()
    module.backbone.train()
    ema = EMA()
    ema.track(module)
    g = torch.Generator().manual_seed(seed + 1)
    for value in ema.shadow.values():
        value.add_(0.05 * torch.randn(value.shape, generator=g))
    module.ema = ema
    return module, ema


def ema_copy_targets(module, ema, batch):
    """Reference: a deep copy of the backbone holding the EMA weights, encoded the same way."""
    twin = copy.deepcopy(module.backbone).eval()
    state = {
        n.removeprefix("backbone."): v for n, v in ema.shadow.items() if n.startswith("backbone.")
    }
    twin.load_state_dict(state, strict=False)
    codes = batch.codes
    pixels = batch.pixels if twin.needs_pixels_for_understanding else None
    flow_u = twin.build_understanding(batch.prompts, batch.captions, codes=codes, pixels=pixels)
    flow_g = twin.build_generation(batch.captions, codes, batch.gen_mask)
    with torch.no_grad():
        h_u = twin.forward_flow(flow_u, "U", module.layers).hidden
        h_g = twin.forward_flow(
            flow_g, "G", module.layers, pool_mask=module.gen_pool_mask(batch)
        ).hidden
        return (
            module.encoders.encode("U", "shared", h_u.float()),
            module.encoders.encode("G", "shared", h_g.float()),
        )


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=lambda c: c.__name__)
def test_ema_targets_equal_a_deep_copy_holding_the_ema_weights(adapter_cls, tmp_path):
    module, ema = stage2_with_drifted_ema(adapter_cls, tmp_path)
    batch = batch_for(module.backbone)
    online = {n: p.detach().clone() for n, p in module.named_parameters()}
    out_u, out_g = module.run_flows(batch, module.layers, record=module.teacher.block_range)
    target_u, target_g = module.teacher_targets(out_u, out_g)
    ref_u, ref_g = ema_copy_targets(module, ema, batch)
    torch.testing.assert_close(target_u, ref_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target_g, ref_g, rtol=1e-5, atol=1e-5)
    # the targets differ from the online factors (the EMA weights differ), and the online
    # weights are back in place afterwards
    online_u = module.encoders.encode("U", "shared", out_u.hidden.float())
    assert (online_u - target_u).abs().max() > 1e-3
    for name, param in module.named_parameters():
        assert torch.equal(param, online[name]), name


def test_unmasked_pooling_reaches_the_teacher_too(tmp_path):
    module, ema = stage2_with_drifted_ema(
        Emu3Adapter, tmp_path, middle_layers=(3, 6), trainable_layers=(3, 6)
    )
    module.gen_pooling = "unmasked"
    batch = batch_for(module.backbone)
    out_u, out_g = module.run_flows(batch, module.layers, record=module.teacher.block_range)
    _, target_g = module.teacher_targets(out_u, out_g)
    torch.testing.assert_close(target_g, ema_copy_targets(module, ema, batch)[1])


def test_no_gradient_reaches_the_teacher(tmp_path):
    """The model's gradients equal those with the teacher's targets as constants, and the EMA
    weights get none."""
    module, ema = stage2_with_drifted_ema(Emu3Adapter, tmp_path)
    batch = batch_for(module.backbone)
    params = [p for p in module.backbone.parameters() if p.requires_grad]
    grads = torch.autograd.grad(module.diva_losses(batch)["loss_model"], params)
    constants = ema_copy_targets(module, ema, batch)
    module.teacher_targets = lambda out_u, out_g: constants
    expected = torch.autograd.grad(module.diva_losses(batch)["loss_model"], params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(not v.requires_grad and v.grad is None for v in ema.shadow.values())


@pytest.mark.parametrize("fused", [False, True], ids=["two-forwards", "fused"])
def test_teacher_runs_no_block_outside_first_trainable_to_last_middle(tmp_path, fused):
    module, _ = stage2_with_drifted_ema(Emu3Adapter, tmp_path)  # middle 3..6, trainable 4..7
    module.fused_flows = fused
    batch = batch_for(module.backbone)
    out_u, out_g = module.run_flows(batch, module.layers, record=module.teacher.block_range)
    called = []
    handles = [
        block.register_forward_hook(lambda *_, i=i: called.append(i))
        for i, block in enumerate(module.backbone.decoder_layers, start=1)
    ]
    module.teacher_targets(out_u, out_g)
    for handle in handles:
        handle.remove()
    # each flow (fused: both in one replay); never 1..3 (shared) or 7..8 (unused)
    assert called == ([4, 5, 6] if fused else [4, 5, 6, 4, 5, 6])


def _fit_losses(tmp_path, targets, decay, steps=4):
    torch.manual_seed(0)
    backbone = Emu3Adapter.tiny()
    module = Stage2(
        backbone, stage1_encoders=encoders_for(backbone, tmp_path / f"enc-{targets}-{decay}"),
        middle_layers=(3, 6), ramp_steps=0, critic_hidden=16, lr=1e-3, warmup_steps=1,
        targets=targets, gather_negatives=False,
    )  # fmt: skip
    recorder = LossRecorder("loss_u2g")
    ema = EMA(decay_start=decay, decay_end=decay, ramp_steps=0)
    torch.manual_seed(1)
    trainer(tmp_path, max_steps=steps, callbacks=[ema, recorder]).fit(
        module, loader_for(backbone, steps)
    )
    return [recorder.values[s] for s in range(1, steps + 1)]


def test_ema_with_decay_zero_gives_the_online_loss(tmp_path):
    online = _fit_losses(tmp_path, "online", 0.0)
    assert _fit_losses(tmp_path, "ema", 0.0) == pytest.approx(online, rel=1e-5, abs=1e-6)
    # with a real decay the targets lag behind the online weights: the curve differs
    lagging = _fit_losses(tmp_path, "ema", 0.9)
    assert lagging[0] == pytest.approx(online[0], rel=1e-5)  # step 0: EMA == initial weights
    assert abs(lagging[-1] - online[-1]) > 1e-5  # decay 0 matches to ~1e-7


def test_ema_targets_need_the_ema_callback(tmp_path):
    backbone = Emu3Adapter.tiny()
    module = Stage2(
        backbone, stage1_encoders=encoders_for(backbone, tmp_path / "e"), middle_layers=(3, 6)
    )
    with pytest.raises(ValueError, match="add exactly one `diva_lightning.stages.ema.EMA`"):
        trainer(tmp_path, max_steps=1).fit(module, loader_for(backbone, 1))
    with pytest.raises(ValueError, match="set targets: online with it"):
        Stage2(
            backbone, stage1_encoders=encoders_for(backbone, tmp_path / "e"),
            middle_layers=(3, 6), stop_gradient=False,
        )  # fmt: skip
