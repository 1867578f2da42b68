"""Held-out metrics of a cross-layer transcoder spliced into the model.

A CLT's layer ``t`` reconstruction needs the features of every layer up to ``t``
(:func:`~transcoders.evaluation.splice.splice_clt`), so its splices differ from per-layer
coders': "layer ``t`` alone" replaces only MLP ``t``, with the earlier layers' features encoded
on the clean model; "all at once" replaces every MLP, each layer's features encoded on the
spliced model (the replacement model of Ameisen et al. 2025). Metrics and units are those of
:func:`~transcoders.evaluation.metrics.evaluate_coders` (nats/token), so reports and the
viewer read both; ``l0`` counts the features of that layer's encoder.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..coders.clt import CrossLayerTranscoder
from ..models.adapters import ModelAdapter
from .metrics import DENSE_THRESHOLD, _next_token_stats
from .splice import keep_first, mean_ablation, splice_clt, splice_mlps, zero_ablation


@torch.no_grad()
def evaluate_clt(adapter: ModelAdapter, clt: CrossLayerTranscoder, eval_tokens: torch.Tensor, *, batch_size: int = 8,
                 progress: bool = True, skip_first: int = 0) -> dict:
    """Evaluate a CLT on held-out tokens, one layer spliced at a time and all at once.

    Args:
        adapter: the model's adapter; the CLT must span its layers and width.
        eval_tokens: ``[n_ctx, ctx_len]`` token ids.
        skip_first: leading positions of every context left out of L0/FVU, and where every
            splice keeps the real MLP output (the attention sink).

    Returns:
        ``{"layers": {"<t>": {l0, fvu, mse, dead_fraction, dense_fraction, ce_clean,
        ce_spliced, ce_zero_ablation, ce_mean_ablation, ce_loss_recovered, kl}},
        "spliced_together": {layers, ce_clean, ce_spliced, ce_increase, kl, ce_zero_ablation,
        ce_mean_ablation, loss_recovered_vs_zero, loss_recovered_vs_mean, leave_one_out: {}},
        "eval_tokens": n, "feature_frequency": {"<t>": [d_sae]}}``; the means for mean
        ablation are the eval tokens' own.

    Raises:
        ValueError: the CLT does not span the model.
    """
    L, device = adapter.n_layers, adapter.device
    clt = clt.to(device)
    layers = list(range(L))
    acc = {t: {"sq": 0.0, "sum_y": 0.0, "sum_y2": 0.0, "n": 0, "l0": 0.0, "ce": 0.0, "kl": 0.0, "ce_zero": 0.0,
               "ce_mean": 0.0, "fires": torch.zeros(clt.d_sae, dtype=torch.int64, device=device)} for t in layers}
    # means of the MLP outputs over the eval tokens (mean ablation), from a first clean pass
    sums = torch.zeros(L, adapter.d_model, dtype=torch.float64, device=device)
    count = 0
    for start in range(0, len(eval_tokens), batch_size):
        outs: dict = {}
        with splice_clt(adapter, clt, (), outputs=outs):
            adapter.model(eval_tokens[start : start + batch_size].to(device), use_cache=False)
        for t in layers:
            sums[t] += outs[t][:, skip_first:].double().sum((0, 1))
        count += outs[0].shape[0] * (outs[0].shape[1] - skip_first)
    means = (sums / count).float()
    together = {"ce": 0.0, "kl": 0.0, "zero": 0.0, "mean": 0.0}
    ce_clean, n_pred = 0.0, 0

    def run(ids, clean_logp, spliced=None, ablate=None):
        if ablate is not None:
            with splice_mlps(adapter, ablate):
                return _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, clean_logp)[:2]
        with splice_clt(adapter, clt, spliced, keep_first_n=skip_first):
            return _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, clean_logp)[:2]

    def zero_at(t):
        return keep_first(zero_ablation, adapter, t, skip_first)

    def mean_at(t):
        return keep_first(mean_ablation(means[t]), adapter, t, skip_first)

    for start in tqdm(range(0, len(eval_tokens), batch_size), desc="evaluate CLT", disable=not progress):
        ids = eval_tokens[start : start + batch_size].to(device)
        outs: dict = {}
        with splice_clt(adapter, clt, (), outputs=outs) as acts:
            ce, _, clean_logp = _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, None)
        ce_clean += ce
        n_pred += ids.shape[0] * (ids.shape[1] - 1)
        for t in layers:
            a = acc[t]
            y = outs[t][:, skip_first:].flatten(0, 1).double()
            y_hat = clt.reconstruct(t, acts)[:, skip_first:].flatten(0, 1).double()
            f = acts[t][:, skip_first:].flatten(0, 1) > 0
            a["sq"] += (y - y_hat).pow(2).sum().item()
            a["sum_y"] = a["sum_y"] + y.sum(0)
            a["sum_y2"] += y.pow(2).sum().item()
            a["n"] += y.shape[0]
            a["l0"] += f.sum().item()
            a["fires"] += f.sum(0)
            ce_t, kl_t = run(ids, clean_logp, [t])
            a["ce"] += ce_t
            a["kl"] += kl_t
            a["ce_zero"] += run(ids, None, ablate={t: zero_at(t)})[0]
            a["ce_mean"] += run(ids, None, ablate={t: mean_at(t)})[0]
        ce_all, kl_all = run(ids, clean_logp, None)
        together["ce"] += ce_all
        together["kl"] += kl_all
        together["zero"] += run(ids, None, ablate={t: zero_at(t) for t in layers})[0]
        together["mean"] += run(ids, None, ablate={t: mean_at(t) for t in layers})[0]
    out: dict = {"layers": {}, "eval_tokens": int(acc[0]["n"]), "feature_frequency": {}}
    clean = ce_clean / n_pred
    for t in layers:
        a = acc[t]
        n = a["n"]
        total_var = a["sum_y2"] - a["sum_y"].pow(2).sum().item() / n
        freq = (a["fires"].double() / n).cpu()
        zero, spliced = a["ce_zero"] / n_pred, a["ce"] / n_pred
        out["layers"][str(t)] = {
            "l0": a["l0"] / n, "fvu": a["sq"] / total_var, "mse": a["sq"] / (n * clt.d_model),
            "dead_fraction": (freq == 0).double().mean().item(),
            "dense_fraction": (freq > DENSE_THRESHOLD).double().mean().item(),
            "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablation": zero, "ce_mean_ablation": a["ce_mean"] / n_pred,
            "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else None, "kl": a["kl"] / n_pred,
        }
        out["feature_frequency"][str(t)] = freq
    spliced, zero, mean = (together[k] / n_pred for k in ("ce", "zero", "mean"))
    out["spliced_together"] = {
        "layers": layers, "ce_clean": clean, "ce_spliced": spliced, "ce_increase": spliced - clean,
        "kl": together["kl"] / n_pred, "ce_zero_ablation": zero, "ce_mean_ablation": mean,
        "loss_recovered_vs_zero": (zero - spliced) / (zero - clean) if zero != clean else None,
        "loss_recovered_vs_mean": (mean - spliced) / (mean - clean) if mean != clean else None,
        "leave_one_out": {},
    }
    return out
