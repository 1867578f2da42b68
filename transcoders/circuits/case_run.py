"""One task's case study, end to end (``transcoders task study``): every prompt studied
(:func:`~transcoders.circuits.case_study.study_prompt`), task-wide features chosen on the first
prompts and checked on the rest, the chosen features described from weights (logit effects,
de-embeddings, virtual weights among them) and from the feature store when one matches.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence

from .case_report import summarize
from .case_study import CaseStudyError, FreePD, feature_frequency, global_variant, study_prompt


def _tokens_text(tokenizer, ids: Sequence[int]) -> list[str]:
    return tokenizer.batch_decode([[int(i)] for i in ids])


def describe_features(adapter, coders, tokenizer, features: Sequence[tuple[int, int]], *, store=None,
                      k: int = 6) -> tuple[list[dict], list[dict]]:
    """For each ``(layer, feature)``: its label (feature store, when it holds these weights), the
    ``k`` tokens it promotes most directly (logit effects), its de-embedding's top ``k`` tokens
    (Dunefsky et al. 2024, Sec. 4.1), and the virtual weights from every earlier feature of the
    list into it (``W_dec_i . N(W_enc_j)``, the change of ``j``'s pre-activation per unit of
    ``i``'s activation along the direct path).

    Returns:
        ``(features, virtual_weights)``: a dict per feature and ``[{"from", "to", "weight"}]``.
    """
    from ..coders.io import coders_fingerprint
    from .weights import deembedding_scores, logit_effect_scores, pullback_scores

    labels: dict[int, dict[str, str]] = {}
    if store is not None:
        labels, _ = store.labels_for({layer: coders_fingerprint({0: c}) for layer, c in coders.items()})
    out = []
    for layer, feat in features:
        le = logit_effect_scores(adapter, coders, layer, feat)
        de = deembedding_scores(adapter, coders, layer, feat)
        out.append({"layer": layer, "feature": feat, "label": labels.get(layer, {}).get(str(feat)),
                    "promotes": _tokens_text(tokenizer, le.topk(k).indices.tolist()),
                    "suppresses": _tokens_text(tokenizer, (-le).topk(k).indices.tolist()),
                    "deembedding": _tokens_text(tokenizer, de.topk(k).indices.tolist())})
    vw = []
    for lj, fj in features:
        for li, fi in features:
            if li < lj:
                w = float(pullback_scores(coders, lj, fj, li, adapter)[fi])
                vw.append({"from": [li, fi], "to": [lj, fj], "weight": w})
    return out, vw


def run_case_study(loaded, coders: dict, items: Sequence, targets: Sequence, *, bos: bool, n_features: int = 10,
                   n_candidates: int = 32, n_select: int | None = None, seeds: Sequence[int] = (0, 1, 2, 3, 4),
                   objective: str = "ablate", store=None, progress: Callable[[int, dict, float], None] | None = None) -> dict:
    """Study every item; choose the task-wide features on the first ``n_select`` items (default:
    half) and edit them on the others (``objective``: ``"ablate"`` chooses the features whose
    ablation cuts PD most, ``"counterfactual"`` those whose patching to the counterfactual prompt's
    activations does; the report gives both edits of either set).

    Args:
        loaded: the model; coders: one transcoder per layer; items: task items with
            counterfactuals; targets: their parsed ``logit_group``/``logit_diff`` targets.

    Returns:
        ``{"studies": [...], "summary": {...}, "summary_held_out": {...}, "global_features": [...],
        "virtual_weights": [...], "n_select": int, "selected_tokens": {...}, "seconds": float}``.

    Raises:
        CaseStudyError: an item has no counterfactual, or a target has no token sets.
    """
    from .session import tokenize_prompt

    ad, tok = loaded.adapter, loaded.tokenizer
    if n_select is None:
        n_select = max(1, len(items) // 2)
    if not 0 < n_select < len(items):
        raise CaseStudyError(f"--select {n_select}: it must leave at least one of the {len(items)} prompts held out")
    for i, (it, t) in enumerate(zip(items, targets)):
        if not it.counterfactual:
            raise CaseStudyError(f"task item {i} has no counterfactual; a case study patches from it")
        if t.kind not in ("logit_group", "logit_diff"):
            raise CaseStudyError(f"task item {i}: target kind {t.kind} has no probability difference; use group: "
                                 "or diff: targets")
    prompts = [(tokenize_prompt(loaded, it.prompt, bos=bos), tokenize_prompt(loaded, it.counterfactual, bos=bos))
               for it in items]
    for i, (ids, cf) in enumerate(prompts):
        if len(ids) != len(cf):
            raise CaseStudyError(f"task item {i} ({items[i].prompt[:40]!r}): the counterfactual has {len(cf)} tokens "
                                 f"and the prompt {len(ids)}; patching needs the same length: rewrite the "
                                 "counterfactual so that it tokenizes to the same length")
    t0 = time.time()
    studies = []
    global_feats: list[tuple[int, int]] = []
    for i, (it, t) in enumerate(zip(items, targets)):
        plus, minus = t.token_sets()
        fp = FreePD(ad, coders, prompts[i][0], plus, minus, prompts[i][1])
        st = study_prompt(fp, n=n_features, n_candidates=n_candidates, seeds=seeds, objective=objective)
        st["index"], st["prompt"] = i, it.prompt
        st["held_out"] = i >= n_select
        toks = _tokens_text(tok, fp.tokens.tolist())
        st["selected_tokens"] = [toks[p] for _, p, _ in st["selected"]]
        st["differing_tokens"] = [toks[p] for p in st["differing_positions"]]
        if i == n_select:  # every selection prompt is done: fix the task-wide features
            global_feats = [(layer, feat) for layer, feat, _, _ in feature_frequency(studies, n_features)]
        if i >= n_select:
            v = global_variant(fp, global_feats, mode=objective)
            pd, mass = fp.measure([v])
            st["pd"]["global"], st["digit_mass"]["global"] = float(pd[0]), float(mass[0])
            st["global_nodes"] = len(v.nodes)
        studies.append(st)
        if progress is not None:
            progress(i, st, time.time() - t0)
    freq = feature_frequency(studies[:n_select], n_features)
    described, vw = describe_features(ad, coders, tok, global_feats, store=store)
    for d, (_, _, count, gain) in zip(described, freq):
        d["chosen_in"], d["summed_gain"] = count, gain
    pos_tokens = Counter(t for st in studies for t in st["selected_tokens"])
    return {"studies": studies, "summary": summarize(studies), "summary_held_out": summarize(studies[n_select:]),
            "global_features": described, "virtual_weights": vw, "n_select": n_select,
            "selected_tokens": dict(pos_tokens.most_common(20)), "objective": objective, "seconds": time.time() - t0}


__all__ = ["describe_features", "run_case_study"]
