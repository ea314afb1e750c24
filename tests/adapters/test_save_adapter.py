"""save_adapter writes the weights and the config together: one rename of a finished folder, or (into a
folder that holds other files) the config last, so a crash never pairs new weights with an old config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from layer_builders import perturb, tiny_bert
from safetensors.torch import load_file

from dora_analysis.adapters.inject import inject_adapters
from dora_analysis.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from dora_analysis.errors import InputError


def _model(r: int):
    model = tiny_bert()
    inject_adapters(model, r=r, alpha=2 * r)
    perturb(model)
    return model


def test_a_new_adapter_folder_appears_in_one_rename(tmp_path: Path, monkeypatch) -> None:
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real(a, b))[1])
    folder = save_adapter(_model(2), tmp_path / "adapter")
    assert [dst for _, dst in renames] == [folder]  # the finished folder, renamed once
    assert renames[0][0].name.startswith(".dora-") and not renames[0][0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_a_crash_while_replacing_never_pairs_new_weights_with_the_old_config(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "adapter"
    save_adapter(_model(2), folder)
    (folder / "README.md").write_text("the user's notes")  # the folder cannot be renamed over now
    real = os.replace

    def crash_on_config(src, dst):
        if Path(dst).name == CONFIG_NAME:
            raise KeyboardInterrupt  # after the new weights, before the new config
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_model(4), folder, overwrite=True)
    monkeypatch.undo()
    ranks = {v.shape[0] for k, v in load_file(folder / WEIGHTS_NAME).items() if "lora_A" in k}
    assert ranks == {4} and not (folder / CONFIG_NAME).exists()  # new weights, no config: not an adapter
    assert (folder / "README.md").read_text() == "the user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left
    save_adapter(_model(4), folder, overwrite=True)
    assert json.loads((folder / CONFIG_NAME).read_text())["r"] == 4


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(InputError, match="not a folder"):
        save_adapter(_model(2), tmp_path / "adapter")
