"""DoRALinear against PEFT's DoRA and float64 references (forward, gradients, norm, merge)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from layer_builders import close, peft_pair, run_both
from torch import nn

from dora_analysis.adapters.dora import DoRALinear, dense_weight_norm, factored_weight_norm, row_norm_sq


def reference_dora(x, w0, bias, lora_A, lora_B, m, s, detach_norm):
    """Paper Eq. 5 in float64 with plain autograd and the dense norm."""
    full = w0 + s * lora_B @ lora_A
    norm = torch.linalg.vector_norm(full, dim=1)
    if detach_norm:
        norm = norm.detach()
    y = (m / norm) * (x @ w0.T + s * (x @ lora_A.T) @ lora_B.T)
    return y if bias is None else y + bias


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("tokens", [(3, 5), (4, 10)])  # fewer and more tokens than in_features
def test_matches_peft_forward_gradients_and_merge(bias, dropout, rslora, tokens):
    peft_model, theirs, ours = peft_pair(bias, dropout, rslora, use_dora=True)
    x = torch.randn(*tokens, 24)
    y_theirs, y_ours, gx_theirs, gx_ours = run_both(peft_model, ours, x, training=True)
    close(y_ours, y_theirs)
    close(gx_ours, gx_theirs)
    close(ours.lora_A.grad, theirs.lora_A.default.weight.grad)
    close(ours.lora_B.grad, theirs.lora_B.default.weight.grad)
    close(ours.magnitude.grad, theirs.lora_magnitude_vector.default.weight.grad)
    # eval: dropout off on both sides
    y_theirs, y_ours, _, _ = run_both(peft_model, ours, x, training=False)
    close(y_ours, y_theirs)
    merged = peft_model.merge_and_unload().lin.weight
    close(ours.merged_weight(), merged)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("r", [4, 0])
def test_fresh_wrapper_is_exactly_the_base(bias, r):
    torch.manual_seed(1)
    base = nn.Linear(24, 16, bias=bias)
    ours = DoRALinear(copy.deepcopy(base), r=r, alpha=8)
    for shape in [(2, 7, 24), (40, 24)]:
        x = torch.randn(*shape)
        if not bias:  # the same GEMM on the same data, + s B A x with B = 0 (exact) and times g = m / m = 1
            assert torch.equal(ours(x), base(x))
            continue
        # With a bias the base layer adds it inside the GEMM (addmm: C = bias, beta = 1) and the wrapper
        # after it (bias + z * 1): two kernels, which may sum the in = 24 products and the bias in other
        # orders. Both are float32 sums of the same 25 terms: within 2 * 25 * 2^-24 of their absolute sum.
        bound = 2 * 25 * 2.0**-24 * (x.abs() @ base.weight.abs().T + base.bias.abs())
        assert ((ours(x) - base(x)).abs() <= bound).all()
    expected = np.linalg.norm(base.weight.detach().double().numpy(), axis=1)
    np.testing.assert_allclose(ours.magnitude.detach().numpy(), expected, rtol=1e-6)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == ({"lora_A", "lora_B", "magnitude"} if r else {"magnitude"})


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("tokens", [6, 40])
@pytest.mark.parametrize("chunk_bytes", [None, 16 * 4 * 3])  # one chunk; chunks of 3 rows (last one partial)
def test_gradients_match_float64_reference(detach_norm, tokens, chunk_bytes, monkeypatch):
    if chunk_bytes:
        monkeypatch.setattr("dora_analysis.adapters.dora._CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(2)
    ours = DoRALinear(nn.Linear(24, 16), r=4, alpha=8, detach_norm=detach_norm)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.3)
        ours.magnitude.mul_(1 + 0.2 * torch.randn(16))
    x = torch.randn(tokens, 24)
    params = [ours.lora_A, ours.lora_B, ours.magnitude]
    ref = [p.detach().double().requires_grad_(True) for p in params]
    w0, b0 = ours.base.weight.double(), ours.base.bias.double()
    grad = torch.randn(tokens, 16)
    ours(x).backward(grad)
    reference_dora(x.double(), w0, b0, *ref, ours.scale, detach_norm).backward(grad.double())
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
    if not detach_norm:  # the norm's gradient really changes A's gradient
        detached = [p.detach().double().requires_grad_(True) for p in params]
        reference_dora(x.double(), w0, b0, *detached, ours.scale, True).backward(grad.double())
        assert not torch.allclose(detached[0].grad, ref[0].grad, atol=1e-4)


@pytest.mark.parametrize("update", [0.01, 1.0, 30.0])
def test_factored_norm_agrees_with_dense_to_float32_rounding(update):
    torch.manual_seed(3)
    w0 = torch.randn(64, 200)
    lora_A = torch.randn(8, 200) / 200**0.5
    lora_B = torch.randn(64, 8) * update
    s = 2.0
    exact = torch.linalg.vector_norm(w0.double() + s * lora_B.double() @ lora_A.double(), dim=1)
    factored = factored_weight_norm(w0, lora_A, lora_B, s, row_norm_sq(w0))
    dense = dense_weight_norm(w0, lora_A, lora_B, s)
    assert factored.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    assert ((factored.double() - exact).abs() / exact).max() < 8 * eps
    assert ((factored - dense).abs() / dense).max() < 16 * eps


def test_factored_norm_near_cancellation():
    """An update that nearly cancels a row: those rows are recomputed densely, so still accurate."""
    torch.manual_seed(4)
    lora_A = torch.randn(4, 50)
    lora_B = torch.randn(8, 4)
    w0 = -(lora_B @ lora_A) + 1e-3 * torch.randn(8, 50)
    exact = torch.linalg.vector_norm(w0.double() + lora_B.double() @ lora_A.double(), dim=1)
    factored = factored_weight_norm(w0, lora_A, lora_B, 1.0, row_norm_sq(w0))
    assert ((factored.double() - exact).abs() / exact).max() < 8 * torch.finfo(torch.float32).eps
    # partly cancelled: half the rows near zero, the rest ordinary; gradients flow through both
    w0[::2] = torch.randn(4, 50)
    lora_A.requires_grad_(True)
    factored = factored_weight_norm(w0, lora_A, lora_B, 1.0, row_norm_sq(w0))
    exact = torch.linalg.vector_norm(w0.double() + lora_B.double() @ lora_A.double(), dim=1)
    assert ((factored.double() - exact).abs() / exact).max() < 8 * torch.finfo(torch.float32).eps
    factored.sum().backward()
    assert torch.isfinite(lora_A.grad).all() and lora_A.grad.abs().sum() > 0


def test_merge_unmerge_round_trip_and_norm_cache():
    torch.manual_seed(5)
    ours = DoRALinear(nn.Linear(24, 16), r=4, alpha=8)
    with torch.no_grad():
        ours.lora_B.normal_(std=0.3)
        ours.magnitude.mul_(1.1)
    original = ours.base.weight.detach().clone()
    x = torch.randn(6, 24)
    before = ours(x).detach()
    ours.merge()
    assert ours.merged
    close(ours(x), before)
    ours.unmerge()
    close(ours.base.weight, original, tol=1e-6)
    close(ours(x), before)
    # the cached ||W0||^2 follows an in-place change of the base weight
    with torch.no_grad():
        ours.base.weight.mul_(2)
    expected = dense_weight_norm(ours.base.weight, ours.lora_A, ours.lora_B, ours.scale)
    close(ours.weight_norm(), expected)


def test_magnitude_only_mode():
    torch.manual_seed(6)
    ours = DoRALinear(nn.Linear(24, 16), r=0, alpha=8)
    assert ours.lora_A is None and ours.lora_B is None
    with torch.no_grad():
        ours.magnitude.mul_(1 + 0.3 * torch.rand(16))
    x = torch.randn(9, 24)
    w0, b0 = ours.base.weight.detach().double().numpy(), ours.base.bias.detach().double().numpy()
    g = ours.magnitude.detach().double().numpy() / np.linalg.norm(w0, axis=1)
    expected = g * (x.double().numpy() @ w0.T) + b0
    y = ours(x)
    np.testing.assert_allclose(y.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(
        ours.magnitude.grad.double().numpy(),
        (x.double().numpy() @ w0.T).sum(0) / np.linalg.norm(w0, axis=1),
        rtol=1e-4,
    )


def test_bfloat16_base_norm_in_float32():
    torch.manual_seed(7)
    base = nn.Linear(24, 16).to(torch.bfloat16)
    ours = DoRALinear(base, r=4, alpha=8)
    assert ours.magnitude.dtype == ours.lora_A.dtype == torch.float32
    with torch.no_grad():
        ours.lora_B.normal_(std=0.3)
    assert ours.weight_norm().dtype == torch.float32
    x = torch.randn(5, 24).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    params = [p.detach().double() for p in (ours.lora_A, ours.lora_B, ours.magnitude)]
    expected = reference_dora(x.double(), base.weight.double(), base.bias.double(), *params, ours.scale, True)
    torch.testing.assert_close(y.double(), expected.detach(), atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert ours.magnitude.grad.dtype == torch.float32 and torch.isfinite(ours.magnitude.grad).all()
