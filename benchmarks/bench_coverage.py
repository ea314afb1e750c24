"""Coverage of the 95% intervals of ``correlations(df, pool_runs=True)``, on series with a known answer.

Each simulated data set is one method's panel: ``S`` seeds x ``L`` layers x ``T`` steps, one point
``(x, y) = (ΔD, ΔM)`` per seed, layer and step, built as the real series are laid out:

    x[s, l, t] = a_x[l] + g_x[t] + u_x[s, l] + e_x[s, l, t]        (y likewise)

- ``a[l]``: the layer's own effect, **shared by every seed** (the seeds fine-tune the same
  pre-trained layers); bivariate normal, correlation ``rho_layer``;
- ``g[t]``: a fixed growth over training, linear in ``t / T``;
- ``u[s, l]``: seed-by-layer effects; ``e[s, l, t]``: noise that is AR(1) over steps (``phi``), so
  successive checkpoints of one matrix are dependent.

The population values are those the statistics tend to as the number of layers grows (seeds and
steps fixed): pooled r and slope from the summed covariance components (the growth's is its variance
over the T steps), r within step without the growth, r within layer from the growth and the AR noise
left after centring each (seed, layer); Spearman's from one data set of 200,000 layers.

Each data set goes through :func:`~dora_analysis.correlations` with ``pool_runs=True`` twice: the
layer jackknife (the default) and the old percentile bootstrap over layers within each run
(``bootstrap="layers-within-run"``); the printed coverage is the share of data sets whose interval
holds the population value (a NaN interval counts as a miss; ``no_interval`` counts them; a method
that never gives one, the old bootstrap's Spearman, shows NaN).

    python benchmarks/bench_coverage.py                       # 500 sets x 4 designs: 17 min on 2 busy cores
    python benchmarks/bench_coverage.py --sets 100 --designs 6x3x4
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dora_analysis.analysis.correlation import correlations  # noqa: E402
from dora_analysis.analysis.inference import MIN_LAYERS  # noqa: E402

STATISTICS = ("r", "slope", "spearman", "r_within_step", "r_within_layer")
METHODS = ("layer-jackknife", "layers-within-run")


@dataclass(frozen=True)
class Scenario:
    """The simulation's variance components (standard deviations) and correlations; see the docstring."""

    layers: int = 6
    seeds: int = 3
    steps: int = 4
    sd_layer: tuple[float, float] = (1.0, 1.0)
    rho_layer: float = -0.5
    growth: tuple[float, float] = (1.5, 1.5)
    sd_seed_layer: tuple[float, float] = (0.5, 0.5)
    rho_seed_layer: float = 0.0
    sd_noise: tuple[float, float] = (0.5, 0.5)
    rho_noise: float = 0.3
    phi: float = 0.7
    layer_tails: float = math.inf  # degrees of freedom of the layer effects' t law (inf: normal)


#: ``--scenario``: ``issue`` (population r about -0.15, as the issue's audit), ``strong`` (r about
#: +0.9, FT- and LoRA-like, where Fisher's z matters), ``heavy`` (the issue's, with t(3) layer effects
#: scaled to the same variance: now and then one layer dominates, as layer 5 does in the study).
SCENARIOS = {
    "issue": Scenario(),
    "strong": Scenario(
        rho_layer=0.9, growth=(3.0, 3.0), sd_seed_layer=(0.3, 0.3), sd_noise=(0.3, 0.3), rho_noise=0.5
    ),
    "heavy": Scenario(layer_tails=3.0),
}


def growth(scenario: Scenario) -> np.ndarray:
    """``(T, 2)`` the fixed growth of x and y at steps 1..T."""
    t = np.arange(1, scenario.steps + 1) / scenario.steps
    return t[:, None] * np.asarray(scenario.growth)[None, :]


def simulate(scenario: Scenario, rng: np.random.Generator) -> pd.DataFrame:
    """One data set: a series frame with ``run``, ``method``, ``module``, ``layer``, ``step`` and (ΔD, ΔM)."""
    s, n_layers, n_steps = scenario.seeds, scenario.layers, scenario.steps

    def pair(shape: tuple[int, ...], sd: tuple[float, float], rho: float) -> np.ndarray:
        z = rng.standard_normal((*shape, 2))
        z[..., 1] = rho * z[..., 0] + math.sqrt(1 - rho * rho) * z[..., 1]
        return z * np.asarray(sd)

    a = pair((1, n_layers, 1), scenario.sd_layer, scenario.rho_layer)
    if math.isfinite(scenario.layer_tails):  # a t law: normal / sqrt(chi2 / df), variance kept
        nu = scenario.layer_tails
        a *= math.sqrt((nu - 2) / nu) / np.sqrt(rng.chisquare(nu, size=(1, n_layers, 1, 1)) / nu)
    u = pair((s, n_layers, 1), scenario.sd_seed_layer, scenario.rho_seed_layer)
    innovations = pair((s, n_layers, n_steps), scenario.sd_noise, scenario.rho_noise)
    e = np.empty_like(innovations)
    e[:, :, 0] = innovations[:, :, 0]
    for t in range(1, n_steps):
        e[:, :, t] = scenario.phi * e[:, :, t - 1] + math.sqrt(1 - scenario.phi**2) * innovations[:, :, t]
    values = a + growth(scenario)[None, None, :, :] + u + e  # (S, L, T, 2)
    seed, layer, step = np.meshgrid(np.arange(s), np.arange(n_layers), np.arange(n_steps), indexing="ij")
    return pd.DataFrame(
        {
            "run": [f"seed{k}" for k in seed.ravel()],
            "method": "dora",
            "module": "query",
            "layer": layer.ravel(),
            "step": step.ravel() + 1,
            "delta_direction": values[..., 0].ravel(),
            "delta_magnitude": values[..., 1].ravel(),
        }
    )


def population(scenario: Scenario) -> dict[str, float]:
    """The value each statistic tends to as the layers grow in number (seeds and steps fixed)."""
    g = growth(scenario)
    g = g - g.mean(axis=0)
    gxx, gyy, gxy = (g[:, 0] ** 2).mean(), (g[:, 1] ** 2).mean(), (g[:, 0] * g[:, 1]).mean()

    def components(sd: tuple[float, float], rho: float) -> tuple[float, float, float]:
        return sd[0] ** 2, sd[1] ** 2, rho * sd[0] * sd[1]

    a = components(scenario.sd_layer, scenario.rho_layer)
    u = components(scenario.sd_seed_layer, scenario.rho_seed_layer)
    e = components(scenario.sd_noise, scenario.rho_noise)
    t = np.arange(scenario.steps)
    # E of the within-(seed, layer) variance of AR(1) noise over T steps, as a share of its variance
    kept = 1 - (scenario.phi ** np.abs(t[:, None] - t[None, :])).mean()
    vx, vy, cxy = (a[i] + u[i] + e[i] for i in range(3))
    return {
        "r": (cxy + gxy) / math.sqrt((vx + gxx) * (vy + gyy)),
        "slope": (cxy + gxy) / (vx + gxx),
        "r_within_step": cxy / math.sqrt(vx * vy),
        "r_within_layer": (gxy + kept * e[2]) / math.sqrt((gxx + kept * e[0]) * (gyy + kept * e[1])),
        "spearman": population_spearman(scenario),
    }


def population_spearman(scenario: Scenario, layers: int = 200_000) -> float:
    """Spearman's rho of one data set of ``layers`` layers (its Monte-Carlo error is about 0.002)."""
    from scipy import stats

    big = simulate(replace(scenario, layers=layers, seeds=1), np.random.default_rng(12345))
    return float(stats.spearmanr(big["delta_direction"], big["delta_magnitude"]).statistic)


def covered(table: pd.DataFrame, truth: dict[str, float]) -> dict[str, float]:
    """Per statistic: 1 if the row's interval holds the population value, 0 if not, NaN if no interval."""
    row = table.iloc[0]
    hits = {}
    for name in STATISTICS:
        low, high = row[f"{name}_low"], row[f"{name}_high"]
        hits[name] = math.nan if math.isnan(low) else float(low <= truth[name] <= high)
    return hits


def coverage(
    scenario: Scenario, sets: int, seed: int, resamples: int, min_layers: int = MIN_LAYERS
) -> pd.DataFrame:
    """One row per (method, statistic): coverage, the share without an interval, the median width."""
    truth = population(scenario)
    rng = np.random.default_rng(seed)
    records = []
    for k in range(sets):
        df = simulate(scenario, rng)
        for method in METHODS:
            table = correlations(
                df, pool_runs=True, bootstrap=method, resamples=resamples, seed=k, min_layers=min_layers
            )
            hits = covered(table, truth)
            for name in STATISTICS:
                width = table.iloc[0][f"{name}_high"] - table.iloc[0][f"{name}_low"]
                records.append({"method": method, "statistic": name, "hit": hits[name], "width": width})
    frame = pd.DataFrame(records)
    summary = frame.groupby(["method", "statistic"], sort=False).agg(
        coverage=("hit", lambda h: h.fillna(0).mean()),
        no_interval=("hit", lambda h: h.isna().mean()),
        median_width=("width", "median"),
    )
    design = f"{scenario.layers}x{scenario.seeds}x{scenario.steps}"
    return summary.reset_index().assign(design=design, truth=lambda f: f["statistic"].map(truth))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", type=int, default=500, help="simulated data sets per design (default 500)")
    parser.add_argument(
        "--designs",
        default="6x3x4,6x3x8,12x3x4,24x3x4",
        help="layers x seeds x steps, comma-separated (default: the study's sizes and larger)",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="the old bootstrap's resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="issue", help="see SCENARIOS")
    parser.add_argument(
        "--min-layers",
        type=int,
        default=MIN_LAYERS,
        help=f"the jackknife's minimum (default {MIN_LAYERS}; lower it to see why it is not lower)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parts = []
    for design in args.designs.split(","):
        layers, seeds, steps = (int(v) for v in design.split("x"))
        scenario = replace(SCENARIOS[args.scenario], layers=layers, seeds=seeds, steps=steps)
        parts.append(coverage(scenario, args.sets, args.seed, args.resamples, args.min_layers))
    table = pd.concat(parts, ignore_index=True)
    print(f"scenario {args.scenario}: {SCENARIOS[args.scenario]}")
    print(f"{args.sets} data sets per design; population values: see the 'truth' column")
    shown = table.assign(coverage=table["coverage"].where(table["no_interval"] < 1))  # none: NaN, not 0
    wide = shown.pivot_table(
        index=["statistic", "method"], columns="design", values="coverage", sort=False, dropna=False
    )
    print("coverage of the 95% interval (method x design):")
    print(wide.round(3).to_string())
    print("\nshare of data sets without an interval, median width:")
    print(table.round(3).to_string(index=False))
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
