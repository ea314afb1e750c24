"""The collector's pauses: restored as they were, and cycles made inside still collected."""

from __future__ import annotations

import gc
import weakref

from dora_analysis.collector import frozen_heap, paused_collector


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


def test_frozen_heap_sets_aside_what_lives_and_still_collects_new_cycles():
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 1000  # the imported modules' objects, at least
        node = Node()
        node.self = node  # a cycle made inside the block
        ref = weakref.ref(node)
        del node
        gc.collect()
        assert ref() is None
    assert gc.get_freeze_count() == 0


def test_frozen_heap_leaves_a_programs_own_freeze_alone(monkeypatch):
    # frozen objects may still be freed meanwhile, so the count is no witness: watch the calls
    calls = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 1000)  # the program froze its objects
    with frozen_heap():
        pass
    assert calls == []
    monkeypatch.setattr(gc, "get_freeze_count", lambda: 0)
    with frozen_heap():
        assert calls == ["freeze"]
    assert calls == ["freeze", "unfreeze"]
