"""Adapter statistics from the factors equal the dense merge and an independent float64 NumPy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dora_analysis.analysis.low_rank as low_rank
from dora_analysis.analysis.comparison import compare, compare_many
from dora_analysis.analysis.decomposition import row_changes, row_scalars, summarize
from dora_analysis.analysis.low_rank import factored_scalars, fits, low_rank_row_changes
from dora_analysis.factors import merge_low_rank
from dora_analysis.readers.base import LowRankUpdate


def _reference(w0: torch.Tensor, update: LowRankUpdate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row |m - m0|, 1 - cos and merged magnitude, merging densely in float64 NumPy."""
    a = w0.double().numpy()
    v = a + update.scale * (update.lora_B.double().numpy() @ update.lora_A.double().numpy())
    if update.magnitude is not None:
        v = update.magnitude.double().numpy()[:, None] * v / np.linalg.norm(v, axis=1)[:, None]
    m0, m = np.linalg.norm(a, axis=1), np.linalg.norm(v, axis=1)
    return np.abs(m - m0), 0.5 * np.sum((a / m0[:, None] - v / m[:, None]) ** 2, axis=1), m


def _updates(out: int, features: int, seed: int = 0, count: int = 4) -> list[LowRankUpdate]:
    """Alternating LoRA and DoRA updates of different ranks and sizes; one DoRA row has m < 0."""
    g = torch.Generator().manual_seed(seed)
    updates = []
    for t in range(count):
        r = 2 + t
        a = torch.randn(r, features, generator=g) * 0.1
        b = torch.randn(out, r, generator=g) * 0.02 * (t + 1)
        magnitude = None
        if t % 2:
            magnitude = 1 + 0.1 * torch.rand(out, generator=g)
            magnitude[1] = -magnitude[1]
        updates.append(LowRankUpdate("w", a, b, scale=2.0 / r, magnitude=magnitude))
    return updates


def _base(out: int, features: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.2 * torch.randn(out, features, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_factored_rows_match_float64_reference(dtype: torch.dtype) -> None:
    w0 = _base(48, 40, dtype)
    updates = _updates(48, 40)
    for update, changes in zip(updates, low_rank_row_changes(w0, updates), strict=True):
        ref_mag, ref_dir, ref_m = _reference(w0, update)
        np.testing.assert_allclose(changes.direction_change.numpy(), ref_dir, rtol=1e-6)
        np.testing.assert_allclose(changes.magnitude_change.numpy(), ref_mag, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(changes.tuned_magnitude.numpy(), ref_m, rtol=1e-7)
    dora = low_rank_row_changes(w0, updates)[1]
    assert 1 < float(dora.direction_change[1]) <= 2  # m < 0 turns the row around


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factored_equals_dense_merge_within_1e_5(dtype: torch.dtype) -> None:
    w0 = _base(64, 96, dtype, seed=2)
    updates = _updates(64, 96, seed=3)
    for update, changes in zip(updates, low_rank_row_changes(w0, updates), strict=True):
        dense = row_changes(row_scalars(w0, merge_low_rank(w0, update)))
        np.testing.assert_allclose(
            changes.direction_change.numpy(), dense.direction_change.numpy(), rtol=1e-5
        )
        np.testing.assert_allclose(changes.tuned_magnitude.numpy(), dense.tuned_magnitude.numpy(), rtol=1e-5)
        factored, merged = summarize(changes), summarize(dense)
        assert factored.delta_direction == pytest.approx(merged.delta_direction, rel=1e-5)
        assert factored.delta_magnitude == pytest.approx(merged.delta_magnitude, rel=1e-5)


def test_series_stacking_and_grouping_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    w0 = _base(300, 50, torch.bfloat16, seed=4)
    updates = _updates(300, 50, seed=5, count=6)
    together = factored_scalars(w0, updates)
    alone = [factored_scalars(w0, [u])[0] for u in updates]
    monkeypatch.setattr(low_rank, "MAX_STACKED_RANK", 5)  # several passes over W0
    monkeypatch.setattr(low_rank, "BLOCK_ELEMENTS", 500)  # many row blocks
    grouped = factored_scalars(w0, updates)
    for t, a, g in zip(together, alone, grouped, strict=True):
        for field in ("base_sq", "dot", "update_sq"):
            # W0 A^T is a float32 product: its rounding depends on the stacking, at float32 level.
            scale = 1e-6 * float(getattr(a, field).abs().max())
            np.testing.assert_allclose(getattr(t, field), getattr(a, field), rtol=1e-6, atol=scale)
            np.testing.assert_allclose(getattr(t, field), getattr(g, field), rtol=1e-6, atol=scale)


def test_magnitude_only_update_and_zero_rows() -> None:
    w0 = _base(6, 5, torch.float32, seed=6)
    magnitude = torch.tensor([1.0, 2.0, 3.0, 0.0, -1.0, 0.5])
    update = LowRankUpdate("w", torch.zeros(0, 5), torch.zeros(6, 0), 1.0, magnitude)  # NVlabs Wdecompose
    (changes,) = low_rank_row_changes(w0, [update])
    assert changes.valid.tolist() == [True, True, True, False, True, True]  # m = 0: a zero row
    norms = torch.linalg.norm(w0.double(), dim=1)
    keep = [0, 1, 2, 4, 5]
    np.testing.assert_allclose(changes.magnitude_change[keep], (magnitude[keep].abs() - norms[keep]).abs())
    np.testing.assert_allclose(changes.direction_change[[0, 1, 2, 5]], 0.0, atol=1e-15)
    assert float(changes.direction_change[4]) == pytest.approx(2.0)  # m < 0: the opposite direction
    delta = summarize(changes)
    assert delta.rows_excluded == 1 and delta.status == "ok"
    dense = summarize(row_changes(row_scalars(w0, merge_low_rank(w0, update))))  # float32 merge
    assert (dense.rows_excluded, dense.status) == (delta.rows_excluded, delta.status)
    assert delta.delta_magnitude == pytest.approx(dense.delta_magnitude, rel=1e-6)
    assert delta.delta_direction == pytest.approx(dense.delta_direction, abs=1e-12)
    # A zero base row makes the DoRA merge divide 0 by 0: reported, as the merged weight would be.
    w0[2] = 0.0
    (changes,) = low_rank_row_changes(w0, [update])
    dense = summarize(row_changes(row_scalars(w0, merge_low_rank(w0, update))))
    assert summarize(changes).status == dense.status == "nonfinite tuned"


def test_factors_that_do_not_fit_are_refused() -> None:
    w0 = torch.zeros(8, 6)
    good = LowRankUpdate("w", torch.zeros(2, 6), torch.zeros(8, 2), 1.0)
    assert fits(w0, good)
    for bad in (
        LowRankUpdate("w", torch.zeros(2, 5), torch.zeros(8, 2), 1.0),
        LowRankUpdate("w", torch.zeros(2, 6), torch.zeros(8, 3), 1.0),
        LowRankUpdate("w", torch.zeros(2, 6), torch.zeros(8, 2), 1.0, magnitude=torch.ones(7)),
        LowRankUpdate("w", torch.zeros(2, 6, 1, 1), torch.zeros(8, 2, 1, 1), 1.0),  # conv factors
    ):
        assert not fits(w0, bad)
    with pytest.raises(ValueError, match="do not fit base rows"):
        factored_scalars(w0, [good, LowRankUpdate("w", torch.zeros(2, 5), torch.zeros(8, 2), 1.0)])


def _peft_series(tmp_path: Path, kind: str, count: int) -> tuple[Path, list[Path], list[dict]]:
    """A tiny BERT saved once and ``count`` perturbed PEFT adapters on it (rsLoRA and a rank_pattern
    on the second), with PEFT's own ``merge_and_unload()`` state dicts as references."""
    import copy

    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_bert_config
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertModel(tiny_bert_config()).eval()
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    folders, merged = [], []
    for t in range(count):
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            use_dora=kind == "dora",
            use_rslora=t == 1,
            rank_pattern={"value": 2} if t == 1 else {},
            target_modules=["query", "value", "dense"],
        )
        model = get_peft_model(copy.deepcopy(base), config)
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                elif "lora_" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
        folder = tmp_path / f"adapter{t}"
        model.save_pretrained(folder)
        merged.append({k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()})
        folders.append(folder)
    return base_dir, folders, merged


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_compare_on_peft_adapters_uses_factors_and_equals_the_dense_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Real PEFT adapter folders: compare() through the factored path equals merging densely, and
    both equal a float64 NumPy reference computed from PEFT's own merge_and_unload()."""
    base_dir, adapters, merged_states = _peft_series(tmp_path, kind, 2)
    calls = []
    real = low_rank.low_rank_row_changes

    def counting(rows, updates):
        calls.append(len(updates))
        return real(rows, updates)

    monkeypatch.setattr("dora_analysis.analysis.tensor_major.low_rank_row_changes", counting)
    factored = compare_many(base_dir, adapters)
    assert calls and all(n == len(adapters) for n in calls)  # W0 read once for both adapters
    monkeypatch.setattr("dora_analysis.analysis.tensor_major._factored_fits", lambda *_: False)
    dense = compare_many(base_dir, adapters)
    from safetensors.torch import load_file

    base_state = load_file(base_dir / "model.safetensors")
    for f, d, merged in zip(factored, dense, merged_states, strict=True):
        assert list(f["tensor"]) == list(d["tensor"]) and len(f) == len(calls)
        np.testing.assert_allclose(f["delta_direction"], d["delta_direction"], rtol=1e-5)
        np.testing.assert_allclose(f["delta_magnitude"], d["delta_magnitude"], rtol=1e-5)
        np.testing.assert_allclose(f["tuned_magnitude_mean"], d["tuned_magnitude_mean"], rtol=1e-5)
        for _, row in f.iterrows():
            w0 = base_state[row["tensor"]].double().numpy()
            w = merged[row["tensor"]].double().numpy()
            n0, n = np.linalg.norm(w0, axis=1), np.linalg.norm(w, axis=1)
            ref_dir = np.mean(0.5 * np.sum((w0 / n0[:, None] - w / n[:, None]) ** 2, axis=1))
            assert row["delta_direction"] == pytest.approx(ref_dir, rel=1e-4)
            assert row["delta_magnitude"] == pytest.approx(np.mean(np.abs(n - n0)), rel=1e-4)
    monkeypatch.undo()
    # compare() of one adapter multiplies W0 (out, H) by its own A^T (H, r); compare_many() by both
    # adapters' A stacked (H, 2r). A BLAS may block and vectorise the two shapes differently, so each
    # float32 dot product of length H (= 32) may be summed in another order: apart by at most
    # 2 H 2^-24 (about 4e-6) of sum|w_i a_i|. To first order ΔM, ΔD and the magnitudes move by that
    # relative amount where the products do not cancel; 1e-5 relative, the tolerance this test already
    # allows between the factored and the dense path. Names, status and dtypes must be equal.
    pd.testing.assert_frame_equal(
        compare(base_dir, adapters[1]), factored[1], check_exact=False, rtol=1e-5, atol=0
    )
