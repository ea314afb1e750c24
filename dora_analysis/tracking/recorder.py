"""``train --track-every N``: the hook the training loop calls, writing ``RUN_DIR/deltas.csv``.

The training loop knows no analysis (it may not import it); it calls ``track(model, step)`` at step 0
and every ``track_every`` steps, and this object does the rest: a
:class:`~dora_analysis.tracking.tracker.DecompositionTracker` made on the first call, the rows
written (atomically, whole) after each record by the main process. Under FSDP2 every rank records
(the gathers are collectives); under DDP only the main process does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dora_analysis.tracking.output import write_tracked
from dora_analysis.tracking.tracker import DecompositionTracker

__all__ = ["DELTAS_FILE", "DeltasRecorder"]

DELTAS_FILE = "deltas.csv"


def _main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class DeltasRecorder:
    """Call with ``(model, step)`` to record and write ``output``; see the module docstring.

    Args:
        output: the ``.csv``/``.parquet`` file (the train command: ``RUN_DIR/deltas.csv``).
        run, method, base: the tracker's (see :class:`DecompositionTracker`).
    """

    def __init__(
        self,
        output: str | os.PathLike,
        *,
        run: str | None = None,
        method: str | None = None,
        base: str | os.PathLike | None = None,
    ) -> None:
        self.output = Path(output)
        self.run = run or self.output.parent.name or "run"
        self.method, self.base = method, base
        self.tracker: DecompositionTracker | None = None

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
        main = _main_process()
        if not (main or sharded):
            return
        if self.tracker is None:
            self.tracker = DecompositionTracker(model, self.base, run=self.run, method=self.method)
        self.tracker.record(step)
        if main:
            write_tracked(self.tracker.frame(), self.output)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
