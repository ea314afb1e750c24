"""Bases from where users keep them (the local Hugging Face cache, an adapter's own base, a Trainer
run's configs), one row per checkpoint, rows in reading order, and shards read one after another."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hub_builders import MODEL_ID
from safetensors.torch import save_file
from tiny_models import save_tiny_bert

from dora_analysis.analysis.comparison import compare
from dora_analysis.analysis.series import analyze_series
from dora_analysis.errors import InputError


def test_trainer_runs_name_their_base_without_run_json(cached_adapter, tmp_path: Path) -> None:
    snapshot, adapter, _ = cached_adapter
    lora_run = tmp_path / "lora_run"
    (lora_run / "checkpoint-5").mkdir(parents=True)
    for file in adapter.iterdir():
        (lora_run / "checkpoint-5" / file.name).write_bytes(file.read_bytes())
    ft_run = tmp_path / "ft_run"
    save_tiny_bert(ft_run / "checkpoint-5", seed=3)  # a full model: config.json names its base
    config_file = ft_run / "checkpoint-5" / "config.json"
    config = json.loads(config_file.read_text())
    config["_name_or_path"] = MODEL_ID
    config_file.write_text(json.dumps(config))
    df = analyze_series(None, [lora_run, ft_run])
    assert set(df["run"]) == {"lora_run", "ft_run"} and set(df["step"]) == {5}
    explicit = analyze_series(snapshot, [lora_run, ft_run])
    pd.testing.assert_frame_equal(df.drop(columns="checkpoint"), explicit.drop(columns="checkpoint"))
    with pytest.raises(InputError, match="given twice"):
        analyze_series(snapshot, [lora_run, ft_run, lora_run])
    with pytest.raises(InputError, match="given twice"):
        analyze_series(snapshot, [lora_run, lora_run / "checkpoint-5"])


def test_rows_sort_by_layer_as_a_number_and_no_layer_is_na(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(4, 4, generator=g) for i in range(12)}
    base["lm_head.weight"] = torch.randn(4, 4, generator=g)
    tuned = {n: w + 0.1 * torch.randn(4, 4, generator=g) for n, w in base.items()}
    save_file(base, tmp_path / "base.safetensors")  # stored alphabetically: layers.10 before layers.2
    save_file(tuned, tmp_path / "tuned.safetensors")
    frame = compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert frame["layer"].tolist()[:12] == list(range(12))
    assert frame["layer"].isna().tolist() == [False] * 12 + [True]
    assert str(frame["layer"].dtype) == "Int64" and set(frame["layout_source"]) == {"name"}


def test_a_sharded_checkpoint_is_read_shard_by_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaModel

    from dora_analysis.readers import sharded

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=12, num_attention_heads=2, vocab_size=50
    )
    model = LlamaModel(config)
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "tuned", max_shard_size="20KB")
    index = json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    opened: list[Path] = []
    real = sharded.open_weight_file
    monkeypatch.setattr(sharded, "open_weight_file", lambda p: opened.append(p) or real(p))
    frame = compare(tmp_path / "base", tmp_path / "tuned")
    base_opens = [p for p in opened if p.parent.name == "base"]
    assert len(base_opens) == len(set(base_opens))  # each base shard opened once
    assert frame["layer"].dropna().is_monotonic_increasing and frame["layer"].max() == 11


def test_series_holds_one_group_of_unmappable_pickles_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """Old (non-zip) pickles are read whole: a series compares them in groups under a byte budget,
    with the same rows as one pass."""
    from dora_analysis.analysis import series
    from dora_analysis.readers import runs

    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(8, 4, generator=g) for i in range(3)}
    save_file(base, tmp_path / "base.safetensors")
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        tuned = {n: w + 0.01 * step * torch.randn(8, 4, generator=g) for n, w in base.items()}
        torch.save(
            tuned, run / f"checkpoint-{step}" / "pytorch_model.bin", _use_new_zipfile_serialization=False
        )
    whole = analyze_series(tmp_path / "base.safetensors", [run])
    size = (run / "checkpoint-1" / "pytorch_model.bin").stat().st_size
    monkeypatch.setattr(runs, "RESIDENT_BYTES", 2 * size)
    groups: list[int] = []
    real = series.compare_many
    monkeypatch.setattr(series, "compare_many", lambda b, t, **kw: groups.append(len(t)) or real(b, t, **kw))
    grouped = analyze_series(tmp_path / "base.safetensors", [run])
    assert groups == [2, 2]
    pd.testing.assert_frame_equal(whole, grouped)
    assert grouped["step"].tolist() == [s for s in (1, 2, 3, 4) for _ in range(3)]
