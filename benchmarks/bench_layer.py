"""Forward+backward time and peak memory of our LoRALinear / DoRALinear against PEFT's, on one layer.

Setup (the issue's): one ``nn.Linear(2048, 2048)`` with bias, fp32, input ``(4096, 2048)`` that
requires grad (a layer inside a network), ranks 16 and 64, ``B`` random so the update is not zero.
Each variant is built from the same base layer and adapter weights.

Time: ``--reps`` timed repetitions of forward + ``backward(grad)`` with a fixed random output
gradient (after ``--warmup`` untimed ones); the median is printed. All variants run interleaved,
round by round, so a slow phase of the machine (other jobs) hits every variant alike.

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

Run: ``python benchmarks/bench_layer.py`` (a few minutes on an idle 2-core machine; far longer, and
noisier, while other jobs share the CPU: compare the ratios, which interleaving keeps fair).
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


def build(r: int, dim: int):
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
    variants["dense DoRA (reference), detached"] = DenseDoRA(base, lora_A, lora_B, magnitude, scale, True)
    variants["dense DoRA (reference), not detached"] = DenseDoRA(
        base, lora_A, lora_B, magnitude, scale, False
    )
    return variants


def step(layer, x, grad):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).backward(grad)


def peak_kib(layer, x, grad) -> int:
    import gc

    for p in layer.parameters():
        p.grad = None
    x.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step(layer, x, grad)
    return _status_kib("VmHWM") - before


def measure_peaks(args) -> None:
    """Child process: print one ``name<TAB>r<TAB>KiB`` line per variant and rank."""
    import torch

    for r in args.ranks:
        variants = build(r, args.dim)
        x = torch.randn(args.tokens, args.dim, requires_grad=True)
        grad = torch.randn(args.tokens, args.dim)
        for name, layer in variants.items():
            step(layer, x, grad)  # warm-up: lazy initialisations are not the step's memory
            peak = statistics.median(peak_kib(layer, x, grad) for _ in range(3))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        measure_peaks(args)
        return
    import torch

    all_peaks = peaks_from_child(args)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; Linear {args.dim}x{args.dim}, "
        f"{args.tokens} tokens, fp32, forward+backward; median of {args.reps}"
    )
    for r in args.ranks:
        variants = build(r, args.dim)
        x = torch.randn(args.tokens, args.dim, requires_grad=True)
        grad = torch.randn(args.tokens, args.dim)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.warmup + args.reps):
            for name, layer in variants.items():
                start = time.perf_counter()
                step(layer, x, grad)
                if rep >= args.warmup:
                    times[name].append(time.perf_counter() - start)
        peaks = {name: all_peaks[(name, r)] for name in variants}
        med = {name: statistics.median(t) for name, t in times.items()}
        print(f"\nr = {r}")
        print(f"  {'variant':38s} {'time ms':>8s} {'peak MiB':>9s}")
        for name in variants:
            print(f"  {name:38s} {med[name] * 1e3:8.1f} {peaks[name] / 1024:9.1f}")
        print("  ratios:")
        print(
            f"    time  ours DoRA / ours LoRA  = {med['ours DoRA'] / med['ours LoRA']:.3f}   (target <= 1.10)"
        )
        print(
            f"    time  ours DoRA / PEFT DoRA  = {med['ours DoRA'] / med['PEFT DoRA']:.3f}   (target <= 0.85)"
        )
        print(f"    time  PEFT DoRA / PEFT LoRA  = {med['PEFT DoRA'] / med['PEFT LoRA']:.3f}")
        print(f"    time  ours LoRA / PEFT LoRA  = {med['ours LoRA'] / med['PEFT LoRA']:.3f}")
        print(
            f"    peak  ours DoRA / PEFT DoRA  = {peaks['ours DoRA'] / peaks['PEFT DoRA']:.3f}   (target <= 1)"
        )
        print(f"    peak  ours DoRA / ours LoRA  = {peaks['ours DoRA'] / peaks['ours LoRA']:.3f}")
        detached, full = peaks["ours DoRA"], peaks["ours DoRA, detach_norm=False"]
        print(f"    peak  ours DoRA detach_norm True / False = {detached / full:.3f}")
        d_det, d_full = (
            peaks["dense DoRA (reference), detached"],
            peaks["dense DoRA (reference), not detached"],
        )
        print(f"    peak  dense reference detached / not     = {d_det / d_full:.3f}")


if __name__ == "__main__":
    main()
