"""Held-out metrics of spliced coders: reconstruction, sparsity and downstream loss.

For each layer: L0 (mean active features per token), FVU (``sum ||y - y_hat||^2 /
sum ||y - mean(y)||^2`` over all eval tokens), MSE (mean squared error per element), the
fractions of dead (never active on the eval tokens) and dense (active on more than 10% of
them) features, and the next-token cross-entropy in nats/token of the model as it is, with
the coder spliced in place of the MLP, with the MLP zero-ablated and mean-ablated, the
fraction of loss recovered ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` (None when zero
ablation does not change the loss) and the mean
KL divergence ``KL(clean || spliced)`` in nats/token (Dunefsky et al. 2024, Sec. 4).

With ``together=True`` the same pass also splices every layer's coder at once (the paper's
"all MLPs replaced" setting, Dunefsky et al. 2024, Sec. 4.2), against zero- and mean-ablating
the same set of MLPs, and once more for each layer with every coder but that one spliced: the
difference is the loss that layer adds on top of the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..coders.coder import SparseCoder
from ..data.activations import harvest
from ..models.adapters import ModelAdapter
from .splice import coder_replacement, keep_first, mean_ablation, splice_mlps, zero_ablation

DENSE_THRESHOLD = 0.1


def _next_token_stats(logits: torch.Tensor, input_ids: torch.Tensor, clean_logp: torch.Tensor | None):
    """Summed CE (nats) over predicted positions, and summed KL(clean || this) if given."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    ce = -logp.gather(-1, input_ids[:, 1:, None]).sum()
    kl = None
    if clean_logp is not None:
        kl = (clean_logp.exp() * (clean_logp - logp)).sum()
    return ce.item(), None if kl is None else kl.item(), logp


@torch.no_grad()
def evaluate_coders(
    adapter: ModelAdapter,
    coders: dict[int, SparseCoder],
    eval_tokens: torch.Tensor,
    *,
    mlp_out_means: dict[int, torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    skip_first: int = 0,
    together: bool = False,
) -> dict:
    """Evaluate coders spliced one at a time into the model on held-out tokens (and, with
    ``together``, all at once).

    Args:
        adapter: the model's adapter (float32 for exact CE).
        coders: ``{key: coder}``, keyed by layer (or by any name, e.g. ``"6/k64"`` for sweep
            variants: the splice layer is ``coder.cfg.layer``); d_in/d_out must equal d_model.
        eval_tokens: ``[n_ctx, ctx_len]`` token ids the coders were not trained on.
        mlp_out_means: ``{layer: [d_model]}`` mean MLP output for mean ablation (training
            statistics); if missing, the mean over the eval tokens is used.
        batch_size: contexts per forward pass.
        skip_first: leading positions of every context left out of L0/FVU, and where every
            splice (coder, zero or mean ablation) keeps the real MLP output (the attention sink).
        together: also splice all coders at once; needs one coder per layer.

    Returns:
        ``{"layers": {"<key>": {l0, fvu, mse, dead_fraction, dense_fraction, ce_clean,
        ce_spliced, ce_zero_ablation, ce_mean_ablation, ce_loss_recovered, kl}},
        "eval_tokens": n}`` and, under ``"feature_frequency"``, per-layer ``[d_sae]`` firing
        frequencies (a tensor, for plots; not JSON). With ``together``, also
        ``"spliced_together"``: ``{layers, ce_clean, ce_spliced, ce_increase, kl,
        ce_zero_ablation, ce_mean_ablation, loss_recovered_vs_zero, loss_recovered_vs_mean,
        leave_one_out: {"<layer>": {ce_without, kl_without, ce_added}}}`` (nats/token;
        ``ce_added = ce_spliced - ce_without``).

    Raises:
        ValueError: ``together`` with two coders for one layer (sweep variants).
    """
    layer_of = {key: coders[key].cfg.layer if coders[key].cfg.layer is not None else int(key) for key in coders}
    keys = sorted(coders, key=lambda key: (layer_of[key], str(key)))
    layers = sorted(set(layer_of.values()))
    if together and len(layers) != len(keys):
        raise ValueError(f"splicing all at once needs one coder per layer; these are {', '.join(map(str, keys))} "
                         "(sweep variants): evaluate one variant's folder, or pass --layers")
    joint = _Together(layers) if together else None
    device = adapter.device
    acc = {key: {"sq_err": 0.0, "sum_y": 0.0, "sum_y2": 0.0, "n": 0, "l0": 0.0,
                 "fires": torch.zeros(coders[key].cfg.d_sae, dtype=torch.int64, device=device),
                 "ce_spliced": 0.0, "ce_zero": 0.0, "ce_mean": 0.0, "kl": 0.0} for key in keys}
    means = dict(mlp_out_means or {})
    if any(layer not in means for layer in layers):  # fall back to eval-token means for missing layers
        sums = {layer: torch.zeros(adapter.d_model, dtype=torch.float64, device=device) for layer in layers}
        count = 0
        for start in range(0, len(eval_tokens), batch_size):
            acts = harvest(adapter, eval_tokens[start : start + batch_size], layers)
            for layer in layers:
                sums[layer] += acts[layer][1][:, skip_first:].double().sum((0, 1))
            count += acts[layers[0]][1].shape[0] * (acts[layers[0]][1].shape[1] - skip_first)
        means = {layer: means.get(layer, (sums[layer] / count).float()) for layer in layers}
    ce_clean = 0.0
    n_pred = 0
    ce_zero: dict[int, float] = {layer: 0.0 for layer in layers}
    ce_mean: dict[int, float] = {layer: 0.0 for layer in layers}
    batches = range(0, len(eval_tokens), batch_size)
    for start in tqdm(batches, desc="evaluate", disable=not progress):
        ids = eval_tokens[start : start + batch_size].to(device)
        # One clean pass gives the MLP activations, the clean loss and the layer outputs to replay.
        prefix, acts = _CleanPrefix(adapter), {}
        keep = lambda layer, x, y, into=acts: into.__setitem__(layer, (x, y))
        with prefix.record(), adapter.hook_mlps(layers, on_output=keep):
            ce, _, clean_logp = _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, None)
        for key in keys:
            a, coder = acc[key], coders[key]
            x = acts[layer_of[key]][0][:, skip_first:].flatten(0, 1).float()
            y = x if coder.cfg.kind == "sae" else acts[layer_of[key]][1][:, skip_first:].flatten(0, 1).float()
            f = coder.encode(x.to(coder.W_enc.dtype))
            y_hat = coder.decode(f, x).float()
            active = f > 0
            a["sq_err"] += (y - y_hat).double().pow(2).sum().item()
            a["sum_y"] = a["sum_y"] + y.double().sum(0)
            a["sum_y2"] += y.double().pow(2).sum().item()
            a["n"] += y.shape[0]
            a["l0"] += active.sum().item()
            a["fires"] += active.sum(0)
        acts.clear()
        ce_clean += ce
        n_pred += ids.shape[0] * (ids.shape[1] - 1)
        for layer in layers:  # ablations depend on the layer only, not on the coder
            for store, fn in ((ce_zero, zero_ablation), (ce_mean, mean_ablation(means[layer].to(device)))):
                with prefix.replay(layer), splice_mlps(adapter, {layer: keep_first(fn, adapter, layer, skip_first)}):
                    store[layer] += _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, None)[0]
        for key in keys:
            replace = keep_first(coder_replacement(coders[key], adapter), adapter, layer_of[key], skip_first)
            with prefix.replay(layer_of[key]), splice_mlps(adapter, {layer_of[key]: replace}):
                ce, kl, _ = _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, clean_logp)
            acc[key]["ce_spliced"] += ce
            acc[key]["kl"] += kl
        if joint is not None:
            coder_of = {layer_of[key]: coders[key] for key in keys}
            joint.add(adapter, ids, clean_logp, prefix, {
                layer: keep_first(coder_replacement(coder_of[layer], adapter), adapter, layer, skip_first) for layer in layers
            }, {layer: keep_first(zero_ablation, adapter, layer, skip_first) for layer in layers},
                {layer: keep_first(mean_ablation(means[layer].to(device)), adapter, layer, skip_first) for layer in layers})
        del clean_logp, prefix
    out: dict = {"layers": {}, "eval_tokens": int(acc[keys[0]]["n"]), "feature_frequency": {}}
    for key in keys:
        a, layer = acc[key], layer_of[key]
        n, d = a["n"], coders[key].cfg.d_out
        total_var = a["sum_y2"] - (a["sum_y"].pow(2).sum().item() / n)
        freq = (a["fires"].double() / n).cpu()
        clean, spliced, zero = ce_clean / n_pred, a["ce_spliced"] / n_pred, ce_zero[layer] / n_pred
        out["layers"][str(key)] = {
            "l0": a["l0"] / n,
            "fvu": a["sq_err"] / total_var,
            "mse": a["sq_err"] / (n * d),
            "dead_fraction": (freq == 0).double().mean().item(),
            "dense_fraction": (freq > DENSE_THRESHOLD).double().mean().item(),
            "ce_clean": clean,
            "ce_spliced": spliced,
            "ce_zero_ablation": zero,
            "ce_mean_ablation": ce_mean[layer] / n_pred,
            "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else None,
            "kl": a["kl"] / n_pred,
        }
        out["feature_frequency"][str(key)] = freq
    if joint is not None:
        out["spliced_together"] = joint.result(ce_clean / n_pred, n_pred)
    return out


class _CleanPrefix:
    """The clean pass's output of every decoder layer, replayed so that a run which changes
    nothing before layer ``l`` computes only layers ``l`` onward (the outputs of the layers below
    are exactly the clean ones). About halves the cost of the single-layer splices."""

    def __init__(self, adapter: ModelAdapter):
        self.blocks = adapter.layers()
        self.outputs: dict[int, object] = {}

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        def keep(i: int):
            return lambda _m, _args, out: self.outputs.__setitem__(i, out)

        handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def replay(self, start: int) -> Iterator[None]:
        """Blocks below ``start`` return their recorded outputs without computing."""
        patched = [i for i in range(start) if i in self.outputs]
        for i in patched:
            self.blocks[i].forward = lambda *_a, _out=self.outputs[i], **_k: _out
        try:
            yield
        finally:
            for i in patched:
                del self.blocks[i].forward


class _Together:
    """Summed CE and KL of the all-at-once splices over the batches of one evaluation."""

    def __init__(self, layers: list[int]):
        self.layers = layers
        self.ce = {"spliced": 0.0, "zero": 0.0, "mean": 0.0}
        self.kl = 0.0
        self.without = {layer: [0.0, 0.0] for layer in layers}  # CE, KL with every coder but this layer's

    def add(self, adapter: ModelAdapter, ids: torch.Tensor, clean_logp: torch.Tensor, prefix: _CleanPrefix, coders: dict,
            zero: dict, mean: dict) -> None:
        def run(replacements: dict) -> tuple[float, float]:
            with prefix.replay(min(replacements, default=0)), splice_mlps(adapter, replacements):
                ce, kl, _ = _next_token_stats(adapter.model(ids, use_cache=False).logits, ids, clean_logp)
            return ce, kl

        ce, self_kl = run(coders)
        self.ce["spliced"] += ce
        self.kl += self_kl
        self.ce["zero"] += run(zero)[0]
        self.ce["mean"] += run(mean)[0]
        if len(self.layers) > 1:
            for layer in self.layers:
                ce, kl = run({k: r for k, r in coders.items() if k != layer})
                self.without[layer][0] += ce
                self.without[layer][1] += kl

    def result(self, ce_clean: float, n_pred: int) -> dict:
        spliced, zero, mean = (self.ce[k] / n_pred for k in ("spliced", "zero", "mean"))
        out = {
            "layers": self.layers, "ce_clean": ce_clean, "ce_spliced": spliced, "ce_increase": spliced - ce_clean,
            "kl": self.kl / n_pred, "ce_zero_ablation": zero, "ce_mean_ablation": mean,
            "loss_recovered_vs_zero": (zero - spliced) / (zero - ce_clean) if zero != ce_clean else None,
            "loss_recovered_vs_mean": (mean - spliced) / (mean - ce_clean) if mean != ce_clean else None,
            "leave_one_out": {},
        }
        if len(self.layers) > 1:
            out["leave_one_out"] = {str(layer): {"ce_without": ce / n_pred, "kl_without": kl / n_pred,
                                                 "ce_added": spliced - ce / n_pred}
                                    for layer, (ce, kl) in self.without.items()}
        return out
