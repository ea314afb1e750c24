"""--metrics spectrum,intruders through compare/series on real checkpoint files: PEFT adapter folders
(factored) and full FT checkpoints (dense), against NumPy float64 on the weights PEFT/transformers give."""

from __future__ import annotations

import numpy as np
import pytest
from series_builders import make_runs

from dora_analysis.analysis.comparison import compare
from dora_analysis.analysis.series import analyze_series
from dora_analysis.commands.main import main
from dora_analysis.errors import InputError
from dora_analysis.schema import COLUMNS, INTRUDER_COLUMNS, SERIES_COLUMNS, SPECTRUM_COLUMNS

STEPS = (10, 20)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("spectrum"), steps=STEPS)


@pytest.fixture(scope="module")
def series(tiny_runs):
    base_dir, runs, _ = tiny_runs
    return analyze_series(
        base_dir,
        [runs[m] for m in ("ft", "lora", "dora")],
        metrics="spectrum,intruders",
        include="query|value",
    )


def _numpy(w0: np.ndarray, wt: np.ndarray) -> dict[str, float]:
    delta = wt - w0
    s = np.linalg.svd(delta, compute_uv=False)
    u0 = np.linalg.svd(w0)[0]
    ut = np.linalg.svd(wt)[0][:, :10]
    return {
        "update_rel_norm": np.linalg.norm(delta) / np.linalg.norm(w0),
        "update_top_singular": s[0],
        "update_stable_rank": np.sum(s**2) / s[0] ** 2,
        "intruder_dimensions": int(np.sum(np.abs(ut.T @ u0).max(axis=1) < 0.5)),
    }


@pytest.mark.slow
def test_series_columns_match_numpy_on_the_merged_weights(tiny_runs, series):
    base_dir, _, merged = tiny_runs
    from safetensors.torch import load_file

    base = load_file(base_dir / "model.safetensors")
    assert list(series.columns) == SERIES_COLUMNS + SPECTRUM_COLUMNS + INTRUDER_COLUMNS + [
        "subspace_to_final"
    ]
    for (method, step, tensor), row in series.set_index(["method", "step", "tensor"]).iterrows():
        w0 = base[tensor].double().numpy()
        reference = _numpy(w0, merged[(method, step)][tensor].double().numpy())
        # FT is exact; PEFT merges adapters in float32, whose rounding the factors do not have
        rtol = 1e-9 if method == "ft" else 1e-4
        for column in ("update_rel_norm", "update_top_singular", "update_stable_rank"):
            assert row[column] == pytest.approx(reference[column], rel=rtol), (method, step, tensor, column)
        assert row["intruder_dimensions"] == reference["intruder_dimensions"], (method, step, tensor)
    lora = series[series["method"] == "lora"]
    assert (lora["update_rank90"] <= 4).all() and (lora["update_effective_rank"] <= 4).all()
    assert (series.loc[series["method"] == "ft", "update_rank90"] > 4).all()
    final = series[series["step"] == max(STEPS)]
    np.testing.assert_allclose(final["subspace_to_final"], 1.0, rtol=1e-9)
    earlier = series[series["step"] == min(STEPS)]["subspace_to_final"]
    assert ((earlier > 0) & (earlier < 1)).all()


def test_factored_lora_equals_the_dense_merge(tiny_runs, tmp_path):
    """The adapter folder (factors) and the same adapter merged into a float64 checkpoint (dense SVD)."""
    from safetensors.torch import load_file, save_file

    from dora_analysis.readers import open_checkpoint

    base_dir, runs, _ = tiny_runs
    adapter = runs["lora"] / "checkpoint-20"
    base = {k: v.double() for k, v in load_file(base_dir / "model.safetensors").items()}
    with open_checkpoint(base_dir) as base_reader, open_checkpoint(adapter, base=base_reader) as reader:
        dense = dict(base)
        for name in reader.names():
            update = reader.low_rank(name)
            if update is not None:
                dense[name] = base[name] + update.scale * update.lora_B.double() @ update.lora_A.double()
    save_file({k: v.contiguous() for k, v in dense.items()}, tmp_path / "merged64.safetensors")
    save_file({k: v.contiguous() for k, v in base.items()}, tmp_path / "base64.safetensors")
    options = dict(metrics=["spectrum", "intruders"], include="query|value")
    factored = compare(tmp_path / "base64.safetensors", adapter, **options)
    dense_frame = compare(tmp_path / "base64.safetensors", tmp_path / "merged64.safetensors", **options)
    assert list(factored.columns) == COLUMNS + SPECTRUM_COLUMNS + INTRUDER_COLUMNS
    for column in SPECTRUM_COLUMNS + INTRUDER_COLUMNS:
        np.testing.assert_allclose(factored[column], dense_frame[column], rtol=1e-6, err_msg=column)


def test_relative_compares_two_checkpoints_updates(tiny_runs, capsys):
    base_dir, runs, _ = tiny_runs
    a, b = runs["lora"] / "checkpoint-10", runs["lora"] / "checkpoint-20"
    frame = compare(base_dir, b, metrics="spectrum", include="query|value", reference=a)
    plain = compare(base_dir, b, metrics="spectrum", include="query|value")
    assert list(frame.columns) == list(plain.columns) + ["subspace_to_reference"]
    np.testing.assert_allclose(frame["update_top_singular"], plain["update_top_singular"])
    assert frame["subspace_to_reference"].between(0, 1).all()
    # the CLI: the base from the runs' run.json, one row per tensor of B, φ symmetric in A and B
    assert main(["compare", str(a), str(b), "--relative", "--format", "csv", "--include", "query|value"]) == 0
    import io

    import pandas as pd

    cli = pd.read_csv(io.StringIO(capsys.readouterr().out))
    np.testing.assert_allclose(cli["subspace_to_reference"], frame["subspace_to_reference"], rtol=1e-9)
    args = [
        "compare",
        str(a),
        str(b),
        "--relative",
        "--base",
        str(base_dir),
        "--format",
        "csv",
        "--include",
        "value",
    ]
    assert main(args) == 0
    given = pd.read_csv(io.StringIO(capsys.readouterr().out))
    np.testing.assert_allclose(
        given["subspace_to_reference"], frame["subspace_to_reference"][1::2], rtol=1e-9
    )
    swapped = compare(base_dir, a, include="query|value", reference=b)
    np.testing.assert_allclose(swapped["subspace_to_reference"], frame["subspace_to_reference"], rtol=1e-9)


def test_bad_metric_options_are_one_line_errors(tiny_runs, capsys):
    base_dir, runs, _ = tiny_runs
    with pytest.raises(InputError, match="unknown metric group 'spectra'"):
        compare(base_dir, runs["ft"] / "checkpoint-10", metrics="spectra")
    assert (
        main(["series", str(base_dir), str(runs["ft"]), "--metrics", "intruders", "--intruder-eps", "2"]) == 2
    )
    assert "intruder_eps must be in (0, 1]" in capsys.readouterr().err
    # a randomised rank below k would leave the k-th vector without computed values below it
    args = ["series", str(base_dir), str(runs["ft"]), "--metrics", "spectrum,intruders", "--svd-rank", "4"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--svd-rank: 4 is below --intruder-k 10" in err and "\n" not in err and len(err) <= 300
    assert main([*args, "--intruder-k", "4", "--format", "csv", "--include", "query"]) == 0


def test_the_base_svd_is_computed_once_per_tensor_for_a_whole_series(tiny_runs, monkeypatch):
    import dora_analysis.analysis.spectrum as spectrum

    base_dir, runs, _ = tiny_runs
    computed = []
    original = spectrum.BaseSpectrum.left.fget

    def counting(self):
        if self._left is None:
            computed.append(self.rows.shape)
        return original(self)

    monkeypatch.setattr(spectrum.BaseSpectrum, "left", property(counting))
    df = analyze_series(
        base_dir, [runs[m] for m in ("ft", "lora", "dora")], metrics="intruders", include="query"
    )
    assert len(df) == 2 * 3 * len(STEPS) and len(computed) == df["tensor"].nunique() == 2
