"""The task's sentences as batches: a fixed subset, token ids, padding, and the held-out evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Encoded", "subset", "encode", "batch", "train_batches", "evaluate"]


def hash_order(texts: Sequence[str]) -> list[int]:
    return sorted(range(len(texts)), key=lambda i: hashlib.sha256(texts[i].encode("utf-8")).digest())


def subset(texts: Sequence[str], labels: Sequence[int], limit: int | None) -> tuple[list[str], list[int]]:
    """The first ``limit`` examples in a fixed hash order (seed-independent, mixes the labels)."""
    if limit is None or limit >= len(texts):
        return list(texts), list(labels)
    keep = sorted(hash_order(texts)[:limit])
    return [texts[i] for i in keep], [labels[i] for i in keep]


@dataclass(frozen=True)
class Encoded:
    ids: list[list[int]]  # token ids per sentence, unpadded
    labels: torch.Tensor  # (n,) int64


def encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[int], max_length: int) -> Encoded:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids=[list(x) for x in ids], labels=torch.tensor(list(labels), dtype=torch.long))


def batch(data: Encoded, index: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen sentences to the longest of them: input_ids/attention_mask ``(b, t)``, labels ``(b,)``."""
    width = max(len(data.ids[i]) for i in index)
    input_ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        input_ids[row, : len(data.ids[i])] = torch.tensor(data.ids[i])
        mask[row, : len(data.ids[i])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": data.labels[list(index)]}


def train_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless (epoch, indices) batches: a fresh seeded permutation per epoch, last partial batch dropped
    when there are enough examples to fill one."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        size = min(batch_size, n)
        for start in range(0, n - size + 1, size):
            yield epoch, order[start : start + size]
        epoch += 1


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: Encoded,
    pad_id: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Held-out ``{"eval_loss", "eval_accuracy"}`` (the model is put back in its previous mode).

    ``device``: where the batches go (default: the model's first parameter's device)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    n = len(data.ids)
    for start in range(0, n, batch_size):
        inputs = batch(data, range(start, min(start + batch_size, n)), pad_id)
        labels = inputs["labels"]
        output = model(**{k: v.to(device) for k, v in inputs.items()})
        loss_sum += float(output.loss) * len(labels)
        correct += int((output.logits.argmax(-1).cpu() == labels).sum())
    model.train(was_training)
    return {"eval_loss": loss_sum / max(n, 1), "eval_accuracy": correct / max(n, 1)}
