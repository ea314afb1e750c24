"""Tensors compared in batches give what each tensor gives alone, and NumPy float64's."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from dora_analysis.analysis import fused_rows, tensor_major
from dora_analysis.analysis.comparison import compare, compare_many
from dora_analysis.analysis.decomposition import row_changes, row_scalars_many, summarize_many
from dora_analysis.analysis.planning import LayoutWarning
from dora_analysis.analysis.tensor_batches import deltas_of_many, located_summaries, row_of, stacked_scalars
from dora_analysis.readers import open_checkpoint
from dora_analysis.readers.base import ReaderWrapper, StoredTensor

EPS64 = float(np.finfo(np.float64).eps)
FIELDS = ("base_magnitude", "tuned_magnitude", "magnitude_change", "direction_change", "valid")


def _mixed_items(seed: int = 0, count: int = 60):
    """Small tensors of several row shapes, dtypes and strides, some with a second tuned tensor;
    zero, NaN and unchanged rows among them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 8), (8, 4), (3, 5), (16, 16), (1, 7)]
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    items = []
    for j in range(count):
        k, n = shapes[j % len(shapes)]
        dtype = dtypes[(j // len(shapes)) % len(dtypes)]
        base = torch.randn(k, n, generator=g, dtype=torch.float64)
        tuned = base * (1 + 0.05 * torch.randn(k, 1, generator=g, dtype=torch.float64))
        tuned += 0.01 * torch.randn(k, n, generator=g, dtype=torch.float64)
        if j % 7 == 3:
            base[0] = 0.0  # an excluded row
        if j % 11 == 5:
            tuned[-1, 0] = math.nan  # a nonfinite tuned tensor
        if j % 13 == 2:
            tuned = base.clone()  # unchanged
        base_rows = base.to(dtype)
        if j % 3 == 1:  # a transposed (Conv1D-like) view: strided rows
            base_rows = base.T.contiguous().to(dtype).T
        tuned_list = [(0, tuned.to(dtype))]
        if j % 2 == 0:
            tuned_list.append((2, (tuned + 0.001).to(torch.float32)))
        items.append((base_rows, tuned_list))
    return items


def _alone(base: torch.Tensor, tuned: list[tuple[int, torch.Tensor]]):
    """The per-tensor path: one tensor's row_scalars_many -> row_changes -> summarize_many."""
    changes = row_changes(row_scalars_many(base, [t for _, t in tuned]))
    deltas = summarize_many(changes)
    return {index: deltas[i] for i, (index, _) in enumerate(tuned)}, {
        index: row_of(changes, i) for i, (index, _) in enumerate(tuned)
    }


def _tolerance(features: int) -> float:
    """Relative error bound of a float64 sum of ``features`` exact products (any order), doubled for
    the ratios and the mean over rows built from it."""
    return 4 * features * EPS64


def test_batched_equals_each_tensor_alone() -> None:
    items = _mixed_items()
    batched = deltas_of_many(items, per_row=True)
    statuses = set()
    for (base, tuned), (deltas, changes) in zip(items, batched, strict=True):
        want_deltas, want_changes = _alone(base, tuned)
        assert deltas.keys() == want_deltas.keys() == changes.keys()
        rtol = _tolerance(base.shape[1])
        for index, want in want_deltas.items():
            got = deltas[index]
            statuses.add(got.status)
            assert (got.rows, got.rows_excluded, got.status) == (want.rows, want.rows_excluded, want.status)
            for field in (
                "delta_magnitude",
                "delta_direction",
                "base_magnitude_mean",
                "tuned_magnitude_mean",
            ):
                np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=rtol, atol=0)
            for field in FIELDS:
                # 1 - cos comes from |a|^2 |d|^2 - (a.d)^2: its error is relative to |d|^2 / |w|^2
                # (below 1 here), not to its own value
                np.testing.assert_allclose(
                    getattr(changes[index], field).double().numpy(),
                    getattr(want_changes[index], field).double().numpy(),
                    rtol=rtol,
                    atol=rtol if field == "direction_change" else 0,
                )
    assert {"ok", "nonfinite tuned"} <= statuses


def _numpy_delta(base: np.ndarray, tuned: np.ndarray) -> tuple[float, float]:
    """ΔM and ΔD in float64 NumPy over the rows where both norms are nonzero."""
    na, nw = np.linalg.norm(base, axis=1), np.linalg.norm(tuned, axis=1)
    valid = (na > 0) & (nw > 0)
    cos = np.sum(base * tuned, axis=1)[valid] / (na[valid] * nw[valid])
    return float(np.mean(np.abs(nw - na)[valid])), float(np.mean(1 - cos))


def test_batched_agrees_with_numpy_float64() -> None:
    items = [item for item in _mixed_items(seed=1) if item[0].dtype != torch.float16]
    for (base, tuned), (deltas, _) in zip(items, deltas_of_many(items), strict=True):
        for index, rows in tuned:
            got = deltas[index]
            if got.status != "ok":
                continue
            # the update d = w - a is formed in float32 (exact for bf16/fp16, rounded for fp32)
            a = base.double().numpy()
            w = a + (rows.float() - base.float()).double().numpy() if base.dtype != torch.float64 else None
            w = rows.double().numpy() if w is None else w
            dm, dd = _numpy_delta(a, w)
            # NumPy's 1 - cos cancels: absolute error ~ features * eps64 per row
            np.testing.assert_allclose(got.delta_magnitude, dm, rtol=1e-9)
            assert abs(got.delta_direction - dd) <= 8 * base.shape[1] * EPS64 + 1e-9 * dd


def _write_pair(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path, dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for j in range(count):
        shape = (4, 6) if j % 2 else (6, 4)
        name = f"model.layers.{j // 3}.mlp.experts.{j}.{('gate', 'up', 'down')[j % 3]}_proj.weight"
        base[name] = (0.02 * torch.randn(shape, generator=g)).bfloat16()
        tuned[name] = (base[name].float() + 0.002 * torch.randn(shape, generator=g)).bfloat16()
    # one large tensor between them: the per-tensor path in the same comparison
    base["model.layers.0.self_attn.q_proj.weight"] = torch.randn(300, 300, generator=g).bfloat16()
    tuned["model.layers.0.self_attn.q_proj.weight"] = torch.randn(300, 300, generator=g).bfloat16()
    save_file(base, folder / "base.safetensors")
    save_file(tuned, folder / "tuned.safetensors")
    return folder / "base.safetensors", folder / "tuned.safetensors", base, tuned


def test_compare_batched_equals_compare_per_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batching never changes a tensor's numbers: the same kernel on the same bytes, the same
    summary pass, so a batch's frame equals the one-by-one frame bit for bit."""
    base, tuned, _, _ = _write_pair(tmp_path, 90)
    batched = compare_many(base, [tuned, base])
    per_row = compare(base, tuned, per_row=True)
    monkeypatch.setattr(tensor_major, "BATCH_ELEMENTS", 0)  # every tensor alone
    alone = compare_many(base, [tuned, base])
    alone_rows = compare(base, tuned, per_row=True)
    for got, want in zip(batched, alone, strict=True):
        assert len(got) == 91
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert (batched[1]["delta_magnitude"] == 0).all()  # the base against itself
    pd.testing.assert_frame_equal(per_row, alone_rows, check_exact=True)


def _reading_through_get(source: Path) -> ReaderWrapper:
    """The checkpoint read only through ``get`` (a wrapper answers no ``stored_at``)."""
    return ReaderWrapper(open_checkpoint(source))


def _count_located(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many tensors each batch compared in place (spying on ``located_summaries``)."""
    counts: list[int] = []

    def spy(items, per_row=False):
        counts.append(len(items))
        return located_summaries(items, per_row)

    monkeypatch.setattr(tensor_major, "located_summaries", spy)
    return counts


@pytest.mark.parametrize("fp16_in_place", [True, False])
def test_rows_read_in_place_equal_rows_read_through_get(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fp16_in_place: bool
) -> None:
    """Tensors found in the memory map (stored_at) give the frame that tensors read through get
    give, bit for bit: bf16, fp16 and fp32 linear weights, a conv weight read as its flattened rows,
    and a Conv1D-shaped name whose rows are transposed (never read in place); fp16 where the CPU
    cannot widen it goes through get, the rest of the batch still in place."""
    if not fp16_in_place:
        monkeypatch.setattr(fused_rows, "_widens_fp16", lambda: False)
    g = torch.Generator().manual_seed(11)
    base, tuned = {}, {}
    for j, dtype in enumerate([torch.bfloat16, torch.float16, torch.float32] * 4):
        name = f"model.layers.{j}.mlp.{('gate', 'up', 'down')[j % 3]}_proj.weight"
        weight = 0.02 * torch.randn(8 + j % 3, 24, generator=g)
        base[name], tuned[name] = (
            weight.to(dtype),
            (weight + 0.001 * torch.randn(weight.shape, generator=g)).to(dtype),
        )
    conv = 0.1 * torch.randn(6, 3, 3, 3, generator=g)
    base["model.stem.conv.weight"], tuned["model.stem.conv.weight"] = conv, conv * 1.01 + 0.01
    gpt = 0.02 * torch.randn(16, 48, generator=g)
    base["transformer.h.0.attn.c_attn.weight"], tuned["transformer.h.0.attn.c_attn.weight"] = gpt, gpt + 0.001
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    with open_checkpoint(tmp_path / "base.safetensors") as reader:
        assert reader.stored_at("model.stem.conv.weight").shape == (6, 3, 3, 3)
    options = {"include": r"\.weight$"}
    counts = _count_located(monkeypatch)
    with pytest.warns(LayoutWarning):
        in_place = compare(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", **options)
    assert sum(counts) == (13 if fp16_in_place else 9)  # all but the transposed one (and fp16)
    counts.clear()
    with (
        _reading_through_get(tmp_path / "base.safetensors") as b,
        _reading_through_get(tmp_path / "tuned.safetensors") as t,
        pytest.warns(LayoutWarning),
    ):
        through_get = compare(b, t, **options)
    assert sum(counts) == 0
    assert len(in_place) == 14 and (in_place["status"] == "ok").all()
    assert set(in_place["layout"]) == {"linear", "conv", "transposed"}
    pd.testing.assert_frame_equal(in_place, through_get, check_exact=True)


def test_a_sharded_checkpoint_is_read_in_place_across_its_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiny_models import save_tiny_bert

    counts = _count_located(monkeypatch)
    save_tiny_bert(tmp_path / "base", max_shard_size="20KB")
    save_tiny_bert(tmp_path / "tuned", seed=1, max_shard_size="20KB")
    assert len(list((tmp_path / "base").glob("model-*.safetensors"))) > 1
    in_place = compare(tmp_path / "base", tmp_path / "tuned")
    assert sum(counts) == len(in_place)
    with _reading_through_get(tmp_path / "base") as b, _reading_through_get(tmp_path / "tuned") as t:
        through_get = compare(b, t)
    assert len(in_place) > 10
    pd.testing.assert_frame_equal(in_place, through_get, check_exact=True)


def test_a_stored_tensor_outlives_its_shard(tmp_path: Path) -> None:
    """The record keeps its memory map: after the sharded reader moved on to another shard (closing
    the first), the bytes at its address are still the tensor's."""
    from tiny_models import save_tiny_bert

    state = save_tiny_bert(tmp_path, max_shard_size="20KB")
    with open_checkpoint(tmp_path) as reader:
        order = reader.read_order([n for n in reader.names() if n.endswith(".weight")])
        first, last = order[0], order[-1]
        stored = reader.stored_at(first)
        assert reader._shard_of[first] != reader._shard_of[last]
        assert reader.stored_at(last) is not None  # opens the last shard, closing the first
    want = state[first].contiguous()
    assert stored.shape == tuple(want.shape) and stored.dtype == want.dtype
    got = ctypes.string_at(stored.address, want.numel() * want.element_size())
    assert got == want.numpy().tobytes()


def test_located_rows_refuse_what_the_kernel_cannot_read() -> None:
    with pytest.raises(ValueError, match="cannot be read in place"):
        fused_rows.row_sums_at([0], torch.float64, [([0], torch.float64)], 2, 2)
    with pytest.raises(ValueError, match="needs 2 addresses"):
        fused_rows.row_sums_at([0, 0], torch.float32, [([0], torch.float32)], 2, 2)
    keep = torch.zeros(4, 4)
    stored = StoredTensor(keep.data_ptr(), torch.float32, (4, 4), keep)
    other = StoredTensor(keep.data_ptr(), torch.float32, (2, 8), keep)
    with pytest.raises(ValueError, match="tuned rows"):
        located_summaries([(stored, [(0, other)])])


@pytest.mark.slow
def test_twenty_thousand_tiny_tensors_match_numpy(tmp_path: Path) -> None:
    base_path, tuned_path, base, tuned = _write_pair(tmp_path, 20_000, seed=3)
    frame = compare(base_path, tuned_path).set_index("tensor")
    assert len(frame) == 20_001 and (frame["status"] == "ok").all()
    for name in list(base)[::997]:
        dm, dd = _numpy_delta(base[name].double().numpy(), tuned[name].double().numpy())
        np.testing.assert_allclose(frame.loc[name, "delta_magnitude"], dm, rtol=1e-9)
        assert abs(frame.loc[name, "delta_direction"] - dd) <= 8 * 6 * EPS64 + 1e-9 * dd


def _equal_shape_items(dtype: torch.dtype, count: int, shape=(12, 40), strided: bool = False, seed: int = 5):
    """``count`` base tensors of one shape from separate storages, each with a bf16 and a float32
    tuned tensor (two series of two stored formats)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        tuned = base * 1.01 + 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
        base_rows = base.T.contiguous().to(dtype).T if strided else base.to(dtype)
        items.append((base_rows, [(0, tuned.to(dtype)), (1, (tuned - 0.01).float())]))
    items[1][0][3] = 0.0  # an excluded row
    return items


@pytest.mark.parametrize(
    ("dtype", "strided", "small"),
    [
        (torch.bfloat16, False, True),  # read in place by the kernel
        (torch.float32, False, True),
        (torch.bfloat16, True, True),  # strided: stacked (a copy)
        (torch.bfloat16, True, False),  # strided and not small: one by one
        (torch.float64, False, False),  # float64: the torch path, one by one
    ],
)
def test_stacked_scalars_equal_each_tensor_alone(
    dtype: torch.dtype, strided: bool, small: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dora_analysis.analysis import tensor_batches

    if not small:
        monkeypatch.setattr(tensor_batches, "SMALL_ELEMENTS", 10)
    items = _equal_shape_items(dtype, 6, strided=strided)
    bases = [b for b, _ in items]
    series = [[t[j][1] for _, t in items] for j in range(2)]
    in_place = not strided and dtype != torch.float64
    assert (fused_rows.row_sums_stacked(bases, series) is not None) == in_place
    got = stacked_scalars(bases, series)
    assert got.dot.shape == (2, 6 * 12)
    for q, (base, tuned) in enumerate(items):
        alone = row_scalars_many(base, [t for _, t in tuned])
        for field in ("base_sq", "dot", "update_sq"):
            part = getattr(got, field)[:, q * 12 : (q + 1) * 12]
            if in_place:  # the same kernel on the same bytes
                assert torch.equal(part, getattr(alone, field)), field
            else:  # a float32 copy or the torch path: the same exact terms, summed in another order
                np.testing.assert_allclose(part, getattr(alone, field), rtol=_tolerance(40), atol=0)
