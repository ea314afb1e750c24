"""CPU time of one intruder count, exact SVD against ``--svd-rank Q`` (certified or fallen back).

Builds ``bench_spectrum``'s base and FT-tuned weight (``--size``, flat and decaying base spectra),
counts the intruders of ``W_t`` against ``W_0``'s exact left vectors with the exact SVD and with the
randomised path for each ``--ranks`` Q, and prints each count, CPU seconds and the ratio to the
exact SVD in the same run. One thread (``torch.set_num_threads(1)``), so CPU time on a shared
machine is not inflated by threads waiting for a core.

    python benchmarks/bench_intruders.py --size 4096     # about 2 minutes per spectrum
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_spectrum import make_base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--ranks", default="16,64", help="comma-separated --svd-rank values")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from dora_analysis.analysis.spectrum import SpectrumOptions, intruder_count, randomized_intruders

    for spectrum in ("decaying", "flat"):
        g = torch.Generator().manual_seed(0)
        base = make_base(args.size, spectrum, g)
        noise = 0.002 * torch.randn(args.size, args.size, generator=g)
        tuned = (
            (base * (1 + 0.01 * torch.randn(args.size, 1, generator=g)) + noise).to(torch.bfloat16).double()
        )
        base_left = torch.linalg.svd(base.to(torch.bfloat16).double(), full_matrices=False)[0]
        start = time.process_time()
        exact = intruder_count(torch.linalg.svd(tuned, full_matrices=False)[0][:, :10], base_left, 0.5)
        exact_cpu = time.process_time() - start
        cells = [f"exact: {exact}, {exact_cpu:.2f} s"]
        for rank in map(int, args.ranks.split(",")):
            start = time.process_time()
            count = randomized_intruders(tuned, base_left, 10, SpectrumOptions(svd_rank=rank))
            if count is None:  # not certified: the exact SVD decides, as the analysis does
                count = intruder_count(
                    torch.linalg.svd(tuned, full_matrices=False)[0][:, :10], base_left, 0.5
                )
                rank_label = f"{rank} (fell back)"
            else:
                rank_label = f"{rank} (certified)"
            cpu = time.process_time() - start
            cells.append(f"--svd-rank {rank_label}: {count}, {cpu:.2f} s, x{cpu / exact_cpu:.2f}")
        print(f"{args.size}x{args.size} {spectrum}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
