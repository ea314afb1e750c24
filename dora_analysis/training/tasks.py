"""Labelled text tasks that ship with Python itself (no download): the trainer's default task.

``pydoc-topics``: sentences of Python's own reference documentation (``pydoc_data.topics``, the text
behind ``help("topic")``), each labelled by the topic it comes from. Five topics with distinct
subjects are used (the debugger, compound statements, string methods, format strings, dicts);
a sentence that appears in more than one topic anywhere in ``pydoc_data.topics`` is dropped, so
every label is unambiguous. The held-out split is a hash of the sentence text (about one in four),
so it never depends on the training seed, and the same text always lands on the same side.

The text is whatever the running Python ships: the same interpreter version gives the same task.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dora_analysis.errors import InputError

__all__ = ["TextTask", "TASKS", "DEFAULT_TASK", "load_task", "pydoc_topics", "doc_sentences"]

# Topics of pydoc_data.topics with many sentences and clearly different subjects.
PYDOC_LABELS = ("debugger", "compound", "string-methods", "formatstrings", "typesmapping")
_HELD_OUT_BUCKETS = 4  # one sentence in about four is held out

_SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=[A-Z"“(])')
_CODE_LINE = (">>>", "...", "(Pdb)")


@dataclass(frozen=True)
class TextTask:
    """A sentence classification task with a fixed held-out split.

    ``*_labels[i]`` is an index into ``labels`` for ``*_texts[i]``.
    """

    name: str
    labels: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    eval_texts: tuple[str, ...]
    eval_labels: tuple[int, ...]
    source: str  # where the text and labels come from, in words

    @property
    def majority_accuracy(self) -> float:
        """Held-out accuracy of always answering the most frequent training label (the floor to beat)."""
        most = Counter(self.train_labels).most_common(1)[0][0]
        return sum(label == most for label in self.eval_labels) / max(len(self.eval_labels), 1)


def doc_sentences(text: str) -> Iterator[str]:
    """The prose sentences of one pydoc topic, in order: code examples, short fragments and
    symbol-heavy lines (grammar rules, tables) are skipped."""
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(line.lstrip().startswith(_CODE_LINE) for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            n_words = len(sentence.split())
            if not 6 <= n_words <= 60 or not sentence.endswith((".", "?", "!", ":")):
                continue
            prose = sum(c.isalpha() or c == " " for c in sentence)
            if prose / len(sentence) >= 0.8:
                yield sentence


def _held_out(text: str) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return digest[0] % _HELD_OUT_BUCKETS == 0


def pydoc_topics(labels: tuple[str, ...] = PYDOC_LABELS) -> TextTask:
    """Sentences of ``pydoc_data.topics`` labelled by topic (see the module docstring)."""
    from pydoc_data.topics import topics

    missing = [label for label in labels if label not in topics]
    if missing:
        raise InputError.of("pydoc_data.topics", f"no topic {missing[0]!r} in this Python's documentation")
    per_topic = {name: list(dict.fromkeys(doc_sentences(text))) for name, text in topics.items()}
    seen = Counter(sentence for sentences in per_topic.values() for sentence in sentences)
    train: list[tuple[str, int]] = []
    held: list[tuple[str, int]] = []
    for index, label in enumerate(labels):
        for sentence in per_topic[label]:
            if seen[sentence] == 1:
                (held if _held_out(sentence) else train).append((sentence, index))
    return TextTask(
        name="pydoc-topics",
        labels=tuple(labels),
        train_texts=tuple(text for text, _ in train),
        train_labels=tuple(label for _, label in train),
        eval_texts=tuple(text for text, _ in held),
        eval_labels=tuple(label for _, label in held),
        source="pydoc_data.topics (Python standard library): documentation sentences labelled by topic",
    )


TASKS: dict[str, Callable[[], TextTask]] = {"pydoc-topics": pydoc_topics}
DEFAULT_TASK = "pydoc-topics"


def load_task(name: str = DEFAULT_TASK) -> TextTask:
    """The task called ``name`` (one of :data:`TASKS`); an unknown name is an :class:`InputError`."""
    if name not in TASKS:
        raise InputError.of("--task", f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]()
