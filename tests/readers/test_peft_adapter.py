"""PEFT adapters read as PEFT reads them, or refused where PEFT refuses or means something else.

References are PEFT's own ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` (or its
refusal) on tiny models built from transformers configs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_peft_adapter, tiny_bert_config

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint

QUERY = "encoder.layer.0.attention.self.query.weight"


def _peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import BertModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = BertModel.from_pretrained(base_dir).eval()
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _trained_with_init(folder: Path, init: str) -> tuple[Path, Path, Path]:
    """A BertModel base, and its adapter with ``init_lora_weights=init`` after a mock training step,
    saved as is (``raw``) and converted to plain LoRA (``converted``), as PEFT's examples do."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertModel(tiny_bert_config()).eval()
    base.save_pretrained(folder / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
        model.save_pretrained(folder / "initial")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        model.save_pretrained(folder / "raw")
        model.save_pretrained(
            folder / "converted", path_initial_model_for_weight_conversion=str(folder / "initial")
        )
    return folder / "base", folder / "raw", folder / "converted"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrote_the_base_is_refused_unless_converted(tmp_path: Path, init: str):
    base, raw, converted = _trained_with_init(tmp_path, init)
    peft_raw = _peft_merged(base, raw)
    with open_checkpoint(tmp_path / "base") as plain:
        w0 = plain.get(QUERY)
    # PEFT re-runs the init on the base, so the factors alone over W0 would be a different weight
    raw_factors = load_file(raw / "adapter_model.safetensors")
    a = raw_factors[f"base_model.model.{QUERY[:-7]}.lora_A.weight"]
    b = raw_factors[f"base_model.model.{QUERY[:-7]}.lora_B.weight"]
    assert (peft_raw[QUERY] - (w0 + 2.0 * b @ a)).abs().max() > 1e-2
    with pytest.raises(InputError) as caught:
        open_checkpoint(raw, base=base)
    message = str(caught.value)
    assert "path_initial_model_for_weight_conversion" in message and repr(init) in message
    assert len(message) <= 300 + len(str(raw))
    reference = _peft_merged(base, converted)
    assert json.loads((converted / "adapter_config.json").read_text())["init_lora_weights"] is True
    with open_checkpoint(converted, base=base) as reader:
        for name in reader.names():
            # fp32 sums of r=8 products of O(1) factors: a few ulps of O(1) values
            torch.testing.assert_close(reader.get(name), reference[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(reader.get(QUERY), peft_raw[QUERY], atol=1e-5, rtol=0)


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def test_target_modules_matching_none_of_the_modules_is_refused_like_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertModel

    make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    _edit_config(tmp_path / "adapter", target_modules=["nothing_here"])
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(BertModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with pytest.raises(InputError, match="match none of the adapter's 4 modules"):
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")


@pytest.mark.parametrize(
    "fields",
    [
        dict(target_modules=["query"]),
        dict(exclude_modules=["value"]),
        dict(target_modules=".*query"),
        dict(layers_to_transform=[1]),
    ],
    ids=["list", "exclude", "regex", "layers"],
)
def test_factors_peft_would_not_load_are_refused(tmp_path: Path, fields: dict) -> None:
    reference = make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    _edit_config(tmp_path / "adapter", **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    ignored = [n for n in peft if not torch.equal(peft[n], reference[n])]
    assert ignored, "PEFT loads every factor, so there was nothing to refuse"
    with pytest.raises(InputError, match="PEFT would not load them"):
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")


@pytest.mark.parametrize(
    "fields",
    [
        dict(target_modules=".*(query|value)"),
        dict(target_modules=["query", "value"], layers_to_transform=[0, 1]),
    ],
    ids=["regex", "layers"],
)
def test_targets_written_other_ways_read_like_peft(tmp_path: Path, fields: dict) -> None:
    make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    _edit_config(tmp_path / "adapter", **fields)
    reference = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    with open_checkpoint(tmp_path / "adapter", base=tmp_path / "base") as reader:
        assert len(reader.names()) == 4
        for name in reader.names():
            torch.testing.assert_close(reader.get(name), reference[name], atol=1e-5, rtol=0)


def test_a_three_dimensional_lora_a_is_refused_like_peft(tmp_path: Path) -> None:
    make_peft_adapter(
        tmp_path / "base", tmp_path / "adapter", model="bert", r=4, lora_alpha=8, target_modules=["query"]
    )
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    factors = load_file(path)
    key = next(k for k in factors if k.endswith("lora_A.weight"))
    factors[key] = factors[key].reshape(4, 4, 8).contiguous()  # (r, 32) folded: the same elements
    save_file(factors, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _peft_merged(tmp_path / "base", tmp_path / "adapter")
    with pytest.raises(InputError, match="must both be 2-D") as caught:
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")
    assert key in str(caught.value)
