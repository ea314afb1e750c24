"""The fused multi-threaded row reductions equal the float64 reference path (and NumPy float64)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from dora_analysis.analysis import fused_rows
from dora_analysis.analysis.comparison import compare_many
from dora_analysis.analysis.decomposition import (
    RowScalars,
    _row_scalars_float64,
    row_changes,
    row_scalars,
    row_scalars_many,
)
from dora_analysis.analysis.row_blocks import row_blocks


def _assert_same(fast: RowScalars, ref: RowScalars, rtol: float = 1e-12) -> None:
    for name in ("base_sq", "dot", "update_sq"):
        got, want = getattr(fast, name).numpy(), getattr(ref, name).numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=name)


def _hard_pair(dtype: torch.dtype, rows: int = 48, cols: int = 300, seed: int = 0):
    """Random rows plus the hard cases: rescaled rows with a ~1e-8 direction change, zero rows, huge
    and tiny values, an unchanged row, NaN and Inf."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    tuned = base + 0.05 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    for j, scale in enumerate((0.3, 1.5, 2.0, 3.0)):  # mostly a magnitude change
        tuned[j] = scale * base[j] + 1e-4 * torch.randn(cols, generator=g, dtype=torch.float64)
    base[4] = 0.0
    tuned[5] = 0.0
    base[6] *= 1e30
    tuned[6] = base[6] * 1.01
    base[7] *= 1e-30
    tuned[7] = base[7] * 0.99
    tuned[8] = base[8]
    base[9, 3] = float("nan")
    tuned[10, 7] = float("inf")
    if dtype == torch.float16:  # keep within fp16's range
        base[6], tuned[6], base[7], tuned[7] = base[11], base[11] * 1.01, base[12] * 1e-3, base[12] * 1e-3
    return base.to(dtype), tuned.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_path_equals_float64_path(dtype: torch.dtype) -> None:
    base, tuned = _hard_pair(dtype)
    assert fused_rows.supports(base, [tuned])
    _assert_same(row_scalars(base, tuned), _row_scalars_float64(base, tuned))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widen_fp16_in_kernel", [True, False])
def test_every_16_bit_pattern_widens_exactly(
    dtype: torch.dtype, widen_fp16_in_kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All 65536 encodings (zeros, subnormals, normals, Inf, NaN), 256 per row, against float64."""
    if not widen_fp16_in_kernel:  # as on a CPU without a hardware fp16 conversion
        monkeypatch.setattr(fused_rows, "_widens_fp16", lambda: False)
    base = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    tuned = torch.zeros_like(base)
    tuned[::2] = base[1::2]  # even rows: another row's values, odd rows: zeros
    fast = row_scalars(base, tuned)
    _assert_same(fast, _row_scalars_float64(base, tuned), rtol=1e-13)
    finite = torch.isfinite(base.double()).all(1)
    assert 200 < int(finite.sum()) < 256  # both finite rows and Inf/NaN rows are checked
    assert torch.isfinite(fast.base_sq[finite]).all() and torch.isnan(fast.base_sq[~finite]).any()


def test_fused_path_matches_numpy_float64_at_one_minus_cos_1e_8() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 1024, generator=g)
    scales = torch.linspace(0.5, 1.9, 64)[:, None]  # large magnitude changes, tiny rotations
    tuned = base * scales + 1e-4 * torch.randn(64, 1024, generator=g)
    a, w = base.double().numpy(), tuned.double().numpy()
    na, nw = np.linalg.norm(a, axis=1), np.linalg.norm(w, axis=1)
    ref_dir = 0.5 * np.sum((a / na[:, None] - w / nw[:, None]) ** 2, axis=1)
    assert ref_dir.max() < 1e-7
    changes = row_changes(row_scalars(base, tuned))
    np.testing.assert_allclose(changes.direction_change.numpy(), ref_dir, rtol=1e-3)
    np.testing.assert_allclose(changes.magnitude_change.numpy(), np.abs(nw - na), rtol=1e-6)


def test_mixed_dtypes_and_strided_rows() -> None:
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(40, 24, generator=g).bfloat16()  # a Conv1D-style (in, out) weight
    merged = weight.float() + 0.01 * torch.randn(40, 24, generator=g)
    base_rows, tuned_rows = weight.T, merged.T  # non-contiguous (out, in) views
    assert not base_rows.is_contiguous()
    _assert_same(row_scalars(base_rows, tuned_rows), _row_scalars_float64(base_rows, tuned_rows))
    _assert_same(row_scalars(weight.T.contiguous(), merged.T), _row_scalars_float64(base_rows, tuned_rows))


def test_series_equals_pairs_and_thread_count_does_not_matter() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(700, 130, generator=g).bfloat16()
    tuned = [(base.float() + s * torch.randn(700, 130, generator=g)).bfloat16() for s in (0.01, 0.1, 1.0)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = [row_scalars(base, t) for t in tuned]
        torch.set_num_threads(2)
        series = row_scalars_many(base, tuned)
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous
    assert series.dot.shape == (3, 700)
    # The thread count does not matter: each row is one kernel loop, whichever thread runs it. But the
    # series' tuned 1 and 2 go through the kernel's t > 0 loop and the single pairs through its t == 0
    # loop: two loop bodies, compiled with fastmath reassoc/contract, which a CPU may vectorise with
    # different accumulator counts. Every term is exact in float64 (a bf16 times a float32 has at most
    # 8 + 24 significant bits; fused or not, a multiply-add rounds only the sum), so the two results are
    # sums of the same n exact terms in two orders: each within (n - 1) u sum|terms| of the exact sum,
    # u = 2^-53, so within 2 (n - 1) u sum|terms| of each other. |a|^2 and |d|^2 have non-negative
    # terms (sum|terms| is the value itself); for a.d, sum|a_i d_i| <= |a| |d| (Cauchy-Schwarz).
    n = base.shape[1]
    bound = 2 * (n - 1) * 2.0**-53
    for i, p in enumerate(single):
        s = RowScalars(series.base_sq[i], series.dot[i], series.update_sq[i])
        _assert_same(s, p, rtol=bound)  # rtol covers |a|^2 and |d|^2; a.d checked against its own bound
        dot_bound = bound * (p.base_sq * p.update_sq).sqrt()
        assert ((s.dot - p.dot).abs() <= dot_bound).all(), (s.dot - p.dot).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_stacked_rows_are_each_tensors_own_rows(dtype: torch.dtype) -> None:
    """m tensors from separate storages (and views out of order in one storage), read in place as one
    batch: every row's sums are bit for bit those of its tensor compared alone (the same kernel on
    the same bytes), the hard rows (zero, NaN, Inf, huge, tiny) included."""
    pairs = [_hard_pair(dtype, seed=seed) for seed in range(4)]
    storage = torch.cat([pairs[0][0].reshape(-1), pairs[1][0].reshape(-1)])
    bases = [storage[48 * 300 :].view(48, 300), *(b for b, _ in pairs[2:]), storage[: 48 * 300].view(48, 300)]
    tuned = [pairs[1][1], pairs[2][1], pairs[3][1], pairs[0][1]]
    other = [t.float() for t in tuned]  # a second series, another stored format: its own kernel call
    got = fused_rows.row_sums_stacked(bases, [tuned, other])
    assert got is not None and got.shape == (2, 3, 4 * 48)
    want = torch.cat([fused_rows.row_sums(b, [t, o]) for b, t, o in zip(bases, tuned, other, strict=True)], 2)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_stacked_rows_refuse_what_cannot_be_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    base = [torch.randn(8, 16).bfloat16() for _ in range(3)]
    tuned = [t.clone() for t in base]
    assert fused_rows.row_sums_stacked(base, [tuned]) is not None
    for bad in (
        torch.randn(16, 8).bfloat16().T,  # strided rows
        torch.randn(8, 17).bfloat16()[:, :16],  # padded rows
        torch.randn(9, 16).bfloat16(),  # another shape
        torch.randn(8, 16).double(),  # a format the kernel does not read
        torch.randn(8, 16).half().bfloat16().to(torch.float16),  # another format than the series'
    ):
        assert fused_rows.row_sums_stacked(base, [[*tuned[:2], bad]]) is None
        assert fused_rows.row_sums_stacked([*base[:2], bad], [tuned]) is None
    with pytest.raises(ValueError, match="needs 3 tensors"):
        fused_rows.row_sums_stacked(base, [tuned[:2]])
    monkeypatch.setattr(fused_rows, "_widens_fp16", lambda: False)  # fp16 is then copied, one tensor only
    half = [t.half() for t in base]
    assert fused_rows.row_sums_stacked(half, [half]) is None
    assert fused_rows.row_sums_stacked(half[:1], [half[:1]]) is not None


def test_run_blocks_gives_every_block_to_exactly_one_thread() -> None:
    rows = torch.zeros(1000, 64)
    todo = row_blocks(rows, elements=640)  # 100 blocks of 10 rows
    seen: list[tuple[int, int]] = []
    threads: set[int] = set()
    lock = threading.Lock()

    def work(blocks) -> None:
        for block in blocks:
            assert torch.get_num_threads() == 1  # torch ops inside run single-threaded
            with lock:
                seen.append(block)
                threads.add(threading.get_ident())

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fused_rows.run_blocks(rows, work, todo)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert sorted(seen) == todo
    assert len(threads) <= 2


def test_errors_in_a_helper_thread_propagate() -> None:
    rows = torch.zeros(100, 8)

    def work(blocks) -> None:
        for start, _ in blocks:
            if start >= 50:
                raise RuntimeError(f"bad block {start}")

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(RuntimeError, match="bad block"):
            fused_rows.run_blocks(rows, work, row_blocks(rows, elements=80))
    finally:
        torch.set_num_threads(previous)
    assert torch.get_num_threads() == previous


def test_without_numba_the_float64_path_gives_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    base, tuned = _hard_pair(torch.bfloat16, seed=4)
    fused = row_scalars(base, tuned)
    monkeypatch.setattr(fused_rows, "supports", lambda *_: False)
    _assert_same(fused, row_scalars(base, tuned))


class _Reader:
    def __init__(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.tensors, self.source, self.partial = tensors, source, False

    def names(self):
        return list(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def get(self, name):
        return self.tensors[name]

    def low_rank(self, name):
        return None

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def test_compare_many_on_a_device_equals_the_default_path() -> None:
    """``device=`` moves every tensor before the math (CPU here: no accelerator in the test suite)."""
    g = torch.Generator().manual_seed(5)
    base = {f"layers.{i}.proj.weight": torch.randn(96, 64, generator=g).bfloat16() for i in range(3)}
    tuned = [{k: (v.float() * 1.01 + 0.01 * s).bfloat16() for k, v in base.items()} for s in (1, 2)]
    plain = compare_many(_Reader(base, "base"), [_Reader(t, f"t{i}") for i, t in enumerate(tuned)])
    moved = compare_many(
        _Reader(base, "base"), [_Reader(t, f"t{i}") for i, t in enumerate(tuned)], device="cpu"
    )
    for p, m in zip(plain, moved, strict=True):
        assert p.equals(m)
        assert (p["status"] == "ok").all() and (p["delta_direction"] > 0).all()
