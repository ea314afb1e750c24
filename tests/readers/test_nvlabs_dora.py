"""The NVlabs DoRA layout (readers/nvlabs_dora.py): partial and full state dicts, alpha required."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reader_checks import (
    TARGETS,
    check_against_peft,
    read_all,
)
from safetensors.torch import save_file
from tiny_models import make_peft_adapter

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint


def _nvlabs_state(adapter: Path) -> dict[str, torch.Tensor]:
    """A PEFT DoRA adapter rewritten in the NVlabs layout (magnitude as ``weight_m_wdecomp.weight`` (out, 1))."""
    from safetensors.torch import load_file

    out = {}
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        key = key.removeprefix("base_model.model.")
        if key.endswith(".lora_magnitude_vector"):
            out[key.replace(".lora_magnitude_vector", ".weight_m_wdecomp.weight")] = value[:, None].clone()
        else:
            out[key] = value
    return out


def test_nvlabs_partial_and_full_state_dicts(tmp_path: Path) -> None:
    reference = make_peft_adapter(
        tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True
    )
    factors = _nvlabs_state(tmp_path / "adapter")
    torch.save(factors, tmp_path / "partial.pt")
    with open_checkpoint(tmp_path / "partial.pt", base=tmp_path / "base", lora_alpha=8) as reader:
        check_against_peft(reader, reference, 4, set())
        assert reader.low_rank(reader.names()[0]).scale == pytest.approx(2.0)

    base = read_all(tmp_path / "base")
    full = {**base, **factors}
    save_file(full, tmp_path / "full.safetensors")
    with open_checkpoint(tmp_path / "full.safetensors", lora_alpha=8) as reader:
        assert not reader.partial and set(reader.names()) == set(base)
        for name in reader.names():
            torch.testing.assert_close(reader.get(name).to(torch.float32), reference[name], atol=1e-5, rtol=0)

    # the NVlabs PEFT fork's adapter folder: adapter_config.json (peft_type DORA) gives lora_alpha
    fork = tmp_path / "fork"
    fork.mkdir()
    torch.save({f"base_model.model.{k}": v for k, v in factors.items()}, fork / "adapter_model.bin")
    (fork / "adapter_config.json").write_text(
        json.dumps({"peft_type": "DORA", "r": 4, "lora_alpha": 8, "target_modules": TARGETS})
    )
    with open_checkpoint(fork, base=tmp_path / "base") as reader:
        check_against_peft(reader, reference, 4, set())


def test_nvlabs_without_alpha_is_refused(tmp_path: Path) -> None:
    make_peft_adapter(
        tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True
    )
    torch.save(_nvlabs_state(tmp_path / "adapter"), tmp_path / "partial.pt")
    with pytest.raises(InputError, match="lora_alpha"):
        open_checkpoint(tmp_path / "partial.pt", base=tmp_path / "base")
    with pytest.raises(InputError, match="base"):
        open_checkpoint(tmp_path / "partial.pt", lora_alpha=8)
