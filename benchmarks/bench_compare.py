"""How close ``dora_analysis.analysis.comparison`` runs to the memory-read floor on LLaMA-shaped bf16 checkpoints.

Generates (deterministically, in a temporary folder that is removed afterwards) a base checkpoint of
about ``--size-gb`` GB (hidden 2048, MLP 5504, q/k/v/o/gate/up/down per layer, bf16 safetensors) and
``--series`` fine-tuned copies, warms the page cache, then times with several repetitions (median):

- ``read``: every byte of both files read once, NumPy over a memory map (the physical floor);
- ``ours``: ``dora_analysis.analysis.comparison.compare(base, tuned)``;
- ``naive``: ``safetensors.torch.load_file`` both, then per tensor float32 norms and
  ``cosine_similarity``;
- ``series``: ``compare_many(base, [8 tuned])`` against 8 separate pairs;

and prints ``ours/read`` (target <= 2.0), ``naive/ours`` (target >= 5), ``series / (8 x pair)``
(target <= 0.65), and the peak anonymous memory (RssAnon) of ``ours`` measured in a fresh
subprocess (target <= 2 x the largest tensor in float32 + 300 MB; issue 2 asks < 500 MB).

Issue 23's fixed cost per tensor, each section in its own temporary folder:

- ``tiny``: ``--tiny`` MoE-named 64x128 bf16 experts; per-tensor overhead = (ours - read floor) /
  tensors, wall and CPU seconds (target <= 30 us);
- ``header``: a valid header of ``--header-tensors`` (200,000) 8x8 tensors compared at all (target
  <= 30 s);
- ``moe``: Qwen3-MoE expert shapes (128 x gate/up 768x2048 and down 2048x768 per layer) against a
  LLaMA-shaped pair of the same size, each ours/read, in alternation (target: within 10%).

    python benchmarks/bench_compare.py                    # ~1 GB checkpoints, 3 repetitions
    python benchmarks/bench_compare.py --size-gb 0.25 --repeats 2 --series 4
    python benchmarks/bench_compare.py --sections dense,tiny,moe --series 0 --skip-naive --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HIDDEN, MLP = 2048, 5504
BASE_STD = 0.02  # typical initialiser scale of LLaMA-family weights
# A fine-tuning-like change: each row rescaled by ~1% (a magnitude change) plus ~10% noise per
# element (a direction change); large enough to survive bf16 rounding.
ROW_SCALE_STD, NOISE_STD = 0.01, 0.1 * BASE_STD


@dataclass(frozen=True)
class Spec:
    """One tensor of the generated checkpoint."""

    name: str
    shape: tuple[int, ...]


def llama_specs(size_gb: float, hidden: int = HIDDEN, mlp: int = MLP) -> list[Spec]:
    """Enough LLaMA decoder layers (bf16) to fill about ``size_gb`` GB; 1-D norms included."""
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden)
    layers = max(1, round(size_gb * 1e9 / per_layer))
    specs = []
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [Spec(p + f"self_attn.{m}_proj.weight", (hidden, hidden)) for m in "qkvo"]
        specs += [Spec(p + f"mlp.{m}_proj.weight", (mlp, hidden)) for m in ("gate", "up")]
        specs.append(Spec(p + "mlp.down_proj.weight", (hidden, mlp)))
        specs += [Spec(p + n + ".weight", (hidden,)) for n in ("input_layernorm", "post_attention_layernorm")]
    return specs


def moe_specs(size_gb: float, experts: int = 128, hidden: int = 2048, moe: int = 768) -> list[Spec]:
    """Qwen3-MoE-shaped expert layers (``experts`` x gate/up ``(moe, hidden)`` and down
    ``(hidden, moe)``, bf16; Qwen3-30B-A3B's shapes) filling about ``size_gb`` GB, at least one layer."""
    per_layer = 2 * experts * 3 * hidden * moe
    layers = max(1, round(size_gb * 1e9 / per_layer))
    specs = []
    for i in range(layers):
        for e in range(experts):
            p = f"model.layers.{i}.mlp.experts.{e}."
            specs += [Spec(p + "gate_proj.weight", (moe, hidden)), Spec(p + "up_proj.weight", (moe, hidden))]
            specs.append(Spec(p + "down_proj.weight", (hidden, moe)))
    return specs


def tiny_specs(count: int, rows: int = 64, features: int = 128) -> list[Spec]:
    """``count`` small expert matrices (``(rows, features)``, down projections transposed), named
    like an MoE's experts (128 per layer, gate/up/down)."""
    specs = []
    for j in range(count):
        layer, rest = divmod(j, 3 * 128)
        expert, kind = divmod(rest, 3)
        name = f"model.layers.{layer}.mlp.experts.{expert}.{('gate', 'up', 'down')[kind]}_proj.weight"
        specs.append(Spec(name, (features, rows) if kind == 2 else (rows, features)))
    return specs


def write_safetensors(path: Path, tensors: Sequence[tuple[Spec, Callable[[], torch.Tensor]]]) -> None:
    """Stream bf16 tensors into a safetensors file, one in memory at a time."""
    header, offset = {}, 0
    for spec, _ in tensors:
        n = 2 * int(np.prod(spec.shape))
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for spec, make in tensors:
            t = make()
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == spec.shape
            f.write(t.contiguous().view(torch.int16).numpy().tobytes())
    os.replace(tmp, path)


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def base_tensor(spec: Spec, index: int, seed: int = 0) -> torch.Tensor:
    """The base checkpoint's tensor ``index`` (bf16), deterministic in (seed, index)."""
    if len(spec.shape) == 1:
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    g = _generator(seed, index)
    return (torch.randn(spec.shape, generator=g) * BASE_STD).bfloat16()


class TunedMaker:
    """Fine-tuned copy ``step`` of base tensors: each row rescaled by ~1% plus elementwise noise.

    Drawing fresh normal noise for every tensor of every checkpoint would dominate the benchmark's
    set-up, so each copy draws one noise pool per shape and shifts it by a tensor-dependent offset.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self._pools: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, spec: Spec, index: int, base: torch.Tensor) -> torch.Tensor:
        g = _generator(1000 + self.step, index)
        w = base.float()
        if spec.shape not in self._pools:
            self._pools[spec.shape] = torch.randn(spec.shape, generator=_generator(2000 + self.step, 0))
        noise = self._pools[spec.shape].reshape(-1).roll(7919 * index).reshape(spec.shape)
        if w.dim() == 2:
            w.mul_(1 + ROW_SCALE_STD * torch.randn(w.shape[0], 1, generator=g))
        w.add_(noise, alpha=NOISE_STD)
        return w.bfloat16()


def generate(
    folder: Path, size_gb: float, tuned: int, seed: int = 0, specs: list[Spec] | None = None
) -> tuple[Path, list[Path], list[Spec]]:
    """Write ``base.safetensors`` and ``tuned-<i>.safetensors`` (i < ``tuned``) into ``folder``
    (``specs``: default LLaMA-shaped, :func:`llama_specs`)."""
    from safetensors import safe_open

    folder.mkdir(parents=True, exist_ok=True)
    specs = specs if specs is not None else llama_specs(size_gb)
    base_path = folder / "base.safetensors"
    write_safetensors(
        base_path, [(s, functools.partial(base_tensor, s, i, seed)) for i, s in enumerate(specs)]
    )
    tuned_paths = []
    with safe_open(base_path, "pt") as base:
        for step in range(tuned):
            path = folder / f"tuned-{step}.safetensors"
            make = TunedMaker(step)
            write_safetensors(
                path,
                [(s, functools.partial(make, s, i, base.get_tensor(s.name))) for i, s in enumerate(specs)],
            )
            tuned_paths.append(path)
    return base_path, tuned_paths, specs


def read_floor(paths: Sequence[Path]) -> int:
    """Touch every byte of every file once through a NumPy memory map; returns a checksum."""
    total = 0
    for path in paths:
        size = path.stat().st_size
        m = np.memmap(path, dtype=np.uint8, mode="r")
        words = m[: size - size % 8].view(np.uint64)
        total ^= int(np.bitwise_xor.reduce(words)) ^ int(
            np.bitwise_xor.reduce(m[size - size % 8 :], initial=0)
        )
        del words, m
    return total


def naive(base: Path, tuned: Path, device: str = "cpu") -> list[tuple[float, float]]:
    """What a researcher writes: load both state dicts, then float32 norms and cosine similarity."""
    from safetensors.torch import load_file

    sd0, sd1 = load_file(base, device=device), load_file(tuned, device=device)
    out = []
    for name, w0 in sd0.items():
        if w0.dim() != 2:
            continue
        a, w = w0.float(), sd1[name].float()
        dm = (torch.linalg.norm(w, dim=1) - torch.linalg.norm(a, dim=1)).abs().mean()
        dd = (1 - torch.nn.functional.cosine_similarity(w, a, dim=1)).mean()
        out.append((float(dm), float(dd)))
    return out


def _compare_kwargs(device: str) -> dict:
    return {} if device == "cpu" else {"device": device}


def ours(base: Path, tuned: Path, device: str = "cpu"):
    from dora_analysis.analysis.comparison import compare

    return compare(base, tuned, **_compare_kwargs(device))


def ours_series(base: Path, tuned: Sequence[Path], device: str = "cpu"):
    from dora_analysis.analysis.comparison import compare_many

    return compare_many(base, list(tuned), **_compare_kwargs(device))


def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


def child_memory(base: Path, tuned: Path, device: str) -> dict:
    """Run ``ours`` once in this (fresh) process, sampling RssAnon every millisecond."""
    import pandas  # noqa: F401

    import dora_analysis.analysis.comparison  # noqa: F401  (imports are counted in after_imports_mb)

    before = _rss_anon_kb()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_kb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ours(base, tuned, device)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_anon_kb())
    return {"after_imports_mb": before / 1024, "peak_mb": peak[0] / 1024}


def measure_memory(base: Path, tuned: Path, device: str) -> dict:
    cmd = [sys.executable, __file__, "--child-memory", str(base), str(tuned), "--device", device]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(fn: Callable[[], object], cpu: list[float] | None = None) -> float:
    """Wall seconds of ``fn()``; its CPU seconds (all threads) are appended to ``cpu`` if given."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of each checkpoint (default 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per measurement (median)")
    parser.add_argument(
        "--series", type=int, default=8, help="fine-tuned checkpoints in the series (0: skip)"
    )
    parser.add_argument("--device", default="cpu", help="torch device for ours and naive (cpu, cuda)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes")
    parser.add_argument("--skip-naive", action="store_true", help="do not time the naive baseline")
    parser.add_argument(
        "--sections",
        default="dense,tiny,header,moe",
        help="what to run, comma-separated: dense (the LLaMA pair, naive, series, memory), tiny "
        "(per-tensor overhead), header (a file of many tiny tensors), moe (Qwen3-MoE experts vs dense)",
    )
    parser.add_argument("--tiny", type=int, default=9216, help="tensors of the tiny pair (64x128 bf16)")
    parser.add_argument("--header-tensors", type=int, default=200_000, help="tensors of the header file")
    parser.add_argument("--moe-gb", type=float, default=1.2, help="size of the MoE pair's files (GB)")
    parser.add_argument("--moe-experts", type=int, default=128, help="experts per MoE layer")
    parser.add_argument("--child-memory", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        print(json.dumps(child_memory(*args.child_memory, args.device)))
        return 0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    sections = set(args.sections.split(","))
    for name, run in (
        ("dense", bench_dense),
        ("tiny", bench_tiny),
        ("header", bench_header),
        ("moe", bench_moe),
    ):
        if name in sections:
            folder = Path(tempfile.mkdtemp(prefix=f"bench_compare_{name}_", dir=args.workdir))
            try:
                run(args, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    return 0


def bench_dense(args: argparse.Namespace, folder: Path) -> None:
    """The LLaMA-shaped pair: ours against the read floor and the naive code, a series, memory."""
    start = time.perf_counter()
    base, tuned, specs = generate(folder, args.size_gb, max(1, args.series))
    gb = base.stat().st_size / 1e9
    largest = max(int(np.prod(s.shape)) for s in specs) * 4 / 2**20
    print(
        f"generated base + {len(tuned)} tuned, {gb:.2f} GB each, {len(specs)} tensors "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    pair = [base, tuned[0]]
    read_floor([base, *tuned])  # warm the page cache
    ours(base, tuned[0], args.device)  # and the code paths
    times: dict[str, list[float]] = {"read": [], "ours": [], "naive": [], "series": []}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        times["read"].append(timed(lambda: read_floor(pair), cpu["read"]))
        times["ours"].append(timed(lambda: ours(base, tuned[0], args.device), cpu["ours"]))
        if not args.skip_naive:
            times["naive"].append(timed(lambda: naive(base, tuned[0], args.device), cpu["naive"]))
        if args.series > 1:
            run_series = functools.partial(ours_series, base, tuned[: args.series], args.device)
            times["series"].append(timed(run_series, cpu["series"]))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (others' work slows both)"
    )
    for k, v in times.items():
        if v:
            print(
                f"  {k:7s} median {med[k]:7.3f} s  ({', '.join(f'{x:.3f}' for x in v)}); "
                f"CPU {statistics.median(cpu[k]):.3f} s"
            )
    print(f"ours/read  = {med['ours'] / med['read']:.2f}   (target <= 2.0)")
    if "naive" in med:
        print(f"naive/ours = {med['naive'] / med['ours']:.1f}   (target >= 5)")
    if "series" in med:
        ratio = med["series"] / (args.series * med["ours"])
        print(f"series / ({args.series} x pair) = {ratio:.2f}   (target <= 0.65)")
    memory = measure_memory(base, tuned[0], args.device)
    budget = 2 * largest + 300
    print(
        f"ours peak RssAnon = {memory['peak_mb']:.0f} MB (after imports {memory['after_imports_mb']:.0f} MB); "
        f"target <= 2 x {largest:.0f} MB + 300 MB = {budget:.0f} MB, and < 500 MB"
    )


def _spread(values: Sequence[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def floor_ratios(
    pair: tuple[Path, Path], repeats: int, device: str, warm: bool = True
) -> dict[str, list[float]]:
    """``repeats`` interleaved timings of the read floor and of ``ours`` on ``pair`` (warm page
    cache; ``warm``: and code paths, one untimed run of ``ours`` first)."""
    read_floor(pair)
    if warm:
        ours(*pair, device)
    out: dict[str, list[float]] = {"read": [], "read_cpu": [], "ours": [], "ours_cpu": [], "ratio": []}
    for _ in range(repeats):
        out["read"].append(timed(lambda: read_floor(pair), out["read_cpu"]))
        out["ours"].append(timed(lambda: ours(*pair, device), out["ours_cpu"]))
        out["ratio"].append(out["ours"][-1] / out["read"][-1])
    return out


def bench_tiny(args: argparse.Namespace, folder: Path) -> None:
    """Per-tensor overhead: ``(ours - read floor) / tensors`` on many 64x128 bf16 experts."""
    specs = tiny_specs(args.tiny)
    base, tuned, _ = generate(folder, 0, 1, specs=specs)
    t = floor_ratios((base, tuned[0]), args.repeats, args.device)
    print(f"tiny pair: {len(specs)} tensors 64x128 bf16, {base.stat().st_size / 1e6:.0f} MB each")
    print(f"  read  {_spread(t['read'])} s; CPU {_spread(t['read_cpu'])} s")
    print(f"  ours  {_spread(t['ours'])} s; CPU {_spread(t['ours_cpu'])} s")
    for kind, ours_s, read_s in (("wall", "ours", "read"), ("CPU", "ours_cpu", "read_cpu")):
        per = [(o - r) / len(specs) * 1e6 for o, r in zip(t[ours_s], t[read_s], strict=True)]
        print(f"per-tensor overhead ({kind}) = {_spread(per)} us   (target <= 30 us)")
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (a loaded machine inflates wall times)"
    )


def bench_header(args: argparse.Namespace, folder: Path) -> None:
    """A valid header of many tiny (8x8 bf16) tensors: the whole comparison's wall time."""
    specs = tiny_specs(args.header_tensors, rows=8, features=8)
    base, tuned, _ = generate(folder, 0, 1, specs=specs)
    t = floor_ratios((base, tuned[0]), max(1, min(args.repeats, 3)), args.device, warm=False)
    print(f"header pair: {len(specs)} tensors 8x8 bf16")
    print(f"  ours  {_spread(t['ours'])} s; CPU {_spread(t['ours_cpu'])} s   (target <= 30 s)", flush=True)


def bench_moe(args: argparse.Namespace, folder: Path) -> None:
    """Qwen3-MoE expert shapes against a dense (LLaMA-shaped) pair of about the same size, each as a
    ratio to its own read floor, measured in alternation."""
    moe = moe_specs(args.moe_gb, experts=args.moe_experts)
    gb = sum(int(np.prod(s.shape)) for s in moe) * 2 / 1e9
    moe_pair = generate(folder / "moe", 0, 1, specs=moe)
    dense_pair = generate(folder / "dense", 0, 1, specs=llama_specs(gb))
    print(f"moe pair: {len(moe)} experts, {gb:.2f} GB each; dense pair: {len(dense_pair[2])} tensors")
    ratios: dict[str, list[float]] = {"moe": [], "dense": []}
    for _ in range(args.repeats):
        for name, (base, tuned, _) in (("moe", moe_pair), ("dense", dense_pair)):
            ratios[name] += floor_ratios((base, tuned[0]), 1, args.device)["ratio"]
    for name, values in ratios.items():
        print(f"  {name:5s} ours/read {_spread(values)}")
    # the least disturbed run of each (min) is the steadier figure on a shared machine
    for how in (statistics.median, min):
        relative = how(ratios["moe"]) / how(ratios["dense"])
        print(f"({how.__name__}) (moe ours/read) / (dense ours/read) = {relative:.2f}   (target <= 1.10)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)


if __name__ == "__main__":
    sys.exit(main())
