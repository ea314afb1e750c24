"""Training in several processes under ``torchrun``: data-parallel (DDP) or sharded (FSDP2).

``torchrun --nproc-per-node N -m dora_analysis train ...`` starts N copies; each reads its rank from
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joins one process group (gloo on the
CPU, nccl on CUDA) and takes its own contiguous slice of every global batch of ``--batch-size``
sentences. Gradients are averaged over the ranks, so one step equals the single-process step on
the whole global batch (up to float rounding; with dropout each rank draws its own masks).
Only rank 0 evaluates and writes (``run.json``, checkpoints).

FSDP2 (``--fsdp``): every adapter module (for FT every ``nn.Linear``) is ``fully_shard``-ed, then
the whole model, so a DoRA layer's forward runs on the gathered ``W0``, ``A``, ``B`` and ``m``: the
norm is computed inside the wrapped forward. Checkpoints gather the full state dict (a collective)
into an unsharded copy on rank 0, which evaluates and saves it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch

from dora_analysis.errors import InputError

__all__ = ["Ranks", "start", "stop", "local_slice", "wrap", "mean_over_ranks", "full_model"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world`` processes, ``local`` on its machine."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def start(device: str) -> Ranks:
    """Join the ``torchrun`` process group (gloo on the CPU, nccl on CUDA); one process: ``Ranks()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        kind = torch.device(device).type
        backend = {"cpu": "gloo", "cuda": "nccl"}.get(kind)
        if backend is None:
            raise InputError.of("--device", f"multi-process training supports cpu and cuda, not {device!r}")
        if kind == "cuda":
            torch.cuda.set_device(ranks.local)
        dist.init_process_group(backend)
    return ranks


def stop(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def rank_device(device: str, ranks: Ranks) -> torch.device:
    """``cuda`` becomes ``cuda:<local rank>`` under torchrun; anything else stays as given."""
    chosen = torch.device(device)
    if chosen.type == "cuda" and ranks.distributed and chosen.index is None:
        return torch.device("cuda", ranks.local)
    return chosen


def local_slice(index: list[int], ranks: Ranks) -> list[int]:
    """This rank's contiguous share of one global batch (the batch size divides by the world size)."""
    share = len(index) // ranks.world
    return index[ranks.rank * share : (ranks.rank + 1) * share]


def wrap(model: torch.nn.Module, ranks: Ranks, fsdp: bool, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 on every adapter module (FT: every Linear) and the root; unchanged in one process."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from dora_analysis.adapters.inject import adapter_modules

        parts = list(adapter_modules(model).values()) or [
            m for m in model.modules() if isinstance(m, torch.nn.Linear)
        ]
        for module in parts:
            fully_shard(module)
        return fully_shard(model)
    if not ranks.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_ranks(value: torch.Tensor, ranks: Ranks) -> float:
    """The mean of a scalar over the ranks (for the logged loss); the value itself in one process."""
    if not ranks.distributed:
        return float(value.detach())
    import torch.distributed as dist

    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)  # SUM: gloo has no AVG
    return float(total) / ranks.world


def full_model(model: torch.nn.Module, shadow: torch.nn.Module | None, fsdp: bool) -> torch.nn.Module | None:
    """The whole model to evaluate and save on rank 0 (None on the others).

    DDP and one process: the wrapped module itself. FSDP2: every rank takes part in gathering the
    full state dict, rank 0 loads it into its unsharded ``shadow`` copy.
    """
    if not fsdp:
        return getattr(model, "module", model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if shadow is None:
        return None
    shadow.load_state_dict(_to_device(state, next(shadow.parameters()).device))
    return shadow


def _to_device(state: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def unsharded_copy(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module | None:
    """Rank 0's unsharded copy of the model (taken before sharding) for evaluation and saving."""
    return copy.deepcopy(model) if ranks.main else None
