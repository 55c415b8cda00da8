"""The EMA callback: decay ramp, accumulation, checkpoint round trip (single process)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diva_lightning.stages.ema import EMA


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.frozen = torch.nn.Linear(4, 1).requires_grad_(False)
        self.history: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, *args):
        self.history.append({k: v.detach().clone() for k, v in self.net.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )


def test_ema_matches_manual_average_with_ramp_and_accumulation(tmp_path):
    torch.manual_seed(0)
    model = Regression()
    start = {k: v.detach().clone() for k, v in model.net.named_parameters()}
    ema = EMA(decay_start=0.5, decay_end=0.9, ramp_steps=2, apply_at_end=False)
    _trainer(tmp_path, [ema], max_epochs=1, accumulate_grad_batches=2).fit(model, _loader())
    # 8 batches, accumulation 2 -> 4 optimizer steps -> 4 EMA updates, at odd batch indices
    assert ema.updates == 4
    expected = dict(start)
    for update, batch in enumerate([1, 3, 5, 7]):
        decay = [0.5, 0.7, 0.9, 0.9][update]
        weights = model.history[batch]
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    for name in ("weight", "bias"):
        torch.testing.assert_close(ema.shadow[f"net.{name}"], expected[name])
    assert "frozen.weight" not in ema.shadow  # only trainable parameters are averaged


def test_ema_survives_checkpoint_and_is_applied_at_end(tmp_path):
    torch.manual_seed(0)
    ema = EMA(decay_start=0.9, decay_end=0.9, ramp_steps=0)
    model = Regression()
    trainer = _trainer(tmp_path, [ema], max_steps=3)
    trainer.fit(model, _loader())
    torch.testing.assert_close(model.net.weight.detach(), ema.shadow["net.weight"])  # applied
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = EMA(decay_start=0.9, decay_end=0.9, ramp_steps=0)
    _trainer(tmp_path, [resumed], max_steps=3).fit(Regression(), _loader(), ckpt_path=ckpt)
    assert resumed.updates == 3
    torch.testing.assert_close(resumed.shadow["net.weight"], ema.shadow["net.weight"])


def test_state_loaded_after_fit_start_is_applied(tmp_path):
    """DeepSpeed restores callback states after ``on_fit_start`` (restore_checkpoint_after_setup):
    the loaded EMA weights must still replace the freshly tracked ones."""
    torch.manual_seed(0)
    ema = EMA(decay_start=0.5, decay_end=0.5, ramp_steps=0)
    _trainer(tmp_path, [ema], max_steps=3).fit(Regression(), _loader())
    saved = ema.state_dict()
    late = EMA()
    model = Regression()
    trainer = _trainer(tmp_path, [late], max_steps=1)
    trainer.strategy.connect(model)
    late.on_fit_start(trainer, model)  # tracks the new model's weights first
    late.load_state_dict(saved)
    assert late.updates == 3
    torch.testing.assert_close(late.shadow["net.weight"], ema.shadow["net.weight"])
    assert not torch.equal(late.shadow["net.weight"], model.net.weight.detach())


def test_export_reassembles_the_ema_of_a_zero3_run_from_its_partitions():
    """Under ZeRO-3 the EMA callback stores one flat, zero-padded partition per rank (DeepSpeed's
    layout: rank r holds elements [r*p, (r+1)*p) of the flattened parameter); ``export`` must
    rebuild the full tensors, shaped like the consolidated state dict, not refuse them."""
    from diva_lightning.export import ema_weights

    full = {"backbone.w": torch.arange(15.0).view(3, 5), "backbone.b": torch.tensor([7.0])}
    world = 4
    per_rank = [{} for _ in range(world)]
    for name, value in full.items():
        part = -(-value.numel() // world)  # ceil
        flat = torch.cat([value.flatten(), torch.zeros(part * world - value.numel())])
        for rank in range(world):
            per_rank[rank][name] = flat[rank * part : (rank + 1) * part].clone()
    ckpt = {
        "state_dict": {k: torch.zeros_like(v) for k, v in full.items()},
        "callbacks": {"EMA{'decay_start': 0.99}": {"updates": 3, "per_rank": per_rank}},
    }
    got = ema_weights(ckpt)
    assert set(got) == set(full)
    for name, value in full.items():
        torch.testing.assert_close(got[name], value)
    # a partition that does not add up to the parameter is an error naming the tensor
    per_rank[1]["backbone.w"] = per_rank[1]["backbone.w"][:1]
    with pytest.raises(ValueError, match="backbone.w"):
        ema_weights(ckpt)
