"""The weights file of a model folder is the one transformers 5's ``from_pretrained`` loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import save_tiny_bert

from dora_analysis.errors import InputError
from dora_analysis.readers import find_weights, open_checkpoint


def _loaded_by_transformers(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import BertModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: v.detach() for k, v in BertModel.from_pretrained(folder).state_dict().items()}


def _other_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 1.0 if v.is_floating_point() else v.clone() for k, v in state.items()}


def _assert_reads(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(folder) as reader:
        assert set(reader.names()) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(reader.get(name), tensor), name  # the same stored bytes, no arithmetic


def test_model_safetensors_wins_over_a_disagreeing_index_as_in_transformers(tmp_path: Path) -> None:
    state = save_tiny_bert(tmp_path)
    shard = "model-00001-of-00001.safetensors"
    save_file(_other_weights(state), tmp_path / shard)
    index = {"metadata": {}, "weight_map": dict.fromkeys(state, shard)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = _loaded_by_transformers(tmp_path)
    assert torch.equal(
        loaded["encoder.layer.0.attention.self.query.weight"],
        state["encoder.layer.0.attention.self.query.weight"],
    )
    assert find_weights(tmp_path).path.name == "model.safetensors"
    _assert_reads(tmp_path, loaded)


def test_the_file_config_json_names_is_read_as_in_transformers(tmp_path: Path) -> None:
    state = save_tiny_bert(tmp_path)
    save_file(_other_weights(state), tmp_path / "chosen.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "transformers_weights": "chosen.safetensors"})
    )
    loaded = _loaded_by_transformers(tmp_path)
    assert not torch.equal(
        loaded["embeddings.word_embeddings.weight"], state["embeddings.word_embeddings.weight"]
    )
    _assert_reads(tmp_path, loaded)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (5, "transformers_weights is 5; expected"),
        ("weights.bin", "expected a .safetensors"),
        ("../model.safetensors", "not a file inside"),
        ("missing.safetensors", "not a file inside"),
    ],
)
def test_a_bad_transformers_weights_field_is_one_line_naming_config_json(tmp_path: Path, value, says) -> None:
    save_tiny_bert(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "transformers_weights": value}))
    with pytest.raises(InputError, match="config.json: transformers_weights") as caught:
        open_checkpoint(tmp_path / "m")
    assert says in str(caught.value)
