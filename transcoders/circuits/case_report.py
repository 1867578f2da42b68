"""Summaries, tables and figures of a task case study (:mod:`transcoders.circuits.case_study`).

The unit of every number is PD (probability difference, in ``[-1, 1]``). A *cut* is how much an
intervention lowers the mean PD over prompts, as a fraction of the clean mean:
``(mean PD_clean - mean PD_x) / mean PD_clean`` (1: PD gone; above 1: reversed).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ..files import atomic_savefig

# What each intervention is, in the report's words (module case_study, study_prompt).
DESCRIPTIONS = {
    "clean": "no intervention (the free replacement model equals the model)",
    "selected": "the case study's features, ablated",
    "selected_counterfactual": "the case study's features, patched to their counterfactual values",
    "global": "the task-wide features (chosen on other prompts), edited as chosen wherever active",
    "all_at_differing": "every feature at the positions where prompt and counterfactual differ, ablated",
    "all_at_differing_counterfactual": "every feature at those positions, patched to counterfactual",
    "first_order_top": "top features by attribution patching (first order), ablated",
    "top_activation": "the features of largest activation, ablated",
    "random": "random active features, ablated (all seeds pooled)",
    "errors_counterfactual": "error nodes patched to counterfactual, features free",
    "features_counterfactual": "every feature patched to counterfactual at every position, errors clean",
    "counterfactual_both": "features and error nodes patched to counterfactual",
    "all_features_ablated": "every feature after position 0 ablated (errors clean)",
    "top_heads_counterfactual": "the heads of largest single effect, output at the last position patched to counterfactual",
    "all_heads_counterfactual": "every head's output at the last position patched to counterfactual",
    "counterfactual_prompt": "the model on the counterfactual prompt",
}


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (math.nan, math.nan)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def summarize(studies: Sequence[dict]) -> dict:
    """Per intervention: ``{"n", "mean_pd", "std_pd", "q1_pd", "q3_pd", "cut", "mean_digit_mass"}``
    over prompts, ``random`` pooling every ``random_seed*`` entry and adding ``cut_by_seed``;
    plus ``error_share``: the share of the PD gap between prompt and counterfactual that
    patching the error nodes alone closes (``sum(PD_clean - PD_errors_cf) / sum(PD_clean -
    PD_cf_prompt)`` over prompts), and ``feature_share`` likewise for patching every feature.

    Raises:
        ValueError: ``studies`` is empty.
    """
    if not studies:
        raise ValueError("no prompts were studied")
    clean = [s["pd"]["clean"] for s in studies]
    base = statistics.fmean(clean)
    names: list[str] = []
    for s in studies:
        names += [k for k in s["pd"] if k not in names and not k.startswith("random_seed")]
    out: dict = {"n_prompts": len(studies), "interventions": {}}

    def row(values: list[float], masses: list[float]) -> dict:
        mean = statistics.fmean(values)
        q1, q3 = _quartiles(values)
        return {"n": len(values), "mean_pd": mean, "std_pd": statistics.pstdev(values), "q1_pd": q1, "q3_pd": q3,
                "cut": (base - mean) / base if base else math.nan,
                "mean_digit_mass": statistics.fmean(masses) if masses else None}

    for name in names:
        have = [s for s in studies if name in s["pd"]]
        out["interventions"][name] = row([s["pd"][name] for s in have],
                                         [s["digit_mass"][name] for s in have if name in s.get("digit_mass", {})])
    seeds = sorted({k for s in studies for k in s["pd"] if k.startswith("random_seed")})
    if seeds:
        pooled = [s["pd"][k] for s in studies for k in seeds if k in s["pd"]]
        masses = [s["digit_mass"][k] for s in studies for k in seeds if k in s.get("digit_mass", {})]
        r = row(pooled, masses)
        r["cut_by_seed"] = {k: (base - statistics.fmean([s["pd"][k] for s in studies])) / base if base else math.nan
                            for k in seeds}
        out["interventions"]["random"] = r
    for key, name in (("error_share", "errors_counterfactual"), ("feature_share", "features_counterfactual")):
        pairs = [(s["pd"]["clean"] - s["pd"][name], s["pd"]["clean"] - s["pd"]["counterfactual_prompt"])
                 for s in studies if name in s["pd"] and "counterfactual_prompt" in s["pd"]]
        gap = sum(g for _, g in pairs)
        out[key] = sum(d for d, _ in pairs) / gap if pairs and gap else None
    return out


def head_ranking(studies: Sequence[dict], n: int = 10) -> list[tuple[str, float, float]]:
    """The ``n`` heads whose output at the last position, patched alone to its counterfactual
    value, lowers PD most on average: ``(layer.head, mean PD change, share of prompts where it
    is among the prompt's 10 strongest)``."""
    effects: dict[str, list[float]] = {}
    top_counts: dict[str, int] = {}
    for s in studies:
        he = s.get("head_effects") or {}
        for k, d in he.items():
            effects.setdefault(k, []).append(d)
        for k in sorted(he, key=he.get)[:10]:
            top_counts[k] = top_counts.get(k, 0) + 1
    ranked = sorted(effects, key=lambda k: statistics.fmean(effects[k]))[:n]
    return [(k, statistics.fmean(effects[k]), top_counts.get(k, 0) / len(studies)) for k in ranked]


def markdown_table(summary: dict, order: Sequence[str] | None = None) -> str:
    """The summary as a markdown table, one row per intervention."""
    rows = summary["interventions"]
    order = [k for k in (order or DESCRIPTIONS) if k in rows] + [k for k in rows if k not in (order or DESCRIPTIONS)]
    lines = ["| intervention | prompts | mean PD | std | quartiles | cut of mean PD | mean P(task tokens) |",
             "|---|---|---|---|---|---|---|"]
    for k in order:
        r = rows[k]
        mass = "" if r.get("mean_digit_mass") is None else f"{r['mean_digit_mass']:.3f}"
        cut = f"{100 * r['cut']:.0f}%" if k != "clean" else ""
        if "cut_by_seed" in r:
            cuts = [100 * c for c in r["cut_by_seed"].values()]
            cut += f" (seeds {min(cuts):.0f}% to {max(cuts):.0f}%)"
        lines.append(f"| {DESCRIPTIONS.get(k, k)} | {r['n']} | {r['mean_pd']:+.3f} | {r['std_pd']:.3f} | "
                     f"{r['q1_pd']:+.3f} to {r['q3_pd']:+.3f} | {cut} | {mass} |")
    return "\n".join(lines)


def plot(summary: dict, path, *, title: str = "") -> None:
    """Bar chart of the mean PD per intervention with the interquartile range, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["interventions"]
    names = [k for k in DESCRIPTIONS if k in rows]
    means = [rows[k]["mean_pd"] for k in names]
    lo = [rows[k]["mean_pd"] - rows[k]["q1_pd"] for k in names]
    hi = [rows[k]["q3_pd"] - rows[k]["mean_pd"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    y = range(len(names))
    ax.barh(list(y), means, xerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]], color="#4c78a8", alpha=0.85)
    ax.set_yticks(list(y), [k.replace("_", " ") for k in names], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.axvline(rows["clean"]["mean_pd"], color="#e45756", lw=0.8, ls="--")
    ax.set_xlabel("mean PD over prompts (bars: interquartile range)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


__all__ = ["DESCRIPTIONS", "head_ranking", "markdown_table", "plot", "summarize"]
