"""What ``--metrics spectrum,intruders`` costs next to ``--metrics decomposition``, in the same run.

Generates (deterministically, in a temporary folder removed afterwards) one ``size x size`` bf16
weight (default 4096, a LLaMA-7B attention projection) as a base checkpoint, a fully fine-tuned copy
(dense update), and a rank-16 LoRA and a rank-16 DoRA PEFT adapter folder over it. For each tuned
checkpoint it times (median of ``--repeats``) ``compare(base, tuned, metrics=...)`` with

- ``decomposition``: ΔM/ΔD only (the baseline);
- ``spectrum``: plus the update's singular spectrum;
- ``spectrum,intruders``: plus intruder dimensions (the SVD of W_0 and of W_t);
- ``spectrum,intruders`` with ``--svd-rank Q`` (the randomised path; default 64),

and prints each wall-clock and CPU time and the CPU-time ratio to the first variant (after one
untimed warm-up run). The randomised rows show rank90's bounds (rank90 itself only where they
meet) and no effective rank; their intruder count is certified or comes from the exact SVD. Expected: the LoRA spectrum from the
factors costs next to nothing; FT and DoRA updates pay a dense float64 SVD; intruders add the SVDs
of W_0 and W_t (the base's would be shared by every checkpoint of a series).

    python benchmarks/bench_spectrum.py                       # 4096 x 4096, several minutes on 2 cores
    python benchmarks/bench_spectrum.py --size 1024 --repeats 3
    python benchmarks/bench_spectrum.py --device cuda
    python benchmarks/bench_spectrum.py --variants decomposition,spectrum,spectrum-randomized  # no W_0 SVD
    python benchmarks/bench_spectrum.py --base-spectrum decaying   # a base shaped like trained weights
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

NAME = "model.layers.0.self_attn.q_proj.weight"
RANK = 16


def make_base(size: int, spectrum: str, g: torch.Generator) -> torch.Tensor:
    """``(size, size)`` float32 with entries of about 0.02 rms: Gaussian (a flat top spectrum) or
    ``G1 diag(s) G2`` with ``s_i = (i + 8)^-0.6`` (decaying, like pre-trained weights' spectra)."""
    if spectrum == "flat":
        return 0.02 * torch.randn(size, size, generator=g)
    s = (torch.arange(size, dtype=torch.float32) + 8) ** -0.6
    base = (torch.randn(size, size, generator=g) * s) @ torch.randn(size, size, generator=g)
    return base * (0.02 / float(base.square().mean().sqrt()))


def make_checkpoints(folder: Path, size: int, spectrum: str = "flat") -> dict[str, Path]:
    """The base, an FT copy, and LoRA/DoRA adapter folders (rank 16, alpha 32) over it."""
    g = torch.Generator().manual_seed(0)
    base = make_base(size, spectrum, g)
    save_file({NAME: base.to(torch.bfloat16)}, folder / "base.safetensors")
    tuned = base * (1 + 0.01 * torch.randn(size, 1, generator=g)) + 0.002 * torch.randn(
        size, size, generator=g
    )
    save_file({NAME: tuned.to(torch.bfloat16)}, folder / "ft.safetensors")
    paths = {"ft": folder / "ft.safetensors"}
    prefix = "base_model.model." + NAME.removesuffix(".weight")
    for method in ("lora", "dora"):
        adapter = folder / method
        adapter.mkdir()
        tensors = {
            f"{prefix}.lora_A.weight": 0.02 * torch.randn(RANK, size, generator=g),
            f"{prefix}.lora_B.weight": 0.02 * torch.randn(size, RANK, generator=g),
        }
        if method == "dora":
            norms = torch.linalg.vector_norm(base.to(torch.bfloat16).float(), dim=1)
            tensors[f"{prefix}.lora_magnitude_vector"] = norms * (1 + 0.01 * torch.randn(size, generator=g))
        save_file(tensors, adapter / "adapter_model.safetensors")
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": 2 * RANK,
            "target_modules": ["q_proj"],
            "use_dora": method == "dora",
        }
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        paths[method] = adapter
    return paths


def timed(run, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds (all threads of this process) of ``run()``.

    The CPU time is the fairer ratio on a shared machine, where waiting for a core inflates wall time.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--svd-rank", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--base-spectrum",
        choices=("flat", "decaying"),
        default="flat",
        help="the base weight: Gaussian (flat top spectrum, default) or with a decaying spectrum",
    )
    parser.add_argument("--methods", default="ft,lora,dora", help="which tuned checkpoints (default all)")
    parser.add_argument(
        "--variants",
        default="decomposition,spectrum,intruders,intruders-randomized",
        help="comma-separated from decomposition, spectrum, spectrum-randomized, intruders, "
        "intruders-randomized (the first given is the ratio's baseline)",
    )
    args = parser.parse_args(argv)

    from dora_analysis.analysis.comparison import compare
    from dora_analysis.analysis.spectrum import SpectrumOptions

    folder = Path(tempfile.mkdtemp(prefix="bench_spectrum_"))
    try:
        paths = make_checkpoints(folder, args.size, args.base_spectrum)
        base = folder / "base.safetensors"
        print(
            f"{args.size}x{args.size} bf16 ({args.base_spectrum} base spectrum), rank {RANK} adapters, "
            f"device {args.device or 'cpu'}, "
            f"torch threads {torch.get_num_threads()}, median of {args.repeats}"
        )
        known = {
            "decomposition": ("decomposition", None),
            "spectrum": ("spectrum", None),
            "spectrum-randomized": ("spectrum", args.svd_rank),
            "intruders": ("spectrum,intruders", None),
            "intruders-randomized": ("spectrum,intruders", args.svd_rank),
        }
        variants = []
        for name in args.variants.split(","):
            metrics, rank = known[name]
            label = metrics + (f" --svd-rank {rank}" if rank else "")
            variants.append((label, metrics, rank))
        paths = {m: paths[m] for m in args.methods.split(",")}
        for tuned in paths.values():  # warm-up: imports, numba compilation of the dense and factored paths
            compare(base, tuned, device=args.device)
        print(f"{'':>5} {'metrics':<36} {'wall s':>8} {'cpu s':>8} {'cpu ratio':>9}")
        for method, tuned in paths.items():
            baseline = None
            for label, metrics, rank in variants:
                options = SpectrumOptions(svd_rank=rank)
                row = {}

                def run(metrics=metrics, options=options, tuned=tuned, row=row):
                    frame = compare(base, tuned, metrics=metrics, spectrum=options, device=args.device)
                    row.update(frame.iloc[0].to_dict())

                wall, cpu = timed(run, args.repeats)
                baseline = baseline or cpu
                numbers = ", ".join(
                    f"{k.removeprefix('update_')} {row[k]:.4g}"
                    for k in (
                        "update_rank90",
                        "update_rank90_lower",
                        "update_rank90_upper",
                        "update_effective_rank",
                        "update_top_singular",
                        "intruder_dimensions",
                    )
                    if k in row
                )
                print(f"{method:>5} {label:<36} {wall:8.2f} {cpu:8.2f} x{cpu / baseline:8.1f}  {numbers}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
