"""PEFT LoRA/DoRA adapters (readers/peft_adapter.py): merged over their base exactly as PEFT merges them."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from reader_checks import (
    TARGETS,
    assert_same,
    check_against_peft,
    read_all,
    write_training_state,
)
from safetensors.torch import load_file, save_file
from tiny_models import file_digests, make_peft_adapter, save_tiny_bert, tiny_bert_config

from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint
from dora_analysis.readers.safetensors_file import SafetensorsReader

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
        check_against_peft(reader, reference, targets, copies)
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
            check_against_peft(reader, reference, 2, set())
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
        check_against_peft(reader, merged, 4, set())
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
    got = read_all(tmp_path / "run", base=tmp_path / "base")
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
    assert_same(read_all(copy), got)


def test_adapter_in_trainer_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-3"
    reference = make_peft_adapter(tmp_path / "base", ckpt, r=4, lora_alpha=8, target_modules=TARGETS)
    write_training_state(ckpt, 3)
    with open_checkpoint(ckpt, base=tmp_path / "base") as reader:
        check_against_peft(reader, reference, 4, set())


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


QUERY = "encoder.layer.0.attention.self.query.weight"


def _peft_merged(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import BertModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = BertModel.from_pretrained(base_dir).eval()
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _trained_with_init(folder: Path, init: str) -> tuple[Path, Path, Path]:
    """A BertModel base, and its adapter with ``init_lora_weights=init`` after a mock training step,
    saved as is (``raw``) and converted to plain LoRA (``converted``), as PEFT's examples do."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertModel(tiny_bert_config()).eval()
    base.save_pretrained(folder / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
        model.save_pretrained(folder / "initial")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        model.save_pretrained(folder / "raw")
        model.save_pretrained(
            folder / "converted", path_initial_model_for_weight_conversion=str(folder / "initial")
        )
    return folder / "base", folder / "raw", folder / "converted"


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_rewrote_the_base_is_refused_unless_converted(tmp_path: Path, init: str):
    base, raw, converted = _trained_with_init(tmp_path, init)
    peft_raw = _peft_merged(base, raw)
    with open_checkpoint(tmp_path / "base") as plain:
        w0 = plain.get(QUERY)
    # PEFT re-runs the init on the base, so the factors alone over W0 would be a different weight
    raw_factors = load_file(raw / "adapter_model.safetensors")
    a = raw_factors[f"base_model.model.{QUERY[:-7]}.lora_A.weight"]
    b = raw_factors[f"base_model.model.{QUERY[:-7]}.lora_B.weight"]
    assert (peft_raw[QUERY] - (w0 + 2.0 * b @ a)).abs().max() > 1e-2
    with pytest.raises(InputError) as caught:
        open_checkpoint(raw, base=base)
    message = str(caught.value)
    assert "path_initial_model_for_weight_conversion" in message and repr(init) in message
    assert len(message) <= 300 + len(str(raw))
    reference = _peft_merged(base, converted)
    assert json.loads((converted / "adapter_config.json").read_text())["init_lora_weights"] is True
    with open_checkpoint(converted, base=base) as reader:
        for name in reader.names():
            # fp32 sums of r=8 products of O(1) factors: a few ulps of O(1) values
            torch.testing.assert_close(reader.get(name), reference[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(reader.get(QUERY), peft_raw[QUERY], atol=1e-5, rtol=0)


def _edit_config(adapter: Path, **fields) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


def test_target_modules_matching_none_of_the_modules_is_refused_like_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import BertModel

    make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    _edit_config(tmp_path / "adapter", target_modules=["nothing_here"])
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(BertModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with pytest.raises(InputError, match="match none of the adapter's 4 modules"):
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")


@pytest.mark.parametrize(
    "fields",
    [
        dict(target_modules=["query"]),
        dict(exclude_modules=["value"]),
        dict(target_modules=".*query"),
        dict(layers_to_transform=[1]),
    ],
    ids=["list", "exclude", "regex", "layers"],
)
def test_factors_peft_would_not_load_are_refused(tmp_path: Path, fields: dict) -> None:
    reference = make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    _edit_config(tmp_path / "adapter", **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    ignored = [n for n in peft if not torch.equal(peft[n], reference[n])]
    assert ignored, "PEFT loads every factor, so there was nothing to refuse"
    with pytest.raises(InputError, match="PEFT would not load them"):
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")


@pytest.mark.parametrize(
    "fields",
    [
        dict(target_modules=".*(query|value)"),
        dict(target_modules=["query", "value"], layers_to_transform=[0, 1]),
    ],
    ids=["regex", "layers"],
)
def test_targets_written_other_ways_read_like_peft(tmp_path: Path, fields: dict) -> None:
    make_peft_adapter(
        tmp_path / "base",
        tmp_path / "adapter",
        model="bert",
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
    )
    _edit_config(tmp_path / "adapter", **fields)
    reference = _peft_merged(tmp_path / "base", tmp_path / "adapter")
    with open_checkpoint(tmp_path / "adapter", base=tmp_path / "base") as reader:
        assert len(reader.names()) == 4
        for name in reader.names():
            torch.testing.assert_close(reader.get(name), reference[name], atol=1e-5, rtol=0)


def test_a_three_dimensional_lora_a_is_refused_like_peft(tmp_path: Path) -> None:
    make_peft_adapter(
        tmp_path / "base", tmp_path / "adapter", model="bert", r=4, lora_alpha=8, target_modules=["query"]
    )
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    factors = load_file(path)
    key = next(k for k in factors if k.endswith("lora_A.weight"))
    factors[key] = factors[key].reshape(4, 4, 8).contiguous()  # (r, 32) folded: the same elements
    save_file(factors, path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        _peft_merged(tmp_path / "base", tmp_path / "adapter")
    with pytest.raises(InputError, match="must both be 2-D") as caught:
        open_checkpoint(tmp_path / "adapter", base=tmp_path / "base")
    assert key in str(caught.value)
