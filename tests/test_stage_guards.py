"""Stage modules: configuration errors, non-finite guard, critic/model gradient separation."""

from dataclasses import dataclass, field

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.objectives import FactorEncoders
from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders
from diva_lightning.stages import SFT, Stage1, Stage2
from diva_lightning.stages.base import NonFiniteLossError


@dataclass
class Batch:
    keys: list
    captions: list
    prompts: list
    pixels: torch.Tensor
    codes: torch.Tensor | None
    gen_mask: torch.Tensor
    skips: dict = field(default_factory=dict)


def loader(n=4, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a red circle at the top left.", "a blue square at the center."]
    batches = [
        Batch(
            [f"{i}-{j}" for j in range(bs)],
            [captions[(i + j) % 2] for j in range(bs)],
            ["Please describe this image in detail."] * bs,
            torch.rand(bs, 3, 32, 32, generator=g),
            None,
            torch.rand(bs, 64, generator=g) < 0.4,
        )
        for i in range(n)
    ]
    return DataLoader(batches, batch_size=None)


def trainer(**kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory):
    torch.manual_seed(0)
    enc = FactorEncoders(64, shared_dim=16)
    return save_factor_encoders(
        tmp_path_factory.mktemp("s1") / "enc", enc, factor_config(enc, [3, 4, 5, 6])
    )


def test_configuration_errors_name_the_culprit(encoders_dir, tmp_path):
    backbone = Emu3Adapter.tiny()
    with pytest.raises(ValueError, match=r"middle_layers 6\.\.12 is outside .* 1\.\.8"):
        Stage1(backbone, middle_layers=(6, 12))
    with pytest.raises(ValueError, match="needs stage1_encoders"):
        Stage2(backbone, middle_layers=(3, 6))
    with pytest.raises(ValueError, match=r"layer range 2\.\.9"):
        Stage2(
            backbone,
            stage1_encoders=str(encoders_dir),
            middle_layers=(3, 6),
            trainable_layers=(2, 9),
        )
    wide = FactorEncoders(128, shared_dim=16)
    other = save_factor_encoders(tmp_path / "wide", wide, factor_config(wide, [3, 6]))
    with pytest.raises(ValueError, match="hidden size 128.*backbone has 64"):
        Stage2(backbone, stage1_encoders=str(other), middle_layers=(3, 6))
    with pytest.raises(ValueError, match="unique_pairs"):
        Stage2(backbone, stage1_encoders=str(encoders_dir), middle_layers=(3, 6), unique_pairs="x")


def test_nonfinite_losses_are_skipped_then_stop_the_run():
    torch.manual_seed(0)
    module = SFT(Emu3Adapter.tiny(), middle_layers=(3, 6), max_nonfinite_steps=2, warmup_steps=1)
    original = module.weighted_terms
    module.weighted_terms = lambda terms: {k: v * float("nan") for k, v in original(terms).items()}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(NonFiniteLossError, match="3 steps had a non-finite loss"):
        trainer(max_steps=4).fit(module, loader())
    assert module.nonfinite_steps == 3
    # skipped steps produced zero gradients: weights did not become NaN
    assert all(torch.isfinite(p).all() for p in module.parameters())
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    # AdamW with zero gradients still applies weight decay to the trainable layers only
    assert all(
        "layers.2." in n or "layers.3." in n or "layers.4." in n or "layers.5." in n
        for n in changed
    )


def test_stage2_critic_and_model_gradients_are_disjoint(encoders_dir):
    torch.manual_seed(0)
    module = Stage2(
        Emu3Adapter.tiny(),
        stage1_encoders=str(encoders_dir),
        middle_layers=(3, 6),
        critic_hidden=16,
        ramp_steps=0,
        targets="online",
    )
    module.configure_trainable()
    batch = next(iter(loader()))
    terms = module.diva_losses(batch)
    critic = list(module.unique_critic.parameters())
    backbone = [p for p in module.backbone.parameters() if p.requires_grad]
    grads = torch.autograd.grad(
        terms["loss_model"], critic + backbone, allow_unused=True, retain_graph=True
    )
    assert all(g is None for g in grads[: len(critic)])  # the model's loss never moves the critic
    assert any(g is not None and g.abs().sum() > 0 for g in grads[len(critic) :])
    grads = torch.autograd.grad(terms["loss_critic"], critic + backbone, allow_unused=True)
    assert all(g is None for g in grads[len(critic) :])  # the critic's loss never moves the model
    torch.testing.assert_close(terms["loss"], terms["loss_model"] + terms["loss_critic"])
    assert all(g is not None for g in grads[: len(critic)])
    groups = module.param_groups()
    assert groups[-1]["params"] == critic
    assert groups[-1]["lr"] == module.critic_lr and groups[-1]["weight_decay"] == 0.0
    assert not any(p.requires_grad for p in module.encoders.parameters())
