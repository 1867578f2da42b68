"""Explain features and score the explanations, from a feature store.

For each feature: the explainer (an LLM, or the LLM-free :func:`.labels.token_label`) sees the
top activating examples; the scores (:mod:`.scoring`) use examples it did not see: activating
ones drawn one per activation quantile group (Paulo et al. 2024, "Automatically interpreting
millions of features", which samples scoring examples across quantiles) and non-activating
ones, half near misses (windows where a feature with a similar decoder direction fires) and
half random windows. Every record goes to ``explanations.jsonl`` beside the coder's store
files, one JSON line per (feature, explainer, judge), so a long batch resumes where it stopped
and LLM explanations sit next to label scores for comparison.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..coders.run_folder import CoderKey
from .examples import Example
from .labels import Label
from .scoring import LLMJudge, RuleJudge, detection_score, fuzzing_score, pearson, token_simulation_score
from .store import EXPLANATIONS, FeatureRecord, FeatureStore, layer_folder

LABEL_EXPLAINER = "token_label"


@dataclass
class ScoringSet:
    """The examples one feature is explained and scored with.

    ``shown``: top examples the explainer reads; ``activating``: held-out activating examples
    (one per quantile group, highest groups first when there are fewer); ``non_activating``:
    near misses, then random windows.
    """

    shown: list[Example]
    activating: list[Example]
    non_activating: list[Example]


def scoring_set(store: FeatureStore, rec: FeatureRecord, *, n_shown: int = 10, n_activating: int = 10,
                n_non_activating: int = 10, seed: int = 0) -> ScoringSet:
    """Pick the examples for one feature (see :class:`ScoringSet`)."""
    shown_at = {e.where for e in rec.top[:n_shown]}
    groups = [[e for e in g if e.where not in shown_at] for g in rec.quantile_groups()]
    activating: list[Example] = []
    while len(activating) < n_activating and any(groups):
        for g in reversed(groups):
            if g and len(activating) < n_activating:
                activating.append(g.pop(len(g) // 2))
    near = store.near_misses(rec.layer, rec.index, n_non_activating // 2, rec.variant, seed=seed)
    rand = store.random_examples(rec.layer, rec.index, n_non_activating - len(near), rec.variant, seed=seed)
    return ScoringSet(rec.top[:n_shown], activating, near + rand)


def score_explanation(judge, text: str, s: ScoringSet, *, seed: int = 0) -> dict:
    """Detection, fuzzing and (per-example) simulation scores of ``text`` under ``judge``; the
    simulation score (:func:`.scoring.simulation_score`) reuses the detection predictions."""
    det = detection_score(judge, text, s.activating, s.non_activating)
    fuzz = fuzzing_score(judge, text, s.activating, s.non_activating, seed=seed)
    # simulation_score on the same examples would ask the judge the same questions again
    sim = pearson(det.predictions, [e.max_act for e in s.activating + s.non_activating])
    num = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return {"detection": num(det.balanced_accuracy), "detection_auroc": num(det.auroc),
            "fuzzing": num(fuzz.balanced_accuracy), "fuzzing_auroc": num(fuzz.auroc), "simulation": num(sim),
            "n_activating": len(s.activating), "n_non_activating": len(s.non_activating)}


def stored_label(store: FeatureStore, key: CoderKey, index: int) -> Label | None:
    """The LLM-free label recorded for a feature (None for a dead one)."""
    labels = store.labels(key)
    text = labels["labels"].get(str(index))
    if text is None:
        return None
    rule = labels.get("rules", {}).get(str(index), {})
    return Label(text, tuple(rule.get("tokens", ())), tuple(rule.get("context", ())), tuple(rule.get("promotes", ())))


def done_records(path: os.PathLike) -> set[tuple[int, str, str]]:
    """(feature, explainer, judge) of the records already in an ``explanations.jsonl``."""
    done = set()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash: that feature is redone
                done.add((r["index"], r["explainer"], r["judge"]))
    return done


def interpret(store: FeatureStore, key: CoderKey, features: Iterable[int], *, client=None, explainer_name: str = "",
              rule_scores: bool = True, judge_labels: bool = True, seed: int = 0, n_shown: int = 10, n_activating: int = 10,
              n_non_activating: int = 10, log: Callable[[str], None] | None = None) -> list[dict]:
    """Explain and score ``features`` of one coder; append each record to ``explanations.jsonl``
    and return the new ones.

    Records: the LLM-free label scored by the rule judge (``rule_scores``; no LLM needed), and,
    with ``client`` (an :class:`~.llm.LLMClient`): the label scored by the LLM judge, and the
    LLM's own explanation scored by the LLM judge (``judge_labels=False``: the LLM judges only
    its own explanations). Records already in the file are skipped.

    Raises:
        FeatureStoreError: the store lacks the coder or a feature. LLMError: the endpoint fails.
    """
    path = store.folder / layer_folder(key) / EXPLANATIONS
    done = done_records(path)
    judge_name = explainer_name or "llm"
    new = []
    llm_judge = LLMJudge(client) if client is not None else None
    for index in features:
        rec = store.feature(key.layer, index, key.variant)
        if rec.count == 0:
            continue
        label = stored_label(store, key, index)
        s = scoring_set(store, rec, n_shown=n_shown, n_activating=n_activating, n_non_activating=n_non_activating,
                        seed=seed)
        todo: list[tuple[str, str, Callable[[], str], object]] = []
        if label is not None and rule_scores:
            todo.append((LABEL_EXPLAINER, "rule", lambda lab=label: lab.text, RuleJudge(label)))
        if client is not None and llm_judge is not None:
            if label is not None and judge_labels:
                todo.append((LABEL_EXPLAINER, judge_name, lambda lab=label: lab.text, llm_judge))
            from .explain import explain

            # the explainer reads activating examples only: a small model given promoted tokens too
            # tends to repeat them (SmolLM2-135M did) instead of describing what the feature fires on
            todo.append((judge_name, judge_name, lambda shown=s.shown, c=client: explain(c, shown), llm_judge))
        for explainer, jname, text_fn, judge in todo:
            if (index, explainer, jname) in done:
                continue
            text = text_fn()
            scores = score_explanation(judge, text, s, seed=seed)
            if explainer == LABEL_EXPLAINER and jname == "rule" and label is not None:
                scores["token_simulation"] = _num(token_simulation_score(label, s.activating + s.non_activating))
            record = {"layer": key.layer, "variant": key.variant, "index": index, "explainer": explainer,
                      "judge": jname, "text": text, "scores": scores, "frequency": rec.frequency}
            _append(path, record)
            done.add((index, explainer, jname))
            new.append(record)
            if log:
                log(f"L{key} f{index} [{explainer} / {jname}] {text!r}: detection {_fmt(scores['detection'])}, "
                    f"fuzzing {_fmt(scores['fuzzing'])}, simulation {_fmt(scores['simulation'])}")
    return new


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _append(path, record: dict) -> None:
    """Append one JSON line and fsync it (a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_explanations(store: FeatureStore, key: CoderKey) -> list[dict]:
    """Every record of a coder's ``explanations.jsonl`` (complete lines only)."""
    path = store.folder / layer_folder(key) / EXPLANATIONS
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out
