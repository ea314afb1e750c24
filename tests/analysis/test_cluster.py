"""The series and the comparison on Ray (analysis/cluster.py): the in-process frames bit for bit, each base
tensor read once across the workers, a killed worker retried, bad input one line, Ctrl-C cancelling.

One local Ray (2 CPUs) serves the module; one test starts a real cluster with the `ray start --head` CLI
and joins it by address from another process. Ray starts slowly: keep the Ray-using tests few.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file
from series_builders import make_runs

from dora_analysis.analysis import cluster as cl
from dora_analysis.analysis.comparison import compare, compare_many
from dora_analysis.analysis.series import analyze_series
from dora_analysis.commands.main import main
from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint

ray = pytest.importorskip("ray", reason="the cluster extra (ray) is part of the dev install")

REPO = Path(__file__).resolve().parents[2]
METHODS = ("ft", "lora", "dora")


def _short_tmp(prefix: str) -> Path:
    """Ray's socket paths must stay under ~107 characters: pytest's tmp paths are too deep."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    base_dir, runs, _ = make_runs(tmp_path_factory.mktemp("cluster"))
    return base_dir, [runs[m] for m in METHODS]


@pytest.fixture(scope="module")
def in_process(tiny_runs):
    base_dir, runs = tiny_runs
    return analyze_series(base_dir, runs)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs for the module, started and stopped by what `--cluster` without an
    address runs (the tests that use it run in-process and find it initialised)."""
    assert not ray.is_initialized()
    with cl._connected(ray, cl.Cluster(num_cpus=2)):
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        yield
    assert not ray.is_initialized()  # stopped again


def one_tensor_per_task(**kwargs) -> cl.Cluster:
    return cl.Cluster(group_bytes=1, **kwargs)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_joins_a_cluster_started_with_the_ray_cli(tiny_runs, in_process):
    """`ray start --head` on 127.0.0.1 in its own processes, joined by address (first in the module: a
    process holds one Ray connection at a time, and the module's local Ray starts after this test).

    The head runs with --block and is stopped by signalling that process: `ray stop` would stop
    every Ray on the machine, this module's local one included.
    """
    assert not ray.is_initialized()
    temp = _short_tmp("drh")
    port, *others = _free_ports(8)
    log = temp / "head.log"
    ray_cli = Path(sys.executable).with_name("ray")
    command = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    head = subprocess.Popen(
        [
            *command,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            *(
                f"--{flag}={p}"
                for flag, p in zip(
                    (
                        "node-manager-port",
                        "object-manager-port",
                        "ray-client-server-port",
                        "dashboard-agent-listen-port",
                        "dashboard-agent-grpc-port",
                        "metrics-export-port",
                        "runtime-env-agent-port",
                    ),
                    others,
                    strict=True,
                )
            ),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (temp / "ray_current_cluster").exists():
            assert head.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.2)
        base_dir, runs = tiny_runs
        reports = []
        # one task (the tiny model is far below GROUP_BYTES): one worker to start, on a slow machine
        config = cl.Cluster(address=f"127.0.0.1:{port}", on_task=reports.append)
        df = analyze_series(base_dir, runs, cluster=config)
        assert not ray.is_initialized()  # left the cluster again
        pd.testing.assert_frame_equal(df, in_process, check_exact=True)
        reads: dict[str, int] = {}
        for report in reports:
            for name, count in report.base_reads.items():
                reads[name] = reads.get(name, 0) + count
        assert len(reports) == 1 and reads == dict.fromkeys(dict.fromkeys(in_process.tensor), 1)
        assert head.poll() is None  # the cluster outlives its driver
    finally:
        head.send_signal(signal.SIGTERM)  # only the head this test started (and its children)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_series_on_ray_is_the_in_process_frame_and_reads_each_base_tensor_once(
    tiny_runs, in_process, local_ray, monkeypatch
):
    base_dir, runs = tiny_runs
    from dora_analysis.readers.safetensors_file import SafetensorsReader

    driver_reads = []
    real_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, n: driver_reads.append(n) or real_get(self, n))
    reports, ticks = [], []
    df = analyze_series(
        base_dir, runs, cluster=one_tensor_per_task(on_task=reports.append), progress=ticks.append
    )
    pd.testing.assert_frame_equal(df, in_process, check_exact=True)
    analysed = list(dict.fromkeys(in_process.tensor))
    assert len(reports) == len(analysed) == sum(ticks)  # one task per tensor here
    reads: dict[str, int] = {}
    for report in reports:
        assert report.tensors == 1 and report.base_bytes > 0
        for name, count in report.base_reads.items():
            reads[name] = reads.get(name, 0) + count
    assert reads == dict.fromkeys(analysed, 1)  # FT pairs and adapter merges alike, across workers
    assert driver_reads == []  # the driver plans from headers only
    assert len({r.worker for r in reports}) == 2  # both workers took part


@pytest.mark.slow
def test_spectral_series_on_ray_is_the_in_process_frame(tiny_runs, local_ray):
    """The spectrum, intruder and φ-to-final columns too: φ needs each run's final checkpoint in the
    same task as every other one of its steps, which tasks split by tensor keep."""
    base_dir, runs = tiny_runs
    metrics = "decomposition,spectrum,intruders"
    expected = analyze_series(base_dir, runs, metrics=metrics)
    got = analyze_series(base_dir, runs, metrics=metrics, cluster=cl.Cluster(group_bytes=40_000))
    assert list(got.columns) == list(expected.columns) and "subspace_to_final" in got
    assert got["subspace_to_final"].notna().any() and got["intruder_dimensions"].notna().any()
    # ΔM/ΔD bit for bit; the SVDs' rounding depends on the workers' thread count
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-12)
    decomposition = ["delta_magnitude", "delta_direction", "rows"]
    pd.testing.assert_frame_equal(got[decomposition], expected[decomposition], check_exact=True)
    # compare A B --relative: φ between two checkpoints of one base, the reference in the same tasks
    a, b = runs[0] / "checkpoint-10", runs[0] / "checkpoint-20"
    expected = compare(base_dir, b, reference=a)
    got = compare(base_dir, b, reference=a, cluster=cl.Cluster(group_bytes=40_000))
    assert got["subspace_to_reference"].notna().all()
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-12)


def test_spectral_tasks_reserve_memory_for_their_largest_matrix(tiny_runs, monkeypatch):
    """Spectral tasks hold several float64 copies of a matrix (SVD factors, workspace): each reserves
    memory from Ray for its largest one, capped at the largest node's; ΔM/ΔD tasks reserve none."""
    from contextlib import nullcontext

    base_dir, runs = tiny_runs
    jobs: list = []
    monkeypatch.setattr(cl, "_connected", lambda ray, config: nullcontext())
    monkeypatch.setattr(cl, "_run", lambda ray, batch, *rest: jobs.extend(batch) or [])
    tuned = [runs[0] / "checkpoint-20"]
    cl.compare_on_cluster(base_dir, tuned, cluster=cl.Cluster(group_bytes=40_000))
    assert jobs and all(job.memory is None for job in jobs)
    jobs.clear()
    cl.compare_on_cluster(
        base_dir, tuned, cluster=cl.Cluster(group_bytes=40_000), metrics=("decomposition", "spectrum")
    )
    with open_checkpoint(base_dir) as reader:
        for job in jobs:
            largest = max(math.prod(reader.shape(n)) for n in job.names)
            assert job.memory == cl.spectral_memory(largest) == cl.SPECTRAL_COPIES * 8 * largest

    class Nodes:
        def __init__(self, nodes):
            self.nodes = lambda: nodes

    alive = [{"Alive": True, "Resources": {"memory": 4e9}}, {"Alive": True, "Resources": {"memory": 8e9}}]
    assert cl._largest_node_memory(Nodes(alive + [{"Alive": False, "Resources": {"memory": 1e12}}])) == 8e9
    assert cl._largest_node_memory(Nodes([])) is None


@pytest.mark.slow
def test_compare_on_ray_keeps_dtypes_and_attrs(tiny_runs, local_ray):
    base_dir, runs = tiny_runs
    ft, lora = runs[0] / "checkpoint-20", runs[1] / "checkpoint-10"
    # FT and an adapter in groups of several tensors; the pooler (no layer index) alone in its task
    for tuned, include in (([ft, lora], None), ([ft], "pooler")):
        expected = compare_many(base_dir, tuned, include=include)
        got = compare_many(base_dir, tuned, include=include, cluster=cl.Cluster(group_bytes=40_000))
        for a, b in zip(got, expected, strict=True):
            pd.testing.assert_frame_equal(a, b, check_exact=True)
            assert a.attrs == b.attrs
    assert expected[0]["layer"].isna().all()


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_retried_and_the_result_is_exact(
    tiny_runs, in_process, local_ray, monkeypatch, tmp_path
):
    marker = tmp_path / "killed-once"

    def dies_on_first_attempt(job):
        if job.index == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-task, as a lost node or the OOM killer would do
        return cl.analyse_group(job)

    monkeypatch.setattr(cl, "_run_group", dies_on_first_attempt)
    base_dir, runs = tiny_runs
    reports = []
    df = analyze_series(base_dir, runs, cluster=one_tensor_per_task(on_task=reports.append))
    assert marker.exists()
    retried = [r for r in reports if r.index == 2]
    assert len(retried) == 1 and retried[0].worker.split(":")[1] != marker.read_text()
    pd.testing.assert_frame_equal(df, in_process, check_exact=True)


@pytest.mark.slow
def test_bad_input_seen_by_a_worker_is_one_line_and_exit_2(
    tiny_runs, local_ray, monkeypatch, tmp_path, capsys
):
    """The workers read the files themselves: here one sees a tuned checkpoint that has changed on disk
    (as a worker on another file system would), a tensor of the wrong shape."""
    base_dir, runs = tiny_runs
    tuned = tmp_path / "checkpoint-20"
    shutil.copytree(runs[0] / "checkpoint-20", tuned)
    weights = tuned / "model.safetensors"
    bad = "bert.encoder.layer.1.attention.self.value.weight"

    def on_a_different_disk(job):
        state = load_file(weights)
        state[bad] = state[bad][:, :-1].contiguous()
        save_file(state, weights)
        return cl.analyse_group(job)

    monkeypatch.setattr(cl, "_run_group", on_a_different_disk)
    code = main(["compare", str(base_dir), str(tuned), "--cluster", "--format", "csv"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert str(tuned) in err[0] and bad in err[0] and "shape" in err[0]
    assert "Ray" not in err[0] and "Traceback" not in err[0]


def test_groups_are_contiguous_and_bounded_and_a_missing_file_is_named(tiny_runs, tmp_path):
    sizes = {"a": 4, "b": 4, "c": 9, "d": 1, "e": 2}
    assert cl.plan_groups(list(sizes), sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert cl.plan_groups(list(sizes), sizes, 1) == [[n] for n in sizes]
    base_dir, _ = tiny_runs
    gone = tmp_path / "not-on-this-worker"
    job = cl.GroupJob(0, str(base_dir), ((0, str(gone)),), ("encoder.layer.0.attention.self.query.weight",))
    with pytest.raises(InputError, match="every worker sees") as caught:
        cl.analyse_group(job)  # what a worker on another file system meets
    assert str(caught.value).startswith(f"{gone}: ")


@pytest.mark.slow
def test_ctrl_c_cancels_the_tasks_and_writes_nothing(tiny_runs, local_ray, monkeypatch, tmp_path):
    """Last of the local-Ray tests: cancelling kills the workers that run tasks."""
    started, finished = tmp_path / "started", tmp_path / "finished"
    started.mkdir(), finished.mkdir()

    def slow(job):
        (started / str(job.index)).touch()
        time.sleep(3)
        (finished / str(job.index)).touch()
        return cl.analyse_group(job)

    monkeypatch.setattr(cl, "_run_group", slow)
    monkeypatch.setattr(cl, "GROUP_BYTES", 1)  # one task per tensor: 13 tasks, 2 at a time
    main_thread = threading.get_ident()

    def press_ctrl_c():
        while not any(started.iterdir()):
            time.sleep(0.05)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    base_dir, runs = tiny_runs
    output = tmp_path / "series.csv"
    code = main(["series", str(base_dir), *map(str, runs), "--cluster", "--output", str(output)])
    assert code == 130 and not output.exists()
    time.sleep(4)  # long enough for a task that escaped cancellation to finish
    assert len(list(finished.iterdir())) == 0
    assert len(list(started.iterdir())) <= 4  # the rest were never started
