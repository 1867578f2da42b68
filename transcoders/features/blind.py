"""Blind case studies (Dunefsky, Chlenski & Nanda 2024, arXiv 2406.11944, Sec. 4.4): guess what a
feature does from input-invariant evidence alone, then look at its activations and score the guess.

Two steps, so that the guess is written down before anything reveals the answer:

1. :func:`pick` draws random *live* features (they fire in the feature store) and
   :func:`evidence` collects only what the paper allowed from weights: the de-embedding (which
   token embeddings excite or inhibit the feature along the direct path), the pullback into the
   previous layer's features with each one's own de-embedding (input-invariant two-step paths
   token -> feature -> feature), the heads whose OV circuits write into it, and the logit
   effects (what it writes). No activations, examples, frequencies or labels are shown.
2. The researcher writes a hypothesis per feature: a sentence, and the tokens it should fire on
   (``tokens``, optionally ``context``: the token just before). :func:`score_hypothesis` reads
   them as a :class:`~transcoders.features.labels.Label` and scores it with the rule judge of the
   explanation scorers (detection and fuzzing, Paulo et al. 2024) on held-out activating windows
   against near misses and random windows, beside the store's own LLM-free label as a reference.

A hypothesis is a *success* when its detection balanced accuracy is at least
:data:`SUCCESS` (0.75), *partial* from :data:`PARTIAL` (0.6), else a *failure*.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..coders.run_folder import CoderKey
from .interpret import score_explanation, scoring_set, stored_label
from .labels import Label
from .scoring import RuleJudge
from .store import ACTS, FeatureStore

SUCCESS = 0.75
PARTIAL = 0.6


class BlindError(ValueError):
    """The blind study cannot be drawn or scored (too few live features, missing hypotheses)."""


def pick(store: FeatureStore, n: int, seed: int, *, layers: Sequence[int] | None = None,
         min_count: int = 20) -> list[tuple[int, int]]:
    """``n`` random live ``(layer, feature)`` pairs: a layer uniformly among ``layers`` (default:
    every non-sweep coder of the store), then a feature uniformly among that layer's live ones
    (at least ``min_count`` activating tokens in the store, so that held-out activating windows
    exist to score a hypothesis on), without repeats.

    Raises:
        BlindError: fewer than ``n`` live features in those layers, or no such layer.
    """
    keys = [k for k in store.keys if not k.variant and (layers is None or k.layer in layers)]
    if not keys:
        raise BlindError(f"the store {store.folder} has none of the layers {list(layers or [])}; "
                         f"it has {sorted(k.layer for k in store.keys)}")
    live = {}
    for key in keys:
        counts = store.tensor(key, ACTS, "count")
        live[key.layer] = [int(i) for i in (counts >= max(min_count, 1)).nonzero().flatten()]
    total = sum(len(v) for v in live.values())
    if total < n:
        raise BlindError(f"only {total} features fire at least {min_count} times in layers {sorted(live)}; ask for at "
                         f"most {total}")
    rng = random.Random(seed)
    chosen: list[tuple[int, int]] = []
    while len(chosen) < n:
        layer = rng.choice(sorted(layer for layer, v in live.items() if v))
        feat = live[layer].pop(rng.randrange(len(live[layer])))
        chosen.append((layer, feat))
    return chosen


def _tokens(pairs, k: int) -> list[str]:
    return [t for t, _ in pairs[:k]]


def evidence(store: FeatureStore, layer: int, feature: int, *, k: int = 8, k_pullback: int = 5) -> dict:
    """The input-invariant evidence of one feature (module docstring), read from the store's
    weight tables: ``{"layer", "feature", "deembedding": {"top", "bottom"}, "pullback": [{"feature",
    "weight", "deembedding"}], "ov_heads": [[layer, head, score]], "promotes", "suppresses"}``."""
    rec = store.feature(layer, feature, examples=())
    de = rec.deembedding
    out = {"layer": layer, "feature": feature,
           "deembedding": {"top": _tokens([p for p in de if p[1] > 0], k),
                           "bottom": _tokens(sorted([p for p in de if p[1] < 0], key=lambda p: p[1]), k)},
           "promotes": _tokens(rec.logit_top, k), "suppresses": _tokens(rec.logit_bottom, k),
           "ov_heads": [list(h) for h in rec.ov_heads[:k_pullback]], "pullback": []}
    if layer > 0 and CoderKey(layer - 1) in store.keys:
        for j, w in rec.pullback[:k_pullback]:
            up = store.feature(layer - 1, int(j), examples=())
            out["pullback"].append({"feature": int(j), "weight": float(w),
                                    "deembedding": _tokens([p for p in up.deembedding if p[1] > 0], 5)})
    return out


def evidence_markdown(items: Sequence[dict]) -> str:
    """The evidence of every picked feature, for the researcher to read (no activations)."""
    lines = ["# Blind case study: evidence", "",
             "Input-invariant evidence only. Write a hypothesis for each feature in hypotheses.jsonl "
             "(`hypothesis`: a sentence; `tokens`: the tokens it should fire on; optional `context`: the token "
             "just before), then run the same command with --reveal.", ""]
    for i, e in enumerate(items):
        lines += [f"## {i + 1}. feature {e['layer']}.{e['feature']}", "",
                  f"- de-embedding, excites: {', '.join(map(repr, e['deembedding']['top']))}",
                  f"- promotes (logit effects): {', '.join(map(repr, e['promotes']))}",
                  f"- suppresses: {', '.join(map(repr, e['suppresses']))}"]
        if e["deembedding"]["bottom"]:
            lines.append(f"- de-embedding, inhibits: {', '.join(map(repr, e['deembedding']['bottom']))}")
        if e["ov_heads"]:
            lines.append("- heads whose OV circuits write most into it: "
                         + ", ".join(f"{h[0]}.{h[1]} ({h[2]:.2f})" for h in e["ov_heads"]))
        for p in e["pullback"]:
            lines.append(f"- pullback: layer {e['layer'] - 1} feature {p['feature']} (virtual weight {p['weight']:+.3f}), "
                         f"whose de-embedding excites {', '.join(map(repr, p['deembedding']))}")
        lines.append("")
    return "\n".join(lines)


def verdict(detection: float | None) -> str:
    """``success`` / ``partial`` / ``failure`` from a detection balanced accuracy (None: failure)."""
    if detection is None:
        return "failure"
    return "success" if detection >= SUCCESS else "partial" if detection >= PARTIAL else "failure"


def score_hypothesis(store: FeatureStore, layer: int, feature: int, hypothesis: dict, *, seed: int = 0,
                     n_reveal: int = 5) -> dict:
    """Score one written hypothesis with the rule judge and reveal the feature.

    Args:
        hypothesis: ``{"hypothesis": str, "tokens": [str, ...], "context": [str] (optional)}``.

    Returns:
        ``{"layer", "feature", "hypothesis", "tokens", "scores": {...}, "verdict", "label",
        "label_scores", "examples": [text with the peak token in brackets, ...]}``.

    Raises:
        BlindError: the hypothesis names no token.
    """
    tokens = tuple(hypothesis.get("tokens") or ())
    if not tokens:
        raise BlindError(f"feature {layer}.{feature}: the hypothesis names no token; give the tokens it should fire "
                         "on in \"tokens\" (e.g. [\" the\"])")
    rec = store.feature(layer, feature)
    s = scoring_set(store, rec, seed=seed)
    guess = Label(str(hypothesis.get("hypothesis", "")), tokens, tuple(hypothesis.get("context") or ()))
    scores = score_explanation(RuleJudge(guess), guess.text, s, seed=seed)
    label = stored_label(store, CoderKey(layer), feature)
    label_scores = score_explanation(RuleJudge(label), label.text, s, seed=seed) if label and not label.dead else None
    shown = []
    for ex in rec.top[:n_reveal]:
        peak = max(range(len(ex.acts)), key=lambda i: ex.acts[i])
        lo = max(0, peak - 12)
        shown.append("".join(ex.tokens[lo:peak]) + "[[" + ex.tokens[peak] + "]]" + "".join(ex.tokens[peak + 1 : peak + 4]))
    return {"layer": layer, "feature": feature, "hypothesis": guess.text, "tokens": list(tokens),
            "context": list(guess.context), "scores": scores, "verdict": verdict(scores["detection"]),
            "label": label.text if label else None, "label_scores": label_scores, "examples": shown}


def tally(results: Sequence[dict]) -> dict[str, int]:
    """How many successes, partial successes and failures."""
    out = {"success": 0, "partial": 0, "failure": 0}
    for r in results:
        out[r["verdict"]] += 1
    return out


def reveal_markdown(results: Sequence[dict]) -> str:
    """The scored hypotheses, the revealed examples and the tally."""
    t = tally(results)
    lines = ["# Blind case study: revealed", "",
             f"Tally: {t['success']} successes, {t['partial']} partial, {t['failure']} failures "
             f"(detection balanced accuracy >= {SUCCESS}: success; >= {PARTIAL}: partial).", "",
             "| feature | hypothesis | tokens | detection | fuzzing | verdict | store's LLM-free label | its detection |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    for r in results:
        ls = r["label_scores"] or {}
        lines.append(f"| {r['layer']}.{r['feature']} | {r['hypothesis']} | {', '.join(map(repr, r['tokens']))} | "
                     f"{fmt(r['scores']['detection'])} | {fmt(r['scores']['fuzzing'])} | {r['verdict']} | "
                     f"{r['label'] or ''} | {fmt(ls.get('detection'))} |")
    for r in results:
        lines += ["", f"## {r['layer']}.{r['feature']}: top examples (peak in [[ ]])", ""]
        lines += [f"- {ex!r}" for ex in r["examples"]]
    return "\n".join(lines) + "\n"


__all__ = ["BlindError", "PARTIAL", "SUCCESS", "evidence", "evidence_markdown", "pick", "reveal_markdown",
           "score_hypothesis", "tally", "verdict"]
