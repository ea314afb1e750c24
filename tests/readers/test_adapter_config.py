"""adapter_config.json (readers/adapter_config.py): fields PEFT would misread are read as PEFT reads them or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


def _peft_merged(model: str, base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What PEFT itself makes of the folder: ``from_pretrained`` then ``merge_and_unload``."""
    import warnings

    from peft import PeftModel
    from transformers import BertModel, GPT2LMHeadModel

    cls = {"bert": BertModel, "gpt2": GPT2LMHeadModel}[model]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns where it overrides the config or skips a key
        merged = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _ours(adapter: Path, base_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    with open_checkpoint(adapter, base=base_dir) as reader:
        return {n: reader.get(n).clone() for n in names}


@pytest.mark.parametrize(
    "model, lora, edit, weights",
    [
        # use_dora false beside stored magnitudes: PEFT builds LoRA layers and skips the vectors
        ("bert", {"use_dora": True}, {"use_dora": False}, ["encoder.layer.0.attention.self.query.weight"]),
        # fan_in_fan_out true on an nn.Linear (square 32x32): PEFT warns and forces it off
        ("bert", {}, {"fan_in_fan_out": True}, ["encoder.layer.1.attention.self.value.weight"]),
        # fan_in_fan_out false on GPT-2's Conv1D: PEFT forces it on (square attn.c_proj, non-square c_attn)
        (
            "gpt2",
            {"fan_in_fan_out": True},
            {"fan_in_fan_out": False},
            ["transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_attn.weight"],
        ),
    ],
    ids=["stray-magnitude", "fan-in-fan-out-on-linear", "fan-in-fan-out-off-on-conv1d"],
)
def test_silent_difference_cases_read_as_peft_reads_them(tmp_path, model, lora, edit, weights) -> None:
    from tiny_models import make_peft_adapter

    targets = ["c_attn", "c_proj"] if model == "gpt2" else ["query", "value"]
    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    written = make_peft_adapter(
        base_dir, adapter, model=model, r=4, lora_alpha=8, target_modules=targets, **lora
    )
    _edit_config(adapter, **edit)
    want = _peft_merged(model, base_dir, adapter)
    got = _ours(adapter, base_dir, weights)
    for name in weights:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    if "use_dora" in edit:  # the edit matters: the folder as written (DoRA) merges differently
        assert not torch.allclose(written[weights[0]], want[weights[0]], atol=1e-4)


def test_non_boolean_and_non_integer_fields_refused_where_peft_would_misread_them(tmp_path) -> None:
    from peft import LoraConfig, PeftModel
    from tiny_models import make_peft_adapter
    from transformers import BertModel

    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    make_peft_adapter(base_dir, adapter, model="bert", r=4, lora_alpha=8, target_modules=["query"])
    _edit_config(adapter, use_dora="false")
    assert LoraConfig.from_pretrained(adapter).use_dora  # PEFT takes the string "false" as true: DoRA
    with pytest.raises(InputError, match="use_dora"):
        open_checkpoint(adapter, base=base_dir)
    _edit_config(adapter, use_dora=False, r=4.9)
    with pytest.raises((TypeError, ValueError, RuntimeError)):  # PEFT cannot build rank 4.9 either
        PeftModel.from_pretrained(BertModel.from_pretrained(base_dir), adapter)
    with pytest.raises(InputError, match="positive integer rank"):
        open_checkpoint(adapter, base=base_dir)
