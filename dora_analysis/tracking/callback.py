"""ΔM and ΔD while ``transformers.Trainer`` trains: :class:`DecompositionCallback`.

At the start of training (step 0) and every ``every`` optimizer steps (and at the last step) the
callback records the model through a :class:`~dora_analysis.tracking.tracker.DecompositionTracker`,
keeps the rows, writes them to ``output`` (CSV or Parquet by suffix; the whole file replaced
atomically at every checkpoint save, at the end, and at most every ``flush_seconds`` otherwise), and
adds the per-module means (``dora/<module>/delta_magnitude``, ``dora/<module>/delta_direction``) to
the next log the Trainer makes. An evaluation at a recorded step fills that step's ``eval_metric``,
``eval_metric_name`` and ``eval_loss`` as :func:`dora_analysis.analyze_series` would.

Resuming (``trainer.train(resume_from_checkpoint=...)``) reads ``output`` back and keeps the rows up
to the resumed step: the later ones are recorded again, never twice. Under DDP only the main process
records and writes; under FSDP2 every rank records (the shards are gathered one tensor at a time)
and the main process writes.

Loggers see the means only if they run after this callback: ``Trainer(callbacks=[...])`` puts user
callbacks after the reporting ones (TensorBoard, W&B), so use :meth:`DecompositionCallback.add_to`
(which puts it first) where they should show them. ``trainer_state.json``'s log history gets them
either way.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from transformers import TrainerCallback

from dora_analysis.schema import default_metric
from dora_analysis.tracking.output import frame_format, read_tracked, rows_up_to, write_tracked
from dora_analysis.tracking.tracker import DecompositionTracker, module_means

__all__ = ["DecompositionCallback"]


class DecompositionCallback(TrainerCallback):
    """Record ΔM and ΔD every ``every`` optimizer steps of a ``transformers.Trainer`` run.

    Args:
        every: record every this many optimizer steps (and at step 0 and the last step).
        output: the ``.csv`` or ``.parquet`` file to write; default ``<output_dir>/deltas.csv``.
        base: the pre-trained checkpoint (see :class:`DecompositionTracker`; default: the frozen
            weights in a PEFT model, the model's ``name_or_path`` for full fine-tuning).
        run: the ``run`` column (default: the name of the Trainer's ``output_dir``).
        flush_seconds: also rewrite ``output`` after a record when this long has passed since the
            last write (saves and the end of training always write).
        log_means: add the per-module means to the Trainer's logs.
        tracker_options: passed to :class:`DecompositionTracker` (``include``, ``exclude``,
            ``layout``, ``method``, ``device``).

    Example:
        >>> callback = DecompositionCallback(every=10, output="runs/dora/deltas.csv")  # doctest: +SKIP
        >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
        >>> callback.frame()                                                         # doctest: +SKIP
    """

    def __init__(
        self,
        every: int = 50,
        output: str | os.PathLike | None = None,
        base: str | os.PathLike | None = None,
        *,
        run: str | None = None,
        flush_seconds: float = 60.0,
        log_means: bool = True,
        **tracker_options: Any,
    ) -> None:
        if int(every) < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if output is not None:
            frame_format(output)  # a bad suffix fails now, not after the first steps
        self.every = int(every)
        self.output = None if output is None else Path(output)
        self.base = base
        self.run = run
        self.flush_seconds = float(flush_seconds)
        self.log_means = log_means
        self.tracker_options = tracker_options
        self.tracker: DecompositionTracker | None = None
        self._pending: dict[str, float] = {}
        self._evals: dict[int, tuple[str | None, float, float]] = {}
        self._written = 0.0
        self._records = False
        self._writes = False

    def add_to(self, trainer: Any) -> DecompositionCallback:
        """Register with ``trainer`` ahead of its other callbacks, so reporters log the means."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # --------------------------------------------------------------------------- Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.output is None:
            self.output = Path(args.output_dir) / "deltas.csv"
        self._writes = bool(state.is_world_process_zero)
        sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
        self._records = self._writes or sharded  # FSDP2: every rank takes part in the gathers
        if not self._records:
            return
        if self.tracker is not None:
            self.tracker.close()
        run = self.run or Path(args.output_dir).name or "run"
        self.tracker = DecompositionTracker(model, self.base, run=run, **self.tracker_options)
        step = int(state.global_step)
        if step > 0 and self.output.is_file():
            self.tracker.keep(rows_up_to(read_tracked(self.output), step))
        recorded = set(self.tracker.frame()["step"].dropna().astype(int))
        if (step == 0 or step % self.every == 0) and step not in recorded:
            self._record(step)

    def on_step_end(self, args, state, control, **kwargs):
        step = int(state.global_step)
        if self.tracker is not None and (step % self.every == 0 or step == state.max_steps):
            self._record(step)
            if time.monotonic() - self._written >= self.flush_seconds:
                self.flush()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        name = default_metric(metrics)
        value = metrics.get(name, math.nan) if name else math.nan
        self._evals[int(state.global_step)] = (name, float(value), float(metrics.get("eval_loss", math.nan)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)
            self._pending = {}

    def on_save(self, args, state, control, **kwargs):
        self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()
        if self.tracker is not None:
            self.tracker.close()

    # ------------------------------------------------------------------------------ the frame

    def frame(self) -> pd.DataFrame:
        """Every row recorded so far (with the evaluations logged at recorded steps)."""
        if self.tracker is None:
            raise RuntimeError("nothing recorded yet: the callback records once training begins")
        frame = self.tracker.frame()
        for step, (name, metric, loss) in self._evals.items():
            at = frame["step"] == step
            if at.any():
                frame.loc[at, ["eval_metric_name", "eval_metric", "eval_loss"]] = [name, metric, loss]
        return frame

    def flush(self) -> None:
        """Write the frame to ``output`` now (main process only)."""
        if self.tracker is not None and self._writes and self.output is not None:
            write_tracked(self.frame(), self.output)
            self._written = time.monotonic()

    def _record(self, step: int) -> None:
        assert self.tracker is not None
        rows = self.tracker.record(step)
        if self.log_means:
            self._pending = module_means(rows)
