"""save_adapter / load_adapter against PEFT's from_pretrained / save_pretrained on a tiny BERT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from layer_builders import output, perturb, tiny_bert, token_ids
from safetensors import safe_open
from safetensors.torch import save_file

from dora_analysis.adapters.inject import inject_adapters
from dora_analysis.adapters.peft_format import load_adapter, save_adapter
from dora_analysis.errors import InputError


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def peft_trained(base, tmp_path, seed: int = 3, **config):
    """A PEFT model with every adapter weight (and any modules_to_save copy) moved, saved to a folder."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    peft_model.eval()
    folder = tmp_path / "peft"
    peft_model.save_pretrained(folder)
    return peft_model, folder


@pytest.mark.parametrize(
    ("method", "rslora", "dropout"),
    [("dora", False, 0.0), ("dora", True, 0.1), ("lora", False, 0.0), ("lora", True, 0.1)],
)
def test_our_save_loads_in_peft_with_equal_outputs(method, rslora, dropout, tmp_path):
    from peft import PeftModel

    base = tiny_bert()
    ids = token_ids()
    model = copy.deepcopy(base)
    inject_adapters(
        model, method=method, targets=("query", "value"), r=4, alpha=8, dropout=dropout, rslora=rslora
    )
    perturb(model)
    model.eval()
    save_adapter(model, tmp_path / "ours", base_model_name_or_path="tiny-bert")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 8, rslora)
    assert config["target_modules"] == ["query", "value"] and config["lora_dropout"] == dropout
    assert config["base_model_name_or_path"] == "tiny-bert"
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert ("base_model.model.encoder.layer.1.attention.self.value.lora_magnitude_vector" in keys) == (
        method == "dora"
    )
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    close(output(theirs, ids), output(model, ids))
    assert not torch.allclose(output(base, ids), output(model, ids), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_classifier_head_travels_as_modules_to_save(task_type, tmp_path):
    from peft import PeftModel

    base = tiny_bert(head=True)
    ids = token_ids()
    model = copy.deepcopy(base)
    inject_adapters(model, targets=("query", "value"), r=4, alpha=8, modules_to_save=["classifier"])
    perturb(model)
    with torch.no_grad():
        model.classifier.weight.add_(0.5 * torch.randn_like(model.classifier.weight))
    save_adapter(model, tmp_path / "ours", task_type=task_type)
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(f.keys())
    # a fresh base whose head is initialised differently: only the saved head reproduces the logits
    fresh = tiny_bert(head=True)
    with torch.no_grad():
        fresh.classifier.weight.normal_()
    theirs = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path / "ours").eval()
    close(output(theirs, ids), output(model, ids))
    again = copy.deepcopy(fresh)
    load_adapter(again, tmp_path / "ours")
    close(output(again, ids), output(model, ids))
    assert again.classifier.weight.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [True, False])
def test_peft_save_loads_in_ours_with_equal_outputs(use_dora, tmp_path):
    base = tiny_bert()
    ids = token_ids()
    peft_model, folder = peft_trained(
        base,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        use_dora=use_dora,
        use_rslora=True,
        rank_pattern={"attention.self.value": 2},
        alpha_pattern={"layer.1.attention.self.query": 3},
        exclude_modules=["pooler.dense"],
    )
    model = copy.deepcopy(base)
    names = load_adapter(model, folder)
    assert "pooler.dense" not in names and "encoder.layer.0.attention.output.dense" in names
    assert len(names) == 2 * 5  # query, value and three "dense" per layer
    assert model.encoder.layer[1].attention.self.value.r == 2
    assert model.encoder.layer[1].attention.self.query.alpha == 3
    close(output(model, ids), output(peft_model, ids))
    # and back: our save of what we loaded is again what PEFT computes
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"encoder.layer.{i}.attention.self.value": 2 for i in range(2)}
    from peft import PeftModel

    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    close(output(theirs, ids), output(peft_model, ids))


def test_peft_seq_cls_folder_loads_in_ours(tmp_path):
    base = tiny_bert(head=True)
    ids = token_ids()
    peft_model, folder = peft_trained(
        base,
        tmp_path,
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        use_dora=True,
        task_type="SEQ_CLS",
    )
    model = copy.deepcopy(base)
    load_adapter(model, folder)
    close(output(model, ids), output(peft_model, ids))
    assert not torch.allclose(model.classifier.weight, base.classifier.weight)


def test_magnitude_only_and_full_name_targets_round_trip(tmp_path):
    from peft import PeftModel

    base = tiny_bert()
    ids = token_ids()
    model = copy.deepcopy(base)
    inject_adapters(model, method="magnitude", targets=r"encoder\.layer\.0\..*\.query")
    perturb(model)
    save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "encoder.layer.0.attention.self.query"
    ]  # "query" would match layer 1 too
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    close(output(theirs, ids), output(model, ids))
    ours = copy.deepcopy(base)
    assert load_adapter(ours, tmp_path / "ours") == ["encoder.layer.0.attention.self.query"]
    close(output(ours, ids), output(model, ids))


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    model = tiny_bert()
    inject_adapters(model, r=2, alpha=4)
    folder = save_adapter(model, tmp_path / "a")
    before = (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(InputError, match="overwrite"):
        save_adapter(model, folder)
    perturb(model)
    save_adapter(model, folder, overwrite=True)
    assert (folder / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(InputError, match="no LoRALinear"):
        save_adapter(tiny_bert(), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_mixed_methods_cannot_share_one_peft_config(tmp_path):
    model = tiny_bert()
    inject_adapters(model, targets=["query"], r=2, alpha=4)
    from dora_analysis.adapters.lora import LoRALinear

    layer = model.encoder.layer[0].attention.self
    layer.value = LoRALinear(layer.value, 2, 4)
    with pytest.raises(InputError, match="method"):
        save_adapter(model, tmp_path / "mixed")


def _rewrite(folder, edit):
    path = folder / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path)


def test_load_errors_name_file_and_tensor(tmp_path):
    model = tiny_bert()
    inject_adapters(model, r=2, alpha=4)
    folder = save_adapter(model, tmp_path / "a")
    key = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"

    _rewrite(folder, lambda t: t.__setitem__(key, torch.zeros(32, 3)))
    with pytest.raises(InputError, match=r"lora_B\.weight: shape \(32, 3\)"):
        load_adapter(tiny_bert(), folder)
    _rewrite(folder, lambda t: t.pop(key))
    with pytest.raises(InputError, match="missing 1 adapter tensor"):
        load_adapter(tiny_bert(), folder)
    _rewrite(folder, lambda t: t.__setitem__("base_model.model.pooler.dense.weight", torch.zeros(32, 32)))
    with pytest.raises(InputError, match="pooler.dense.weight: no module"):
        load_adapter(tiny_bert(), folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(InputError, match="IA3"):
        load_adapter(tiny_bert(), folder)
    with pytest.raises(InputError, match="adapter_config.json"):
        load_adapter(tiny_bert(), tmp_path / "nowhere")
