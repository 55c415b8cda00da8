"""Factor encoders, low-rank readouts, orthogonality, InfoNCE alignment and ramps."""

import math

import pytest
import torch

from diva_lightning.objectives import (
    FactorEncoders,
    Factors,
    LinearRamp,
    LogitInjection,
    LowRankReadout,
    SharedAlignment,
    build_factor_encoder,
    directed_info_nce,
    infonce_lower_bound,
    injected_loss,
    orthogonality,
)
from diva_lightning.objectives.encoders import GatedMLPEncoder


@pytest.mark.parametrize("arch", ["gated_mlp", "linear_ln", "transformer"])
def test_encoder_variants_map_each_layer_independently(arch):
    torch.manual_seed(0)
    enc = build_factor_encoder(arch, in_dim=48, out_dim=16)
    h = torch.randn(3, 5, 48)  # (B, L, D)
    z = enc(h)
    assert z.shape == (3, 5, 16)
    # layer l's factor depends on h^(l) only (Eq. 5: z^(l,i) = E(h_i^(l)))
    h2 = h.clone()
    h2[:, 2] += 1.0
    z2 = enc(h2)
    changed = (z2 - z).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.tolist() == [False, False, True, False, False]
    # LayerNorm at the output: zero mean, unit variance per vector
    torch.testing.assert_close(z.mean(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)


def test_gated_mlp_is_eq13():
    torch.manual_seed(0)
    enc = GatedMLPEncoder(8, 4, hidden_dim=6)
    h = torch.randn(5, 8)
    expected = torch.nn.functional.layer_norm(
        torch.sigmoid(h @ enc.gate.weight.T + enc.gate.bias) * enc.phi(h),
        (4,),
        enc.norm.weight,
        enc.norm.bias,
    )
    torch.testing.assert_close(enc(h), expected)
    assert sum(isinstance(m, torch.nn.Linear) for m in enc.phi) == 3
    assert sum(isinstance(m, torch.nn.GELU) for m in enc.phi) == 2


def test_factor_encoders_are_four_distinct_modules_and_check_width():
    enc = FactorEncoders(hidden_size=32, shared_dim=8, unique_dim=6)
    f = enc(torch.randn(2, 3, 32), torch.randn(2, 3, 32))
    assert f.shared_u.shape == (2, 3, 8) and f.unique_g.shape == (2, 3, 6)
    assert len({id(m) for m in enc.encoders.values()}) == 4
    with pytest.raises(ValueError, match="hidden size 32"):
        enc(torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="unknown encoder arch"):
        build_factor_encoder("mlp", 4, 4)


def test_low_rank_readout_equals_dense_product():
    torch.manual_seed(0)
    readout = LowRankReadout(vocab_size=50, factor_dim=12, rank=5)
    torch.nn.init.normal_(readout.P)  # P starts at zero; make the check non-trivial
    z = torch.randn(3, 4, 12)  # (B, L, d)
    dense = torch.einsum("vd,bld->blv", readout.dense(), z)
    torch.testing.assert_close(readout(z), dense, rtol=1e-5, atol=1e-5)
    assert readout.P.shape == (50, 5) and readout.Q.shape == (12, 5)


def _factors(b=3, layers=2, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Factors(*(torch.randn(b, layers, d, generator=g) for _ in range(4)))


def test_injection_is_cross_flow_shared_plus_same_flow_unique():
    torch.manual_seed(0)
    inj = LogitInjection(text_vocab_size=11, codebook_size=7, shared_dim=6, unique_dim=6, rank=3)
    for readout in (inj.A_U, inj.B_U, inj.A_G, inj.B_G):
        torch.nn.init.normal_(readout.P)
    f = _factors()
    bias_u, bias_g = inj.biases(f)
    dense = lambda r, z: torch.einsum("vd,bld->blv", r.dense(), z)  # noqa: E731
    torch.testing.assert_close(bias_u, dense(inj.A_U, f.shared_g) + dense(inj.B_U, f.unique_u))
    torch.testing.assert_close(bias_g, dense(inj.A_G, f.shared_u) + dense(inj.B_G, f.unique_g))
    shared_only_u, _ = inj.biases(f, use_unique=False)
    torch.testing.assert_close(shared_only_u, dense(inj.A_U, f.shared_g))
    # the authors' variant: same flow, A (z_sh + z_uni)
    same = LogitInjection(11, 7, 6, 6, rank=3, injection="same_flow_sum")
    torch.nn.init.normal_(same.A_U.P)
    bias_u, _ = same.biases(f)
    torch.testing.assert_close(bias_u, dense(same.A_U, f.shared_u + f.unique_u))


def test_injected_loss_broadcasts_bias_over_positions_and_averages_layers():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9)  # (B, S, V)
    targets = torch.randint(0, 9, (2, 5))
    targets[1, 3:] = -100
    bias = torch.randn(2, 3, 9)  # (B, L, V)
    manual = []
    for layer in range(3):
        shifted = logits + bias[:, layer].unsqueeze(1)
        manual.append(torch.nn.functional.cross_entropy(shifted.flatten(0, 1), targets.flatten()))
    torch.testing.assert_close(injected_loss(logits, targets, bias), torch.stack(manual).mean())
    # zero readouts at init: injected loss == native loss
    inj = LogitInjection(9, 9, 4, 4)
    bias_u, _ = inj.biases(_factors(b=2, layers=3, d=4))
    native = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(injected_loss(logits, targets, bias_u), native)


def test_injected_loss_corrects_continuous_targets_with_their_regression():
    """Continuous generation targets (#22): the bias is a low-rank additive correction of the
    predicted embeddings (B, S, D), each layer scored by the native regression over valid slots,
    averaged over layers; values and gradients as computed by hand (also under checkpointing)."""
    from functools import partial

    from diva_lightning.backbones.flows import embedding_regression

    torch.manual_seed(0)
    pred = torch.randn(2, 5, 8, requires_grad=True)  # (B, S, D) predicted embeddings
    targets = torch.randn(2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    inj = LogitInjection(9, 8, 4, 4, rank=2)  # codebook_size = D: the head's output width
    torch.nn.init.normal_(inj.A_G.P)
    f = _factors(b=2, layers=3, d=4)
    _, bias_g = inj.biases(f)  # (B, L, D)
    native = partial(embedding_regression, valid=valid)
    loss = injected_loss(pred, targets, bias_g, native=native)
    manual = torch.stack([
        0.5 * (pred + bias_g[:, k, None] - targets)[valid].square().mean()
        + 0.5 * (1 - torch.cosine_similarity((pred + bias_g[:, k, None])[valid], targets[valid],
                                             dim=-1)).mean()
        for k in range(3)
    ]).mean()  # fmt: skip
    torch.testing.assert_close(loss, manual)
    (grad,) = torch.autograd.grad(loss, pred)
    (manual_grad,) = torch.autograd.grad(manual, pred)
    torch.testing.assert_close(grad, manual_grad)
    assert grad[1, 3:].abs().sum() == 0  # padding slots get nothing


def _saved_bytes(fn, *args):
    """Bytes the autograd graph keeps for backward while ``fn`` runs (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, sum(seen.values())


def test_injected_loss_memory_does_not_grow_with_layer_count():
    """L copies of (B, S, V) logits must never be held for backward at once (issue 21)."""
    torch.manual_seed(0)
    b, s, v = 2, 16, 512
    logits = torch.randn(b, s, v)  # (B, S, V), from the frozen backbone: no grad
    targets = torch.randint(0, v, (b, s))
    one_layer = b * s * v * 4  # one float (B, S, V) copy
    saved = {}
    for layers in (2, 11):
        bias = torch.randn(b, layers, v, requires_grad=True)  # (B, L, V)
        loss, saved[layers] = _saved_bytes(injected_loss, logits, targets, bias)
        loss.backward()
    assert saved[11] - saved[2] < one_layer, saved


def test_injected_loss_chunked_equals_unchunked_values_and_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 33, requires_grad=True)  # (B, S, V)
    targets = torch.randint(0, 33, (3, 7))
    targets[2, 4:] = -100
    bias = torch.randn(3, 6, 33, requires_grad=True)  # (B, L, V)
    manual = torch.stack(
        [
            torch.nn.functional.cross_entropy(
                (logits + bias[:, layer, None]).flatten(0, 1), targets.flatten()
            )
            for layer in range(6)
        ]
    ).mean()
    grads_manual = torch.autograd.grad(manual, (logits, bias))
    loss = injected_loss(logits, targets, bias)
    grads = torch.autograd.grad(loss, (logits, bias))
    torch.testing.assert_close(loss, manual, atol=1e-6, rtol=0)
    for got, want in zip(grads, grads_manual, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_orthogonality_is_batch_normalised_frobenius():
    torch.manual_seed(0)
    zs, zu = torch.randn(8, 2, 4), torch.randn(8, 2, 3)
    manual = sum(((zs[:, i].T @ zu[:, i]) / 8).pow(2).sum() for i in range(2)) / 2
    torch.testing.assert_close(orthogonality(zs, zu), manual)
    # orthogonal factors give zero; duplicating the batch leaves the value unchanged
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert orthogonality(q[:, :4], q[:, 4:]).item() < 1e-10
    torch.testing.assert_close(orthogonality(torch.cat([zs, zs]), torch.cat([zu, zu])), manual)


def test_infonce_loss_matches_manual_and_bound_never_exceeds_log_n():
    torch.manual_seed(0)
    q, k = torch.randn(6, 2, 5), torch.randn(6, 2, 5)
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    manual = 0.0
    for layer in range(2):
        s = qn[:, layer] @ kn[:, layer].T / 0.1
        manual += torch.nn.functional.cross_entropy(s, torch.arange(6)) / 2
    torch.testing.assert_close(directed_info_nce(q, k, tau=0.1), manual)
    for _ in range(20):
        scores = torch.randn(7, 7) * 10
        assert infonce_lower_bound(scores) <= math.log(7) + 1e-6
    assert infonce_lower_bound(torch.eye(7) * 1e4) == pytest.approx(math.log(7), abs=1e-4)


def test_stop_gradient_target_side_gets_no_gradient_symmetric_does():
    torch.manual_seed(0)
    u = torch.randn(4, 2, 8, requires_grad=True)
    g = torch.randn(4, 2, 8, requires_grad=True)
    l_u2g = directed_info_nce(u, g, stop_gradient=True)
    l_u2g.backward()
    assert u.grad.abs().sum() > 0 and g.grad is None
    u.grad = None
    l_sym = directed_info_nce(u, g, stop_gradient=False)
    l_sym.backward()
    assert u.grad.abs().sum() > 0 and g.grad.abs().sum() > 0
    # both directed terms together train both sides, each only as a query
    u.grad, g.grad = None, None
    l1, l2 = SharedAlignment(tau=0.07)(u, g)
    grad_u_from_l1 = torch.autograd.grad(l1, [u, g], allow_unused=True)
    assert grad_u_from_l1[1] is None and grad_u_from_l1[0].abs().sum() > 0
    grad_from_l2 = torch.autograd.grad(l2, [u, g], allow_unused=True)
    assert grad_from_l2[0] is None and grad_from_l2[1].abs().sum() > 0


def test_alignment_loss_decreases_when_factors_agree():
    torch.manual_seed(0)
    u = torch.randn(16, 1, 8)
    assert directed_info_nce(u, u + 0.01 * torch.randn_like(u)) < directed_info_nce(
        u, torch.randn_like(u)
    )
    with pytest.raises(ValueError, match="differ"):
        directed_info_nce(u, u[:, :, :4])


def test_linear_ramp():
    ramp = LinearRamp(0.0, 0.6, steps=10, delay=5)
    assert [ramp(s) for s in (0, 5, 10, 15, 100)] == pytest.approx([0.0, 0.0, 0.3, 0.6, 0.6])
    assert LinearRamp(0, 1, steps=0)(0) == 1
    with pytest.raises(ValueError):
        LinearRamp(steps=-1)


def test_orthogonality_mean_reduction_averages_entries():
    torch.manual_seed(0)
    zs, zu = torch.randn(8, 2, 4), torch.randn(8, 2, 3)
    torch.testing.assert_close(orthogonality(zs, zu, "mean"), orthogonality(zs, zu) / 12)
    with pytest.raises(ValueError, match="reduction"):
        orthogonality(zs, zu, "max")
