"""compare/compare_many over the reader interface (in-memory readers; files are tested in test_cli)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reader_checks import MemoryReader

from dora_analysis.analysis.comparison import compare, compare_many
from dora_analysis.errors import InputError
from dora_analysis.schema import COLUMNS


def _reference_delta(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    a, b = w0.double().numpy(), w.double().numpy()
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.sum(a * b, axis=1) / (na * nb)
    return float(np.mean(np.abs(nb - na))), float(np.mean(1 - cos))


def _model(seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"embeddings.word_embeddings.weight": torch.randn(50, 8, generator=g)}
    for i in range(layers):
        for m in ("query", "value"):
            tensors[f"encoder.layer.{i}.attention.self.{m}.weight"] = torch.randn(8, 8, generator=g)
            tensors[f"encoder.layer.{i}.attention.self.{m}.bias"] = torch.randn(8, generator=g)
    return tensors


def _tuned(base: dict[str, torch.Tensor], seed: int, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {prefix + k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def test_compare_rows_and_values_match_reference() -> None:
    base = _model(0)
    tuned = _tuned(base, 1, prefix="bert.")
    frame = compare(MemoryReader(base, "base"), MemoryReader(tuned, "tuned"))
    assert list(frame.columns) == COLUMNS
    assert list(frame["tensor"]) == [n for n in base if n.endswith(".weight") and "embeddings" not in n]
    for row in frame.itertuples():
        dm, dd = _reference_delta(base[row.tensor], tuned["bert." + row.tensor])
        assert row.delta_magnitude == pytest.approx(dm, rel=1e-6)
        assert row.delta_direction == pytest.approx(dd, rel=1e-6)
        assert row.shape == "8x8" and row.rows == 8 and row.status == "ok"
    assert set(frame["module"]) == {"attention.self.query", "attention.self.value"}
    assert set(frame["layer"]) == {0, 1} and set(frame["stack"]) == {"encoder"}


def test_include_exclude_and_one_sided_names() -> None:
    base = _model(0)
    tuned = _tuned(base, 1)
    tuned["classifier.weight"] = torch.randn(3, 8)
    del tuned["encoder.layer.1.attention.self.value.weight"]
    frame = compare(
        MemoryReader(base, "b"), MemoryReader(tuned, "t"), include=r"embeddings|query", exclude=r"layer\.1\."
    )
    assert list(frame["tensor"]) == [
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.attention.self.query.weight",
    ]
    assert frame.attrs["base_only"] == ["encoder.layer.1.attention.self.value.weight"]
    assert frame.attrs["tuned_only"] == ["classifier.weight"]


def test_partial_checkpoints_do_not_report_base_only_names() -> None:
    base = _model(0)
    tuned = {k: v for k, v in _tuned(base, 1).items() if "query.weight" in k}
    frame = compare(MemoryReader(base, "b"), MemoryReader(tuned, "adapter", partial=True))
    assert len(frame) == 2 and frame.attrs["base_only"] == []


def test_compare_many_reads_each_base_tensor_once() -> None:
    base_reader = MemoryReader(_model(0), "b")
    tuned = [MemoryReader(_tuned(_model(0), seed), f"t{seed}") for seed in range(1, 5)]
    frames = compare_many(base_reader, tuned)
    assert len(frames) == 4 and all(len(f) == 4 for f in frames)
    assert sorted(base_reader.reads) == sorted(set(base_reader.reads)) and len(base_reader.reads) == 4
    single = compare(MemoryReader(_model(0), "b"), tuned[2])
    assert frames[2]["delta_direction"].tolist() == single["delta_direction"].tolist()


def test_no_tensor_in_common_names_both_sides() -> None:
    with pytest.raises(
        InputError, match=r"^tuned\.safetensors: no tensor in common with base base\.safetensors"
    ):
        compare(
            MemoryReader(_model(0), "base.safetensors"),
            MemoryReader({"x.weight": torch.ones(2, 2)}, "tuned.safetensors"),
        )


def test_shape_mismatch_names_file_and_tensor() -> None:
    base = _model(0)
    tuned = _tuned(base, 1)
    tuned["encoder.layer.0.attention.self.value.weight"] = torch.ones(8, 4)
    with pytest.raises(
        InputError,
        match=r"^t\.pt: encoder\.layer\.0\.attention\.self\.value\.weight: shape \[8, 4\] != base shape \[8, 8\]",
    ):
        compare(MemoryReader(base, "b"), MemoryReader(tuned, "t.pt"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int64])
def test_integer_or_quantized_weights_are_refused(dtype: torch.dtype) -> None:
    base = _model(0)
    tuned = _tuned(base, 1)
    tuned["encoder.layer.1.attention.self.query.weight"] = torch.ones(8, 8, dtype=dtype)
    with pytest.raises(
        InputError,
        match=r"^q\.safetensors: encoder\.layer\.1\.attention\.self\.query\.weight: stored as u?int\d+, expected a floating-point",
    ):
        compare(MemoryReader(base, "b"), MemoryReader(tuned, "q.safetensors"))


def test_nonfinite_tensor_is_reported_in_its_row() -> None:
    base = _model(0)
    tuned = _tuned(base, 1)
    tuned["encoder.layer.0.attention.self.query.weight"][3, 3] = float("nan")
    frame = compare(MemoryReader(base, "b"), MemoryReader(tuned, "t")).set_index("tensor")
    assert frame.loc["encoder.layer.0.attention.self.query.weight", "status"] == "nonfinite tuned"
    assert (frame.drop(index="encoder.layer.0.attention.self.query.weight")["status"] == "ok").all()
