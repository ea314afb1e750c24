"""The series on Ray (``--cluster``) against the in-process series, on one machine, in one run.

Builds (with ``bench_compare``'s generators, in a temporary folder removed afterwards) a LLaMA-shaped
bf16 base of about ``--size-gb`` GB and ``--series`` fine-tuned copies, warms the page cache, then:

- ``in-process``: ``analyze_series(base, tuned)``;
- ``cluster``: the same with ``cluster=`` a local Ray of ``--workers`` CPUs, started once (its start-up
  and the workers' first imports are timed apart: a cluster that is already running pays neither);

checks the two frames are equal bit for bit, and prints the overhead ratio cluster / in-process
(target <= 1.25), then a table of the tasks (tensors, bytes read, seconds, the worker's anonymous
memory before and at its peak) beside the in-process run's peak, and what the per-task figures say
about N machines.

    python benchmarks/bench_cluster.py --workdir /tmp/somewhere      # ~1 GB, 8 checkpoints
    python benchmarks/bench_cluster.py --size-gb 0.1 --series 2      # a quick check
    python benchmarks/bench_cluster.py --size-gb 0.1 --series 2 --metrics decomposition,spectrum,intruders
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import generate, read_floor  # noqa: E402  (the 1 GB bf16 builders, reused)

METRICS = "decomposition"  # --metrics: what every series of this run computes


def series(base: Path, tuned: Sequence[Path], cluster=None) -> pd.DataFrame:
    from dora_analysis.analysis.series import analyze_series

    return analyze_series(base, list(tuned), method="ft", cluster=cluster, metrics=METRICS)


def assert_same(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """ΔM/ΔD bit for bit; spectral columns up to the SVDs' rounding (it depends on the thread count)."""
    if METRICS == "decomposition":
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        return
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-12)
    columns = ["delta_magnitude", "delta_direction"]
    pd.testing.assert_frame_equal(got[columns], expected[columns], check_exact=True)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def child_memory(base: Path, tuned: list[Path]) -> dict:
    """The in-process series once in this (fresh) process, sampling RssAnon every millisecond."""
    import dora_analysis.analysis.series  # noqa: F401  (imports count in after_imports_mb)

    before = _rss_anon_mb()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    series(base, tuned)
    done.set()
    sampler.join()
    return {"after_imports_mb": before, "peak_mb": max(peak[0], _rss_anon_mb())}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (default 1.0)")
    parser.add_argument("--series", type=int, default=8, help="fine-tuned checkpoints (default 8)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each (median)")
    parser.add_argument(
        "--group-mb", type=float, default=None, help="base MB per task (default: GROUP_BYTES)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes")
    parser.add_argument(
        "--metrics", default="decomposition", help="metric groups, e.g. decomposition,spectrum,intruders"
    )
    parser.add_argument("--child-memory", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global METRICS
    METRICS = args.metrics
    if args.child_memory:
        print(json.dumps(child_memory(args.child_memory[0], args.child_memory[1:])))
        return 0

    import ray

    from dora_analysis.analysis import cluster as cl

    print(f"{os.cpu_count()} CPUs; load average at start {loadavg()}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_cluster_", dir=args.workdir))
    try:
        start = time.perf_counter()
        base, tuned, specs = generate(folder, args.size_gb, args.series)
        gb = base.stat().st_size / 1e9
        print(
            f"generated base + {len(tuned)} tuned, {gb:.2f} GB each, {len(specs)} tensors "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        read_floor([base, *tuned])  # warm the page cache
        memory = json.loads(
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--metrics",
                    METRICS,
                    "--child-memory",
                    str(base),
                    *map(str, tuned),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.splitlines()[-1]
        )
        group_bytes = int(args.group_mb * 2**20) if args.group_mb else cl.GROUP_BYTES
        t_init, _ = timed(lambda: ray.init(address="local", num_cpus=args.workers, include_dashboard=False))
        try:
            first: list = []
            config = cl.Cluster(group_bytes=group_bytes, on_task=first.append)
            t_first, _ = timed(lambda: series(base, tuned, config))  # workers import torch, load kernels
            series(base, tuned)  # the driver's kernels too, before anything is timed
            times: dict[str, list[float]] = {"in-process": [], "cluster": []}
            load_before = loadavg()
            for _ in range(args.repeats):
                t, expected = timed(lambda: series(base, tuned))
                times["in-process"].append(t)
                t, got = timed(lambda: series(base, tuned, cl.Cluster(group_bytes=group_bytes)))
                times["cluster"].append(t)
                assert_same(got, expected)
            load_after = loadavg()
            reports: list = []
            metered = cl.Cluster(group_bytes=group_bytes, measure_memory=True, on_task=reports.append)
            t_metered, _ = timed(lambda: series(base, tuned, metered))
        finally:
            t_stop, _ = timed(ray.shutdown)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["cluster"] / med["in-process"]
        print(f"load average {load_before} -> {load_after} during the timed runs (others' work slows both)")
        for k, v in times.items():
            print(f"  {k:10s} median {med[k]:7.2f} s  ({', '.join(f'{x:.2f}' for x in v)})")
        same = "bit for bit" if METRICS == "decomposition" else "(ΔM/ΔD bit for bit, spectral within 1e-9)"
        print(
            f"metrics {METRICS}: cluster / in-process = {ratio:.2f}   (target <= 1.25); frames equal {same}"
        )
        print(
            f"Ray start {t_init:.1f} s, first run on fresh workers {t_first:.1f} s, stop {t_stop:.1f} s "
            "(paid once per command with --cluster alone; not with --cluster auto on a running cluster)"
        )
        _table(sorted(reports, key=lambda r: r.index), memory, t_metered)
        _scaling(reports, med, len(tuned), gb, args.workers)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _table(reports: list, memory: dict, wall: float) -> None:
    print(f"\n{len(reports)} tasks (run with memory sampling, {wall:.2f} s):")
    print(
        f"  {'task':>4} {'tensors':>7} {'ckpts':>5} {'base MB':>8} {'tuned MB':>9} {'s':>6} {'RssAnon MB':>16}  worker"
    )
    for r in reports:
        print(
            f"  {r.index:>4} {r.tensors:>7} {r.checkpoints:>5} {r.base_bytes / 2**20:>8.0f} "
            f"{r.tuned_bytes / 2**20:>9.0f} {r.seconds:>6.2f} "
            f"{r.rss_anon_before_mb:>7.0f} -> {r.peak_rss_anon_mb:>5.0f}  {r.worker}"
        )
    peak = max(r.peak_rss_anon_mb for r in reports)
    growth = max(r.peak_rss_anon_mb - r.rss_anon_before_mb for r in reports)
    print(
        f"worker peak RssAnon {peak:.0f} MB (at most +{growth:.0f} MB during a task); in-process series peak "
        f"{memory['peak_mb']:.0f} MB (after imports {memory['after_imports_mb']:.0f} MB, so "
        f"+{memory['peak_mb'] - memory['after_imports_mb']:.0f} MB for the analysis)"
    )


def _scaling(reports: list, med: dict, tuned: int, gb: float, workers: int) -> None:
    work = sum(r.seconds for r in reports)
    longest = max(r.seconds for r in reports)
    read = sum(r.base_bytes + r.tuned_bytes for r in reports) / 1e9
    base_read = sum(r.base_bytes for r in reports) / 1e9
    overhead = med["cluster"] - work / workers
    print(
        f"\nscaling: {len(reports)} tasks, {work:.1f} task-seconds in all (longest {longest:.2f} s), "
        f"{read:.1f} GB read ({base_read:.2f} GB of base: each base byte once; {tuned} x {gb:.2f} GB tuned).\n"
        f"  With N machines of c workers and the files on a shared file system of aggregate bandwidth B:\n"
        f"  time ~= driver planning and scheduling ({overhead:.1f} s here, beyond task-seconds / workers)\n"
        f"         + max(task-seconds / (N c), longest task, {read:.1f} GB / B).\n"
        f"  Here task-seconds / (N c) is {work / workers:.1f} s at N c = {workers}, {work / 16:.1f} s at 16, "
        f"{work / 64:.2f} s at 64; it stops shrinking at one task per worker ({len(reports)} workers here: "
        f"more tasks need smaller groups, or a larger model), and at the file system's bandwidth: "
        f"every worker reads its share of {read:.1f} GB through it."
    )


if __name__ == "__main__":
    sys.exit(main())
