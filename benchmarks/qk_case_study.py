"""QK attribution case study on SmolLM2: an induction prompt and a greater-than prompt.

Both prompts start with BOS, whose position is folded into the bias nodes (it is the attention
sink, the same on every prompt), so sources are the prompt's own tokens and features.

1. Induction: ten random one-token words, repeated. Every head is scored as an induction head
   (attention from the second copy of a word to the word after its first copy) and as a
   previous-token head; for the strongest induction head, the QK breakdown at several query
   positions says where its key side comes from (which position, through which earlier head)
   and what its query side is. The top key-side source is then removed, frozen and in the real
   model, and the attention weight measured.
2. A greater-than prompt: the graph of its top logit, the (head, q, k) that carry its strongest
   edges between positions, their QK breakdowns, and the same removal check.

Usage: python benchmarks/qk_case_study.py RUN [--out DIR] [--seed 0]
Prints a markdown report and writes DIR/qk_case_study.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from transcoders.circuits import LocalReplacement, attribute
from transcoders.circuits.attribution import SourceIndex
from transcoders.circuits.head_loadings import head_loadings
from transcoders.circuits.prune import node_influence
from transcoders.circuits.qk import column_positions, column_source, column_writes, qk_attribution, side_heads, source_label
from transcoders.circuits.qk_check import check_source, free_pattern, frozen_pattern, source_write
from transcoders.circuits.session import load_layer_coders
from transcoders.circuits.targets import top_logit_targets
from transcoders.models import load_model

GT_PROMPT = "The war lasted from the year 1732 to the year 17"


def one_token_words(tok, n: int, seed: int) -> list[int]:
    """``n`` distinct token ids that are whole lowercase words with a leading space."""
    rng = random.Random(seed)
    ids = [i for i in range(1000, 20000) if (s := tok.decode([i])).startswith(" ") and s[1:].isalpha() and s[1:].islower()
           and len(s) > 3]
    return rng.sample(ids, n)


def head_scores(rep: LocalReplacement, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(induction [L, H], previous-token [L, H])`` mean attention weights, for BOS + n words + the
    same n words: from the second copy of word i (position 1 + n + i) to the word after its first
    copy (2 + i), and from each word to the one before it."""
    pat = torch.stack([fl.pattern for fl in rep.layers])  # [L, H, T, T]
    i = torch.arange(1, n)
    induction = pat[:, :, 1 + n + i, 2 + i].mean(-1)
    p = torch.arange(2, 2 * n + 1)
    prev = pat[:, :, p, p - 1].mean(-1)
    return induction, prev


def carriers(rep, a, index, side: str, n_sources: int = 24) -> list[dict]:
    """The heads that bring each side's strongest sources from other positions: the terms of the
    ``n_sources`` sources of largest |terms| (features, errors, embeddings) at other positions,
    split by the head that first moves them (``side_heads``), summed per (head, from, to)."""
    marg = a.key_marginals() if side == "k" else a.query_marginals()
    pos = a.k if side == "k" else a.q
    writes, n_total = [], 0.0
    for col in marg[:-1].abs().argsort(descending=True).tolist():
        src = column_source(rep, index, col, layer=a.layer, pos=pos, side=side)
        if src["kind"] in ("feature", "error", "embedding") and src["pos"] != pos:
            layer, write = source_write(rep, src)
            writes.append((layer, src["pos"], write[src["pos"]]))
            n_total += float(marg[col])
            if len(writes) == n_sources:
                break
    agg: dict = {}
    for parts in side_heads(rep, a, writes, side):
        for p in parts:
            if p.kind == "head":
                key = (f"{p.layer}.{p.head}", p.src_pos, p.dst_pos)
                agg[key] = agg.get(key, 0.0) + p.weight
    top = sorted(agg.items(), key=lambda x: -abs(x[1]))[:5]
    return [{"head": h, "from": f, "to": t, "terms": w, "of": n_total} for (h, f, t), w in top]


def describe(rep, a, index, tokens_str, n=6) -> dict:
    out = {"layer": a.layer, "head": a.head, "q": a.q, "k": a.k, "score": a.score, "pattern": a.pattern}
    for side, marg, pos in (("key", a.key_marginals(), a.k), ("query", a.query_marginals(), a.q)):
        total = float(marg.abs().sum())
        by_pos: dict[int, float] = {}
        srcs = [column_source(rep, index, c, layer=a.layer, pos=pos, side=side[0]) for c in range(len(marg))]
        for c, src in enumerate(srcs):
            by_pos[src["pos"]] = by_pos.get(src["pos"], 0.0) + float(marg[c])
        top = marg.abs().argsort(descending=True)[:n].tolist()
        out[side] = {"total_abs": total, "sum": float(marg.sum()),
                     "by_position": {str(p): v for p, v in sorted(by_pos.items(), key=lambda x: -abs(x[1]))[:4]},
                     "top": [{"label": source_label(srcs[c], tokens_str), "term": float(marg[c]), "source": srcs[c]}
                             for c in top]}
    out["key_carriers"] = carriers(rep, a, index, "k")
    # Position blocks of the pair matrix: which positions' sources on each side make the score.
    pos_of = column_positions(rep, index)
    every_q, every_k = torch.arange(a.query.shape[0]), torch.arange(a.key.shape[0])
    terms = a.terms(every_q, every_k)
    blocks = {}
    for qp in sorted({a.q, a.q - 1}):
        for kp in sorted({a.k, a.k - 1, 0}):
            blocks[f"q@{qp} x k@{kp}"] = float(terms[pos_of == qp][:, pos_of == kp].sum())
    out["blocks"] = blocks
    out["group_checks"] = [group_check(rep, a, index, p, pos_of) for p in sorted({a.k - 1, a.k - 2}) if p >= 1]
    out["pairs"] = [{"query": source_label(column_source(rep, index, qc, layer=a.layer, pos=a.q, side="q"), tokens_str),
                     "key": source_label(column_source(rep, index, kc, layer=a.layer, pos=a.k, side="k"), tokens_str),
                     "term": t} for qc, kc, t in a.top_pairs(n)]
    return out


def removable(rep, a, index, side: str):
    marg = a.key_marginals() if side == "k" else a.query_marginals()
    pos = a.k if side == "k" else a.q
    for col in marg[:-1].abs().argsort(descending=True).tolist():
        src = column_source(rep, index, col, layer=a.layer, pos=pos, side=side)
        if src["kind"] in ("feature", "error", "embedding") and src["layer"] < a.layer:
            return col, src
    return None, None


def group_check(rep, a, index, pos: int, pos_of: torch.Tensor) -> dict:
    """Remove every feature, error node and embedding write at ``pos`` (both sides), frozen and in
    the real model; the terms predict the frozen score exactly."""
    cols = [c for c in (pos_of == pos).nonzero().flatten().tolist()
            if column_source(rep, index, c, layer=a.layer, pos=pos, side="k")["kind"] != "bias"]
    cols = [c for c in cols if column_source(rep, index, c, layer=a.layer, pos=pos, side="k")["layer"] < a.layer]
    post, _ = column_writes(rep, index, cols)
    writes = {lyr: w.sum(0) for lyr, w in post.items()}
    removed = rep.forward(delta_post={lyr: -w for lyr, w in writes.items()}).resid_pre[a.layer]
    scores, pattern = frozen_pattern(rep, a.layer, a.head, a.q, removed)
    S = torch.tensor(cols)
    predicted = a.score - float(a.query_marginals()[S].sum() + a.key_marginals()[S].sum() - a.terms(S, S).sum())
    free = free_pattern(rep, a.layer, writes)
    return {"pos": pos, "n_sources": len(cols), "score": a.score, "score_frozen": float(scores[a.k]), "predicted": predicted,
            "pattern": a.pattern, "pattern_frozen": float(pattern[a.k]), "pattern_free": float(free[a.head, a.q, a.k])}


def check(rep, a, index, tokens_str, side: str) -> dict:
    col, src = removable(rep, a, index, side)
    c = check_source(rep, a, col, src)
    src_layer, write = source_write(rep, src)
    carried = [p for p in side_heads(rep, a, [(src_layer, src["pos"], write[src["pos"]])], side)[0] if p.kind == "head"][:3]
    marg = a.key_marginals() if side == "k" else a.query_marginals()
    return {"side": side, "source": source_label(src, tokens_str), "term": float(marg[col]),
            "score": c.score, "score_frozen": c.score_frozen, "predicted": c.score + c.predicted_change,
            "pattern": c.pattern, "pattern_frozen": c.pattern_frozen, "pattern_free": c.pattern_free,
            "carried_by": [{"head": f"{p.layer}.{p.head}", "from": p.src_pos, "to": p.dst_pos, "weight": p.weight}
                           for p in carried]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--out", default="runs/qk-case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-words", type=int, default=10)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = load_model(dtype=torch.float32)
    coders = load_layer_coders(args.run, lm)
    tok = lm.tokenizer
    result: dict = {"run": str(args.run), "seed": args.seed}

    # ---------------------------------------------------------------- induction
    n = args.n_words
    words = one_token_words(tok, n, args.seed)
    bos = tok.bos_token_id
    tokens = torch.tensor([bos] + words + words)
    strs = [tok.decode([t]) for t in tokens.tolist()]
    rep = LocalReplacement(lm.adapter, coders, tokens, tokenizer=tok, constant_positions=(0,))
    index = SourceIndex(rep)
    ind, prev = head_scores(rep, n)
    top_ind = [(int(i) // ind.shape[1], int(i) % ind.shape[1], float(ind.flatten()[i])) for i in ind.flatten().topk(5).indices]
    top_prev = [(int(i) // prev.shape[1], int(i) % prev.shape[1], float(prev.flatten()[i]))
                for i in prev.flatten().topk(5).indices]
    layer, head, _ = top_ind[0]
    ind_res = {"prompt": "".join(strs), "induction_heads": top_ind, "previous_token_heads": top_prev, "positions": []}
    t0 = time.perf_counter()
    for i in (3, 5, 7):
        q, k = 1 + n + i, 2 + i
        a = qk_attribution(rep, layer, head, q, k, index=index)
        d = describe(rep, a, index, strs)
        d["checks"] = [check(rep, a, index, strs, "k"), check(rep, a, index, strs, "q")]
        ind_res["positions"].append(d)
    ind_res["seconds"] = time.perf_counter() - t0
    result["induction"] = ind_res

    # ---------------------------------------------------------------- greater-than
    gt_tokens = torch.tensor([bos] + tok(GT_PROMPT, add_special_tokens=False).input_ids)
    gstrs = [tok.decode([t]) for t in gt_tokens.tolist()]
    rep = LocalReplacement(lm.adapter, coders, gt_tokens, tokenizer=tok, constant_positions=(0,))
    index = SourceIndex(rep)
    t0 = time.perf_counter()
    graph = attribute(rep, top_logit_targets(rep.logits, tokenizer=tok)[:1], max_feature_nodes=1000)
    t_graph = time.perf_counter() - t0
    node_influence(graph)
    section = head_loadings(rep, graph, n_heads=5)
    gt_res = {"prompt": GT_PROMPT, "target": graph.targets[0].label, "seconds_graph": t_graph,
              "seconds_qk": section["seconds"]["total"], "heads": []}
    for h in section["heads"][:3]:
        a = qk_attribution(rep, h["layer"], h["head"], h["q"], h["k"], index=index)
        d = describe(rep, a, index, gstrs)
        d["carried"] = h["carried"]
        d["checks"] = [check(rep, a, index, gstrs, "k"), check(rep, a, index, gstrs, "q")]
        gt_res["heads"].append(d)
    result["greater_than"] = gt_res
    (out_dir / "qk_case_study.json").write_text(json.dumps(result, indent=1))
    report(result)


def report(r: dict) -> None:
    ind = r["induction"]
    print(f"## Induction ({ind['prompt']!r})\n")
    print("induction heads (mean attention to the token after the first copy): "
          + ", ".join(f"{la}.{h} {s:.2f}" for la, h, s in ind["induction_heads"]))
    print("previous-token heads: " + ", ".join(f"{la}.{h} {s:.2f}" for la, h, s in ind["previous_token_heads"]) + "\n")
    for sec in (ind["positions"], r["greater_than"]["heads"]):
        for d in sec:
            print(f"### head {d['layer']}.{d['head']} q={d['q']} k={d['k']}: score {d['score']:+.3f}, "
                  f"attention {d['pattern']:.3f}")
            for side in ("key", "query"):
                s = d[side]
                print(f"- {side} side: terms sum {s['sum']:+.3f} (|terms| {s['total_abs']:.3f}); by source position "
                      + ", ".join(f"pos{p} {v:+.3f}" for p, v in s["by_position"].items()))
                print("  top: " + "; ".join(f"{t['label']} {t['term']:+.3f}" for t in s["top"][:4]))
            print("- key side brought from other positions by: " + ", ".join(
                f"{c['head']} pos{c['from']}->pos{c['to']} {c['terms']:+.3f}" for c in d["key_carriers"]))
            print("- pair terms by source positions: " + ", ".join(f"{k} {v:+.3f}" for k, v in d["blocks"].items()))
            print("- pairs: " + "; ".join(f"{p['query']} x {p['key']} {p['term']:+.3f}" for p in d["pairs"][:3]))
            for g in d["group_checks"]:
                print(f"- remove all {g['n_sources']} sources at pos{g['pos']}: score {g['score']:+.3f} -> "
                      f"{g['score_frozen']:+.3f} frozen (predicted {g['predicted']:+.3f}); attention {g['pattern']:.3f} -> "
                      f"{g['pattern_frozen']:.3f} frozen, {g['pattern_free']:.3f} free")
            for c in d["checks"]:
                carriers = ", ".join(f"{x['head']} pos{x['from']}->pos{x['to']} {x['weight']:+.3f}" for x in c["carried_by"])
                print(f"- remove the top {c['side']}-side source {c['source']} (terms {c['term']:+.3f}, carried by "
                      f"{carriers or 'the residual'}): score {c['score']:+.3f} -> {c['score_frozen']:+.3f} frozen "
                      f"(predicted {c['predicted']:+.3f}); attention {c['pattern']:.3f} -> {c['pattern_frozen']:.3f} "
                      f"frozen, {c['pattern_free']:.3f} free")
            print()
    gt = r["greater_than"]
    print(f"greater-than graph {gt['seconds_graph']:.1f} s; head loadings + QK of 5 heads {gt['seconds_qk']:.1f} s")


if __name__ == "__main__":
    main()
