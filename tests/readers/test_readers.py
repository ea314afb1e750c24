"""Checkpoint readers: every format reads the same tensors; adapters merge exactly as PEFT does."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import file_digests, make_peft_adapter, save_bin_folder, save_tiny_bert

from dora_analysis.errors import InputError
from dora_analysis.readers import find_checkpoints, open_checkpoint
from dora_analysis.readers.names import canonical_name
from dora_analysis.readers.safetensors_file import SafetensorsReader

TRAINING_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


def _read_all(path, **kwargs) -> dict[str, torch.Tensor]:
    with open_checkpoint(path, **kwargs) as reader:
        out = {}
        for name in reader.names():
            t = reader.get(name)
            assert tuple(t.shape) == reader.shape(name) and t.dtype == reader.dtype(name)
            out[name] = t.clone()
        return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _write_training_state(folder: Path, step: int) -> None:
    for name in TRAINING_FILES:
        torch.save({"state": {0: torch.ones(3)}, "param_groups": [{"lr": 0.1}]}, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


# --- plain weights -------------------------------------------------------------------------------


def test_hf_folders_single_sharded_and_bin_read_identically(tmp_path: Path) -> None:
    state = save_tiny_bert(tmp_path / "single")
    save_tiny_bert(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    save_bin_folder(tmp_path / "bin", state)
    save_bin_folder(tmp_path / "bin_sharded", state, shards=3)
    want = _read_all(tmp_path / "single")
    _assert_same(want, state)
    for folder in ("sharded", "bin", "bin_sharded"):
        _assert_same(_read_all(tmp_path / folder), state)
    _assert_same(_read_all(tmp_path / "single" / "model.safetensors"), state)
    _assert_same(_read_all(tmp_path / "sharded" / "model.safetensors.index.json"), state)


def test_sharded_reader_keeps_one_shard_open(tmp_path: Path, monkeypatch) -> None:
    save_tiny_bert(tmp_path, max_shard_size="20KB")
    opened: list[Path] = []
    closed: list[Path] = []
    real_init, real_close = SafetensorsReader.__init__, SafetensorsReader.close

    def init(self, path):
        opened.append(Path(path))
        real_init(self, path)

    def close(self):
        closed.append(self.source)
        real_close(self)

    monkeypatch.setattr(SafetensorsReader, "__init__", init)
    monkeypatch.setattr(SafetensorsReader, "close", close)
    with open_checkpoint(tmp_path) as reader:
        for name in reader.names():
            reader.get(name)
            assert len(opened) - len(closed) <= 1
    assert len(set(opened)) > 1 and len(opened) == len(closed)


def test_pickle_containers_and_prefixes_are_unwrapped(tmp_path: Path) -> None:
    state = {"layer.0.weight": torch.randn(3, 4), "layer.0.bias": torch.randn(3)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pt")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, tmp_path / "compiled.pth")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)  # cannot be mmapped
    for name in ("ddp.pt", "compiled.pth", "legacy.bin"):
        _assert_same(_read_all(tmp_path / name), state)


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "trap": Payload()}, evil)
    before = file_digests(evil)
    with pytest.raises(InputError) as err:
        open_checkpoint(evil)
    message = str(err.value)
    assert str(evil) in message and "code execution" in message and "\n" not in message
    assert not marker.exists()
    assert file_digests(evil) == before


def test_trainer_checkpoint_never_reads_training_state(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-5"
    state = save_tiny_bert(ckpt)
    _write_training_state(ckpt, 5)
    _assert_same(_read_all(ckpt), state)
    with pytest.raises(InputError, match="training-state file"):
        open_checkpoint(ckpt / "optimizer.pt")


def test_find_checkpoints_sorts_steps_and_skips_non_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (10, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoint-final").mkdir()
    (run / "checkpoint-3").write_text("not a folder")
    torch.save({}, run / "optimizer.pt")
    assert find_checkpoints(run) == [(2, run / "checkpoint-2"), (10, run / "checkpoint-10")]

    single = tmp_path / "final"
    save_tiny_bert(single)
    _write_training_state(single, 7)
    assert find_checkpoints(single) == [(7, single)]

    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save({}, empty / "optimizer.pt")
    with pytest.raises(InputError, match="no weights"):
        find_checkpoints(empty)


# --- PEFT adapters -------------------------------------------------------------------------------

TARGETS = ["query", "value"]
PEFT_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "lora_rslora_modules_to_save": dict(
        r=4, lora_alpha=6, target_modules=TARGETS, use_rslora=True, modules_to_save=["classifier"]
    ),
    "lora_patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS + ["dense"],
        rank_pattern={"layer.1.attention.self.query": 2, "output.dense": 3},
        alpha_pattern={"value": 3},
    ),
    "dora": dict(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, modules_to_save=["classifier"]),
    "dora_rslora": dict(r=2, lora_alpha=5, target_modules=TARGETS, use_dora=True, use_rslora=True),
    "lora_bias": dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_bias=True),
}


def _check_against_peft(
    reader, reference: dict[str, torch.Tensor], expect_targets: int, expect_copies: set[str]
) -> None:
    ref_by_canon = {canonical_name(k): v for k, v in reference.items()}
    names = reader.names()
    targets = [n for n in names if reader.low_rank(n) is not None]
    assert reader.partial and len(targets) == expect_targets
    assert {canonical_name(n) for n in names if reader.low_rank(n) is None} >= {
        canonical_name(c) for c in expect_copies
    }
    for name in names:
        got = reader.get(name)
        want = ref_by_canon[canonical_name(name)]
        assert got.shape == want.shape == reader.shape(name)
        torch.testing.assert_close(got, want.to(torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_merges_like_merge_and_unload(tmp_path: Path, case: str) -> None:
    kwargs = PEFT_CASES[case]
    reference = make_peft_adapter(tmp_path / "base", tmp_path / "adapter", **kwargs)
    copies = {"classifier.weight", "classifier.bias"} if kwargs.get("modules_to_save") else set()
    # "dense" also matches attention.output, intermediate and output in each layer, and the pooler
    targets = 2 * 2 + (2 * 3 + 1 if "dense" in kwargs["target_modules"] else 0)
    with open_checkpoint(tmp_path / "adapter", base=tmp_path / "base") as reader:
        biases = 2 * len(TARGETS) if kwargs.get("lora_bias") else 0
        assert len(reader.names()) == targets + len(copies) + biases
        _check_against_peft(reader, reference, targets, copies)
        update = reader.low_rank("bert.encoder.layer.1.attention.self.query.weight")
        rank = kwargs.get("rank_pattern", {}).get("layer.1.attention.self.query", kwargs["r"])
        denominator = rank**0.5 if kwargs.get("use_rslora") else rank
        assert update.lora_A.shape[0] == rank
        assert update.scale == pytest.approx(kwargs["lora_alpha"] / denominator)
        assert (update.magnitude is not None) == bool(kwargs.get("use_dora"))
        if "alpha_pattern" in kwargs:
            value = reader.low_rank("bert.encoder.layer.0.attention.self.value.weight")
            assert value.scale == pytest.approx(3 / kwargs["r"])


def test_gpt2_fan_in_fan_out_lora_and_dora(tmp_path: Path) -> None:
    for use_dora in (False, True):
        root = tmp_path / str(use_dora)
        reference = make_peft_adapter(
            root / "base",
            root / "adapter",
            model="gpt2",
            r=4,
            lora_alpha=8,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            use_dora=use_dora,
        )
        with open_checkpoint(root / "adapter", base=root / "base") as reader:
            _check_against_peft(reader, reference, 2, set())
            update = reader.low_rank(reader.names()[0])
            assert update.fan_in_fan_out and reader.shape(reader.names()[0]) == (32, 96)


class _ConvNet(torch.nn.Module):
    """Conv2d (3x3), Conv1d (kernel 2), Conv3d (1x2x2) and Linear: what PEFT's LoRA/DoRA adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.conv1 = torch.nn.Conv1d(6, 5, 2)
        self.conv3 = torch.nn.Conv3d(2, 3, (1, 2, 2))  # weights only: not in forward
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv1(self.conv(x).mean(2)).mean(2))


def _conv_adapter(folder: Path, **lora):
    """A fresh :class:`_ConvNet` saved as ``folder/base``, wrapped by PEFT with random B factors."""
    from peft import LoraConfig, get_peft_model

    net = _ConvNet()
    (folder / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, folder / "base" / "model.safetensors")
    return get_peft_model(net, LoraConfig(init_lora_weights=False, **lora))


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_lora_and_dora_merge_like_peft(tmp_path: Path, use_dora: bool, monkeypatch) -> None:
    from dora_analysis.analysis import tensor_major
    from dora_analysis.analysis.comparison import compare

    factored_rows = []  # base rows analysed from factors, never merged

    def counting(base_rows, updates):
        factored_rows.append(tuple(base_rows.shape))
        return low_rank_row_changes(base_rows, updates)

    low_rank_row_changes = tensor_major.low_rank_row_changes
    monkeypatch.setattr(tensor_major, "low_rank_row_changes", counting)

    torch.manual_seed(0)
    model = _conv_adapter(
        tmp_path, r=2, lora_alpha=6, target_modules=["conv", "conv1", "conv3", "fc"], use_dora=use_dora
    )
    with torch.no_grad():  # move the DoRA magnitudes off the base norms too
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    save_file(merged, tmp_path / "merged.safetensors")
    with open_checkpoint(tmp_path / "adapter", base=tmp_path / "base") as reader:
        _check_against_peft(reader, merged, 4, set())
        update = reader.low_rank("conv.weight")
        assert update.lora_A.shape == (2, 4 * 3 * 3) and update.lora_B.shape == (6, 2)
        assert (update.magnitude is not None and update.magnitude.shape == (6,)) == use_dora
    # the conv rows' statistics from the factors equal those of PEFT's merged weights
    factored = compare(tmp_path / "base", tmp_path / "adapter", include=r"weight$")
    assert factored_rows == [(6, 36), (5, 12), (3, 8), (3, 5)]  # conv weights as rows (out, in * kernel)
    dense = compare(tmp_path / "base", tmp_path / "merged.safetensors", include=r"weight$")
    assert list(factored.tensor) == ["conv.weight", "conv1.weight", "conv3.weight", "fc.weight"]
    for column in ("delta_magnitude", "delta_direction", "tuned_magnitude_mean"):
        assert factored[column].to_numpy() == pytest.approx(dense[column].to_numpy(), rel=1e-5)
    assert (factored.delta_direction > 1e-4).all()


def test_conv_factors_that_do_not_fit_are_named(tmp_path: Path) -> None:
    _conv_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["conv"]).save_pretrained(tmp_path / "adapter")
    factors = tmp_path / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(factors)
    tensors["base_model.model.conv.lora_A.weight"] = torch.randn(2, 4, 5, 5)  # not the base's 3x3 kernel
    save_file(tensors, factors)
    before = file_digests(tmp_path)
    with pytest.raises(InputError) as err:
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")
    message = str(err.value)
    assert str(factors) in message and "conv.lora_A" in message and "kernel (3, 3)" in message
    assert "\n" not in message and file_digests(tmp_path) == before


def test_adapter_on_classifier_over_bare_encoder_uses_base_names(tmp_path: Path) -> None:
    """An adapter trained on BertForSequenceClassification (``bert.encoder...``) over a BertModel base."""
    from transformers import BertForSequenceClassification

    reference = make_peft_adapter(
        tmp_path / "cls_base",
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=TARGETS,
        use_dora=True,
        modules_to_save=["classifier"],
    )
    bare = BertForSequenceClassification.from_pretrained(tmp_path / "cls_base").bert
    bare.save_pretrained(tmp_path / "bare")
    with open_checkpoint(tmp_path / "adapter", base=tmp_path / "bare") as reader:
        names = reader.names()
        assert "encoder.layer.0.attention.self.query.weight" in names
        assert "classifier.weight" in names  # the base lacks it: kept under the adapter's name
        for name in names:
            want = reference.get(name, reference.get(f"bert.{name}"))
            torch.testing.assert_close(reader.get(name), want, atol=1e-5, rtol=0)


def test_named_adapter_subfolder_bin_file_and_base_from_config(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    save_tiny_bert(tmp_path / "base")
    model = BertModel.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(
        model, LoraConfig(r=2, lora_alpha=4, target_modules=["query"]), adapter_name="mine"
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "run", safe_serialization=False)
    assert (tmp_path / "run" / "mine" / "adapter_model.bin").is_file()
    reference = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    got = _read_all(tmp_path / "run", base=tmp_path / "base")
    assert len(got) == 2
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=0)
    # base=None: adapter_config's base_model_name_or_path, when it is a local path, is the base
    config_file = tmp_path / "run" / "mine" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run" / "mine", copy)
    (copy / "adapter_config.json").write_text(json.dumps(config))
    _assert_same(_read_all(copy), got)


def test_adapter_in_trainer_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-3"
    reference = make_peft_adapter(tmp_path / "base", ckpt, r=4, lora_alpha=8, target_modules=TARGETS)
    _write_training_state(ckpt, 3)
    with open_checkpoint(ckpt, base=tmp_path / "base") as reader:
        _check_against_peft(reader, reference, 4, set())


def test_adapter_get_reads_only_the_requested_module(tmp_path: Path, monkeypatch) -> None:
    make_peft_adapter(
        tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True
    )
    calls: list[tuple[str, str]] = []
    real_get = SafetensorsReader.get

    def get(self, name):
        calls.append((self.source.name, name))
        return real_get(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", get)
    with open_checkpoint(tmp_path / "adapter", base=tmp_path / "base") as reader:
        assert calls == []  # opening reads headers only
        reader.get("bert.encoder.layer.1.attention.self.value.weight")
    assert sorted(calls) == sorted(
        [
            (
                "adapter_model.safetensors",
                "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight",
            ),
            (
                "adapter_model.safetensors",
                "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight",
            ),
            (
                "adapter_model.safetensors",
                "base_model.model.bert.encoder.layer.1.attention.self.value.lora_magnitude_vector",
            ),
            ("model.safetensors", "bert.encoder.layer.1.attention.self.value.weight"),
        ]
    )


# --- NVlabs DoRA layout --------------------------------------------------------------------------


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
        _check_against_peft(reader, reference, 4, set())
        assert reader.low_rank(reader.names()[0]).scale == pytest.approx(2.0)

    base = _read_all(tmp_path / "base")
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
        _check_against_peft(reader, reference, 4, set())


def test_nvlabs_without_alpha_is_refused(tmp_path: Path) -> None:
    make_peft_adapter(
        tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True
    )
    torch.save(_nvlabs_state(tmp_path / "adapter"), tmp_path / "partial.pt")
    with pytest.raises(InputError, match="lora_alpha"):
        open_checkpoint(tmp_path / "partial.pt", base=tmp_path / "base")
    with pytest.raises(InputError, match="base"):
        open_checkpoint(tmp_path / "partial.pt", lora_alpha=8)


# --- bad input -----------------------------------------------------------------------------------


def _safetensors_bytes(tmp_path: Path) -> bytes:
    save_file({"a.weight": torch.randn(4, 4), "b.weight": torch.randn(2, 4)}, tmp_path / "good.safetensors")
    return (tmp_path / "good.safetensors").read_bytes()


def _with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bad_file(tmp_path: Path, case: str) -> Path:
    good = _safetensors_bytes(tmp_path)
    n = struct.unpack("<Q", good[:8])[0]
    path = tmp_path / "bad.safetensors"
    if case == "truncated_data":
        path.write_bytes(good[:-10])
    elif case == "header_past_eof":
        path.write_bytes(struct.pack("<Q", n + 1000) + good[8:])
    elif case == "offsets_past_eof":
        header = json.loads(good[8 : 8 + n])
        header["b.weight"]["data_offsets"] = [64, 64 + 32 * 4]
        header["b.weight"]["shape"] = [32, 1]
        path.write_bytes(_with_header(header, good[8 + n :]))
    elif case == "header_not_json":
        path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16)
    elif case == "absurd_header":
        path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    elif case == "tiny":
        path.write_bytes(b"\x01\x02")
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("truncated_data", "truncated"),
        ("header_past_eof", "runs past the end"),
        ("offsets_past_eof", "past its end"),
        ("header_not_json", "not valid JSON"),
        ("absurd_header", "absurd size"),
        ("tiny", "truncated"),
    ],
)
def test_bad_safetensors_files(tmp_path: Path, case: str, needle: str) -> None:
    path = _bad_file(tmp_path, case)
    before = file_digests(path)
    with pytest.raises(InputError) as err:
        open_checkpoint(path)
    message = str(err.value)
    assert message.startswith(str(path)) and needle in message and "\n" not in message
    if case == "offsets_past_eof":
        assert "b.weight" in message
    assert file_digests(path) == before


def test_missing_unknown_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "weights.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(InputError, match="unknown format"):
        open_checkpoint(tmp_path / "weights.npy")
    ckpt = tmp_path / "checkpoint-9"
    ckpt.mkdir()
    _write_training_state(ckpt, 9)
    before = file_digests(ckpt)
    with pytest.raises(InputError) as err:
        open_checkpoint(ckpt)
    assert str(ckpt) in str(err.value) and "no weights" in str(err.value)
    assert file_digests(ckpt) == before


def _edited_adapter(tmp_path: Path, edit_config=None, edit_tensors=None) -> Path:
    """A copy of a real PEFT adapter with its config or tensors changed (the original is kept intact)."""
    from safetensors.torch import load_file

    src = tmp_path / "adapter"
    if not src.exists():
        make_peft_adapter(tmp_path / "base", src, r=4, lora_alpha=8, target_modules=TARGETS)
    dst = tmp_path / "edited"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / "adapter_config.json").read_text())
        edit_config(config)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors")
    return dst


Q0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("case", "needle", "where"),
    [
        ("no_r", "missing 'r'", "adapter_config.json"),
        ("no_alpha", "missing 'lora_alpha'", "adapter_config.json"),
        ("not_lora", "peft_type", "adapter_config.json"),
        ("bad_shape", "do not fit", "adapter_model.safetensors"),
        ("no_base_weight", "no base weight", "adapter_model.safetensors"),
        ("rank_mismatch", "rank r=4", "adapter_config.json"),
    ],
)
def test_bad_adapters(tmp_path: Path, case: str, needle: str, where: str) -> None:
    edits = {
        "no_r": dict(edit_config=lambda c: c.pop("r")),
        "no_alpha": dict(edit_config=lambda c: c.pop("lora_alpha")),
        "not_lora": dict(edit_config=lambda c: c.update(peft_type="IA3")),
        "bad_shape": dict(edit_tensors=lambda t: t.update({f"{Q0}.lora_A.weight": torch.randn(4, 31)})),
        "no_base_weight": dict(
            edit_tensors=lambda t: t.update(
                {k.replace("layer.0.", "layer.9."): t.pop(k) for k in [k for k in t if k.startswith(Q0)]}
            )
        ),
        "rank_mismatch": dict(
            edit_tensors=lambda t: t.update(
                {f"{Q0}.lora_A.weight": torch.randn(2, 32), f"{Q0}.lora_B.weight": torch.randn(32, 2)}
            )
        ),
    }[case]
    adapter = _edited_adapter(tmp_path, **edits)
    before = {**file_digests(adapter), **file_digests(tmp_path / "base")}
    with pytest.raises(InputError) as err:
        open_checkpoint(adapter, base=tmp_path / "base")
    message = str(err.value)
    assert str(adapter / where) in message and needle in message and "\n" not in message
    if case in ("bad_shape", "no_base_weight", "rank_mismatch"):
        assert "query" in message  # the tensor is named
    assert {**file_digests(adapter), **file_digests(tmp_path / "base")} == before


def test_adapter_without_base_is_refused(tmp_path: Path) -> None:
    make_peft_adapter(tmp_path / "base", tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    with pytest.raises(InputError, match="needs a base"):
        open_checkpoint(tmp_path / "adapter")
    with pytest.raises(InputError, match="adapter_config.json"):
        shutil.copy(tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "loose.safetensors")
        open_checkpoint(tmp_path / "loose.safetensors")
