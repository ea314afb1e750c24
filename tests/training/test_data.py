"""The task's sentences as batches (training/data.py): a fixed subset, padding, seeded epochs."""

from __future__ import annotations

import hashlib
from itertools import islice

import torch

from dora_analysis.training.data import Encoded, batch, subset, train_batches


def test_subset_is_the_first_in_hash_order_kept_in_input_order():
    texts = [f"sentence {i}" for i in range(20)]
    labels = [i % 3 for i in range(20)]
    kept, kept_labels = subset(texts, labels, 5)
    by_hash = sorted(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).digest())[:5]
    assert set(kept) == set(by_hash) and kept == [t for t in texts if t in set(by_hash)]
    assert kept_labels == [labels[texts.index(t)] for t in kept]
    assert subset(texts, labels, None) == (texts, labels) and subset(texts, labels, 99) == (texts, labels)


def test_batch_pads_to_the_longest_chosen_sentence():
    data = Encoded(ids=[[5, 6, 7], [8], [9, 10]], labels=torch.tensor([1, 0, 2]))
    got = batch(data, [1, 2], pad_id=0)
    assert got["input_ids"].tolist() == [[8, 0], [9, 10]]
    assert got["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert got["labels"].tolist() == [0, 2]


def test_train_batches_cover_each_epoch_once_and_repeat_with_the_seed():
    def first(n_batches, seed):
        return list(islice(train_batches(10, 4, torch.Generator().manual_seed(seed)), n_batches))

    batches = first(4, seed=3)  # 10 examples, batches of 4: two per epoch, the last two dropped
    assert [epoch for epoch, _ in batches] == [0, 0, 1, 1]
    for epoch in (0, 1):
        seen = [i for e, idx in batches if e == epoch for i in idx]
        assert len(seen) == 8 and len(set(seen)) == 8 and set(seen) <= set(range(10))
    assert first(4, seed=3) == batches and first(4, seed=4) != batches
    assert len(first(1, seed=0)[0][1]) == 4
    small = list(islice(train_batches(3, 8, torch.Generator().manual_seed(0)), 2))
    assert [sorted(idx) for _, idx in small] == [[0, 1, 2], [0, 1, 2]]  # fewer than a batch: all of them
