"""``GradientBalance`` against closed-form gradients and the old diagnose figures, and stage 2's
``balance: cap`` as the callback measures it."""

import json
import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.mini.diagnose import term_gradients as diagnose_terms
from diva_lightning.stages.balance import GradientBalance, cosine
from tests.stage_helpers import (
    batch_for,
    loader_for,
    rank_zero_messages,
    tiny_stage2,
    trainer,
)


class Toy(L.LightningModule):
    """Terms with closed-form gradients in (W, b):
    und = |W x + b - y|^2 / 2 -> ((r x^T), r), r = W x + b - y;  gen = <W, A> -> (A, 0);
    u2g = c |W|^2 / 2 -> (c W, 0)."""

    term_groups = {"native": ("und", "gen"), "diva": ("u2g",)}

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.A = torch.randn(3, 4, generator=g, dtype=torch.float64)
        self.c = 2.5

    def loss_terms(self, batch):
        x, y = batch
        r = self.W @ x + self.b - y
        return {
            "und": 0.5 * (r * r).sum(),
            "gen": (self.W * self.A).sum(),
            "u2g": 0.5 * self.c * (self.W * self.W).sum(),
        }

    def balance_parameters(self):
        return [self.W, self.b]

    def training_step(self, batch, batch_idx):
        return sum(self.loss_terms(batch).values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_norms_cosines_and_shares_match_the_closed_form(tmp_path):
    toy = Toy()
    x, y = torch.arange(4.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    W, b, A = toy.W.detach().numpy().copy(), toy.b.detach().numpy().copy(), toy.A.numpy()
    balance = GradientBalance(every_n_steps=1)
    loader = DataLoader([(x, y)], batch_size=None)
    trainer(tmp_path, max_steps=1, callbacks=[balance], gradient_clip_val=0.5).fit(toy, loader)
    (stats,) = balance.history
    r = W @ x.numpy() + b - y.numpy()
    flat = {  # (dW, db) flattened
        "und": np.concatenate([np.outer(r, x.numpy()).ravel(), r]),
        "gen": np.concatenate([A.ravel(), np.zeros(3)]),
        "u2g": np.concatenate([toy.c * W.ravel(), np.zeros(3)]),
    }
    flat["native"] = flat["und"] + flat["gen"]
    flat["diva"] = flat["u2g"]
    total = flat["native"] + flat["diva"]
    scale = min(1.0, 0.5 / np.linalg.norm(total))
    for name, g in flat.items():
        assert stats[f"norm/{name}"] == pytest.approx(np.linalg.norm(g), rel=1e-6)
        assert stats[f"clipped_norm/{name}"] == pytest.approx(scale * np.linalg.norm(g), rel=1e-6)
    for a, c in [("und", "gen"), ("u2g", "native"), ("und", "u2g"), ("native", "diva")]:
        expected = flat[a] @ flat[c] / np.linalg.norm(flat[a]) / np.linalg.norm(flat[c])
        assert cosine(stats, a, c) == pytest.approx(expected, abs=1e-6)
    shares = {n: flat[n] @ total / (total @ total) for n in ("und", "gen", "u2g")}
    for name, share in shares.items():
        assert stats[f"share/{name}"] == pytest.approx(share, abs=1e-6)
    assert sum(stats[f"share/{n}"] for n in shares) == pytest.approx(1.0)
    assert stats["norm/total"] == pytest.approx(np.linalg.norm(total), rel=1e-6)


def _old_diagnose(module, batch, lambda_sha, lambda_uni):
    """The figures of the former ``benchmarks/mini/diagnose.py``, computed its way (flat)."""
    terms = module.diva_losses(batch)
    params = [p for p in module.backbone.parameters() if p.requires_grad]

    def flat(loss):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).flatten()
                for g, p in zip(grads, params, strict=True)
            ]
        )

    native = flat(terms["loss_und"] + terms["loss_gen"])
    align = flat(lambda_sha * (terms["loss_u2g"] + terms["loss_g2u"]))
    unique = flat(lambda_uni * terms["loss_uni"])
    total = native + align + unique
    cos = torch.nn.functional.cosine_similarity
    return {
        "native_norm": float(native.norm()),
        "alignment_norm": float(align.norm()),
        "unique_norm": float(unique.norm()),
        "cos_alignment_native": float(cos(align, native, dim=0)),
        "cos_unique_native": float(cos(unique, native, dim=0)),
        "diva_clipped": float(total.norm() > 1.0),
        "native_share_after_clip": float(min(1.0, 1.0 / total.norm()) * native.norm()),
    }


def test_tiny_backbone_reproduces_the_old_diagnose_figures(tmp_path):
    module = tiny_stage2(tmp_path)
    batch = batch_for(module.backbone)
    old = _old_diagnose(module, batch, 0.6, 0.6)
    new = diagnose_terms(module, batch)
    for key, value in old.items():
        assert new[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_warns_once_prints_a_summary_and_writes_it(tmp_path, caplog):
    module = tiny_stage2(tmp_path, lambda_sha=50.0)
    balance = GradientBalance(every_n_steps=2, warn_ratio=0.1)
    run = trainer(tmp_path, max_steps=4, callbacks=[balance])
    warned = pytest.warns(UserWarning, match="the native losses get a small part")
    with warned as caught, rank_zero_messages(caplog):
        run.fit(module, loader_for(module.backbone, 4))
    assert len([w for w in caught if "native losses" in str(w.message)]) == 1
    assert [row["step"] for row in balance.history] == [0, 2]
    assert any("gradient balance over 2 measured steps" in r.getMessage() for r in caplog.records)
    written = json.loads((tmp_path / "gradient_balance.json").read_text())
    assert written["summary"]["norm/native"] == pytest.approx(
        np.mean([row["norm/native"] for row in balance.history])
    )


def test_balance_cap_holds_as_measured_by_gradient_balance(tmp_path):
    cap = 0.5
    loud = dict(lambda_sha=20.0, lambda_und=0.02, lambda_gen=0.02)  # DIVA gradient >> native
    module = tiny_stage2(tmp_path, **loud, balance="cap", balance_cap=cap, balance_every=1)
    balance = GradientBalance(every_n_steps=1)
    trainer(tmp_path, max_steps=4, callbacks=[balance], gradient_clip_val=1.0).fit(
        module, loader_for(module.backbone, 4)
    )
    assert len(balance.history) == 4
    for row in balance.history:
        assert row["norm/diva"] <= cap * row["norm/native"] * (1 + 1e-5)
        assert row["norm/diva"] == pytest.approx(cap * row["norm/native"], rel=1e-4)  # active
    assert module.balance_scale < 1
    # without the cap the same run's DIVA gradient is far above it
    free = tiny_stage2(tmp_path, **loud)
    stats = GradientBalance.measure(free, batch_for(free.backbone))
    assert stats["norm/diva"] > 2 * cap * stats["norm/native"]
    assert math.isfinite(stats["norm/total"])
