"""inject_adapters / merge_adapters on a tiny BERT built from a config."""

from __future__ import annotations

import copy

import pytest
import torch
from layer_builders import output, perturb, tiny_bert, token_ids

from dora_analysis.adapters.inject import adapter_modules, inject_adapters, merge_adapters
from dora_analysis.errors import InputError


@pytest.mark.parametrize("method", ["dora", "lora", "magnitude"])
def test_wraps_targets_freezes_the_rest_and_starts_at_the_base(method):
    base = tiny_bert()
    model = copy.deepcopy(base)
    ids = token_ids()
    names = inject_adapters(model, method=method, targets=("query", "value"), r=4, alpha=8)
    assert names == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    if method == "lora":  # the base layer's own F.linear, plus s B A x with B = 0: exact
        assert torch.equal(output(model, ids), output(base, ids))
    else:
        # A fresh DoRA / magnitude wrapper adds the bias after the GEMM (bias + z * 1), the base layer
        # inside it (addmm): two kernels, each query/value output a float32 sum of the same hidden + 1 = 33
        # terms in other orders, apart by at most 2 * 33 * 2^-24 (about 4e-6) of its absolute sum. Two
        # layers of attention and LayerNorm carry that relative change to the output; we allow them to
        # amplify it 100-fold.
        got, want = output(model, ids), output(base, ids)
        tol = 100 * 2 * 33 * 2.0**-24
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        "dora": {"lora_A", "lora_B", "magnitude"},
        "lora": {"lora_A", "lora_B"},
        "magnitude": {"magnitude"},
    }
    assert trainable == expected[method]
    wrapped = model.encoder.layer[0].attention.self.query
    assert wrapped.r == (0 if method == "magnitude" else 4) and wrapped.alpha == 8
    assert isinstance(wrapped.base, torch.nn.Linear)


def test_regex_targets_and_one_training_step_moves_only_adapters():
    model = tiny_bert()
    names = inject_adapters(model, targets=r".*layer\.1\.attention\.self\.(query|key)", r=2, alpha=4)
    assert names == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    output(model, token_ids()).pow(2).mean().backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.encoder.layer[1].attention.self.query.lora_B.abs().sum() > 0


def test_unmatched_target_names_targets_and_existing_modules():
    model = tiny_bert()
    with pytest.raises(InputError) as info:
        inject_adapters(model, targets=["q_proj", "v_proj"])
    message = str(info.value)
    assert "q_proj" in message and "query" in message and "\n" not in message
    with pytest.raises(InputError, match="non-Linear"):
        inject_adapters(model, targets=["LayerNorm"])
    assert not adapter_modules(model)


def test_modules_to_save_stay_trainable():
    model = tiny_bert(head=True)
    inject_adapters(model, targets=["query"], modules_to_save=["classifier"])
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert not model.bert.pooler.dense.weight.requires_grad
    with pytest.raises(InputError, match="already holds adapters"):
        inject_adapters(model, targets=["value"])
    with pytest.raises(InputError, match="head"):
        inject_adapters(tiny_bert(head=True), targets=["query"], modules_to_save=["head"])


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_merge_adapters_matches_wrapped_model_and_peft(method, tmp_path):
    from peft import PeftModel

    from dora_analysis.adapters.peft_format import save_adapter

    base = tiny_bert()
    model = copy.deepcopy(base)
    ids = token_ids()
    inject_adapters(model, method=method, targets=("query", "value"), r=4, alpha=8)
    perturb(model)
    wrapped = output(model, ids).detach()
    save_adapter(model, tmp_path / "adapter")
    merged = merge_adapters(model)
    assert merged is model and not adapter_modules(model)
    assert type(model.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(output(model, ids), wrapped, atol=1e-5, rtol=1e-5)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").merge_and_unload()
    for name, weight in theirs.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weight, atol=1e-6, rtol=1e-5)


def test_top_level_exports():
    import dora_analysis
    from dora_analysis import (
        DoRALinear,
        LoRALinear,
        inject_adapters,
        load_adapter,
        merge_adapters,
        save_adapter,
    )

    assert {LoRALinear.__module__, DoRALinear.__module__} == {
        "dora_analysis.adapters.lora",
        "dora_analysis.adapters.dora",
    }
    assert all(callable(f) for f in (inject_adapters, merge_adapters, save_adapter, load_adapter))
    assert "DoRALinear" in dora_analysis.__all__
