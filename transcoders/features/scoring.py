"""Scores for an explanation of a feature, whoever wrote it (an LLM, or :func:`token_label`).

A *judge* reads the explanation and predicts, for each example, the probability that it
matches. Three scores compare these predictions with the feature's real activations:

* **Detection** (Paulo et al. 2024, "Automatically interpreting millions of features in large
  language models"): can the judge tell windows where the feature fires from windows where it
  is silent? Balanced accuracy and AUROC; chance is 0.5 for both.
* **Fuzzing** (same paper): activating windows with their truly activating tokens marked
  (correct) against windows with as many randomly chosen tokens marked (incorrect). Does the
  explanation pick out the right tokens, not just the right texts? Balanced accuracy and AUROC;
  chance is 0.5.
* **Simulation** (Bills et al. 2023, "Language models can explain neurons in language
  models"): the correlation of predicted with true activations; chance is 0. Bills et al.
  simulate every token; a small judge can't, so :func:`simulation_score` correlates one
  prediction per example with the example's max activation. :func:`token_simulation_score`
  scores a :class:`Label` per token, as Bills et al. do, since its rule is a token simulator.

Conventions: a prediction ``p`` counts as positive when ``p > 0.5``, negative when
``p < 0.5``, and ``p == 0.5`` counts half right whatever the truth (a judge that always says
0.5 scores exactly 0.5). AUROC is rank-based with tied scores sharing their mean rank (ties
count half). Scores that are undefined (one class empty; a constant input to a correlation)
are NaN.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from transcoders.features.examples import Example
from transcoders.features.explain import crop, render_marked
from transcoders.features.labels import Label, rule_predict


class ChatModel(Protocol):
    """What the scores need of a language model (duck-typed; see ``transcoders.features.llm``)."""

    def chat(self, messages: list[dict], *, max_tokens: int = 200, temperature: float = 0.0) -> str:
        """The model's reply to a chat."""
        ...

    def choice_logprobs(self, messages: list[dict], choices: Sequence[str]) -> dict[str, float]:
        """Log-probability of each choice as the first token of the reply (-inf when not among the top)."""
        ...


class Judge(Protocol):
    """Reads an explanation and predicts which examples (or marked tokens) match it."""

    def predict(self, explanation: str, examples: list[Example], *, marked: list[list[int]] | None = None) -> list[float]:
        """One probability in [0, 1] per example.

        Without ``marked`` (detection): that the example contains what the explanation
        describes. With ``marked`` (fuzzing; token indices highlighted in each example): that the
        highlighted tokens are the ones the explanation describes.
        """
        ...


# --------------------------------------------------------------------------- metrics


def _check(predictions: Sequence[float], labels: Sequence[int]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if any(y not in (0, 1) for y in labels):
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels))}")


def balanced_accuracy(predictions: Sequence[float], labels: Sequence[int], threshold: float = 0.5) -> float:
    """Mean of the accuracy on positives and the accuracy on negatives; chance level is 0.5.

    A prediction above ``threshold`` says positive, below says negative, and exactly at the
    threshold counts half right. NaN when either class is empty.
    """
    _check(predictions, labels)
    right = [0.0, 0.0]
    count = [0, 0]
    for p, y in zip(predictions, labels):
        count[y] += 1
        if p == threshold:
            right[y] += 0.5
        elif (p > threshold) == (y == 1):
            right[y] += 1.0
    if not count[0] or not count[1]:
        return math.nan
    return 0.5 * (right[0] / count[0] + right[1] / count[1])


def auroc(predictions: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative.

    Computed from ranks (Mann-Whitney U): tied scores get the mean of their ranks, so a tied
    positive-negative pair counts half. Chance level is 0.5. NaN when either class is empty.
    """
    _check(predictions, labels)
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return math.nan
    order = sorted(range(len(predictions)), key=lambda i: predictions[i])
    ranks = [0.0] * len(order)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and predictions[order[j + 1]] == predictions[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # ranks are 1-based
        for k in range(i, j + 1):
            ranks[order[k]] = mean_rank
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; chance level is 0. NaN with fewer than 2 points or a constant input."""
    if len(x) != len(y):
        raise ValueError(f"correlation of {len(x)} values with {len(y)} values")
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    a = a - a.mean()
    b = b - b.mean()
    r = float(a @ b / math.sqrt(float(a @ a) * float(b @ b)))
    return max(-1.0, min(1.0, r))


@dataclass(frozen=True)
class Score:
    """A detection or fuzzing score.

    Attributes:
        balanced_accuracy: of thresholding the predictions at 0.5 (chance 0.5; NaN with a class empty).
        auroc: of the predictions (chance 0.5; NaN with a class empty).
        n_positive: examples that match (activating windows; correctly marked windows).
        n_negative: examples that don't.
        predictions: the judge's probability for each example.
        labels: 1 for a positive example, 0 for a negative one, in the order of ``predictions``.
    """

    balanced_accuracy: float
    auroc: float
    n_positive: int
    n_negative: int
    predictions: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, predictions: Sequence[float], labels: Sequence[int]) -> Score:
        """The score of ``predictions`` against ``labels``."""
        predictions = [float(p) for p in predictions]
        labels = [int(y) for y in labels]
        return cls(
            balanced_accuracy(predictions, labels),
            auroc(predictions, labels),
            sum(labels),
            len(labels) - sum(labels),
            predictions,
            labels,
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN scores become None)."""

        def num(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "balanced_accuracy": num(self.balanced_accuracy),
            "auroc": num(self.auroc),
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "predictions": list(self.predictions),
            "labels": list(self.labels),
        }


# --------------------------------------------------------------------------- judges


def yes_probability(logprobs: dict[str, float], yes: str = "Yes", no: str = "No") -> float:
    """Softmax of the ``yes`` and ``no`` log-probs (missing counts as -inf); 0.5 when both are -inf."""
    a = logprobs.get(yes, -math.inf)
    b = logprobs.get(no, -math.inf)
    if math.isnan(a) or math.isnan(b):
        raise ValueError(f"NaN log-probability in {logprobs}")
    if a == -math.inf and b == -math.inf:
        return 0.5
    if a == -math.inf:
        return 0.0
    if b == -math.inf:
        return 1.0
    d = b - a
    return 1.0 / (1.0 + math.exp(d)) if d < 700 else 0.0


_JUDGE_SYSTEM = "You check whether an explanation of a language model feature fits a text. Answer Yes or No."


class LLMJudge:
    """A judge that asks a chat model, one short request per example.

    Detection asks whether the text contains what the explanation describes; fuzzing shows the
    marked tokens ``<<like this>>`` and asks whether they are what it describes. The probability
    is the softmax over the model's log-probs of answering ``Yes`` and ``No``. Texts are cropped
    to ``window`` tokens, around the example's centre (detection: the position the example was
    drawn for, which doesn't reveal the activations) or its marks (fuzzing).
    """

    def __init__(self, model: ChatModel, *, window: int = 32) -> None:
        self.model = model
        self.window = window

    def messages(self, explanation: str, example: Example, marked: Sequence[int] | None = None) -> list[dict]:
        """The chat asked about one example."""
        n = len(example.tokens)
        if marked is None:
            start, end = crop(n, example.center, self.window)
            text = render_marked(example.tokens, (), start, end).strip()
            question = "Does the text contain what the explanation describes? Answer Yes or No."
        else:
            focus = sorted(marked)[len(marked) // 2] if marked else example.center
            start, end = crop(n, focus, self.window)
            text = render_marked(example.tokens, marked, start, end).strip()
            question = "Are the tokens marked <<like this>> what the explanation describes? Answer Yes or No."
        user = f"Explanation: {explanation}\nText: {text}\n{question}"
        return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]

    def predict(self, explanation: str, examples: list[Example], *, marked: list[list[int]] | None = None) -> list[float]:
        if marked is not None and len(marked) != len(examples):
            raise ValueError(f"{len(marked)} markings for {len(examples)} examples")
        out = []
        for i, example in enumerate(examples):
            messages = self.messages(explanation, example, None if marked is None else marked[i])
            out.append(yes_probability(self.model.choice_logprobs(messages, ["Yes", "No"])))
        return out


class RuleJudge:
    """A judge that reads a :class:`Label` with :func:`rule_predict`, not the explanation text.

    Detection: the largest predicted token activation in the window (1.0 when a label token
    appears, :data:`~transcoders.features.labels.UNCUED` when it appears without the label's
    context cue, 0.0 otherwise). Fuzzing: the mean prediction over the marked tokens, so all
    marks on label tokens give 1.0, none give 0.0, and exactly half give 0.5, which counts as
    a tie; a window with no marks gives 0.0.
    """

    def __init__(self, label: Label) -> None:
        self.label = label

    def predict(self, explanation: str, examples: list[Example], *, marked: list[list[int]] | None = None) -> list[float]:
        del explanation  # the rule is the label's, whatever text it is shown with
        if marked is not None and len(marked) != len(examples):
            raise ValueError(f"{len(marked)} markings for {len(examples)} examples")
        out = []
        for i, example in enumerate(examples):
            pred = rule_predict(self.label, example)
            if marked is None:
                out.append(max(pred, default=0.0))
            else:
                m = marked[i]
                out.append(sum(pred[j] for j in m) / len(m) if m else 0.0)
        return out


# --------------------------------------------------------------------------- scores


def _predict(judge: Judge, explanation: str, examples: list[Example], marked: list[list[int]] | None = None) -> list[float]:
    preds = [float(p) for p in judge.predict(explanation, examples, marked=marked)]
    if len(preds) != len(examples):
        raise ValueError(f"the judge gave {len(preds)} predictions for {len(examples)} examples")
    bad = [p for p in preds if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"the judge's predictions must be probabilities in [0, 1], got {bad[:5]}")
    return preds


def detection_score(judge: Judge, explanation: str, activating: Sequence[Example], non_activating: Sequence[Example]) -> Score:
    """Detection (Paulo et al. 2024): does the judge tell activating from non-activating windows?

    The judge predicts each window without marks; activating windows are the positives.
    Balanced accuracy (threshold 0.5, ties half right) and AUROC, chance 0.5 for both.
    ``Score.predictions`` lists the activating windows first, then the non-activating ones.
    """
    examples = list(activating) + list(non_activating)
    labels = [1] * len(activating) + [0] * len(non_activating)
    return Score.of(_predict(judge, explanation, examples), labels)


def fuzzing_items(
    activating: Sequence[Example],
    non_activating: Sequence[Example] | None = None,
    *,
    seed: int = 0,
) -> tuple[list[Example], list[list[int]], list[int]]:
    """The examples, markings and labels (1 correct, 0 incorrect) that :func:`fuzzing_score` shows.

    Correct: every activating example with its activating tokens (activation > 0) marked.
    Incorrect: as many items again, each marking as many tokens as a correct item, chosen at
    random (``seed``). Without ``non_activating`` they are all activating examples with random
    *silent* tokens marked; with it, half (rounded up) are those and the rest are
    non-activating examples with random tokens marked. An activating example that is active on
    every token has no silent token to mark and gives no incorrect item.
    """
    rng = random.Random(seed)
    act = [e for e in activating if e.activating]
    examples: list[Example] = []
    marks: list[list[int]] = []
    labels: list[int] = []
    counts: list[int] = []
    for e in act:
        m = [i for i, a in enumerate(e.acts) if a > 0]
        examples.append(e)
        marks.append(m)
        labels.append(1)
        counts.append(len(m))

    n = len(act)
    silent = [e for e in (non_activating or ()) if e.tokens]
    n_from_act = n if not silent else (n + 1) // 2
    order = rng.sample(range(n), n)
    for idx in order[:n_from_act]:
        e = act[idx]
        free = [i for i, a in enumerate(e.acts) if a <= 0]
        if not free:
            continue
        examples.append(e)
        marks.append(sorted(rng.sample(free, min(counts[idx], len(free)))))
        labels.append(0)
    if silent:
        pool = rng.sample(silent, len(silent))
        for k, idx in enumerate(order[n_from_act:]):
            e = pool[k % len(pool)]
            examples.append(e)
            marks.append(sorted(rng.sample(range(len(e.tokens)), min(counts[idx], len(e.tokens)))))
            labels.append(0)
    return examples, marks, labels


def fuzzing_score(
    judge: Judge,
    explanation: str,
    activating: Sequence[Example],
    non_activating: Sequence[Example] | None = None,
    *,
    seed: int = 0,
) -> Score:
    """Fuzzing (Paulo et al. 2024): does the judge tell correctly from randomly marked tokens?

    The items are built by :func:`fuzzing_items` (correct: activating examples with their
    activating tokens marked; incorrect: the same number of items with the same numbers of
    random tokens marked, seeded by ``seed``). Balanced accuracy (threshold 0.5, ties half
    right) and AUROC, chance 0.5 for both.
    """
    examples, marks, labels = fuzzing_items(activating, non_activating, seed=seed)
    return Score.of(_predict(judge, explanation, examples, marks), labels)


def simulation_score(judge: Judge, explanation: str, examples: Sequence[Example]) -> float:
    """Simulation (after Bills et al. 2023), per example: chance level 0, perfect 1.

    The Pearson correlation between the judge's detection probability for each example and the
    example's true max activation. Bills et al. predict every token's activation; a small judge
    answering Yes/No can't, so this scores one prediction per example. Use a sample that spans
    the activation range (quantile examples and silent windows), or the correlation says little.
    NaN when it is undefined: fewer than two examples, or the predictions or the activations
    all equal.
    """
    examples = list(examples)
    return pearson(_predict(judge, explanation, examples), [e.max_act for e in examples])


def token_simulation_score(label: Label, examples: Sequence[Example]) -> float:
    """Simulation of a :class:`Label` per token (Bills et al. 2023): chance level 0, perfect 1.

    The Pearson correlation, over every token of every example, between :func:`rule_predict`
    and the true activations. NaN when undefined (e.g. the label predicts no token, or no token
    activates).
    """
    predicted: list[float] = []
    true: list[float] = []
    for e in examples:
        predicted.extend(rule_predict(label, e))
        true.extend(e.acts)
    return pearson(predicted, true)
