"""The collector's pauses: restored as they were, and young cycles made inside still collected."""

from __future__ import annotations

import gc
import weakref

from dora_analysis.collector import paused_collector, young_collections_only


class Node:
    pass


def test_paused_collector_restores_the_collector_as_it_was():
    assert gc.isenabled()
    with paused_collector():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_collector():
            pass
        assert not gc.isenabled()  # a program that disabled it keeps it disabled
    finally:
        gc.enable()


def test_young_collections_only_collects_young_cycles_and_never_the_older_generations():
    thresholds = gc.get_threshold()
    collected: list[int] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "stop":
            collected.append(info["generation"])

    gc.callbacks.append(watch)
    try:
        with young_collections_only():
            node = Node()
            node.self = node  # a cycle made inside the block
            ref = weakref.ref(node)
            del node
            kept = [
                [] for _ in range(20 * thresholds[0] * thresholds[1])
            ]  # survivors, many young collections
            assert ref() is None  # the young collections ran and freed the cycle
            del kept
    finally:
        gc.callbacks.remove(watch)
    assert collected and set(collected) == {0}
    assert gc.get_threshold() == thresholds
    collected.clear()
    gc.callbacks.append(watch)
    try:  # the same work outside the block collects the older generations too
        kept = [[] for _ in range(20 * thresholds[0] * thresholds[1])]
        del kept
    finally:
        gc.callbacks.remove(watch)
    assert 1 in collected


def test_young_collections_only_leaves_a_disabled_collector_alone():
    thresholds = gc.get_threshold()
    gc.disable()
    try:
        with young_collections_only():
            assert gc.get_threshold() == thresholds and not gc.isenabled()
    finally:
        gc.enable()
