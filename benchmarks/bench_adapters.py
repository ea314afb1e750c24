"""A series of DoRA adapters analysed from their factors vs merging each adapter densely.

Generates (deterministically, in a temporary folder removed afterwards) the LLaMA-shaped bf16 base of
``bench_compare.py`` (about ``--size-gb`` GB) and ``--adapters`` PEFT-format DoRA adapter folders
(``adapter_config.json`` + ``adapter_model.safetensors``, rank ``--rank`` on q/k/v/o/gate/up/down),
then times, warm page cache, median of ``--repeats``:

- ``factored``: ``compare_many(base, adapters)``: ``W0`` read once per tensor for every adapter,
  per-row statistics from ``W0 A^T``, ``A A^T``, ``B`` and the magnitude (no merged weight);
- ``dense``: each adapter merged densely by its reader (``W0 + s B A``, then ``m V / ||V||_c``),
  tensor by tensor, and the merged weight compared with ``W0`` (the fused dense path);

and prints ``dense / factored`` (target >= 5) and the largest relative difference between the two
results (target <= 1e-5).

    python benchmarks/bench_adapters.py                 # 1 GB base, 8 adapters of rank 16 (~3 min on 2 cores)
    python benchmarks/bench_adapters.py --size-gb 0.25 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compare import Spec, generate, read_floor  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_dora_adapter(folder: Path, base: Path, specs: Sequence[Spec], rank: int, seed: int) -> None:
    """A PEFT DoRA adapter over ``base`` with trained-looking factors: ``A`` ~ Kaiming, ``B`` small,
    magnitude = base row norms rescaled by ~1%."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(10_000 + seed)
    tensors = {}
    with safe_open(base, "pt") as f:
        for spec in specs:
            if len(spec.shape) != 2:
                continue
            out, features = spec.shape
            module = "base_model.model." + spec.name.removesuffix(".weight")
            norms = torch.linalg.vector_norm(f.get_tensor(spec.name).float(), dim=1)
            tensors[module + ".lora_A.weight"] = torch.randn(rank, features, generator=g) / features**0.5
            tensors[module + ".lora_B.weight"] = 1e-3 * torch.randn(out, rank, generator=g)
            tensors[module + ".lora_magnitude_vector"] = norms * (1 + 0.01 * torch.randn(out, generator=g))
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "use_dora": True,
        "use_rslora": False,
        "target_modules": TARGETS,
        "fan_in_fan_out": False,
        "bias": "none",
        "base_model_name_or_path": str(base.parent),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def factored(base: Path, adapters: Sequence[Path], device: str) -> list[dict[str, tuple[float, ...]]]:
    """``compare_many`` on the adapter folders: the factored path, ``W0`` read once per tensor."""
    from dora_analysis.analysis.comparison import compare_many

    frames = compare_many(base, list(adapters), **({} if device == "cpu" else {"device": device}))
    return [_records(f) for f in frames]


def dense(base: Path, adapters: Sequence[Path], device: str) -> list[dict[str, tuple[float, ...]]]:
    """Merge each adapter densely (the readers' ``get``), then compare with ``W0`` (fused dense path)."""
    from contextlib import ExitStack

    from dora_analysis.analysis.decomposition import row_changes, row_scalars, summarize
    from dora_analysis.readers import open_checkpoint

    results: list[dict[str, tuple[float, ...]]] = [{} for _ in adapters]
    with ExitStack() as stack:
        base_reader = stack.enter_context(open_checkpoint(base))
        readers = [stack.enter_context(open_checkpoint(a, base=base_reader)) for a in adapters]
        for name in base_reader.names():
            if not any(name.endswith(f"{t}.weight") for t in TARGETS):
                continue
            w0 = base_reader.get(name).to(device)
            for result, reader in zip(results, readers, strict=True):
                tuned_name = next(n for n in reader.names() if n.endswith(name))
                merged = reader.get(tuned_name).to(device)  # W0 + s B A, then m V / ||V||_c
                d = summarize(row_changes(row_scalars(w0, merged)))
                result[name] = (d.delta_magnitude, d.delta_direction, d.tuned_magnitude_mean)
    return results


def _records(frame) -> dict[str, tuple[float, ...]]:
    return {
        r.tensor: (r.delta_magnitude, r.delta_direction, r.tuned_magnitude_mean)
        for r in frame.itertuples(index=False)
    }


def largest_difference(a, b) -> float:
    """Largest relative difference over every tensor, adapter and column."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y) and x
        for name, values in x.items():
            for u, v in zip(values, y[name], strict=True):
                worst = max(worst, abs(u - v) / abs(v))
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-gb", type=float, default=1.0, help="size of the base checkpoint (default 1.0)"
    )
    parser.add_argument("--adapters", type=int, default=8, help="DoRA adapters in the series (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    parser.add_argument("--repeats", type=int, default=2, help="repetitions per measurement (median)")
    parser.add_argument("--device", default="cpu", help="torch device for the analysis (cpu, cuda)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes")
    args = parser.parse_args(argv)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_adapters_", dir=args.workdir))
    try:
        start = time.perf_counter()
        base, _, specs = generate(folder, args.size_gb, 0)
        adapters = [folder / f"dora-{i}" for i in range(args.adapters)]
        for i, path in enumerate(adapters):
            write_dora_adapter(path, base, specs, args.rank, i)
        print(
            f"generated base ({base.stat().st_size / 1e9:.2f} GB) + {args.adapters} DoRA adapters of rank "
            f"{args.rank} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        read_floor([base])
        factored(base, adapters[:1], args.device)  # warm the code paths
        methods = {"factored": factored, "dense": dense}
        times: dict[str, list[float]] = {k: [] for k in methods}
        results: dict[str, list] = {}
        for _ in range(args.repeats):
            for kind, method in methods.items():
                start = time.perf_counter()
                results[kind] = method(base, adapters, args.device)
                times[kind].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"  {k:8s} median {med[k]:7.3f} s  ({', '.join(f'{x:.3f}' for x in v)})")
        print(f"dense / factored = {med['dense'] / med['factored']:.1f}   (target >= 5)")
        print(
            f"largest relative difference (delta_magnitude, delta_direction, tuned_magnitude_mean) = "
            f"{largest_difference(results['factored'], results['dense']):.1e}   (target <= 1e-5)"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
