"""Forward+backward time and peak memory of our LoRALinear / DoRALinear against PEFT's, on one layer.

Setup (the issue's): one ``nn.Linear(2048, 2048)`` with bias, fp32, input ``(4096, 2048)`` that
requires grad (a layer inside a network), ranks 16 and 64, ``B`` random so the update is not zero.
Each variant is built from the same base layer and adapter weights.

Time: ``--reps`` timed repetitions of forward + ``backward(grad)`` with a fixed random output
gradient (after ``--warmup`` untimed ones); the median is printed. All variants run interleaved,
round by round, so a slow phase of the machine (other jobs) hits every variant alike. Each ratio
line gives the ratio of the medians and, in brackets, the median and interquartile range of the
per-round ratios (the two variants timed back to back): the spread there is the run's own noise.

Peak memory: the kernel's peak resident set size, measured in a child process (the timing runs with
the ordinary allocator). The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every tensor above 64 KiB by its own ``mmap`` and
returns it with ``munmap`` on free: resident memory then follows the live tensors (no malloc cache
hides or keeps memory). Before each measured step it drops gradients, writes ``5`` to
``/proc/self/clear_refs`` (resets ``VmHWM``, the peak RSS, to the current RSS) and reads ``VmRSS``;
after forward+backward, ``VmHWM - VmRSS(before)`` is the peak extra memory of that step: saved
activations, temporaries, the output and the gradients. The input and weights exist before and are
not counted. Linux only.

Also printed: our DoRA with ``detach_norm=False`` (the full norm gradient), and for reference a
plain-autograd DoRA with the dense norm (``B @ A`` formed), detached and not: what section 4.3 of the
paper saves in a dense implementation.

Modes (``--mode``):

- ``train`` (default): forward + backward as above.
- ``eval``: forward only, modules in eval mode under ``torch.no_grad()``: our DoRA reuses its cached
  ``g`` (target: our DoRA / our LoRA <= 1.05); PEFT's DoRA is shown plain and inside its opt-in
  ``DoraCaching()`` context.
- ``--precision bf16`` / ``fp16``: the same under ``torch.autocast`` (weights stay float32, as in
  mixed-precision training); the dense references are left out there.

``--device cuda``: time with ``torch.cuda.synchronize()`` around each step and peak memory as
``torch.cuda.max_memory_allocated()`` above the memory allocated before the step (no child process).

Run: ``python benchmarks/bench_layer.py`` (a few minutes on an idle 2-core machine; far longer, and
noisier, while other jobs share the CPU: compare the ratios, which interleaving keeps fair), e.g.
``--precision bf16`` or ``--mode eval``; the machine's load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time

MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _peft_layer(base, r, alpha, use_dora, lora_A, lora_B, magnitude):
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = copy.deepcopy(base)

        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(
        One(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=use_dora)
    )
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_A.default.weight.copy_(lora_A)
        layer.lora_B.default.weight.copy_(lora_B)
        if use_dora:
            layer.lora_magnitude_vector.default.weight.copy_(magnitude)
    return model


class DenseDoRA:
    """Plain-autograd DoRA with the dense norm ``||W0 + s B A||_c``: the reference for the detach."""

    def __init__(self, base, lora_A, lora_B, magnitude, scale, detach):
        import torch

        self.base, self.scale, self.detach = base, scale, detach
        self.lora_A = torch.nn.Parameter(lora_A.clone())
        self.lora_B = torch.nn.Parameter(lora_B.clone())
        self.magnitude = torch.nn.Parameter(magnitude.clone())

    def parameters(self):
        return [self.lora_A, self.lora_B, self.magnitude]

    def __call__(self, x):
        import torch.nn.functional as F

        full = self.base.weight + self.scale * (self.lora_B @ self.lora_A)
        norm = full.norm(dim=1)
        if self.detach:
            norm = norm.detach()
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return (self.magnitude / norm) * (F.linear(x, self.base.weight) + lora) + self.base.bias


def build(r: int, dim: int, device: str = "cpu", dense: bool = True):
    import torch
    from torch import nn

    from dora_analysis import DoRALinear, LoRALinear

    torch.manual_seed(0)
    base = nn.Linear(dim, dim)
    lora_A = torch.randn(r, dim) / dim**0.5
    lora_B = torch.randn(dim, r) * 0.01
    alpha = 2 * r
    variants = {}
    for name, cls, kw in (
        ("ours LoRA", LoRALinear, {}),
        ("ours DoRA", DoRALinear, {}),
        ("ours DoRA, detach_norm=False", DoRALinear, {"detach_norm": False}),
    ):
        layer = cls(copy.deepcopy(base), r, alpha, **kw)
        with torch.no_grad():
            layer.lora_A.copy_(lora_A)
            layer.lora_B.copy_(lora_B)
        variants[name] = layer
    magnitude = variants["ours DoRA"].magnitude.detach().clone()
    variants["PEFT LoRA"] = _peft_layer(base, r, alpha, False, lora_A, lora_B, None)
    variants["PEFT DoRA"] = _peft_layer(base, r, alpha, True, lora_A, lora_B, magnitude)
    scale = alpha / r
    if dense:
        variants["dense DoRA (reference), detached"] = DenseDoRA(base, lora_A, lora_B, magnitude, scale, True)
        variants["dense DoRA (reference), not detached"] = DenseDoRA(
            base, lora_A, lora_B, magnitude, scale, False
        )
    for layer in variants.values():
        if isinstance(layer, DenseDoRA):
            layer.base = copy.deepcopy(base).to(device)
            for attr in ("lora_A", "lora_B", "magnitude"):
                setattr(layer, attr, torch.nn.Parameter(getattr(layer, attr).detach().to(device)))
        else:
            layer.to(device)
    return variants


class Runner:
    """One measured step in the chosen mode, precision and device."""

    def __init__(self, mode: str, precision: str, device: str):
        import torch

        self.mode, self.device = mode, device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def prepare(self, variants) -> None:
        for layer in variants.values():
            if hasattr(layer, "train"):
                layer.train(self.mode == "train")

    def __call__(self, name, layer, x, grad) -> None:
        import contextlib

        import torch

        autocast = (
            torch.autocast(torch.device(self.device).type, dtype=self.dtype)
            if self.dtype is not None
            else contextlib.nullcontext()
        )
        if self.mode == "eval":
            caching = contextlib.nullcontext()
            if name == "PEFT DoRA, DoraCaching()":
                from peft.helpers import DoraCaching

                caching = DoraCaching()
            with torch.no_grad(), autocast, caching:
                layer(x)
            return
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        with autocast:
            y = layer(x)
        y.backward(grad.to(y.dtype))

    def sync(self) -> None:
        import torch

        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()


def peak_kib(run, name, layer, x, grad) -> int:
    import gc

    import torch

    for p in layer.parameters():
        p.grad = None
    x.grad = None
    gc.collect()
    if torch.device(run.device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(name, layer, x, grad)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) // 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    run(name, layer, x, grad)
    return _status_kib("VmHWM") - before


def inputs(args):
    import torch

    torch.manual_seed(1)
    x = torch.randn(args.tokens, args.dim, device=args.device, requires_grad=args.mode == "train")
    return x, torch.randn(args.tokens, args.dim, device=args.device)


def variants_for(args, r):
    variants = build(r, args.dim, args.device, dense=args.mode == "train" and args.precision == "fp32")
    if args.mode == "eval":
        variants["PEFT DoRA, DoraCaching()"] = variants["PEFT DoRA"]
    return variants


def measure_peaks(args) -> None:
    """Child process (or in process on CUDA): one ``name<TAB>r<TAB>KiB`` line per variant and rank."""
    run = Runner(args.mode, args.precision, args.device)
    for r in args.ranks:
        variants = variants_for(args, r)
        run.prepare(variants)
        x, grad = inputs(args)
        for name, layer in variants.items():
            run(name, layer, x, grad)  # warm-up: lazy initialisations are not the step's memory
            peak = statistics.median(peak_kib(run, name, layer, x, grad) for _ in range(3))
            print(f"{name}\t{r}\t{peak}", flush=True)


def peaks_from_child(args) -> dict[tuple[str, int], float]:
    import subprocess

    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        "--dim",
        str(args.dim),
        "--tokens",
        str(args.tokens),
        "--mode",
        args.mode,
        "--precision",
        args.precision,
        "--device",
        args.device,
        "--ranks",
        *map(str, args.ranks),
    ]
    out = subprocess.run(
        cmd, env={**os.environ, MALLOC_ENV: "65536"}, capture_output=True, text=True, check=True
    )
    peaks = {}
    for line in out.stdout.splitlines():
        name, r, kib = line.split("\t")
        peaks[(name, int(r))] = float(kib)
    return peaks


def paired(times: dict[str, list[float]], a: str, b: str) -> str:
    """``a / b`` per round (the two timed back to back): ``[median, IQR q1-q3]`` as text."""
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"[per round: median {statistics.median(ratios):.3f}, IQR {q1:.3f}-{q3:.3f}]"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def peaks_in_process(args) -> dict[tuple[str, int], float]:
    """CUDA: the allocator's own peak, measured here (no child process needed)."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        measure_peaks(args)
    peaks = {}
    for line in buffer.getvalue().splitlines():
        name, r, kib = line.split("\t")
        peaks[(name, int(r))] = float(kib)
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        measure_peaks(args)
        return
    import torch

    if torch.device(args.device).type == "cuda":
        all_peaks = peaks_in_process(args)
    else:
        all_peaks = peaks_from_child(args)
    run = Runner(args.mode, args.precision, args.device)
    what = "forward+backward" if args.mode == "train" else "eval forward (no grad)"
    autocast = "" if args.precision == "fp32" else f", autocast {args.precision} (fp32 weights)"
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; Linear "
        f"{args.dim}x{args.dim}, {args.tokens} tokens{autocast}, {what}; median of {args.reps}; "
        f"load average at start {_loadavg()}"
    )
    for r in args.ranks:
        variants = variants_for(args, r)
        run.prepare(variants)
        x, grad = inputs(args)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.warmup + args.reps):
            for name, layer in variants.items():
                run.sync()
                start = time.perf_counter()
                run(name, layer, x, grad)
                run.sync()
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        peaks = {name: all_peaks[(name, r)] for name in variants}
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nr = {r}")
        print(f"  {'variant':38s} {'time ms':>8s} {'peak MiB':>9s}")
        for name in variants:
            print(f"  {name:38s} {med[name] * 1e3:8.1f} {peaks[name] / 1024:9.1f}")
        print(f"  ratios (load average now {_loadavg()}):")
        if args.mode == "eval":
            print(
                f"    time  ours DoRA / ours LoRA  = {med['ours DoRA'] / med['ours LoRA']:.3f}   (target <= 1.05) "
                f"{paired(times, 'ours DoRA', 'ours LoRA')}"
            )
            twin = "ours DoRA, detach_norm=False"  # the same computation in eval: its ratio is noise
            print(
                f"    time  {twin} / ours DoRA = {med[twin] / med['ours DoRA']:.3f} (same code here: noise)"
            )
            print(f"    time  PEFT DoRA / PEFT LoRA  = {med['PEFT DoRA'] / med['PEFT LoRA']:.3f}")
            cached = med["PEFT DoRA, DoraCaching()"]
            print(f"    time  PEFT DoRA with DoraCaching() / PEFT LoRA = {cached / med['PEFT LoRA']:.3f}")
            print(f"    time  ours DoRA / PEFT DoRA with DoraCaching() = {med['ours DoRA'] / cached:.3f}")
            print(f"    peak  ours DoRA / ours LoRA  = {peaks['ours DoRA'] / peaks['ours LoRA']:.3f}")
            continue
        print(
            f"    time  ours DoRA / ours LoRA  = {med['ours DoRA'] / med['ours LoRA']:.3f}   (target <= 1.10) "
            f"{paired(times, 'ours DoRA', 'ours LoRA')}"
        )
        print(
            f"    time  ours DoRA / PEFT DoRA  = {med['ours DoRA'] / med['PEFT DoRA']:.3f}   (target <= 0.85) "
            f"{paired(times, 'ours DoRA', 'PEFT DoRA')}"
        )
        print(f"    time  PEFT DoRA / PEFT LoRA  = {med['PEFT DoRA'] / med['PEFT LoRA']:.3f}")
        print(f"    time  ours LoRA / PEFT LoRA  = {med['ours LoRA'] / med['PEFT LoRA']:.3f}")
        print(
            f"    peak  ours DoRA / PEFT DoRA  = {peaks['ours DoRA'] / peaks['PEFT DoRA']:.3f}   (target <= 1)"
        )
        print(f"    peak  ours DoRA / ours LoRA  = {peaks['ours DoRA'] / peaks['ours LoRA']:.3f}")
        if "dense DoRA (reference), detached" not in peaks:
            continue
        detached, full = peaks["ours DoRA"], peaks["ours DoRA, detach_norm=False"]
        print(f"    peak  ours DoRA detach_norm True / False = {detached / full:.3f}")
        d_det, d_full = (
            peaks["dense DoRA (reference), detached"],
            peaks["dense DoRA (reference), not detached"],
        )
        print(f"    peak  dense reference detached / not     = {d_det / d_full:.3f}")


if __name__ == "__main__":
    main()
