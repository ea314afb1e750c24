"""LoRALinear against PEFT's lora.Linear and a float64 reference."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from layer_builders import close, peft_pair, run_both
from torch import nn

from dora_analysis.adapters.lora import LoRALinear, lora_scale


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("tokens", [(3, 5), (4, 10)])
def test_matches_peft_forward_gradients_and_merge(bias, dropout, rslora, tokens):
    peft_model, theirs, ours = peft_pair(bias, dropout, rslora, use_dora=False)
    x = torch.randn(*tokens, 24)
    y_theirs, y_ours, gx_theirs, gx_ours = run_both(peft_model, ours, x, training=True)
    close(y_ours, y_theirs)
    close(gx_ours, gx_theirs)
    close(ours.lora_A.grad, theirs.lora_A.default.weight.grad)
    close(ours.lora_B.grad, theirs.lora_B.default.weight.grad)
    if dropout:  # the mask really applied: without it the output differs
        ours.eval()
        assert not torch.allclose(ours(x), y_ours.detach())
    merged = peft_model.merge_and_unload().lin.weight
    close(ours.merged_weight(), merged)


@pytest.mark.parametrize("bias", [True, False])
def test_fresh_wrapper_is_exactly_the_base(bias):
    torch.manual_seed(1)
    base = nn.Linear(24, 16, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), r=4, alpha=8)
    x = torch.randn(2, 7, 24)
    assert torch.equal(ours(x), base(x))
    assert not ours.base.weight.requires_grad
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_matches_float64_reference():
    torch.manual_seed(2)
    ours = LoRALinear(nn.Linear(24, 16), r=4, alpha=12, rslora=True)
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(5, 24)
    w0, b0 = ours.base.weight.double().numpy(), ours.base.bias.double().numpy()
    a, b = ours.lora_A.detach().double().numpy(), ours.lora_B.detach().double().numpy()
    s = 12 / math.sqrt(4)
    expected = x.double().numpy() @ (w0 + s * b @ a).T + b0
    np.testing.assert_allclose(ours(x).detach().double().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert ours.scale == pytest.approx(s) and lora_scale(12, 4) == 3


def test_init_is_peft_kaiming_uniform():
    torch.manual_seed(3)
    ours = LoRALinear(nn.Linear(300, 20), r=8, alpha=16)
    torch.manual_seed(3)
    nn.Linear(300, 20)  # the base layer drew its numbers first
    expected = torch.empty(8, 300)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    assert torch.equal(ours.lora_A.detach(), expected)
    assert ours.lora_A.abs().max() <= 1 / math.sqrt(300)
    assert torch.count_nonzero(ours.lora_B) == 0


def test_merge_unmerge_round_trip():
    torch.manual_seed(4)
    ours = LoRALinear(nn.Linear(24, 16), r=4, alpha=8)
    with torch.no_grad():
        ours.lora_B.normal_()
    original = ours.base.weight.detach().clone()
    x = torch.randn(6, 24)
    before = ours(x).detach()
    effective = ours.merged_weight()
    ours.merge()
    assert ours.merged and torch.allclose(ours.base.weight, effective)
    close(ours(x), before)
    ours.unmerge()
    close(ours.base.weight, original, tol=1e-6)
    close(ours(x), before)


def test_bfloat16_base():
    torch.manual_seed(5)
    base = nn.Linear(24, 16).to(torch.bfloat16)
    ours = LoRALinear(base, r=4, alpha=8)
    assert ours.lora_A.dtype == torch.float32 and ours.lora_B.dtype == torch.float32
    with torch.no_grad():
        ours.lora_B.normal_()
    x = torch.randn(5, 24).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    w = base.weight.double() + ours.scale * (ours.lora_B.double() @ ours.lora_A.double())
    expected = x.double() @ w.detach().T + base.bias.double()
    torch.testing.assert_close(y.double(), expected.detach(), atol=0.1, rtol=0.02)
    y.float().sum().backward()
    assert ours.lora_B.grad is not None and ours.lora_B.grad.dtype == torch.float32
