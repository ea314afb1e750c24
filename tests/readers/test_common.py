"""Name checks that scan every tensor name: the one-pass scans over the joined names decide as the
per-name rules do, names with line breaks included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.errors import InputError
from dora_analysis.readers._common import quantized_storage_problem
from dora_analysis.readers.files import open_weight_file
from dora_analysis.readers.nvlabs_dora import MAGNITUDE_SUFFIX, has_nvlabs_keys

PLAIN = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(50)]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.layers.3.mlp.down_proj.qweight", "GPTQ/AWQ"),
        ("model.layers.3.mlp.down_proj.weight.absmax", "bitsandbytes 4-bit"),
        ("model.layers.3.mlp.down_proj.weight.quant_state.bitsandbytes__nf4", "bitsandbytes 4-bit"),
        ("model.layers.3.mlp.down_proj.SCB", "bitsandbytes 8-bit"),
        ("model.layers.3.mlp.down_proj.weight_scale_inv", "FP8"),
        ("model.layers.3.mlp.down_proj.qweight\n", "GPTQ/AWQ"),  # ``$`` before a final line break
    ],
)
def test_quantized_names_are_found_among_plain_ones(name: str, kind: str) -> None:
    found = quantized_storage_problem([*PLAIN, name, *PLAIN])
    assert found is not None and found[0] == name and kind in found[1]


def test_names_that_only_look_quantized_across_a_line_break_are_not() -> None:
    # joined one per line, these read ".qweight" then a line end: the per-name rule decides
    assert quantized_storage_problem([*PLAIN, "a.qweight\nmore", "x.SCB\n.weight"]) is None
    assert quantized_storage_problem(PLAIN) is None


def test_nvlabs_magnitudes_are_found_only_at_a_names_end() -> None:
    assert has_nvlabs_keys([*PLAIN, "layers.0.q" + MAGNITUDE_SUFFIX])
    assert not has_nvlabs_keys([*PLAIN, "layers.0.q" + MAGNITUDE_SUFFIX + "\nx"])
    assert not has_nvlabs_keys(PLAIN)


def test_two_names_for_one_tensor_are_refused_and_distinct_ones_read(tmp_path: Path) -> None:
    save_file({n: torch.zeros(2, 2) for n in PLAIN}, tmp_path / "plain.safetensors")
    with open_weight_file(tmp_path / "plain.safetensors") as reader:
        assert sorted(reader.names()) == sorted(PLAIN)
    save_file(
        {"layers.0.w.weight": torch.zeros(1), "model.layers.0.w.weight": torch.zeros(1)},
        tmp_path / "two.safetensors",
    )
    with pytest.raises(InputError, match="one tensor once prefixes are dropped"):
        open_weight_file(tmp_path / "two.safetensors")
