"""Layers and models to test the adapters on, and running ours beside PEFT's."""

from __future__ import annotations

import copy

import torch
from tiny_models import tiny_bert_config
from torch import nn

from dora_analysis.adapters.inject import adapter_modules
from dora_analysis.adapters.lora import LoRALinear


class One(nn.Module):
    """One linear layer named ``lin`` (PEFT needs a parent module to wrap)."""

    def __init__(self, bias: bool = True, in_features: int = 24, out_features: int = 16):
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.lin(x)


def peft_pair(bias: bool, dropout: float, rslora: bool, use_dora: bool, r: int = 4, alpha: float = 8):
    """The same base wrapped by PEFT and by us, with equal A, B (random) and, for DoRA, equal m."""
    from peft import LoraConfig, get_peft_model

    from dora_analysis.adapters.dora import DoRALinear

    torch.manual_seed(0)
    base = One(bias)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["lin"],
        use_dora=use_dora,
        use_rslora=rslora,
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    theirs = peft_model.base_model.model.lin
    cls = DoRALinear if use_dora else LoRALinear
    ours = cls(copy.deepcopy(base.lin), r, alpha, dropout=dropout, rslora=rslora)
    with torch.no_grad():
        lora_B = torch.randn(16, r) * 0.3
        theirs.lora_B.default.weight.copy_(lora_B)
        ours.lora_B.copy_(lora_B)
        ours.lora_A.copy_(theirs.lora_A.default.weight)
        if use_dora:
            m = theirs.lora_magnitude_vector.default.weight * (1 + 0.1 * torch.randn(16))
            theirs.lora_magnitude_vector.default.weight.copy_(m)
            ours.magnitude.copy_(m)
    return peft_model, theirs, ours


def run_both(peft_model, ours, x, training: bool):
    """Forward + backward of both with the same dropout mask (same seed before each forward)."""
    peft_model.train(training)
    ours.train(training)
    x_theirs = x.clone().requires_grad_(True)
    x_ours = x.clone().requires_grad_(True)
    torch.manual_seed(123)
    y_theirs = peft_model(x_theirs)
    torch.manual_seed(123)
    y_ours = ours(x_ours)
    grad = torch.randn_like(y_theirs)
    y_theirs.backward(grad)
    y_ours.backward(grad)
    return y_theirs, y_ours, x_theirs.grad, x_ours.grad


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def tiny_bert(head: bool = False, seed: int = 0):
    from transformers import BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    model = (BertForSequenceClassification if head else BertModel)(tiny_bert_config(num_labels=3))
    return model.eval()


def token_ids(seed: int = 1):
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def perturb(model, seed: int = 2):
    """Move every adapter away from its initialisation (B, A, m) as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in adapter_modules(model).values():
            if module.lora_B is not None:
                module.lora_B.normal_(std=0.2)
                module.lora_A.add_(0.05 * torch.randn_like(module.lora_A))
            if hasattr(module, "magnitude"):
                module.magnitude.mul_(1 + 0.1 * torch.randn_like(module.magnitude))
