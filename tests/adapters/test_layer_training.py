"""The layers under real training conditions: autocast and 16-bit bases, in-place ops after the layer,
``dL/dg`` at tiny magnitudes, ``torch.compile``, the eval-mode ``g`` cache, meta-device initialisation,
and that DoRA's magnitude really trains in each of these modes."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_builders import output, peft_pair, tiny_bert, token_ids
from torch import nn

from dora_analysis.adapters.dora import DoRALinear
from dora_analysis.adapters.inject import init_adapter_parameters, inject_adapters
from dora_analysis.adapters.lora import LoRALinear

BF16_TOL = 2e-2  # relative (Frobenius) error a bf16 computation stays within, against float32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def trained_pair(use_dora: bool, seed: int = 0):
    """PEFT's layer and ours on the same base, with moved A, B (and m)."""
    peft_model, theirs, ours = peft_pair(True, 0.0, False, use_dora=use_dora)
    return peft_model, theirs, ours


def grads(module: nn.Module, names) -> list[torch.Tensor]:
    return [dict(module.named_parameters())[n].grad.clone() for n in names]


OURS = {True: ["lora_A", "lora_B", "magnitude"], False: ["lora_A", "lora_B"]}
THEIRS = {
    True: ["lora_A.default.weight", "lora_B.default.weight", "lora_magnitude_vector.default.weight"],
    False: ["lora_A.default.weight", "lora_B.default.weight"],
}


def forward_backward(layer, x, grad, dtype=None):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(x)
    y.float().backward(grad)
    return y, x.grad


@pytest.mark.parametrize("use_dora", [True, False])
def test_autocast_bf16_matches_float32_and_peft(use_dora):
    peft_model, theirs, ours = trained_pair(use_dora)
    x, grad = torch.randn(3, 10, 24), torch.randn(3, 10, 16)
    y32, gx32 = forward_backward(ours, x, grad)
    g32 = grads(ours, OURS[use_dora])
    y16, gx16 = forward_backward(ours, x, grad, torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    g16 = grads(ours, OURS[use_dora])
    assert all(g.dtype == torch.float32 for g in g16)  # parameters and their gradients stay float32
    yp, gxp = forward_backward(peft_model, x, grad, torch.bfloat16)
    gp = grads(theirs, THEIRS[use_dora])
    for mine, exact, peft in [(y16, y32, yp), (gx16, gx32, gxp), *zip(g16, g32, gp, strict=True)]:
        assert rel_err(mine, exact) < BF16_TOL
        assert rel_err(mine, peft) < BF16_TOL
    if use_dora:  # the norm and g are float32 under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ours.weight_norm().dtype == torch.float32
            assert ours.magnitude_scale().dtype == torch.float32


@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_16_bit_base_weights(cls, base_dtype, autocast, dropout):
    torch.manual_seed(1)
    base32 = nn.Linear(24, 16)
    ours = cls(copy.deepcopy(base32).to(base_dtype), 4, 8, dropout=dropout)
    exact = cls(copy.deepcopy(base32), 4, 8, dropout=dropout)
    with torch.no_grad():
        base32.weight.copy_(ours.base.weight.float())  # the same (rounded) base for the reference
        base32.bias.copy_(ours.base.bias.float())
        exact.base.load_state_dict(base32.state_dict())
        exact.lora_A.copy_(ours.lora_A)
        ours.lora_B.normal_(std=0.3)
        exact.lora_B.copy_(ours.lora_B)
        if cls is DoRALinear:
            assert ours.magnitude.dtype == torch.float32
            ours.magnitude.mul_(1.1)
            exact.magnitude.copy_(ours.magnitude)
    x, grad = torch.randn(6, 24), torch.randn(6, 16)
    dtype = base_dtype if autocast else None
    torch.manual_seed(5)  # the same dropout mask in both
    y, gx = forward_backward(ours, x.to(base_dtype) if not autocast else x, grad, dtype)
    assert y.dtype == base_dtype
    torch.manual_seed(5)
    y_ref, gx_ref = forward_backward(exact, x, grad)
    assert rel_err(y, y_ref) < BF16_TOL and rel_err(gx, gx_ref) < BF16_TOL
    for name in OURS[cls is DoRALinear]:
        mine, ref = dict(ours.named_parameters())[name].grad, dict(exact.named_parameters())[name].grad
        assert mine.dtype == torch.float32 and rel_err(mine, ref) < BF16_TOL


@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (3, 5)])
def test_in_place_op_after_the_layer(cls, bias, shape):
    torch.manual_seed(2)
    layer = cls(nn.Linear(24, 16, bias=bias), 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    model = nn.Sequential(layer, nn.ReLU(inplace=True))
    reference = nn.Sequential(copy.deepcopy(layer), nn.ReLU())
    x, grad = torch.randn(*shape, 24), torch.randn(*shape, 16)
    for mode in (True, False):  # with autograd never a view: FSDP2 drops its hook on in-place ops on views
        assert not layer.train(mode)(x)._is_view()
    layer.train()
    model(x).backward(grad)  # raised "modified by an inplace operation" before
    reference(x).backward(grad)
    for (name, p), q in zip(layer.named_parameters(), reference[0].parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_magnitude_gradient_exact_at_tiny_magnitude_and_large_bias():
    """dL/dg used to be recovered as sum(dy (y - bias)) / g: all precision lost when |g z| << |bias|."""
    torch.manual_seed(3)
    layer = DoRALinear(nn.Linear(24, 16), 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.magnitude.fill_(1e-30)
        layer.base.bias.fill_(50.0)
    x, grad = torch.randn(7, 24), torch.randn(7, 16)
    layer(x).backward(grad)
    w = layer.base.weight.double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
    z = x.double() @ w.T  # (N, out): W0 x + s B A x, without the bias
    expected = (grad.double() * z).sum(0) / torch.linalg.vector_norm(w, dim=1)
    torch.testing.assert_close(layer.magnitude.grad.double(), expected.detach(), rtol=1e-5, atol=0)


def test_eval_cache_follows_every_parameter():
    torch.manual_seed(4)
    layer = DoRALinear(nn.Linear(24, 16), 4, 8).eval()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(3, 24)

    def fresh():  # the same layer without a cache
        other = copy.deepcopy(layer)
        other.clear_norm_cache()
        other.cache_norm = False
        with torch.no_grad():
            return other(x)

    with torch.no_grad():
        first = layer(x)
        cached = layer._g_cache[1]
        assert layer(x).equal(first) and layer._g_cache[1] is cached  # reused, not recomputed
    for change in (
        lambda: layer.lora_A.mul_(1.5),
        lambda: layer.lora_B.add_(0.3),
        lambda: layer.magnitude.mul_(0.7),
        lambda: layer.base.weight.mul_(1.2),
    ):
        with torch.no_grad():
            change()
            y = layer(x)
        torch.testing.assert_close(y, fresh(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(y, layer(x).detach(), atol=1e-6, rtol=1e-6)  # = the autograd path
        assert not torch.allclose(y, first, atol=1e-4)
        first = y
    # an optimizer step changes the parameters in place: the next eval forward sees it
    layer.train()
    torch.optim.SGD(layer.parameters(), lr=0.1).zero_grad()
    layer(x).sum().backward()
    torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1).step()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fresh(), atol=1e-6, rtol=1e-6)


def test_meta_model_initialised_after_loading():
    reference = tiny_bert(seed=5)
    state = reference.state_dict()
    with torch.device("meta"):
        model = type(reference)(reference.config)
    inject_adapters(model, "dora", targets=("query", "value"), r=4, alpha=8)
    with pytest.raises(RuntimeError, match="meta"):
        init_adapter_parameters(model)
    model.to_empty(device="cpu")
    wrapped = {
        k.replace(".query.", ".query.base.").replace(".value.", ".value.base."): v for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(wrapped, strict=False)
    assert not unexpected and all(k.endswith(("lora_A", "lora_B", "magnitude")) for k in missing)
    with torch.no_grad():  # non-persistent buffers (position ids) are not in the state dict
        for (_name, buffer), (_, value) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
            buffer.copy_(value)
    init_adapter_parameters(model)
    ids = token_ids()
    torch.testing.assert_close(output(model.eval(), ids), output(reference, ids), atol=1e-6, rtol=1e-6)
    for module in model.modules():
        if isinstance(module, DoRALinear):
            expected = torch.linalg.vector_norm(module.base.weight, dim=1)
            torch.testing.assert_close(module.magnitude.detach(), expected)
            assert not module.lora_B.any() and module.lora_A.abs().sum() > 0


def _train_steps(layer, x, target, steps=3, dtype=None, compiled=None):
    run = layer if compiled is None else compiled
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    start = layer.magnitude.detach().clone()
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = (run(x).float() - target).square().mean()
        loss.backward()
        assert layer.magnitude.grad is not None and layer.magnitude.grad.abs().sum() > 0
        optimizer.step()
    return start, layer.magnitude.detach()


@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "fp16-autocast", "bf16-base", "dropout", "r0"])
def test_magnitude_trains(mode):
    torch.manual_seed(6)
    base = nn.Linear(24, 16)
    if mode == "bf16-base":
        base = base.to(torch.bfloat16)
    layer = DoRALinear(base, 0 if mode == "r0" else 4, 8, dropout=0.2 if mode == "dropout" else 0.0)
    x = torch.randn(20, 24).to(base.weight.dtype)
    target = torch.randn(20, 16)
    dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(mode)
    start, end = _train_steps(layer, x, target, dtype=dtype)
    assert (end - start).abs().min() > 0  # every unit's magnitude moved


def test_torch_compile_same_outputs_and_gradients():
    torch.manual_seed(7)
    layer = DoRALinear(nn.Linear(24, 16), 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    reference = copy.deepcopy(layer)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    x, grad = torch.randn(5, 24), torch.randn(5, 16)
    compiled(x).backward(grad)
    reference(x).backward(grad)
    for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    start, end = _train_steps(layer, x, torch.randn(5, 16), steps=2, compiled=compiled)
    assert (end - start).abs().min() > 0


@pytest.mark.slow
@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
def test_torch_compile_with_inductor_the_default_backend(cls):
    """What users get from plain ``torch.compile``: generated C++ kernels, no graph break; the fused
    reductions may sum in another order, hence float32 tolerances rather than equality."""
    torch.manual_seed(8)
    layer = cls(nn.Linear(64, 32), 4, 8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    reference = copy.deepcopy(layer)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x, grad = torch.randn(5, 7, 64), torch.randn(5, 7, 32)
    y = compiled(x)
    y.backward(grad)
    expected = reference(x)
    expected.backward(grad)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    assert not y._is_view() and (cls is LoRALinear or layer.magnitude.grad.abs().sum() > 0)
    layer.eval()
    reference.eval()
    with torch.no_grad():  # eval under compile bypasses the g cache: the same numbers
        torch.testing.assert_close(compiled(x), reference(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cancelled", [3, 8])  # rows the update nearly cancels (all 8 in the second case)
def test_sync_free_cancellation_fix_matches_the_exact_one(cancelled, monkeypatch):
    """Off the CPU the cancelled rows are fixed with a fixed-size topk and a mask: same result."""
    from dora_analysis.adapters.dora import _redo_cancelled_rows, row_norm_sq

    torch.manual_seed(8)
    lora_A, lora_B = torch.randn(4, 50, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    w0 = torch.randn(8, 50)
    w0[:cancelled] = -(lora_B[:cancelled] @ lora_A).float() + 1e-3 * torch.randn(cancelled, 50)
    weight_sq = row_norm_sq(w0)
    w_a = w0.double() @ lora_A.T
    sq = weight_sq + 2 * (lora_B * w_a).sum(1) + ((lora_B @ (lora_A @ lora_A.T)) * lora_B).sum(1)
    sq = sq + 1e-9 * weight_sq  # what float32 rounding of W0 A^T would add
    exact = _redo_cancelled_rows(sq, weight_sq, w0, lora_A, lora_B, 1.0, sync_free=False)
    monkeypatch.setattr("dora_analysis.adapters.dora._MAX_REDONE", 5)
    masked = _redo_cancelled_rows(sq, weight_sq, w0, lora_A, lora_B, 1.0, sync_free=True)
    # The two paths multiply differently shaped row subsets, so BLAS may sum in another order:
    # agreement to the float64 rounding bound of the recomputed rows, not bit for bit.
    bound = _recomputed_row_bound(w0, lora_A, lora_B)
    if cancelled <= 5:
        assert ((masked - exact).abs() <= bound).all(), (masked - exact).abs().max()
        assert ((exact - sq).abs() > 100 * bound).any()  # the fix changed something, beyond rounding
    else:  # more cancelled rows than the fixed budget: the 5 worst are fixed, no others touched
        fixed = masked != sq
        assert fixed.sum() == 5 and ((masked - exact).abs()[fixed] <= bound[fixed]).all()


def _recomputed_row_bound(w0, lora_A, lora_B):
    """Bound ``(out,)`` on how far two float64 evaluations of ``||W0_j + B_j A||^2`` may differ.

    Each entry ``d = w + sum_k b_k a_k`` is within ``delta = (r + 1) u (|w| + |b| |a|)`` of the exact
    value whatever the summation order (u = 2^-53), so two evaluations differ by at most ``2 delta``
    per entry; squaring and summing ``n`` entries adds ``n u sum d^2`` on each side.
    """
    u = torch.finfo(torch.float64).eps / 2
    rank, n = lora_A.shape
    d = w0.double() + lora_B @ lora_A
    delta = (rank + 1) * u * (w0.double().abs() + lora_B.abs() @ lora_A.abs())
    return (2 * delta * (2 * d.abs() + 2 * delta)).sum(1) + 2 * n * u * d.square().sum(1)


@pytest.mark.parametrize("cls", [DoRALinear, LoRALinear])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_autocast_casts_the_input_once(cls, dropout):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(3)
    layer = cls(nn.Linear(24, 16), 4, 8, dropout=dropout)
    x = torch.randn(3, 5, 24, requires_grad=True) * 1.0  # an activation: autocast's cast cache skips it
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)  # the forward: backward casts gradients of this shape too
    casts = [
        e
        for e in prof.events()
        if e.name == "aten::_to_copy" and e.input_shapes and list(e.input_shapes[0]) in ([3, 5, 24], [15, 24])
    ]
    # one cast for both products; with dropout the adapter's input is another tensor, cast once more
    assert len(casts) == (1 if dropout == 0 else 2), [e.input_shapes for e in casts]
