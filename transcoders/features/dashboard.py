"""One feature's dashboard as plain text (`transcoders feature RUN L.F`): statistics, an
activation histogram, top and quantile examples with the active tokens marked, logit effects,
de-embedding, pullback, OV heads, co-occurring features, the label and any explanations."""

from __future__ import annotations

from .examples import Example
from .store import FeatureRecord

BARS = " ▁▂▃▄▅▆▇█"


def _tok(t: str) -> str:
    return t.replace("\n", "\\n").replace("\t", "\\t")


def marked_text(ex: Example, *, width: int = 110) -> str:
    """The window with every active token shown as ``[token|activation]`` (the centre token's
    mark doubled: ``[[token|activation]]``), cut to about ``width`` characters around the centre."""
    parts = []
    for i, (t, a) in enumerate(zip(ex.tokens, ex.acts)):
        t = _tok(t)
        if a > 0:
            t = f"[{t}|{a:.2f}]" if i != ex.center else f"[[{t}|{a:.2f}]]"
        parts.append(t)
    text = "".join(parts)
    centre = len("".join(parts[: ex.center]))
    if len(text) > width:
        lo = max(0, min(centre - 2 * width // 3, len(text) - width))
        text = ("…" if lo else "") + text[lo: lo + width] + ("…" if lo + width < len(text) else "")
    return text


def sparkline(hist: list[int], edges: list[float]) -> str:
    """The occupied part of a log-spaced histogram as block characters, with its range."""
    nz = [i for i, c in enumerate(hist) if c]
    if not nz:
        return "(no activations)"
    lo, hi = nz[0], nz[-1]
    top = max(hist)
    bars = "".join(BARS[min(8, -(-8 * c // top))] if c else BARS[0] for c in hist[lo: hi + 1])
    return f"{edges[lo]:.2g} {bars} {edges[hi + 1]:.2g}"


def render(rec: FeatureRecord, *, n_top: int = 8, n_per_group: int = 1, explanations: list[dict] | None = None,
           k: int = 8) -> str:
    """The dashboard of one feature, as lines of text."""
    name = f"L{rec.layer}{'/' + rec.variant if rec.variant else ''} f{rec.index}"
    out = [f"{name}: {rec.label or '(no label)'}"]
    if rec.count == 0:
        out.append("never fires on the store's tokens" + (
            f" except at the attention sink / BOS position ({rec.sink_count:,} times, max {rec.sink_max:.3g})"
            if rec.sink_only else ""))
        return "\n".join(out)
    out.append(f"fires on {rec.frequency:.3%} of {rec.n_tokens:,} tokens ({rec.count:,}); mean {rec.mean:.3g}, "
               f"max {rec.max:.3g}; at the sink position: {rec.sink_count:,}")
    out.append("activations: " + sparkline(rec.hist, rec.hist_edges))
    if rec.quantiles and rec.quantiles[0] == rec.quantiles[0]:
        out.append("deciles (sampled): " + " ".join(f"{q:.3g}" for q in rec.quantiles))
    for e in (explanations or []):
        sc = e.get("scores", {})
        show = lambda v: "n/a" if v is None else f"{v:.2f}"
        out.append(f"explanation [{e['explainer']} / judge {e['judge']}]: {e['text']!r}  detection "
                   f"{show(sc.get('detection'))}, fuzzing {show(sc.get('fuzzing'))}, simulation {show(sc.get('simulation'))}")
    out.append(f"top activations ({min(n_top, len(rec.top))} of {len(rec.top)}):")
    out += [f"  {e.acts[e.center]:7.3f}  {marked_text(e)}" for e in rec.top[:n_top]]
    groups = rec.quantile_groups()
    if any(groups):
        out.append("sampled across activation deciles (highest first):")
        for g in reversed(range(len(groups))):
            for e in groups[g][:n_per_group]:
                out.append(f"  q{g} {e.acts[e.center]:7.3f}  {marked_text(e)}")
    if rec.logit_top:
        out.append("promotes:    " + ", ".join(f"{_tok(t)!r} {s:+.2f}" for t, s in rec.logit_top[:k]))
        out.append("suppresses:  " + ", ".join(f"{_tok(t)!r} {s:+.2f}" for t, s in rec.logit_bottom[:k]))
    if rec.deembedding:
        out.append("de-embedding (tokens that excite it directly): "
                   + ", ".join(f"{_tok(t)!r} {s:+.2f}" for t, s in rec.deembedding[:k]))
    if rec.pullback:
        out.append(f"pullback (layer-{rec.layer - 1} features, virtual weight): "
                   + ", ".join(f"f{i} {s:+.3f}" for i, s in rec.pullback[:k]))
    if rec.ov_heads:
        out.append("OV heads that write into its input most: " + ", ".join(f"{a}.{h} {s:.2f}" for a, h, s in rec.ov_heads))
    if rec.cooccurring:
        out.append("co-occurs with (Jaccard): " + ", ".join(f"f{i} {j:.2f}" for i, j, _ in rec.cooccurring[:k]))
    if rec.neighbours:
        out.append("decoder neighbours (cosine): " + ", ".join(f"f{i} {c:.2f}" for i, c in rec.neighbours[:5]))
    return "\n".join(out)
