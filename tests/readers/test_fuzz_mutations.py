"""A generated fuzzing round over the readers (issue 23): mutated inputs, each read or refused in one line.

Classes, each built from a valid file by a seeded generator:

- ``st``: safetensors headers: offsets (negative, past the end, swapped, overlapping, gaps), dtypes,
  shapes (negative, float, huge, empty with huge dimensions), huge tensor counts, metadata, header
  lengths, and random byte flips inside the header text;
- ``zip``: zip-format ``.pt`` files: the small records torch trusts, storage records cut, grown or
  missing, and random byte flips in ``data.pkl`` and the zip directory (run in a subprocess: a
  crash there must fail this test, not end the test run);
- ``index``: shard indexes: ``weight_map`` of the wrong type, paths outside the folder, missing
  shards, tensors in the wrong shard;
- ``adapter``: ``adapter_config.json`` fields of the wrong type or value;
- ``json``: JSON type confusion in ``trainer_state.json``, ``config.json`` and ``run.json``.

The promise checked for each case: :class:`InputError` with one line of at most 300 characters that
names a file of the case, or a read whose every tensor equals the reference library's reading
(safetensors' own ``safe_open`` for ``st``); never another exception, never a crash.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.errors import InputError
from dora_analysis.readers import find_checkpoints, open_checkpoint

ROOT = Path(__file__).resolve().parents[2]
W = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.bias": torch.ones(3)}


def outcome(path: Path, base: Path | None = None) -> tuple[str, object]:
    """``("ok", {name: tensor})``, ``("error", message)`` or ``("broken", traceback)`` of reading ``path``."""
    try:
        with open_checkpoint(path, base=base) as reader:
            return "ok", {name: reader.get(name).clone() for name in reader.names()}
    except InputError as e:
        return "error", str(e)
    except Exception:  # anything else breaks the promise
        return "broken", traceback.format_exc(limit=3)


def _broken_message(message: str, folder: Path) -> str | None:
    if "\n" in message or len(message) > 300:
        return f"not one line of at most 300 characters ({len(message)})"
    if str(folder) not in message and "--" not in message:
        return "names no file of the case"
    return None


# ------------------------------------------------------------------------------------ safetensors


def _valid_header() -> dict:
    return {
        "a.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "b.bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]},
    }


def _data() -> bytes:
    return W["a.weight"].numpy().tobytes() + W["b.bias"].numpy().tobytes()


def _st_file(path: Path, header: object, data: bytes | None = None, text: bytes | None = None) -> Path:
    raw = text if text is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (_data() if data is None else data))
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _field(name: str, key: str, value: object) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        header = _valid_header()
        header[name][key] = value
        return _st_file(path, header)

    return build


def st_cases() -> dict[str, Callable[[Path], Path]]:
    cases: dict[str, Callable[[Path], Path]] = {}
    for i, offsets in enumerate(
        [
            [-1, 48],
            [0, 49],
            [0, 10**6],
            [48, 0],
            [0, 2**64],
            [0, 48.0],
            [0],
            [0, 48, 60],
            "0,48",
            None,
            [12, 60],
            [0, 47],
            [1, 49],
            [True, 48],
            [False, 48],  # JSON's false is 0 to isinstance: never a size
            [0, 4.8e1],
        ]
    ):
        cases[f"offsets_{i}"] = _field("a.weight", "data_offsets", offsets)
    for i, dtype in enumerate(["f32", "F31", "", 5, None, "F8_E4M3", "BOOL", "I64", "C64", ["F32"]]):
        cases[f"dtype_{i}"] = _field("a.weight", "dtype", dtype)
    for i, shape in enumerate(
        [[-3, 4], [3.0, 4], [12], [4, 3], [2**62, 2**62], [0, 2**40], [3, 4, 1], [], "3,4", None, [3, "4"]]
        + [[True, 12], [3, 4, True]]
    ):
        cases[f"shape_{i}"] = _field("a.weight", "shape", shape)
    overlap = _valid_header()
    overlap["b.bias"]["data_offsets"] = [36, 48]
    cases["overlap"] = lambda p, h=overlap: _st_file(p, h)
    gap = {**_valid_header(), "b.bias": {"dtype": "F32", "shape": [3], "data_offsets": [52, 64]}}
    cases["gap"] = lambda p, h=gap: _st_file(p, h, _data() + bytes(4))
    many = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for i in range(20_000)}
    cases["many_aliases"] = lambda p, h=many: _st_file(p, h, bytes(4))
    cases["metadata_not_str"] = lambda p: _st_file(p, {**_valid_header(), "__metadata__": {"format": 5}})
    cases["metadata_list"] = lambda p: _st_file(p, {**_valid_header(), "__metadata__": [1]})
    cases["record_list"] = lambda p: _st_file(p, {**_valid_header(), "c": [1, 2]})
    cases["duplicate_key"] = lambda p: _st_file(
        p,
        None,
        text=json.dumps(_valid_header())[:-1].encode() + b', "a.weight": {"dtype": "F32", '
        b'"shape": [3], "data_offsets": [48, 60]}}',
    )
    cases["length_zero"] = lambda p: _raw(p, struct.pack("<Q", 0) + _data())
    cases["length_huge"] = lambda p: _raw(p, struct.pack("<Q", 2**63) + b"{}")
    cases["length_short"] = lambda p: _raw(p, b"\x01\x02")
    cases["trailing_bytes"] = lambda p: _st_file(p, _valid_header(), _data() + b"extra")
    cases["data_cut"] = lambda p: _st_file(p, _valid_header(), _data()[:50])
    text = json.dumps(_valid_header()).encode()
    # the header's text itself: other encodings, and runs of digits that are or are not integers
    cases["utf16_header"] = lambda p: _st_file(p, None, text=text.decode().encode("utf-16"))
    cases["utf8_bom_header"] = lambda p: _st_file(p, None, text=b"\xef\xbb\xbf" + text)
    digits = "1" * 40
    named = {f"a{digits}" if k == "a.weight" else k: v for k, v in _valid_header().items()}
    cases["digits_in_a_name"] = lambda p, h=named: _st_file(p, h)  # valid: a name, not an integer
    cases["digits_in_metadata"] = lambda p: _st_file(p, {**_valid_header(), "__metadata__": {"n": digits}})
    cases["long_int_metadata"] = lambda p: _st_file(
        p, None, text=text[:-1] + b', "__metadata__": {"n": ' + digits.encode() + b"}}"
    )
    cases["long_int_offset"] = lambda p: _st_file(
        p, None, text=text.replace(b"[0, 48]", b"[0, " + digits.encode() + b"]")
    )
    rng = random.Random(23)
    for i in range(60):  # random byte flips inside the header text
        flipped = bytearray(text)
        for _ in range(rng.randint(1, 3)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        cases[f"flip_{i}"] = lambda p, t=bytes(flipped): _st_file(p, None, text=t)
    return cases


def _safetensors_reading(path: Path) -> dict[str, torch.Tensor] | None:
    """The safetensors library's own reading of every tensor, or None where it refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception:
        return None


ST = st_cases()


@pytest.mark.parametrize("case", sorted(ST))
def test_mutated_safetensors_headers(tmp_path: Path, case: str) -> None:
    path = ST[case](tmp_path / "m.safetensors")
    kind, got = outcome(path)
    assert kind != "broken", got
    if kind == "error":
        problem = _broken_message(got, tmp_path)
        assert problem is None, (problem, got)
        return
    reference = _safetensors_reading(path)
    assert reference is not None, "read a file the safetensors library refuses"
    assert got.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(got[name], tensor), name  # the same stored bytes


# ------------------------------------------------------------------------------------- shard index


def _sharded(folder: Path, weight_map: object, metadata: object = None, shards: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file, names in (
        shards if shards is not None else {"s1.safetensors": ["a.weight"], "s2.safetensors": ["b.bias"]}
    ).items():
        save_file({n: W[n] for n in names}, folder / file)
    index = (
        {"weight_map": weight_map} if metadata is None else {"metadata": metadata, "weight_map": weight_map}
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


INDEX = {
    "map_list": lambda f: _sharded(f, [["a.weight", "s1.safetensors"]]),
    "map_str": lambda f: _sharded(f, "s1.safetensors"),
    "map_empty": lambda f: _sharded(f, {}),
    "file_int": lambda f: _sharded(f, {"a.weight": 1, "b.bias": "s2.safetensors"}),
    "file_outside": lambda f: _sharded(f, {"a.weight": "../s1.safetensors", "b.bias": "s2.safetensors"}),
    "file_absolute": lambda f: _sharded(f, {"a.weight": "/etc/passwd", "b.bias": "s2.safetensors"}),
    "file_missing": lambda f: _sharded(f, {"a.weight": "s9.safetensors", "b.bias": "s2.safetensors"}),
    "wrong_shard": lambda f: _sharded(f, {"a.weight": "s2.safetensors", "b.bias": "s2.safetensors"}),
    "name_missing": lambda f: _sharded(f, {"a.weight": "s1.safetensors"}),
    "extra_name": lambda f: _sharded(
        f, {"a.weight": "s1.safetensors", "b.bias": "s2.safetensors", "c": "s2.safetensors"}
    ),
    "metadata_list": lambda f: _sharded(f, {"a.weight": "s1.safetensors", "b.bias": "s2.safetensors"}, [1]),
    "same_in_two": lambda f: _sharded(
        f,
        {"a.weight": "s1.safetensors", "b.bias": "s2.safetensors"},
        shards={"s1.safetensors": ["a.weight", "b.bias"], "s2.safetensors": ["b.bias"]},
    ),
    "shard_is_folder": lambda f: (
        _sharded(f, {"a.weight": "s1.safetensors", "b.bias": "d"}),
        (f / "d").mkdir(),
    )[0],
    "index_list": lambda f: (f.mkdir(), (f / "model.safetensors.index.json").write_text("[]"), f)[2],
}


@pytest.mark.parametrize("case", sorted(INDEX))
def test_sharded_index_oddities(tmp_path: Path, case: str) -> None:
    folder = INDEX[case](tmp_path / "m")
    kind, got = outcome(folder)
    assert kind != "broken", got
    if kind == "error":
        assert _broken_message(got, tmp_path) is None, got
    else:  # read: every tensor is the one the index names, unchanged
        assert all(torch.equal(got[n], W[n]) for n in got) and set(got) <= set(W), got


# ------------------------------------------------------------------------------------ adapter config

ADAPTER_FIELDS = {
    "r_string": {"r": "4"},
    "r_negative": {"r": -4},
    "r_float": {"r": 4.0},
    "r_bool": {"r": True},
    "r_zero": {"r": 0},
    "r_mismatch": {"r": 8},
    "alpha_string": {"lora_alpha": "8"},
    "alpha_bool": {"lora_alpha": False},
    "alpha_list": {"lora_alpha": [8]},
    "targets_int": {"target_modules": 5},
    "targets_ints": {"target_modules": [1, 2]},
    "targets_bad_regex": {"target_modules": "(query"},
    "targets_none_match": {"target_modules": ["key"]},
    "exclude_all": {"exclude_modules": ".*"},
    "exclude_int": {"exclude_modules": 3},
    "init_int": {"init_lora_weights": 3},
    "init_pissa": {"init_lora_weights": "pissa_niter_4"},
    "init_loftq": {"init_lora_weights": "loftq"},
    "init_gaussian": {"init_lora_weights": "gaussian"},
    "use_dora_string": {"use_dora": "true"},
    "rank_pattern_list": {"rank_pattern": [4]},
    "rank_pattern_float": {"rank_pattern": {"query": 2.5}},
    "alpha_pattern_str": {"alpha_pattern": {"q": "x"}},
    "peft_type_ia3": {"peft_type": "IA3"},
    "peft_type_int": {"peft_type": 1},
    "layers_strings": {"layers_to_transform": ["0"]},
    "layers_other": {"layers_to_transform": [7]},
    "target_parameters": {"target_parameters": ["weight"]},
    "base_int": {"base_model_name_or_path": 5},
    "modules_to_save_str": {"modules_to_save": "classifier"},
    "rslora_int": {"use_rslora": 1},
}


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory) -> Path:
    from tiny_models import make_peft_adapter

    root = tmp_path_factory.mktemp("adapter")
    make_peft_adapter(
        root / "base", root / "adapter", model="bert", r=4, lora_alpha=8, target_modules=["query", "value"]
    )
    return root


@pytest.mark.parametrize("case", sorted(ADAPTER_FIELDS))
def test_adapter_config_oddities(tmp_path: Path, adapter_template: Path, case: str) -> None:
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_template / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **ADAPTER_FIELDS[case]}))
    kind, got = outcome(adapter, base=adapter_template / "base")
    assert kind != "broken", got
    if kind == "error":
        assert _broken_message(got, tmp_path) is None, got
    else:  # only an init that leaves the base alone (the factors are loaded over it) may pass
        assert case == "init_gaussian", f"read: {sorted(got)[:2]}"


# -------------------------------------------------------------------------------- JSON type confusion

JSON_CASES = {
    "state_list": ("trainer_state.json", "[1]"),
    "state_number": ("trainer_state.json", "7"),
    "state_string": ("trainer_state.json", '"x"'),
    "step_float": ("trainer_state.json", '{"global_step": 1.5}'),
    "step_string": ("trainer_state.json", '{"global_step": "1"}'),
    "step_huge": ("trainer_state.json", '{"global_step": 1' + "0" * 30 + "}"),
    "history_dict": ("trainer_state.json", '{"log_history": {}}'),
    "history_ints": ("trainer_state.json", '{"log_history": [1, 2]}'),
    "state_nan": ("trainer_state.json", '{"global_step": NaN}'),
    "config_list": ("config.json", "[1]"),
    "config_weights_int": ("config.json", '{"transformers_weights": 1}'),
    "config_weights_outside": ("config.json", '{"transformers_weights": "../x.safetensors"}'),
    "config_bad_utf8": ("config.json", b'{"model_type": "\xff"}'),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_json_type_confusion(tmp_path: Path, case: str) -> None:
    name, text = JSON_CASES[case]
    folder = tmp_path / "run" / "checkpoint-1"
    folder.mkdir(parents=True)
    save_file(W, folder / "model.safetensors")
    (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        steps = find_checkpoints(tmp_path / "run")
        kind, got = outcome(steps[0][1])
    except InputError as e:
        kind, got = "error", str(e)
    assert kind != "broken", got
    if kind == "error":
        assert _broken_message(got, tmp_path) is None, got
    else:
        raise AssertionError(f"read {case}: {sorted(got)}")


# ------------------------------------------------------------------------------------- zip .pt files

ZIP_SCRIPT = textwrap.dedent(
    """
    import json, random, sys, zipfile, io, torch
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from dora_analysis.errors import InputError
    from dora_analysis.readers import open_checkpoint
    folder = Path(sys.argv[1])
    good = folder / "good.pt"
    torch.save({"a.weight": torch.arange(12.).reshape(3, 4), "b.bias": torch.ones(3)}, good)

    def rewrite(name, change):
        path = folder / f"{name}.pt"
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                body = change(info.filename.split("/", 1)[1], zin.read(info.filename))
                if body is not None:
                    zout.writestr(info.filename, body)
        return path

    cases = {}
    for record, values in {
        "byteorder": [b"big", b"", b"little\\0", b"\\xff" * 3, b"big" * 1000, None],
        ".storage_alignment": [b"0", b"-1", b"63", b"1" * 40, b"x", None],
        ".format_version": [b"-1", b"99", b"z", None], "version": [b"0", b"x", b"-5", None],
        "data/0": [b"", b"\\0" * 47, b"\\0" * 49, None], "data/1": [b"\\0" * 11, None],
        "data.pkl": [None, b"", b"\\x80\\x02N."],
    }.items():
        for i, value in enumerate(values):
            cases[f"{record}_{i}"] = lambda r=record, v=value: rewrite(
                f"r{abs(hash((r, v))) % 10**8}", lambda n, d: (v if n == r else d))
    raw = good.read_bytes()
    rng = random.Random(23)
    for i in range(40):
        def flip(i=i, seed=rng.random()):
            local = random.Random(seed)
            data = bytearray(raw)
            for _ in range(local.randint(1, 4)):
                data[local.randrange(len(data))] = local.randrange(256)
            path = folder / f"flip{i}.pt"
            path.write_bytes(bytes(data))
            return path
        cases[f"flip_{i}"] = flip
    cases["truncated"] = lambda: ((folder / "cut.pt").write_bytes(raw[: len(raw) // 2]), folder / "cut.pt")[1]
    results = {}
    for name, build in cases.items():
        path = build()
        try:
            with open_checkpoint(path) as reader:
                for key in reader.names():
                    reader.get(key).float().sum()
            results[name] = ["ok", ""]
        except InputError as e:
            results[name] = ["error", str(e)]
        except Exception as e:
            results[name] = ["broken", f"{type(e).__name__}: {str(e)[:200]}"]
        print(json.dumps([name] + results[name]), flush=True)
    """
)


@pytest.mark.slow  # one fresh interpreter for all the zip cases (about 10 s)
def test_mutated_zip_checkpoints_never_crash(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", ZIP_SCRIPT, str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("[")]
    assert run.returncode == 0, (run.returncode, results[-1:] if results else None, run.stderr[-500:])
    assert len(results) >= 70
    broken = [r for r in results if r[1] == "broken"]
    assert not broken, broken
    for name, kind, message in results:
        if kind == "error":
            assert _broken_message(message, tmp_path) is None, (name, message)
