"""`python -m dora_analysis compare` end to end on real files: outputs, references, and bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hub_builders import MODEL_ID
from safetensors.torch import load_file, save_file
from tiny_models import file_digests, make_peft_adapter, save_tiny_bert

from dora_analysis.analysis.comparison import compare
from dora_analysis.commands.main import main
from dora_analysis.errors import InputError

TARGETS = ["query", "value"]


def _reference(
    base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], name: str
) -> tuple[float, float]:
    """Float64 NumPy ΔM and ΔD of one (out, in) weight."""
    a = base[name].double().numpy()
    b = merged[name].double().numpy()
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return float(np.mean(np.abs(nb - na))), float(np.mean(1 - np.sum(a * b, axis=1) / (na * nb)))


def _run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("use_dora", [False, True])
def test_compare_adapter_json_equals_float64_reference(tmp_path: Path, capsys, use_dora: bool) -> None:
    merged = make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        use_dora=use_dora,
        use_rslora=use_dora,
    )
    base = load_file(tmp_path / "base" / "model.safetensors")
    code, out, err = _run(capsys, "compare", tmp_path / "base", tmp_path / "adapter", "--format", "json")
    assert code == 0, err
    records = json.loads(out)
    assert sorted(r["tensor"] for r in records) == sorted(
        f"encoder.layer.{i}.attention.self.{m}.weight" for i in range(2) for m in TARGETS
    )
    for record in records:
        ref_dm, ref_dd = _reference(base, merged, record["tensor"])
        assert record["delta_magnitude"] == pytest.approx(ref_dm, rel=1e-4)
        assert record["delta_direction"] == pytest.approx(ref_dd, rel=1e-4)
        assert record["status"] == "ok" and record["rows"] == 32
    assert "4 tensors compared" in err  # the summary goes to stderr for json


def test_table_summary_and_sharded_folder_reads_the_same(tmp_path: Path, capsys) -> None:
    save_tiny_bert(tmp_path / "base", seed=0)
    save_tiny_bert(tmp_path / "tuned", seed=1)
    save_tiny_bert(tmp_path / "sharded", seed=1, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    code, table, _ = _run(capsys, "compare", tmp_path / "base", tmp_path / "tuned")
    assert code == 0
    assert "attention.output.dense" in table and "delta_direction" in table
    assert (
        table.strip().splitlines()[-1].startswith("13 tensors compared; mean delta_magnitude")
    )  # 2 x 6 + pooler
    code, sharded, _ = _run(capsys, "compare", tmp_path / "base", tmp_path / "sharded")
    assert code == 0 and sharded == table


def test_device_option_analyses_there_or_says_why_not(tmp_path: Path, capsys, monkeypatch) -> None:
    save_tiny_bert(tmp_path / "base", seed=0)
    save_tiny_bert(tmp_path / "tuned", seed=1)
    code, plain, _ = _run(capsys, "compare", tmp_path / "base", tmp_path / "tuned", "--format", "csv")
    assert code == 0
    code, on_cpu, _ = _run(
        capsys, "compare", tmp_path / "base", tmp_path / "tuned", "--format", "csv", "--device", "cpu"
    )
    assert code == 0 and on_cpu == plain
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU-only machine
    for device, needle in (("cuda", "sees no CUDA GPU"), ("gpu0", "not a torch device")):
        out_file = tmp_path / f"{device}.csv"
        for command in ("compare", "series"):
            code, out, err = _run(
                capsys,
                command,
                tmp_path / "base",
                tmp_path / "tuned",
                "--device",
                device,
                "--output",
                out_file,
            )
            assert code == 2 and out == "" and not out_file.exists(), (command, device, err)
            assert err.startswith("error: --device") and needle in err and len(err.strip().splitlines()) == 1


def test_output_file_is_written_once_and_not_overwritten(tmp_path: Path, capsys) -> None:
    save_tiny_bert(tmp_path / "base", seed=0)
    save_tiny_bert(tmp_path / "tuned", seed=1)
    out = tmp_path / "deltas.csv"
    args = ["compare", tmp_path / "base", tmp_path / "tuned", "--format", "csv", "--output", out]
    assert _run(capsys, *args)[0] == 0
    first = out.read_text()
    assert first.splitlines()[0].startswith(
        "tensor,stack,layer,module,shape,rows,delta_magnitude,delta_direction"
    )
    code, _, err = _run(capsys, *args, "--include", "query")
    assert code == 2 and "already exists" in err and str(out) in err
    assert out.read_text() == first
    assert _run(capsys, *args, "--include", r"query\.weight", "--overwrite")[0] == 0
    assert len(out.read_text().splitlines()) == 1 + 2  # header + two query weights
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


class _Payload:
    """Unpickling this with code execution would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (base, tuned, what the message must say)."""
    base = tmp_path / "base"
    state = save_tiny_bert(base, seed=0)
    q = "encoder.layer.0.attention.self.query.weight"
    cases: dict[str, tuple[Path, Path, str]] = {}
    cases["missing"] = (base, tmp_path / "nothing_here", "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    cases["no_weights"] = (base, empty, "no weights")
    unknown = tmp_path / "weights.h5"
    unknown.write_bytes(b"\x89HDF")
    cases["unknown"] = (base, unknown, "unknown format")
    good = (base / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    cases["truncated"] = (base, truncated, "truncated")
    not_json = tmp_path / "notjson.safetensors"
    not_json.write_bytes((9).to_bytes(8, "little") + b"not json!" + b"\0" * 8)
    cases["not_json"] = (base, not_json, "not valid JSON")
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as f:
        pickle.dump({"state_dict": {q: _Payload(tmp_path / "PWNED")}}, f)
    cases["code_pickle"] = (base, evil, "weights_only")
    other = tmp_path / "other.safetensors"
    save_file({"decoder.proj.weight": torch.ones(4, 4)}, other)
    cases["nothing_common"] = (base, other, "no tensor in common")
    reshaped = tmp_path / "reshaped.safetensors"
    save_file({**{k: v.contiguous() for k, v in state.items()}, q: torch.ones(32, 16)}, reshaped)
    cases["shape"] = (base, reshaped, "shape [32, 16] != base shape [32, 32]")
    quantized = tmp_path / "quantized.safetensors"
    save_file(
        {**{k: v.contiguous() for k, v in state.items()}, q: torch.ones(32, 32, dtype=torch.int8)}, quantized
    )
    cases["integer"] = (base, quantized, "stored as int8")
    adapter = tmp_path / "adapter"
    make_peft_adapter(
        tmp_path / "adapter_base", adapter, model="bert", r=4, lora_alpha=8, target_modules=TARGETS
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["lora_alpha"]
    no_alpha = tmp_path / "no_alpha"
    no_alpha.mkdir()
    (no_alpha / "adapter_config.json").write_text(json.dumps(config))
    (no_alpha / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    cases["no_alpha"] = (tmp_path / "adapter_base", no_alpha, "lora_alpha")
    wrong_base = tmp_path / "wide"
    from tiny_models import tiny_bert_config
    from transformers import BertModel

    config64 = tiny_bert_config()
    config64.hidden_size, config64.intermediate_size = 64, 128
    BertModel(config64).save_pretrained(wrong_base)
    cases["adapter_does_not_fit"] = (wrong_base, adapter, "do not fit")
    return cases


def test_bad_inputs_give_one_line_exit_2_and_change_nothing(tmp_path: Path, capsys) -> None:
    cases = _bad_inputs(tmp_path)
    capsys.readouterr()  # drop what building the inputs printed
    for name, (base, tuned, needle) in cases.items():
        before = {**file_digests(base), **(file_digests(tuned) if tuned.exists() else {})}
        out_file = tmp_path / f"{name}.json"
        code, out, err = _run(capsys, "compare", base, tuned, "--format", "json", "--output", out_file)
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert needle in lines[0], (name, lines[0])
        assert str(tuned) in lines[0] or str(base) in lines[0], (name, lines[0])
        assert not out_file.exists() and out == ""
        assert {**file_digests(base), **(file_digests(tuned) if tuned.exists() else {})} == before, name
    assert not (tmp_path / "PWNED").exists()


def test_output_format_follows_the_extension_and_formats_hold_the_same_numbers(
    tmp_path: Path, capsys
) -> None:
    import pandas as pd

    save_tiny_bert(tmp_path / "base", seed=0)
    save_tiny_bert(tmp_path / "tuned", seed=1)
    frames = {}
    for ext in ("csv", "json", "parquet"):
        out = tmp_path / f"deltas.{ext}"
        code, stdout, err = _run(capsys, "compare", tmp_path / "base", tmp_path / "tuned", "--output", out)
        assert code == 0 and stdout == "", err
        if ext == "json":
            records = json.loads(out.read_text())  # JSON although no --format was given
            assert all(type(r["rows"]) is int for r in records)
            frames[ext] = pd.DataFrame(records)
        else:
            frames[ext] = pd.read_csv(out) if ext == "csv" else pd.read_parquet(out)
    for column in ("delta_magnitude", "delta_direction", "base_magnitude_mean", "tuned_magnitude_mean"):
        values = [frames[ext][column].to_numpy(dtype=np.float64) for ext in frames]
        assert all(np.array_equal(values[0], v, equal_nan=True) for v in values[1:]), column
    assert (
        frames["csv"]["tensor"].tolist()
        == frames["json"]["tensor"].tolist()
        == frames["parquet"]["tensor"].tolist()
    )


def test_base_as_a_cached_model_id_or_from_the_adapter_alone(cached_adapter, capsys) -> None:
    snapshot, adapter, merged = cached_adapter
    by_path = compare(snapshot, adapter)
    by_id = compare(MODEL_ID, adapter)
    alone = compare(None, adapter)
    pd.testing.assert_frame_equal(by_path, by_id)
    pd.testing.assert_frame_equal(by_path, alone)
    assert len(by_path) == 4 and (by_path["delta_direction"] > 0).all()
    # the numbers are the merged weights' (float64 reference)
    from safetensors.torch import load_file

    base = load_file(snapshot / "model.safetensors")
    for row in alone.itertuples():
        a, b = base[row.tensor].double().numpy(), merged[row.tensor].double().numpy()
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        assert row.delta_direction == pytest.approx(np.mean(1 - (a * b).sum(1) / (na * nb)), rel=1e-5)
    assert main(["compare", str(adapter), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 5  # header + 4 tensors


def test_an_uncached_model_id_is_one_line(cached_adapter, tmp_path: Path, capsys) -> None:
    _, adapter, _ = cached_adapter
    with pytest.raises(InputError, match=r"^other-org/missing: .*local Hugging Face cache"):
        compare("other-org/missing", adapter)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "other-org/missing"
    config_file.write_text(json.dumps(config))
    assert main(["compare", str(adapter)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "other-org/missing" in err
