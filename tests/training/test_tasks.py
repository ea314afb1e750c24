from __future__ import annotations

import math
from collections import Counter

import pytest

from dora_analysis.errors import InputError
from dora_analysis.training.tasks import DEFAULT_TASK, PYDOC_LABELS, doc_sentences, load_task, pydoc_topics


@pytest.fixture(scope="module")
def task():
    return load_task(DEFAULT_TASK)


def test_every_label_has_examples_on_both_sides(task):
    assert task.labels == PYDOC_LABELS
    train, held = Counter(task.train_labels), Counter(task.eval_labels)
    assert set(train) == set(held) == set(range(len(task.labels)))
    assert min(train.values()) >= 40 and min(held.values()) >= 10
    assert len(task.train_texts) == len(task.train_labels) and len(task.eval_texts) == len(task.eval_labels)
    fraction = len(task.eval_texts) / (len(task.eval_texts) + len(task.train_texts))
    assert 0.15 < fraction < 0.35


def test_split_is_disjoint_unambiguous_and_repeatable(task):
    assert not set(task.train_texts) & set(task.eval_texts)
    label_of: dict[str, int] = {}
    for text, label in zip(
        task.train_texts + task.eval_texts, task.train_labels + task.eval_labels, strict=True
    ):
        assert label_of.setdefault(text, label) == label
    assert len(label_of) == len(task.train_texts) + len(task.eval_texts)  # no duplicates
    again = pydoc_topics()
    assert again == task


def test_sentences_come_from_their_topic(task):
    from pydoc_data.topics import topics

    flat = {name: " ".join(text.split()) for name, text in topics.items()}
    for text, label in list(zip(task.eval_texts, task.eval_labels, strict=True))[:50]:
        assert text in flat[task.labels[label]]


def test_majority_accuracy_is_the_most_frequent_training_label(task):
    most = Counter(task.train_labels).most_common(1)[0][0]
    expected = Counter(task.eval_labels)[most] / len(task.eval_labels)
    assert task.majority_accuracy == pytest.approx(expected)


def test_doc_sentences_skips_code_and_fragments():
    text = (
        "The debugger supports breakpoints and single stepping at the source line level.  It also\n"
        "supports post-mortem debugging of crashed programs.\n\n"
        "   >>> import pdb\n   >>> pdb.run('f(2)')\n\n"
        "Short one.\n\n"
        'x ::= "a" | "b" | "c" | ("d" "e")* [f] {g} <h> ~~ == !!\n'
    )
    assert list(doc_sentences(text)) == [
        "The debugger supports breakpoints and single stepping at the source line level.",
        "It also supports post-mortem debugging of crashed programs.",
    ]


def test_a_small_classifier_beats_the_majority_floor(task):
    """Bag of words, naive Bayes with add-one smoothing: the labels are learnable from the text."""

    def words(text: str) -> list[str]:
        return [w.strip('.,:;"()*').lower() for w in text.split()]

    counts = [Counter() for _ in task.labels]
    for text, label in zip(task.train_texts, task.train_labels, strict=True):
        counts[label].update(words(text))
    vocabulary = set().union(*counts)
    prior = Counter(task.train_labels)
    totals = [sum(c.values()) + len(vocabulary) for c in counts]

    def predict(text: str) -> int:
        scores = [
            math.log(prior[k]) + sum(math.log((counts[k][w] + 1) / totals[k]) for w in words(text))
            for k in range(len(task.labels))
        ]
        return max(range(len(scores)), key=scores.__getitem__)

    accuracy = sum(predict(t) == y for t, y in zip(task.eval_texts, task.eval_labels, strict=True)) / len(
        task.eval_texts
    )
    assert accuracy > 2 * task.majority_accuracy


def test_unknown_task_and_topic_are_input_errors():
    with pytest.raises(InputError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(InputError, match="no topic 'not-a-topic'"):
        pydoc_topics(("debugger", "not-a-topic"))
