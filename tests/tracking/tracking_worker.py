"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU) by ``test_tracker_distributed.py``, and in the
test's own process for the single-process reference.

Two SGD steps of a tiny BERT classifier (FT, or PEFT DoRA on query/value), every rank on its half of
one global batch, the model plain, DDP-wrapped or sharded with FSDP2 (``fully_shard`` on every
encoder layer, then the root); a :class:`DecompositionTracker` records steps 0, 1 and 2 and the main
process writes the frame to ``OUT/<mode>-<method>.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import dora_analysis


def model_to_train(base: Path, method: str) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(base)
    if method == "ft":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"
    )
    return get_peft_model(model, lora)


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (8, 10), generator=generator)
    return {"input_ids": ids, "labels": torch.randint(0, 2, (8,), generator=generator)}


def train_and_track(
    base: Path, method: str, mode: str, rank: int = 0, world: int = 1
) -> dora_analysis.DecompositionTracker:
    """Two steps of ``mode`` (``single``, ``ddp`` or ``fsdp``) training; the tracker after step 2."""
    torch.manual_seed(0)
    model = model_to_train(base, method)
    wrapped = model
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        layers = model.get_base_model().bert.encoder.layer if method != "ft" else model.bert.encoder.layer
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(hasattr(p, "full_tensor") for p in model.parameters())  # DTensor shards
    tracker = dora_analysis.DecompositionTracker(wrapped, run="run")
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    batch = global_batch()
    mine = {k: v[rank * 8 // world : (rank + 1) * 8 // world] for k, v in batch.items()}
    tracker.record(0)
    for step in (1, 2):
        wrapped(**mine).loss.backward()  # DDP and FSDP average the ranks' gradients
        optimizer.step()
        optimizer.zero_grad()
        tracker.record(step)
    return tracker


if __name__ == "__main__":
    import torch.distributed as dist

    base, out = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in ("ddp", "fsdp"):
        for method in ("ft", "dora"):
            tracker = train_and_track(base, method, mode, rank, world)
            if rank == 0:
                tracker.frame().to_csv(out / f"{mode}-{method}.csv", index=False)
            tracker.close()
    dist.destroy_process_group()
