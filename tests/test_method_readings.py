"""The paper's open readings as options: each test fails under the other reading."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.objectives import FactorEncoders, SharedAlignment
from diva_lightning.objectives.checkpoint import load_factor_encoders
from diva_lightning.stages import SFT, Stage1, Stage2
from diva_lightning.stages.ema import EMA
from tests.stage_helpers import (
    batch_for,
    encoders_for,
    loader_for,
    rank_zero_messages,
    tiny_stage2,
    trainer,
)


def test_alignment_mean_is_exactly_half_of_sum(tmp_path):
    batch = batch_for(Emu3Adapter.tiny())
    diva = {}
    for reduction in ("sum", "mean"):
        module = tiny_stage2(tmp_path, alignment_reduction=reduction, lambda_uni=0.0)
        terms = module.diva_losses(batch)
        diva[reduction] = terms["loss_model"] - terms["loss_und"] - terms["loss_gen"]
        expected = 0.6 * (terms["loss_u2g"] + terms["loss_g2u"])
        torch.testing.assert_close(diva["sum"], expected)
    torch.testing.assert_close(diva["mean"], diva["sum"] / 2)


def test_shared_projector_shares_phi_between_flows_and_survives_saving(tmp_path):
    shared = FactorEncoders(64, shared_dim=16, projector="shared")
    per_flow = FactorEncoders(64, shared_dim=16)
    for kind in ("shared", "unique"):
        u, g = shared.encoders[f"U_{kind}"], shared.encoders[f"G_{kind}"]
        assert all(a is b for a, b in zip(u.phi.parameters(), g.phi.parameters(), strict=True))
        assert u.gate.weight is not g.gate.weight  # gates stay per flow (Eq. 5's W^i)
        pu, pg = per_flow.encoders[f"U_{kind}"], per_flow.encoders[f"G_{kind}"]
        assert pu.phi[0].weight is not pg.phi[0].weight
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(shared) < count(per_flow)
    path = encoders_for(Emu3Adapter.tiny(), tmp_path / "shared", projector="shared")
    loaded, config = load_factor_encoders(path)
    assert config["projector"] == "shared"
    assert loaded.encoders["U_shared"].phi[0].weight is loaded.encoders["G_shared"].phi[0].weight
    with pytest.raises(ValueError, match="arch 'linear_ln' has none"):
        FactorEncoders(64, arch="linear_ln", projector="shared")


def test_generation_pooling_over_unmasked_slots_only(tmp_path):
    backbone = Emu3Adapter.tiny()
    batch = batch_for(backbone)
    flow = backbone.build_generation(batch.captions, batch.codes, batch.gen_mask)
    states = backbone.forward_flow(flow, "G", [3], pool=False).hidden[:, 0]  # (B, N, D)
    keep = (~batch.gen_mask).float().unsqueeze(-1)
    expected = (states * keep).sum(1) / keep.sum(1)
    module = Stage1(backbone, middle_layers=(3, 3), gen_pooling="unmasked", shared_dim=16)
    _, out_g = module.run_flows(batch, [3])
    torch.testing.assert_close(out_g.hidden[:, 0], expected)
    assert not torch.allclose(out_g.hidden[:, 0], states.mean(1))  # "all" pools masked slots too
    assert module.factor_config()["gen_pooling"] == "unmasked"
    # stage 2 inherits the pooling its encoders were trained with, and refuses another
    enc = encoders_for(backbone, tmp_path / "enc")
    assert Stage2(backbone, stage1_encoders=enc, middle_layers=(3, 6)).gen_pooling == "all"
    with pytest.raises(ValueError, match="gen_pooling 'unmasked' differs from the 'all'"):
        Stage2(backbone, stage1_encoders=enc, middle_layers=(3, 6), gen_pooling="unmasked")


@pytest.mark.parametrize("decay_all", [False, True])
def test_weight_decay_skips_biases_norms_and_embeddings_unless_asked(decay_all):
    """One AdamW step with zero gradients moves a parameter only through weight decay."""
    torch.manual_seed(0)
    module = SFT(
        Emu3Adapter.tiny(), middle_layers=(3, 6), decay_all_parameters=decay_all, weight_decay=0.5
    )
    module.backbone.model.get_input_embeddings().weight.requires_grad_(True)  # an embedding too
    params = dict(module.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(module.param_groups(), lr=0.1, weight_decay=0.5)
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    exempt = {n for n, p in trainable.items() if p.ndim < 2 or "embed_tokens" in n}
    assert exempt and any("norm" in n for n in exempt) and any("embed" in n for n in exempt)
    assert moved == (set(trainable) if decay_all else set(trainable) - exempt)


def test_stage1_alignment_weight_adds_the_authors_infonce_and_aligns_the_factors(tmp_path):
    backbone = Emu3Adapter.tiny()
    batch = batch_for(backbone)
    torch.manual_seed(0)
    options = dict(middle_layers=(3, 6), shared_dim=16, lr=1e-2, warmup_steps=1)
    plain = Stage1(backbone, **options)
    assert "loss_align" not in plain.diva_losses(batch)
    torch.manual_seed(0)
    aligned = Stage1(backbone, **options, lambda_sha=2.0)
    terms = aligned.diva_losses(batch)
    rest = terms["loss_und_injected"] + terms["loss_gen_injected"] + 0.2 * terms["loss_perp"]
    torch.testing.assert_close(terms["loss"], rest + 2.0 * terms["loss_align"])
    # trained on this batch, the shared factors of both flows agree more than without the term
    final = {}
    for name, module in (("plain", plain), ("aligned", aligned)):
        trainer(tmp_path, max_steps=30).fit(module, DataLoader([batch] * 30, batch_size=None))
        module.eval()
        with torch.no_grad():
            out_u, out_g = module.run_flows(batch, module.layers)
            f = module.encoders(out_u.hidden, out_g.hidden)
            final[name] = sum(SharedAlignment(0.07)(f.shared_u, f.shared_g)).item() / 2
    assert final["aligned"] < final["plain"] - 0.1


def test_first_stage2_step_reports_infonce_beside_log_batch(tmp_path, caplog):
    module = tiny_stage2(tmp_path, targets="ema", gather_negatives=False)
    recorded = {}

    class Grab(EMA):
        def on_train_batch_end(self, trainer, pl_module, *args):
            super().on_train_batch_end(trainer, pl_module, *args)
            if not recorded:
                recorded.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    with rank_zero_messages(caplog):
        trainer(tmp_path, max_steps=2, callbacks=[Grab()]).fit(
            module, loader_for(module.backbone, 2)
        )
    assert recorded["train/infonce_chance"] == pytest.approx(math.log(4))
    start = (recorded["train/loss_u2g"] + recorded["train/loss_g2u"]) / 2
    assert recorded["train/infonce_start"] == pytest.approx(start)
    messages = [
        r.getMessage() for r in caplog.records if "stage 2 starts with InfoNCE" in r.getMessage()
    ]
    assert len(messages) == 1 and "log(candidates) = 1.386" in messages[0]
