"""Fixtures shared by test folders (builders without fixtures sit in tests/*_builders.py, tiny_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_builders import MODEL_ID, fake_hub
from tiny_models import make_peft_adapter


@pytest.fixture
def cached_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache, snapshot = fake_hub(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merged = make_peft_adapter(
        snapshot, tmp_path / "adapter", model="bert", r=2, lora_alpha=4, target_modules=["query", "value"]
    )
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = MODEL_ID
    config_file.write_text(json.dumps(config))
    return snapshot, tmp_path / "adapter", merged
