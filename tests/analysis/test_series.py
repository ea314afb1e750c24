"""analyze_series(): one row per (run, step, tensor) from run folders, checked against PEFT and float64 NumPy;
the base is read once per tensor; the method and metric come from the run's files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from series_builders import STEPS, make_runs

from dora_analysis.analysis.series import analyze_series
from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint
from dora_analysis.readers.runs import run_checkpoints, training_history
from dora_analysis.schema import SERIES_COLUMNS


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("series"))


def reference_deltas(base: torch.Tensor, tuned: torch.Tensor) -> tuple[float, float]:
    """ΔM and ΔD (paper Eq. 3/4) in float64 NumPy, one row per output unit of an (out, in) weight."""
    w0, w = base.double().numpy(), tuned.double().numpy()
    m0, m = np.linalg.norm(w0, axis=1), np.linalg.norm(w, axis=1)
    cos = (w0 * w).sum(axis=1) / (m0 * m)
    return float(np.abs(m - m0).mean()), float((1 - cos).mean())


def test_series_rows_match_peft_merged_weights_and_float64_reference(tiny_runs):
    base_dir, runs, merged = tiny_runs
    df = analyze_series(base_dir, [runs["ft"], runs["lora"], runs["dora"]])
    assert list(df.columns) == SERIES_COLUMNS
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    for method in ("ft", "lora", "dora"):
        for step in STEPS:
            rows = df[(df.method == method) & (df.step == step)]
            modules = {m.rsplit(".", 1)[-1] for m in rows.module}
            # FT changes every linear weight; the adapters only query and value
            assert modules == ({"query", "value"} if method != "ft" else modules | {"query", "key", "value"})
            assert set(rows[rows.tensor.str.startswith("encoder.")]["stack"]) == {"encoder"}
            for row in rows.itertuples():
                dm, dd = reference_deltas(base[row.tensor], merged[(method, step)][row.tensor])
                assert row.delta_magnitude == pytest.approx(dm, rel=1e-5, abs=1e-9)
                assert row.delta_direction == pytest.approx(dd, rel=1e-5, abs=1e-12)
                expected_layer = (
                    int(row.tensor.split(".")[2]) if row.tensor.startswith("encoder.layer.") else None
                )
                assert (None if pd.isna(row.layer) else row.layer) == expected_layer
                assert row.run == method
    lora = df[(df.method == "lora") & (df.tensor == "encoder.layer.1.attention.self.value.weight")]
    assert list(lora.step) == list(STEPS)
    # the held-out metric logged at each step
    assert lora.eval_metric.tolist() == pytest.approx([0.6 + s / 100 for s in STEPS])
    assert set(lora.eval_metric_name) == {"eval_accuracy"}


class CountingReader:
    """Wraps a reader and counts get() per tensor name."""

    def __init__(self, reader):
        self._reader = reader
        self.source, self.partial = reader.source, reader.partial
        self.reads: dict[str, int] = {}

    def names(self):
        return self._reader.names()

    def shape(self, name):
        return self._reader.shape(name)

    def dtype(self, name):
        return self._reader.dtype(name)

    def get(self, name):
        self.reads[name] = self.reads.get(name, 0) + 1
        return self._reader.get(name)

    def low_rank(self, name):
        return self._reader.low_rank(name)

    def close(self):
        self._reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_series_reads_each_base_tensor_once(tiny_runs):
    base_dir, runs, _ = tiny_runs
    with open_checkpoint(base_dir) as reader:
        counting = CountingReader(reader)
        df = analyze_series(counting, list(runs.values()))
    analysed = set(df.tensor)
    assert len(df) > 3 * len(analysed)  # nine checkpoints share the tensors
    assert set(counting.reads) == analysed
    assert set(counting.reads.values()) == {1}  # FT pairs and adapter merges alike


def test_progress_callback_counts_base_tensors(tiny_runs):
    base_dir, runs, _ = tiny_runs
    ticks = []
    df = analyze_series(base_dir, [runs["lora"]], progress=ticks.append)
    assert sum(ticks) == df.tensor.nunique() == 4  # query and value of two layers


def test_method_comes_from_adapter_config_without_run_json_or_is_given(tmp_path):
    base_dir, runs, _ = make_runs(tmp_path, methods=("dora", "ft"), steps=(10,), run_json=False)
    checkpoints = run_checkpoints([runs["dora"], runs["ft"]])
    assert [(c.method, c.step) for c in checkpoints] == [("dora", 10), ("ft", 10)]
    df = analyze_series(base_dir, [runs["dora"] / "checkpoint-10"], method="mine")
    assert set(df.method) == {"mine"} and set(df.step) == {10} and set(df.run) == {"dora"}
    with pytest.raises(InputError, match="base"):
        analyze_series(None, [runs["ft"]])  # no run.json names the base


def test_base_defaults_to_run_json_and_history_is_read(tiny_runs):
    base_dir, runs, _ = tiny_runs
    df = analyze_series(None, [runs["ft"]], include=r"attention\.self\.query")
    assert set(df.module) == {"attention.self.query"} and len(df) == 2 * len(STEPS)
    lone = analyze_series(None, [runs["lora"] / "checkpoint-20"])  # base and method from ../run.json
    assert set(lone.method) == {"lora"} and set(lone.step) == {20} and set(lone.run) == {"lora"}
    history = training_history(list(runs.values()))
    ft = history[history.run == "ft"].set_index("step")
    assert list(ft.index) == [0, 5, 10, 15, 20, 25, 30]
    assert ft.loc[10, "loss"] == pytest.approx(1.1) and ft.loc[10, "eval_accuracy"] == pytest.approx(0.6)


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such run"):
        analyze_series(tmp_path, [tmp_path / "nope"])


def test_series_per_row_matches_float64_rows_and_the_per_tensor_means(tiny_runs):
    """``per_row=True``: one row per output unit at every checkpoint; each row's |m - m0| and 1 - cos
    against float64 NumPy on the weights PEFT/transformers give, and their means are the per-tensor rows."""
    base_dir, runs, merged = tiny_runs
    from safetensors.torch import load_file

    from dora_analysis.schema import SERIES_PER_ROW_COLUMNS

    rows = analyze_series(base_dir, [runs["ft"], runs["dora"]], per_row=True)
    means = analyze_series(base_dir, [runs["ft"], runs["dora"]])
    assert list(rows.columns) == SERIES_PER_ROW_COLUMNS
    base = load_file(base_dir / "model.safetensors")
    for (method, step, tensor), part in rows.groupby(["method", "step", "tensor"], sort=False):
        w0, w = base[tensor].double().numpy(), merged[(method, step)][tensor].double().numpy()
        m0, m = np.linalg.norm(w0, axis=1), np.linalg.norm(w, axis=1)
        assert part["row"].tolist() == list(range(w0.shape[0]))
        # Both sides hold float32 weights (PEFT merges in float32, as do we): each norm and cosine may
        # differ by a few float32 roundings, u32 = 2^-24, relative to the row's magnitude.
        u32 = 2.0**-24
        assert (np.abs(part["delta_magnitude"] - np.abs(m - m0)) <= 16 * u32 * m0).all()
        cos = (w0 * w).sum(axis=1) / (m0 * m)
        assert (np.abs(part["delta_direction"] - (1 - cos)) <= 16 * u32).all()
        mean = means[(means.method == method) & (means.step == step) & (means.tensor == tensor)]
        assert part["delta_magnitude"].mean() == pytest.approx(
            float(mean["delta_magnitude"].iloc[0]), rel=1e-9
        )
    # the same (run, step, tensor) order as the per-tensor frame
    order = rows[["run", "step", "tensor"]].drop_duplicates().reset_index(drop=True)
    pd.testing.assert_frame_equal(order, means[["run", "step", "tensor"]].reset_index(drop=True))
    with pytest.raises(InputError, match="decomposition only"):
        analyze_series(base_dir, [runs["ft"]], per_row=True, metrics="decomposition,spectrum")
