"""The comparison and the series on Ray core tasks: one task per group of base tensors.

The in-process comparison is tensor-major (:func:`~dora_analysis.analysis.tensor_major.compare_in_process`):
each base tensor is read once and compared with every tuned checkpoint before the next. Here the
driver plans exactly what that run would analyse (:func:`~dora_analysis.analysis.planning.plan_comparison`:
names, shapes and dtypes only, no tensor is read),
splits its tensor order into contiguous groups of about :data:`GROUP_BYTES` of base weights, and
runs one Ray task per group. A task opens the checkpoints itself (paths must be visible to every
worker: a shared file system), calls ``compare_in_process`` on its group only (an include-list of exact
names, so the math exists once), reads each of its base tensors once for all the checkpoints, and
returns plain rows of statistics, never tensors. The driver keeps at most ``max_in_flight`` tasks
submitted (``ray.wait`` back-pressure) and puts the rows back in the in-process order, so the frames
are the in-process ones, bit for bit.

Ray is an optional extra (``pip install "dora-analysis[cluster]"``) imported only here, only when a
cluster is asked for.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dora_analysis.analysis.planning import Plan, RecordColumns, finished_frames, plan_comparison
from dora_analysis.analysis.spectrum import SpectrumOptions
from dora_analysis.analysis.tensor_major import compare_in_process
from dora_analysis.devices import parse_device
from dora_analysis.errors import DoraAnalysisError, InputError, first_line
from dora_analysis.readers.base import CheckpointReader
from dora_analysis.readers.hub import resolve_model
from dora_analysis.readers.reuse import MeteredReader, ReusingReader
from dora_analysis.schema import COLUMNS, metric_columns

__all__ = [
    "GROUP_BYTES",
    "Cluster",
    "TaskReport",
    "GroupJob",
    "GroupResult",
    "as_cluster",
    "plan_groups",
    "spectral_memory",
    "analyse_group",
    "compare_on_cluster",
]

# Base bytes per task: large enough that opening T+1 checkpoints per task (headers, adapter configs)
# is noise next to reading the group, small enough to keep every worker busy to the end (a 1 GB
# model gives ~16 tasks; a 70B bf16 model, ~140 GB, ~2200: well within what Ray schedules).
GROUP_BYTES = 64 << 20
# Memory a task with spectral metrics reserves (Ray's ``memory=``), in float64 copies of its largest
# matrix: its rows, the dense update, W_t, the SVDs' factors and LAPACK's workspace (measured: a worker
# grew by 8.2 copies of a 5504 x 2048 update). ΔM/ΔD alone streams row blocks and reserves nothing.
SPECTRAL_COPIES = 10
EXTRA = 'Ray is not installed: --cluster needs the cluster extra (pip install "dora-analysis[cluster]")'
_ADDRESS = re.compile(r"^(auto|local|ray://\S+|[A-Za-z0-9_.\-]+:\d+|\[[0-9A-Fa-f:.]+\]:\d+)$")

Progress = bool | Callable[[int], None]


@dataclass(frozen=True)
class TaskReport:
    """What one task did, for progress, tests and benchmarks (the driver's ``on_task`` gets it).

    ``base_reads`` counts ``get()`` calls on the base reader per tensor name (under the reader that
    keeps the last tensor for adapters merging over it, so a real read each); the byte counts are
    those of the tensors the readers returned (for an adapter, the merged weight it builds).
    """

    index: int  # the group, in tensor order
    tensors: int  # base tensors in the group
    checkpoints: int  # tuned checkpoints compared with them
    base_reads: dict[str, int]
    base_bytes: int
    tuned_bytes: int
    seconds: float
    worker: str  # host:pid
    rss_anon_before_mb: float | None = None  # the worker's anonymous memory when the task began
    peak_rss_anon_mb: float | None = None  # and its peak during the task (when measured)


@dataclass(frozen=True)
class GroupJob:
    """One task: the base tensors ``names`` of ``base``, against the ``tuned`` checkpoints that have some."""

    index: int
    base: str
    tuned: tuple[tuple[int, str], ...]  # (index in the caller's list, path)
    names: tuple[str, ...]
    device: str | None = None
    measure_memory: bool = False
    layout: str | None = None  # as compare_many's ``layout=`` (None: the config.json decides)
    metrics: tuple[str, ...] = ("decomposition",)  # as compare_many's ``metrics=``
    spectrum: SpectrumOptions | None = None  # as compare_many's ``spectrum=``
    references: tuple[int | None, ...] | None = None  # φ references, as indices into ``tuned``
    memory: int | None = None  # bytes the task reserves from Ray (spectral metrics), None: none


@dataclass(frozen=True)
class GroupResult:
    """A task's rows per tuned checkpoint (``(index, columns)``, its frame's columns as lists)."""

    rows: list[tuple[int, dict[str, list]]]
    report: TaskReport


@dataclass(frozen=True)
class Cluster:
    """Where and how the tasks run.

    Attributes:
        address: None to start a local Ray for the call (stopped after it); ``"auto"`` or
            ``"HOST:PORT"`` (or ``"ray://HOST:PORT"``) to join a running cluster. A Ray already
            initialised in this process is used as it is, and left running.
        num_cpus: CPUs a local Ray may use (default: all); ignored when joining.
        group_bytes: base bytes per task (default :data:`GROUP_BYTES`).
        cpus_per_task: CPUs reserved per task; the fused row loops use that many threads.
        max_in_flight: tasks submitted at once (default: twice the cluster's CPUs / cpus_per_task).
        max_retries: retries of a task whose worker died (lost node, killed, out of memory).
        measure_memory: sample each worker's anonymous memory during its task (for benchmarks).
        on_task: called in the driver with each finished task's :class:`TaskReport`.
    """

    address: str | None = None
    num_cpus: int | None = None
    group_bytes: int | None = None
    cpus_per_task: int = 1
    max_in_flight: int | None = None
    max_retries: int = 3
    measure_memory: bool = False
    on_task: Callable[[TaskReport], None] | None = field(default=None, compare=False)


def as_cluster(cluster: Cluster | str | bool | None) -> Cluster | None:
    """``cluster`` as a :class:`Cluster` (None/False: run in process).

    True, ``""`` and ``"local"`` start a local Ray; ``"auto"``, ``"HOST:PORT"`` or ``"ray://..."`` join one.

    Raises:
        InputError: a string that is not a Ray address.
    """
    if cluster is None or cluster is False:
        return None
    if cluster is True:
        return Cluster()
    if isinstance(cluster, Cluster):
        return cluster
    address = str(cluster).strip()
    if address in ("", "local"):
        return Cluster()
    if not _ADDRESS.match(address):
        raise InputError.of(
            "--cluster", f"{address!r} is not a Ray address (auto, HOST:PORT or ray://HOST:PORT)"
        )
    return Cluster(address=address)


def import_ray():
    """The ``ray`` module, or one line naming the extra that provides it."""
    try:
        import ray
    except ImportError:
        raise InputError(EXTRA) from None
    return ray


# ------------------------------------------------------------------------------------------ plan


def plan_groups(order: Sequence[str], sizes: dict[str, int], group_bytes: int) -> list[list[str]]:
    """Split ``order`` into contiguous groups of at most ``group_bytes`` (at least one name each)."""
    groups: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name in order:
        if current and total + sizes[name] > group_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(name)
        total += sizes[name]
    if current:
        groups.append(current)
    return groups


def _plan(
    base: Path, tuned: Sequence[Path], include: str | None, exclude: str | None, layout: str | None
) -> tuple[Plan, dict[str, int], dict[str, int]]:
    """The in-process run's plan (warned once, here), and each base tensor's stored bytes and element
    count."""
    from dora_analysis.readers import open_checkpoint

    with ExitStack() as stack:
        base_reader = stack.enter_context(open_checkpoint(base))
        readers = [stack.enter_context(open_checkpoint(t, base=base_reader)) for t in tuned]
        plan = plan_comparison(base_reader, readers, include, exclude, layout)
        numels = {name: _numel(base_reader.shape(name)) for name in plan.order}
        sizes = {name: numels[name] * _itemsize(base_reader.dtype(name)) for name in plan.order}
    return plan, sizes, numels


def spectral_memory(numel: int) -> int:
    """Bytes a task with spectral metrics reserves for a largest matrix of ``numel`` elements."""
    return SPECTRAL_COPIES * 8 * numel


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _exact(names: Sequence[str]) -> str:
    """A regular expression matching exactly ``names``."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


# ------------------------------------------------------------------------------------ the task


def _rss_anon_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@contextmanager
def _peak_memory(enabled: bool) -> Iterator[list[float | None]]:
    """Yields ``[before, peak]`` RssAnon in MB, the peak sampled every 2 ms (when enabled)."""
    before = _rss_anon_mb() if enabled else None
    box: list[float | None] = [before, before]
    if not enabled or before is None:
        yield box
        return
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            box[1] = max(box[1] or 0.0, _rss_anon_mb() or 0.0)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield box
    finally:
        done.set()
        sampler.join()
        box[1] = max(box[1] or 0.0, _rss_anon_mb() or 0.0)


def analyse_group(job: GroupJob) -> GroupResult:
    """Run in a Ray worker: ``compare_in_process`` on the group's tensors, each base tensor read once.

    Raises:
        InputError: a checkpoint this worker cannot read (not on a file system it sees, or bad).
    """
    from dora_analysis.readers import open_checkpoint

    start = time.perf_counter()
    for path in (job.base, *(p for _, p in job.tuned)):
        if not os.path.exists(path):
            raise InputError.of(
                path,
                f"not found on Ray worker {socket.gethostname()}: checkpoints must be on a file "
                "system every worker sees",
            )
    with _peak_memory(job.measure_memory) as memory, ExitStack() as stack:
        base = MeteredReader(stack.enter_context(open_checkpoint(Path(job.base))))
        shared = ReusingReader(base)  # adapters merging over the base reuse the tensor just read
        tuned = [
            MeteredReader(stack.enter_context(open_checkpoint(Path(p), base=shared))) for _, p in job.tuned
        ]
        frames = compare_in_process(
            shared,
            tuned,
            include=_exact(job.names),
            device=job.device,
            layout=job.layout,
            metrics=job.metrics,
            spectrum=job.spectrum,
            references=job.references,
        )
        rows = [(index, frame.to_dict("list")) for (index, _), frame in zip(job.tuned, frames, strict=True)]
        reads, base_bytes, tuned_bytes = dict(base.reads), base.bytes, sum(t.bytes for t in tuned)
        del frames
    report = TaskReport(
        index=job.index,
        tensors=len(job.names),
        checkpoints=len(job.tuned),
        base_reads=reads,
        base_bytes=base_bytes,
        tuned_bytes=tuned_bytes,
        seconds=time.perf_counter() - start,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        rss_anon_before_mb=memory[0],
        peak_rss_anon_mb=memory[1],
    )
    return GroupResult(rows, report)


# What each task runs (a seam for tests: a wrapper that kills its worker once, or that sleeps).
_run_group: Callable[[GroupJob], GroupResult] = analyse_group


# ---------------------------------------------------------------------------------- the driver


def compare_on_cluster(
    base: str | os.PathLike | CheckpointReader,
    tuned: Sequence[str | os.PathLike | CheckpointReader],
    include: str | None = None,
    exclude: str | None = None,
    progress: Progress = False,
    device: str | torch.device | None = None,
    cluster: Cluster | str | bool = True,
    *,
    layout: str | None = None,
    metrics: Sequence[str] = ("decomposition",),
    spectrum: SpectrumOptions | None = None,
    references: Sequence[int | None] | None = None,
) -> list[pd.DataFrame]:
    """:func:`~dora_analysis.analysis.comparison.compare_many` on Ray: the same frames (ΔM/ΔD bit for
    bit; the spectral columns up to the SVDs' rounding, which depends on each worker's thread count).

    Args:
        base, tuned: checkpoint paths every Ray worker can read (open readers cannot travel).
        include, exclude, device, layout, metrics, spectrum, references: as for ``compare_many``
            (``cuda`` asks one GPU per task; ``metrics`` as :func:`~dora_analysis.schema.parse_metrics`
            returns them).
        progress: True for a bar over tasks on stderr, or a callable given the number of base
            tensors each finished task analysed.
        cluster: see :func:`as_cluster`.
    Raises:
        InputError: as ``compare_many`` (from any worker, unwrapped from Ray's error), a reader
            given instead of a path, Ray missing, or no cluster at the address.
    """
    config = as_cluster(cluster) or Cluster()
    base_path, tuned_paths = _paths(base, tuned)
    device_name = _device_name(device)
    ray = import_ray()  # before any planning: a missing extra is the first thing to say
    plan, sizes, numels = _plan(base_path, tuned_paths, include, exclude, layout)
    template = GroupJob(
        0, str(base_path), (), (), device_name, config.measure_memory, layout, tuple(metrics), spectrum
    )
    spectral = tuple(metrics) != ("decomposition",) or references is not None  # φ needs SVDs too
    groups = plan_groups(plan.order, sizes, config.group_bytes or GROUP_BYTES)
    jobs = [
        _job(template, index, names, tuned_paths, plan, references, numels if spectral else None)
        for index, names in enumerate(groups)
    ]
    with _connected(ray, config):
        results = _run(ray, jobs, config, progress, device_name)
    tables = [RecordColumns() for _ in tuned_paths]
    for result in results:  # in group order, which is the in-process tensor order
        for index, columns in result.rows:
            tables[index].extend(columns)
    # Sorted by stack, layer, module and tensor, as in-process: the task order does not matter.
    return finished_frames(tables, plan, COLUMNS + metric_columns(metrics, reference=references is not None))


def _job(
    template: GroupJob,
    index: int,
    names: list[str],
    tuned_paths: list[Path],
    plan: Plan,
    references: Sequence[int | None] | None,
    numels: dict[str, int] | None,
) -> GroupJob:
    """The task of group ``index``: its tensors against the tuned checkpoints that have some of them;
    with ``numels`` (spectral metrics) it reserves memory for its largest matrix."""
    wanted = set(names)
    members = tuple(
        (k, str(path))
        for k, (path, selection) in enumerate(zip(tuned_paths, plan.selections, strict=True))
        if not wanted.isdisjoint(selection.pairs)
    )
    local = {k: position for position, (k, _) in enumerate(members)}
    return dataclasses.replace(
        template,
        index=index,
        tuned=members,
        names=tuple(names),
        # a reference outside the group has none of its tensors: φ is NaN there, as in-process
        references=None if references is None else tuple(local.get(references[k]) for k, _ in members),
        memory=spectral_memory(max(numels[n] for n in names)) if numels is not None else None,
    )


def _paths(
    base: str | os.PathLike | CheckpointReader, tuned: Sequence[str | os.PathLike | CheckpointReader]
) -> tuple[Path, list[Path]]:
    """Absolute paths (workers do not share the driver's working directory)."""
    out = []
    for source in (base, *tuned):
        if isinstance(source, CheckpointReader):
            raise InputError.of(
                source.source,
                "--cluster needs checkpoint paths that every Ray worker can open, not an open reader",
            )
        out.append(Path(os.path.abspath(resolve_model(source))))  # a cached model id becomes its folder
    return out[0], out[1:]


def _device_name(device: str | torch.device | None) -> str | None:
    """The device each worker analyses on: checked for syntax here, for presence on the workers."""
    if device is None:
        return None
    resolved = parse_device(device)
    # Ray gives each GPU task its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES): an index cannot carry over.
    return "cuda" if resolved.type == "cuda" else str(resolved)


@contextmanager
def _connected(ray, config: Cluster) -> Iterator[None]:
    """Ray initialised for the call: a local one started and stopped, or a cluster joined and left."""
    if ray.is_initialized():
        yield
        return
    import logging

    kwargs: dict = {"logging_level": logging.WARNING, "include_dashboard": False}
    if config.address is None:
        kwargs.update(address="local", num_cpus=config.num_cpus)
    try:
        with _importable_by_local_workers(config.address is None):
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = config.address or "a local Ray"
        raise InputError.of("--cluster", f"cannot start or join {where}: {first_line(error)}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _importable_by_local_workers(local: bool) -> Iterator[None]:
    """Workers of a local Ray inherit its environment: put this package's folder on their PYTHONPATH
    while it starts, so they import the driver's copy (a source checkout run from its root too)."""
    previous = os.environ.get("PYTHONPATH")
    root = str(Path(__file__).resolve().parents[2])
    if local and root not in (previous or "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([root, previous] if previous else [root])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous


def _run(
    ray, jobs: list[GroupJob], config: Cluster, progress: Progress, device: str | None
) -> list[GroupResult]:
    """Run ``jobs`` with at most ``max_in_flight`` submitted; results in job order.

    A task error carrying one of our errors (bad input) is raised as that error; on any error or
    Ctrl-C the tasks still pending are cancelled (their workers stopped) before it propagates.
    """
    submit, limit = _submitter(ray, jobs, config, device)
    bar = _progress_bar(len(jobs), progress is True)
    tick = progress if callable(progress) else None
    results: list[GroupResult | None] = [None] * len(jobs)
    pending: dict = {}
    waiting = iter(jobs)
    try:
        more = True
        while more or pending:
            while more and len(pending) < limit:
                job = next(waiting, None)
                more = job is not None
                if more:
                    pending[submit(job)] = job
            if not pending:
                break
            # A timeout keeps the loop in Python now and then, so Ctrl-C is seen promptly.
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                job = pending.pop(ref)
                result = results[job.index] = _result(ray, ref, job, config)
                bar.update(1)
                if tick is not None:
                    tick(len(job.names))
                if config.on_task is not None:
                    config.on_task(result.report)
    except BaseException:
        _cancel(ray, pending)
        raise
    finally:
        bar.close()
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _submitter(ray, jobs: list[GroupJob], config: Cluster, device: str | None) -> tuple[Callable, int]:
    """A function submitting one job with the cluster's resource options, and how many may be in flight.

    Raises:
        InputError: a GPU asked of a cluster that has none.
    """
    resources = ray.cluster_resources()
    options: dict = {"num_cpus": config.cpus_per_task, "max_retries": config.max_retries}
    if device is not None and device.startswith("cuda"):
        if resources.get("GPU", 0) < 1:
            raise InputError.of("--device", f"{device}: the Ray cluster has no GPU")
        options["num_gpus"] = 1
    cpus = max(1, int(resources.get("CPU", 1)) // max(1, config.cpus_per_task))
    limit = config.max_in_flight or 2 * cpus
    task = ray.remote(_run_group)
    remote = task.options(**options)
    # only where a task reserves memory: asking the cluster for its nodes is a round trip
    largest = _largest_node_memory(ray) if any(job.memory is not None for job in jobs) else None

    def submit(job: GroupJob):
        if job.memory is None:
            return remote.remote(job)
        # Ray then runs no more of these on a node than its memory holds; a reservation above every
        # node's memory would never be scheduled, so it is capped there (the task then runs alone).
        reserve = job.memory if largest is None else min(job.memory, largest)
        return task.options(**options, memory=reserve).remote(job)

    return submit, limit


def _result(ray, ref, job: GroupJob, config: Cluster) -> GroupResult:
    """A finished task's result; one of our errors (bad input) raised from a worker is raised as it is."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as error:
        if isinstance(error.cause, DoraAnalysisError):
            raise error.cause from None
        raise
    except ray.exceptions.RayError as error:
        raise DoraAnalysisError(
            f"Ray task for tensors {job.names[0]} .. {job.names[-1]} failed after "
            f"{config.max_retries} retries: {first_line(error)}"
        ) from error


def _cancel(ray, pending: dict) -> None:
    """Cancel the tasks still pending, stopping their workers: nothing more is read."""
    for ref in pending:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - never mask the error or Ctrl-C that brought us here
            pass


def _largest_node_memory(ray) -> int | None:
    """The largest ``memory`` resource of a live node (bytes), or None where Ray does not say."""
    try:
        found = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - an older or remote client without node listings
        return None
    return int(max(found)) if found and max(found) > 0 else None


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="task",
        desc="ray tasks",
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
        file=sys.stderr,
    )
