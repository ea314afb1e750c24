"""Hostile and broken inputs, generated: every case ends in exit 2 and one line, or a correct result.

Classes (issue 16): 1 work and memory bounded by the bytes stored, 2 no silently wrong number,
3 one line instead of a traceback, 5 what the summary says; plus quantized storage (issue 11).
Each case is built by a small function into its own folder, run through the CLI's ``main`` in this
process (``compare``/``series``), and checked for: the exit status and a single ``error:`` line (or a
result equal to a float64 NumPy reference), inputs byte-for-byte unchanged, no file left behind.
The cases whose damage was memory or time run again in one subprocess that measures each one's
peak resident memory (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), bounded by a
small multiple of the bytes stored plus a constant, under a hang-guard timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.commands.main import main
from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint

ROOT = Path(__file__).resolve().parents[2]
W = "layer.0.attn.query.weight"  # one 2-D linear weight, analysed by default


@dataclass
class Case:
    argv: list[str]  # the CLI arguments after the command, paths included
    expect: str = "error"  # "error": exit 2 and one line containing ``says``; "ok": exit 0
    says: str = ""
    command: str = "compare"
    check: Callable[[str], None] | None = None  # for "ok": checks stdout
    memory: bool = False  # also measured in the memory subprocess
    extra_inputs: list[Path] = field(default_factory=list)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _base(folder: Path) -> Path:
    path = folder / "base.safetensors"
    save_file({W: _rand(8, 8)}, path)
    return path


def _raw_safetensors(path: Path, header: object, data: bytes = b"", header_text: bytes | None = None) -> Path:
    text = header_text if header_text is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _itself(argv: list[str]) -> list[str]:
    """The hostile file compared with itself (so no shape check stops it before the work starts)."""
    return [argv[1], argv[1]]


def _st_pair(
    folder: Path, tuned_header: object = None, data: bytes = b"", text: bytes | None = None
) -> list[str]:
    return [str(_base(folder)), str(_raw_safetensors(folder / "tuned.safetensors", tuned_header, data, text))]


def _pt_pair(folder: Path, state: object, **save_kwargs) -> list[str]:
    path = folder / "tuned.pt"
    torch.save(state, path, **save_kwargs)
    return [str(_base(folder)), str(path)]


def _deep(n: int = 100_000) -> bytes:
    return b"[" * n + b"]" * n


def _huge_int() -> bytes:
    return b"1" * 5000


# ---------------------------------------------------------------------------------- class 1: bounds


def c1_empty_huge_dims(f: Path) -> Case:
    header = {W: {"dtype": "F32", "shape": [2**27, 0], "data_offsets": [0, 0]}}
    return Case(_itself(_st_pair(f, header)), says="holds no elements", memory=True)


def c1_empty_huge_dims_3d(f: Path) -> Case:
    header = {W: {"dtype": "BF16", "shape": [0, 2**20, 2**20], "data_offsets": [0, 0]}}
    return Case(_itself(_st_pair(f, header)), says="holds no elements", memory=True)


def c1_stride0_tall(f: Path) -> Case:
    return Case(_itself(_pt_pair(f, {W: torch.ones(1).expand(2**26, 1)})), says="stride-0", memory=True)


def c1_stride0_square(f: Path) -> Case:
    return Case(_itself(_pt_pair(f, {W: torch.ones(1).expand(2**20, 2**20)})), says="stride-0", memory=True)


def c1_overlapping_view(f: Path) -> Case:
    view = torch.arange(1024.0).as_strided((512, 512), (1, 1))  # 262,144 elements over 1,024 stored
    return Case(_itself(_pt_pair(f, {W: view})), says="overlapping", memory=True)


def c1_many_views_of_one_storage(f: Path) -> Case:
    """4,000 full views of one 256 KiB storage: 1 GiB of work from a file of about 1 MB."""
    storage = torch.zeros(256, 256)
    state = {f"layer.{i}.attn.query.weight": storage[:] for i in range(4000)}
    return Case(_itself(_pt_pair(f, state)), says="many views", memory=True)


def c1_stride0_legacy_format(f: Path) -> Case:
    state = {W: torch.ones(1).expand(2**24, 8)}
    return Case(
        _itself(_pt_pair(f, state, _use_new_zipfile_serialization=False)), says="stride-0", memory=True
    )


def c1_inflating_data_pkl(f: Path) -> Case:
    """A zip .pt whose data.pkl is deflated and inflates to 256 MB (a real pickle, then zeros)."""
    good = f / "good.pt"
    torch.save({W: _rand(8, 8)}, good)
    path = f / "tuned.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(record, "w") as out:
                    out.write(data)
                    zeros = bytes(1 << 20)
                    for _ in range(256):
                        out.write(zeros)
            else:
                dst.writestr(info, data)
    good.unlink()
    return Case([str(path), str(path)], says="inflate", memory=True)


def c1_many_tensors(f: Path) -> Case:
    """A valid header listing 20,000 tiny tensors: read in time and memory linear in its size."""
    n = 20_000
    names = [f"block.{i}.norm.weight" for i in range(n)]
    tensors = {name: torch.full((1,), float(i)) for i, name in enumerate(names)} | {W: _rand(8, 8)}
    save_file(tensors, f / "base.safetensors")
    tuned = dict(tensors) | {W: 2 * tensors[W]}
    save_file(tuned, f / "tuned.safetensors")

    def check(out: str) -> None:
        assert "1 tensors compared" in out and "mean delta_magnitude" in out

    argv = [str(f / "base.safetensors"), str(f / "tuned.safetensors")]
    return Case(argv, expect="ok", check=check, memory=True)


# ------------------------------------------------------------------------ class 2: silent wrong numbers


def c2_truncated_storage_record(f: Path) -> Case:
    """data/0 cut to half its size: the memory map would read data/1 (1e10-scale numbers) in its place."""
    good = f / "good.pt"
    torch.save({W: _rand(8, 8), "layer.0.attn.key.weight": 1e10 * _rand(8, 8, seed=1)}, good)
    path = f / "tuned.pt"
    writer = torch._C.PyTorchFileWriter(str(path))
    with zipfile.ZipFile(good) as src:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            if name.startswith(".") or name in ("version", "byteorder"):
                continue  # the writer adds its own
            data = src.read(info)
            if name == "data/0":
                data = data[: len(data) // 2]
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    good.unlink()
    return Case([str(_base(f)), str(path)], says="truncated")


def c2_prefix_twins(f: Path) -> Case:
    tuned = f / "tuned.safetensors"
    save_file({W: _rand(8, 8, seed=1), "model." + W: _rand(8, 8, seed=2)}, tuned)
    return Case([str(_base(f)), str(tuned)], says="ambiguous")


def _adapter(f: Path, **config) -> list[str]:
    """A PEFT-layout LoRA adapter on ``W`` (r=2) with ``config`` fields replacing the defaults."""
    folder = f / "adapter"
    folder.mkdir()
    prefix = "base_model.model." + W.removesuffix(".weight")
    save_file(
        {f"{prefix}.lora_A.weight": _rand(2, 8, seed=3), f"{prefix}.lora_B.weight": _rand(8, 2, seed=4)},
        folder / "adapter_model.safetensors",
    )
    body = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"]} | config
    (folder / "adapter_config.json").write_text(json.dumps(body))
    return [str(_base(f)), str(folder)]


def _adapter_raw_config(f: Path, text: bytes) -> list[str]:
    argv = _adapter(f)
    (Path(argv[1]) / "adapter_config.json").write_bytes(text)
    return argv


def c2_use_dora_string(f: Path) -> Case:
    return Case(_adapter(f, use_dora="false"), says="use_dora")


def c2_rank_not_integer(f: Path) -> Case:
    return Case(_adapter(f, r=4.9), says="positive integer rank")


def c2_fan_in_fan_out_string(f: Path) -> Case:
    return Case(_adapter(f, fan_in_fan_out="yes"), says="fan_in_fan_out")


def c2_fan_in_fan_out_square_unknown(f: Path) -> Case:
    """No config.json says whether the square base is a Conv1D or a Linear: refused, not guessed."""
    return Case(_adapter(f, fan_in_fan_out=True), says="fan_in_fan_out")


def c2_rank_pattern_float(f: Path) -> Case:
    return Case(_adapter(f, rank_pattern={"query": 2.5}), says="rank_pattern")


# ------------------------------------------------------------------------------ class 3: one line


def c3_header_deep(f: Path) -> Case:
    return Case(_st_pair(f, text=b'{"a":' + _deep() + b"}"), says="nested too deeply")


def c3_header_huge_int(f: Path) -> Case:
    text = (
        b'{"' + W.encode() + b'": {"dtype": "F32", "shape": [' + _huge_int() + b'], "data_offsets": [0, 0]}}'
    )
    return Case(_st_pair(f, text=text), says="digits")


def c3_header_not_object(f: Path) -> Case:
    return Case(_st_pair(f, [1, 2, 3]), says="not a JSON object")


def c3_header_bad_utf8(f: Path) -> Case:
    return Case(_st_pair(f, text=b'{"\xff\xfe": 1}'), says="not valid JSON")


def c3_header_negative_dims(f: Path) -> Case:
    return Case(
        _st_pair(f, {W: {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}}), says="malformed"
    )


def c3_header_float8(f: Path) -> Case:
    header = {W: {"dtype": "F8_E4M3", "shape": [8, 8], "data_offsets": [0, 64]}}
    return Case(_st_pair(f, header, bytes(64)), says="dequantized")


def _index_folder(f: Path, text: bytes) -> list[str]:
    folder = f / "tuned"
    folder.mkdir()
    save_file({W: _rand(8, 8)}, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_bytes(text)
    return [str(_base(f)), str(folder)]


def c3_index_deep(f: Path) -> Case:
    return Case(_index_folder(f, b'{"weight_map":' + _deep() + b"}"), says="nested too deeply")


def c3_index_huge_int(f: Path) -> Case:
    return Case(_index_folder(f, b'{"metadata": {"total_size": ' + _huge_int() + b"}}"), says="digits")


def c3_config_deep(f: Path) -> Case:
    return Case(_adapter_raw_config(f, b'{"r":' + _deep() + b"}"), says="nested too deeply")


def c3_config_huge_int(f: Path) -> Case:
    return Case(_adapter_raw_config(f, b'{"r": ' + _huge_int() + b', "lora_alpha": 1}'), says="digits")


def c3_config_r_overflow(f: Path) -> Case:
    return Case(_adapter_raw_config(f, b'{"r": 1e999, "lora_alpha": 1}'), says="positive integer rank")


def c3_config_alpha_infinite(f: Path) -> Case:
    return Case(_adapter_raw_config(f, b'{"r": 2, "lora_alpha": -1e999}'), says="finite number")


def c3_config_bad_regex(f: Path) -> Case:
    return Case(_adapter(f, rank_pattern={"(": 4}), says="regular expression")


def c3_config_bad_alpha_regex(f: Path) -> Case:
    return Case(_adapter(f, alpha_pattern={"q[": 4}), says="regular expression")


def c3_config_not_object(f: Path) -> Case:
    return Case(_adapter_raw_config(f, b"[]"), says="not a JSON object")


def c3_base_is_adapter(f: Path) -> Case:
    """BASE is an adapter whose base_model_name_or_path is itself: refused before any recursion."""
    _, adapter = _adapter(f)
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    (Path(adapter) / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": adapter})
    )
    return Case([adapter, adapter], says="itself an adapter")


def _nvlabs(f: Path, lora_a: torch.Tensor) -> list[str]:
    module = W.removesuffix(".weight")
    path = f / "nvlabs.safetensors"
    save_file(
        {
            f"{module}.lora_A.weight": lora_a,
            f"{module}.lora_B.weight": _rand(8, max(lora_a.shape[0], 1) if lora_a.dim() else 1),
            f"{module}.weight_m_wdecomp.weight": torch.ones(8, 1),
        },
        path,
    )
    (f / "adapter_config.json").write_text(json.dumps({"peft_type": "DORA", "lora_alpha": 8}))
    return [str(_base(f)), str(path)]


def c3_nvlabs_rank0(f: Path) -> Case:
    return Case(_nvlabs(f, torch.zeros(0, 8)), says="r >= 1")


def c3_nvlabs_0d(f: Path) -> Case:
    return Case(_nvlabs(f, torch.tensor(1.0)), says="r >= 1")


def c3_sparse(f: Path) -> Case:
    return Case(_pt_pair(f, {W: _rand(8, 8).to_sparse()}), says="sparse")


def c3_sparse_csr(f: Path) -> Case:
    return Case(_pt_pair(f, {W: _rand(8, 8).to_sparse_csr()}), says="sparse")


def c3_meta(f: Path) -> Case:
    return Case(_pt_pair(f, {W: torch.empty(8, 8, device="meta")}), says="meta tensor")


def c3_float8_pickle(f: Path) -> Case:
    return Case(_pt_pair(f, {W: _rand(8, 8).to(torch.float8_e5m2)}), says="dequantized")


def c3_quantized_pickle(f: Path) -> Case:
    q = torch.quantize_per_tensor(_rand(8, 8), 0.1, 0, torch.qint8)
    return Case(_pt_pair(f, {W: q}), says="dequantized")


def c3_not_a_state_dict(f: Path) -> Case:
    return Case(_pt_pair(f, [1, 2, 3]), says="not a state dict")


def c3_empty_pt(f: Path) -> Case:
    path = f / "tuned.pt"
    path.write_bytes(b"")
    return Case([str(_base(f)), str(path)], says="not a readable PyTorch file")


def c3_code_execution(f: Path) -> Case:
    path = f / "tuned.pt"

    class Boom:
        def __reduce__(self):
            return (os.getcwd, ())

    path.write_bytes(pickle.dumps({W: Boom()}))
    return Case([str(_base(f)), str(path)], says="refused")


# --------------------------------------------------------------------------- quantized storage


def c11_bitsandbytes_4bit(f: Path) -> Case:
    tuned = f / "tuned.safetensors"
    save_file(
        {
            W: torch.zeros(32, 1, dtype=torch.uint8),
            W + ".absmax": torch.ones(2),
            W + ".quant_map": torch.ones(16),
        },
        tuned,
    )
    return Case([str(_base(f)), str(tuned)], says="bitsandbytes 4-bit quantized")


def c11_bitsandbytes_8bit(f: Path) -> Case:
    tuned = f / "tuned.safetensors"
    save_file({W: torch.zeros(8, 8, dtype=torch.int8), W.replace("weight", "SCB"): torch.ones(8)}, tuned)
    return Case([str(_base(f)), str(tuned)], says="bitsandbytes 8-bit quantized")


def c11_gptq(f: Path) -> Case:
    module = W.removesuffix(".weight")
    tuned = f / "tuned.pt"
    torch.save(
        {
            f"{module}.qweight": torch.zeros(1, 8, dtype=torch.int32),
            f"{module}.qzeros": torch.zeros(1, 1, dtype=torch.int32),
            f"{module}.scales": torch.ones(1, 8, dtype=torch.float16),
        },
        tuned,
    )
    return Case([str(_base(f)), str(tuned)], says="GPTQ/AWQ")


# ------------------------------------------------------------------------------- series inputs


def _run(
    f: Path, steps=("checkpoint-10",), state: dict | None = None, state_text: bytes | None = None
) -> list[str]:
    run = f / "run"
    for i, name in enumerate(steps):
        folder = run / name
        folder.mkdir(parents=True)
        save_file({W: _rand(8, 8, seed=10 + i)}, folder / "model.safetensors")
        if state_text is not None:
            (folder / "trainer_state.json").write_bytes(state_text)
        elif state is not None:
            (folder / "trainer_state.json").write_text(json.dumps(state))
    return [str(_base(f)), str(run)]


def s_checkpoint_step_huge(f: Path) -> Case:
    return Case(_run(f, ("checkpoint-99999999999999999999999",)), command="series", says="digits")


def s_two_checkpoints_one_step(f: Path) -> Case:
    return Case(
        _run(f, ("checkpoint-10", "checkpoint-010")), command="series", says="two checkpoints for step 10"
    )


def s_eval_accuracy_text(f: Path) -> Case:
    state = {"global_step": 10, "log_history": [{"step": 10, "eval_accuracy": "high", "eval_loss": 0.5}]}
    return Case(_run(f, state=state), command="series", says="expected a number")


def s_state_deep(f: Path) -> Case:
    return Case(
        _run(f, state_text=b'{"log_history":' + _deep() + b"}"), command="series", says="nested too deeply"
    )


def s_state_huge_int(f: Path) -> Case:
    return Case(_run(f, state_text=b'{"global_step": ' + _huge_int() + b"}"), command="series", says="digits")


def s_state_step_disagrees(f: Path) -> Case:
    return Case(
        _run(f, state={"global_step": 20, "log_history": []}), command="series", says="global_step is 20"
    )


def s_run_json_deep(f: Path) -> Case:
    argv = _run(f)
    (Path(argv[1]) / "run.json").write_bytes(b'{"method":' + _deep() + b"}")
    return Case(argv, command="series", says="nested too deeply")


# --------------------------------------------------------------------------------- valid inputs


def ok_parameter_pickle(f: Path) -> Case:
    """An nn.Parameter is read as its data: ΔM equals the float64 NumPy reference."""
    tuned = _rand(8, 8, seed=5)
    argv = _pt_pair(f, {W: torch.nn.Parameter(tuned)})
    base = _rand(8, 8).double().numpy()
    want = np.abs(np.linalg.norm(tuned.double().numpy(), axis=1) - np.linalg.norm(base, axis=1)).mean()

    def check(out: str) -> None:
        assert f"mean delta_magnitude {want:.4g}" in out

    return Case(argv, expect="ok", check=check)


def ok_nonfinite_not_zero_rows(f: Path) -> Case:
    """A NaN tensor is reported by its status, not counted as zero rows excluded (class 5)."""
    tuned = _rand(8, 8)
    tuned[3, 3] = float("nan")
    path = f / "tuned.safetensors"
    save_file({W: tuned}, path)

    def check(out: str) -> None:
        assert "1 not analysed (see status)" in out and "zero rows" not in out and "nonfinite tuned" in out

    return Case([str(_base(f)), str(path)], expect="ok", check=check)


CASES = {
    name: fn
    for name, fn in sorted(globals().items())
    if callable(fn) and name.split("_")[0] in ("c1", "c2", "c3", "c11", "s", "ok")
}


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", sorted(n for n in CASES if not n.startswith("c1_")))  # c1: below
def test_fuzz_case(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    case = CASES[name](folder)
    before = _digests(folder)
    capsys.readouterr()
    rc = main([case.command, *case.argv])
    out, err = capsys.readouterr()
    if case.expect == "error":
        lines = err.strip().splitlines()
        assert rc == 2, (rc, out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert case.says in lines[0], lines[0]
    else:
        assert rc == 0, err
        assert case.check is not None
        case.check(out)
    assert _digests(folder) == before  # inputs unchanged, nothing left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ------------------------------------------------------------------- memory and time, in a subprocess

_DRIVER = textwrap.dedent(
    """
    import io, json, re, sys, contextlib
    from dora_analysis.commands.main import main

    def rss(field):
        return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    for line in sys.stdin:
        case = json.loads(line)
        open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
        start = rss("VmRSS")
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(case["argv"])
        peak = rss("VmHWM") - start
        record = {"name": case["name"], "rc": rc, "err": err.getvalue(), "out": out.getvalue(), "peak": peak}
        print(json.dumps(record), flush=True)
    """
)

# Peak memory may exceed what the inputs store by this factor plus this constant (interpreter
# work, pandas frames, the one tensor being analysed).
_FACTOR, _CONSTANT = 4, 96 * 1024 * 1024


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to measure peaks")
def test_fuzz_memory_and_time_bounded_by_bytes_stored(tmp_path: Path) -> None:
    """Class 1, in one subprocess: exit status and one line (or the right result), peak memory over
    the start within a small multiple of the bytes stored plus a constant, inputs unchanged."""
    built, stored, digests = {}, {}, {}
    for name in sorted(n for n in CASES if n.startswith("c1_")):
        folder = tmp_path / name
        folder.mkdir()
        built[name] = CASES[name](folder)
        assert built[name].memory
        stored[name] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        digests[name] = _digests(folder)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    lines = [json.dumps({"name": "warm-up", "argv": ["compare", *_base_pair(tmp_path)]})]
    lines += [json.dumps({"name": n, "argv": [c.command, *c.argv]}) for n, c in built.items()]
    # a hang guard, not a speed test: before the fix these cases ran for minutes or ran out of memory
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    for name, case in built.items():
        got = results[name]
        print(f"{name}: peak {got['peak'] / 2**20:.1f} MiB over start, {stored[name]} bytes stored")
        if case.expect == "error":
            err = got["err"].strip().splitlines()
            assert got["rc"] == 2 and len(err) == 1 and case.says in err[0], got
        else:
            assert got["rc"] == 0 and case.check is not None, got
            case.check(got["out"])
        assert got["peak"] <= _FACTOR * stored[name] + _CONSTANT, (name, got["peak"], stored[name])
        assert _digests(tmp_path / name) == digests[name]  # inputs unchanged, nothing left beside them


def _base_pair(root: Path) -> list[str]:
    folder = root / "warm"
    folder.mkdir()
    base = _base(folder)
    return [str(base), str(base)]


@pytest.mark.slow
def test_cli_subprocess_one_line_exit_2(tmp_path: Path) -> None:
    """The real entry point: ``python -m dora_analysis compare`` prints one line and exits 2."""
    case = c1_stride0_tall(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "dora_analysis", "compare", *case.argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# --------------------------------------------------------------- the Python API raises InputError


def test_api_adapter_naming_itself_as_base_raises_input_error(tmp_path: Path) -> None:
    _, adapter = _adapter(tmp_path)
    config_file = Path(adapter) / "adapter_config.json"
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": adapter})
    )
    with pytest.raises(InputError, match="itself an adapter"):
        open_checkpoint(adapter)
    # two adapters that name each other
    other = tmp_path / "other"
    other.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (other / name).write_bytes((Path(adapter) / name).read_bytes())
    config_file.write_text(
        json.dumps(json.loads(config_file.read_text()) | {"base_model_name_or_path": str(other)})
    )
    with pytest.raises(InputError, match="itself an adapter"):
        open_checkpoint(adapter)


def test_api_hostile_json_raises_input_error(tmp_path: Path) -> None:
    _, adapter = _adapter_raw_config(tmp_path, b'{"r": ' + _huge_int() + b"}")
    with pytest.raises(InputError, match="digits"):
        open_checkpoint(adapter, base=tmp_path / "base.safetensors")
    from dora_analysis.readers.json_file import parse_json

    for text in (_deep(), b"[" + _huge_int() + b"]", b"\xff", b"{"):
        with pytest.raises(InputError, match="x.json"):
            parse_json("x.json", text)


def test_api_checkpoint_reading_is_bounded_before_any_work(tmp_path: Path) -> None:
    from dora_analysis.readers.runs import run_checkpoints

    _, run = _run(tmp_path, ("checkpoint-99999999999999999999999",))
    with pytest.raises(InputError, match="digits"):
        run_checkpoints(run)
