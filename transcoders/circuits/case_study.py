"""Case studies: which few features carry a task, found and checked by intervention.

For one prompt with a probability-difference metric (PD, :func:`~transcoders.circuits.targets.prob_diff`;
for greater-than Hanna et al. 2023's ``P(digit > start tens) - P(digit <= start tens)``), the
command names at most ``n`` feature *nodes* (a feature of one layer at one position, as in the
attribution graph) whose ablation in the **free replacement model** cuts PD the most:

- the free replacement model (as :class:`~transcoders.circuits.interventions.ReplacementRunner`):
  every MLP is its transcoder plus the error node held at its clean value; attention, norms and
  every downstream feature are recomputed. With no edit it reproduces the model's logits.
- selection is greedy forward selection guided by attribution patching (Nanda 2023; Syed et al.
  2023, "Attribution Patching Outperforms Automated Circuit Discovery"): at each step one
  backward pass gives ``dPD/da`` for every active node in the current (already ablated) state,
  the ``n_candidates`` nodes with the most negative first-order estimate ``-a dPD/da`` are each
  ablated for real (one batched forward pass), and the best is kept. Features that only matter
  once others are gone (backups) enter the candidates as the state changes.

The same runner measures the baselines the paper's case study compares against (Dunefsky et
al. 2024, section 4.3; the issue's bars): every active feature at the positions where the prompt
and its counterfactual differ (for greater-than, the start year's last two digits), ``n`` random
active nodes (several seeds), the ``n`` nodes of largest activation, the first-order top ``n``,
and what the error nodes carry: PD with the error nodes patched to their values on the
counterfactual prompt (features free), which no feature ablation can reach since ablations hold
errors at their clean values.

Position 0 (the first token, the attention sink) is never a candidate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..coders.clt import require_per_layer
from ..coders.coder import SparseCoder
from ..data.activations import harvest
from ..evaluation.splice import splice_mlps
from ..models.adapters import ModelAdapter
from .targets import prob_diff

Node = tuple[int, int, int]  # (layer, pos, feature)


class CaseStudyError(ValueError):
    """The prompt and counterfactual do not fit a case study (lengths, positions, sets)."""


@dataclass
class Variant:
    """One intervention in the free replacement model.

    Attributes:
        nodes: feature nodes ``(layer, pos, feature)`` to edit.
        positions: positions at which *every* feature of every layer is edited (the node list
            need not name them; features that would newly activate there are edited too).
        mode: ``"ablate"`` (activation 0) or ``"counterfactual"`` (the activation the real model's
            MLP input on the counterfactual prompt gives the feature).
        patch_errors: error nodes take their counterfactual values (at every position).
        heads: attention heads ``(layer, head)`` whose output at ``head_positions`` takes its
            value on the counterfactual prompt (the head's slice of the output projection's input).
    """

    nodes: Sequence[Node] = ()
    positions: Sequence[int] = ()
    mode: str = "ablate"
    patch_errors: bool = False
    heads: Sequence[tuple[int, int]] = ()
    head_positions: Sequence[int] = (-1,)


class FreePD:
    """PD of one prompt in the free replacement model under batches of :class:`Variant` s.

    Args:
        adapter: the model's adapter. coders: ``{layer: coder}``, one per layer (every MLP is
            replaced). tokens: ``[T]`` prompt ids. plus, minus: the PD's token ids.
        cf_tokens: ``[T]`` the counterfactual prompt (same length), needed for
            ``mode="counterfactual"`` and ``patch_errors``.

    Raises:
        CaseStudyError: the counterfactual's length differs from the prompt's.
    """

    def __init__(self, adapter: ModelAdapter, coders: dict[int, SparseCoder], tokens: torch.Tensor,
                 plus: Sequence[int], minus: Sequence[int] = (), cf_tokens: torch.Tensor | None = None):
        require_per_layer(coders, "a case study")
        self.adapter, self.coders = adapter, coders
        self.tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        self.plus, self.minus = list(plus), list(minus)
        self.errors, self.clean_acts = self._errors_and_acts(self.tokens)
        self.cf_tokens = None
        if cf_tokens is not None:
            self.cf_tokens = torch.as_tensor(cf_tokens, dtype=torch.long).flatten()
            if self.cf_tokens.numel() != self.tokens.numel():
                raise CaseStudyError(f"the counterfactual has {self.cf_tokens.numel()} tokens and the prompt "
                                     f"{self.tokens.numel()}; patching needs the same positions: write a "
                                     "counterfactual that tokenizes to the same length")
            self.cf_errors, self.cf_acts = self._errors_and_acts(self.cf_tokens)
            self.cf_heads = self._head_inputs(self.cf_tokens)
        self.n_pos = int(self.tokens.numel())

    def n_heads(self, layer: int) -> int:
        """Query heads of layer ``layer``'s attention."""
        return self._n_heads(self.adapter.attention_io(layer))

    @staticmethod
    def _n_heads(io) -> int:
        return sum(1 for _, slices in io.qkv for kind, _, _ in slices if kind == "q")

    @staticmethod
    def _d_head(io) -> int:
        sl = next(sl for _, slices in io.qkv for kind, _, sl in slices if kind == "q")
        return sl.stop - sl.start

    @torch.no_grad()
    def _head_inputs(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: [T, n_heads * d_head]}``: every layer's output-projection input (the heads'
        mixed values) on ``tokens`` in the real model."""
        rec: dict[int, torch.Tensor] = {}
        handles = []
        for layer in range(self.adapter.n_layers):
            mod = self.adapter.attention_io(layer).out_proj
            handles.append(mod.register_forward_pre_hook(lambda _m, args, layer=layer: rec.__setitem__(layer, args[0][0])))
        try:
            self.adapter.model(input_ids=tokens[None].to(self.adapter.device))
        finally:
            for h in handles:
                h.remove()
        return rec

    @torch.no_grad()
    def _errors_and_acts(self, tokens: torch.Tensor):
        clean = harvest(self.adapter, tokens[None].to(self.adapter.device), list(self.coders))
        errors, acts = {}, {}
        for layer, (x, y) in clean.items():
            coder = self.coders[layer]
            xc = x.to(coder.W_enc.dtype)
            a = coder.encode(xc)
            acts[layer] = a[0]
            errors[layer] = (y - coder.decode(a, xc).to(y.dtype))[0]
        return errors, acts

    @torch.no_grad()
    def counterfactual_pd(self) -> float:
        """PD of the model on the counterfactual prompt (same ``plus`` and ``minus`` tokens)."""
        if self.cf_tokens is None:
            raise CaseStudyError("no counterfactual prompt: the task items need one")
        logits = self.adapter.model(input_ids=self.cf_tokens[None].to(self.adapter.device)).logits[:, -1]
        return float(prob_diff(logits, self.plus, self.minus)[0])

    def differing_positions(self) -> list[int]:
        """Positions where the prompt and the counterfactual have different tokens."""
        if self.cf_tokens is None:
            raise CaseStudyError("no counterfactual prompt: the task items need one")
        return [int(i) for i in torch.nonzero(self.tokens != self.cf_tokens).flatten()]

    def active_nodes(self, *, skip_positions: Sequence[int] = (0,)) -> list[tuple[Node, float]]:
        """Every active node of the clean run with its activation, position 0 left out."""
        out = []
        for layer, a in self.clean_acts.items():
            pos, feat = torch.nonzero(a > 0, as_tuple=True)
            for p, f in zip(pos.tolist(), feat.tolist()):
                if p not in skip_positions:
                    out.append(((layer, p, f), float(a[p, f])))
        return out

    def _forward(self, variants: Sequence[Variant], grads: dict | None = None) -> torch.Tensor:
        """Last-position logits ``[B, vocab]`` of the free replacement model, one row per variant.
        ``grads``: if a dict, filled with ``grads["acts"][layer]`` the activations ``[B, T, d_sae]``
        and ``grads["leaves"][layer]`` zero tensors added to them, whose gradient is the total
        derivative with respect to the activations (through every later layer's re-encoding)."""
        ad, B, T = self.adapter, len(variants), self.n_pos
        if any(v.mode == "counterfactual" or v.patch_errors for v in variants) and self.cf_tokens is None:
            raise CaseStudyError("a counterfactual intervention needs the counterfactual prompt")
        if any(v.mode not in ("ablate", "counterfactual") for v in variants):
            raise CaseStudyError("Variant.mode must be 'ablate' or 'counterfactual'")
        per_layer: dict[int, tuple[list, list, list]] = {layer: ([], [], []) for layer in self.coders}
        pos_mask = torch.zeros(B, T, dtype=torch.bool)
        cf_rows = torch.tensor([v.mode == "counterfactual" for v in variants])
        for b, v in enumerate(variants):
            for layer, p, f in v.nodes:
                ix = per_layer[layer]
                ix[0].append(b), ix[1].append(p), ix[2].append(f)
            for p in v.positions:
                pos_mask[b, p] = True
        err_rows = torch.tensor([v.patch_errors for v in variants])
        head_edits: dict[int, list[tuple[int, int, list[int]]]] = {}
        for b, v in enumerate(variants):
            for layer, head in v.heads:
                head_edits.setdefault(layer, []).append((b, head, [p % T for p in v.head_positions]))
        if head_edits and self.cf_tokens is None:
            raise CaseStudyError("patching heads needs the counterfactual prompt")

        def head_patch(layer):
            io = self.adapter.attention_io(layer)
            d_head = self._d_head(io)

            def fn(_module, args):
                z = args[0].clone()
                ref = self.cf_heads[layer].to(z.dtype)
                for b, head, pos in head_edits[layer]:
                    sl = slice(head * d_head, (head + 1) * d_head)
                    z[b, pos, sl] = ref[pos, sl]
                return (z, *args[1:])

            return fn

        def replace(layer):
            coder = self.coders[layer]
            b_ix, p_ix, f_ix = (torch.tensor(x, dtype=torch.long) for x in per_layer[layer])

            def fn(x):
                xc = x.to(coder.W_enc.dtype)
                a = coder.encode(xc)  # [B, T, d_sae]
                ref = torch.zeros_like(a)
                if self.cf_tokens is not None and bool(cf_rows.any()):
                    ref = torch.where(cf_rows[:, None, None].to(a.device), self.cf_acts[layer].to(a.dtype)[None], ref)
                if pos_mask.any():
                    a = torch.where(pos_mask[:, :, None].to(a.device), ref, a)
                if len(b_ix):
                    a = a.index_put((b_ix, p_ix, f_ix), ref[b_ix, p_ix, f_ix])
                if grads is not None:  # a zero leaf: its gradient is the total derivative through later layers
                    z = torch.zeros_like(a, requires_grad=True)
                    grads.setdefault("leaves", {})[layer] = z
                    grads.setdefault("acts", {})[layer] = a
                    a = a + z
                err = self.errors[layer][None].expand(B, -1, -1)
                if bool(err_rows.any()):
                    err = torch.where(err_rows[:, None, None].to(err.device), self.cf_errors[layer][None], err)
                return coder.decode(a, xc).to(x.dtype) + err

            return fn

        handles = [ad.attention_io(layer).out_proj.register_forward_pre_hook(head_patch(layer)) for layer in head_edits]
        try:
            with splice_mlps(ad, {layer: replace(layer) for layer in self.coders}):
                logits = ad.model(input_ids=self.tokens[None].expand(B, -1).to(ad.device)).logits
        finally:
            for h in handles:
                h.remove()
        return logits[:, -1]

    @torch.no_grad()
    def pd(self, variants: Sequence[Variant], *, batch_size: int = 32) -> torch.Tensor:
        """``[B]`` PD (float64) under each variant."""
        return self.measure(variants, batch_size=batch_size)[0]

    @torch.no_grad()
    def measure(self, variants: Sequence[Variant], *, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B] PD, [B] task mass)`` under each variant from one forward pass each; the mass is
        the summed probability of the PD's tokens (``plus`` and ``minus``): a PD cut that only
        lowers it moved probability away from the task, not between sides."""
        pds, masses = [], []
        for i in range(0, len(variants), batch_size):
            logits = self._forward(variants[i : i + batch_size])
            pds.append(prob_diff(logits, self.plus, self.minus))
            masses.append(prob_diff(logits, self.plus + self.minus))
        if not pds:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        return torch.cat(pds).cpu(), torch.cat(masses).cpu()

    def first_order(self, variant: Variant | None = None, mode: str = "ablate") -> tuple[float, dict[int, torch.Tensor]]:
        """Attribution patching at ``variant``'s state: ``(PD, {layer: [T, d_sae]})`` with the
        estimated change of PD when each node is edited by ``mode``, ``(a' - a) dPD/da`` with
        ``a'`` 0 (``"ablate"``: 0 where inactive) or the counterfactual activation."""
        grads: dict = {}
        with torch.enable_grad():
            logits = self._forward([variant or Variant()], grads)
            value = prob_diff(logits, self.plus, self.minus)[0]
            acts, leaves = grads["acts"], grads["leaves"]
            layers = list(acts)
            g = torch.autograd.grad(value, [leaves[layer] for layer in layers])
        out = {}
        for layer, gl in zip(layers, g):
            a = acts[layer][0].detach()
            ref = self.cf_acts[layer].to(a.dtype) if mode == "counterfactual" else torch.zeros_like(a)
            out[layer] = (ref - a) * gl[0]
        return float(value.detach()), out


@dataclass
class Selection:
    """Greedy selection's result: ``nodes`` in the order chosen and ``pd`` after each (``pd[0]``:
    no edit)."""

    nodes: list[Node] = field(default_factory=list)
    pd: list[float] = field(default_factory=list)
    first_order_top: list[Node] = field(default_factory=list)


def _top_nodes(estimate: dict[int, torch.Tensor], n: int, exclude: set, skip_positions: Sequence[int]) -> list[Node]:
    """The ``n`` nodes with the most negative estimate (strictly negative only)."""
    flat = []
    for layer, est in estimate.items():
        e = est.clone()
        e[list(skip_positions)] = 0
        k = min(n + len(exclude), e.numel())
        vals, idx = (-e).flatten().topk(k)
        for v, i in zip(vals.tolist(), idx.tolist()):
            if v <= 0:
                break
            node = (layer, i // e.shape[1], i % e.shape[1])
            if node not in exclude:
                flat.append((v, node))
    flat.sort(key=lambda t: -t[0])
    return [node for _, node in flat[:n]]


def greedy_select(fp: FreePD, n: int = 10, *, n_candidates: int = 32, skip_positions: Sequence[int] = (0,),
                  batch_size: int = 32, mode: str = "ablate") -> Selection:
    """At most ``n`` nodes whose joint edit (``mode``: ablation, or patching to the counterfactual
    activations) cuts PD the most, chosen greedily (module docstring): ``n`` rounds of one
    backward pass and one batched forward pass over ``n_candidates``. Stops early when no
    candidate lowers PD further."""
    sel = Selection()
    current = float(fp.pd([Variant()])[0])
    sel.pd.append(current)
    for r in range(n):
        _, est = fp.first_order(Variant(nodes=list(sel.nodes), mode=mode), mode)
        if r == 0:
            sel.first_order_top = _top_nodes(est, n, set(), skip_positions)
        cands = _top_nodes(est, n_candidates, set(sel.nodes), skip_positions)
        if not cands:
            break
        pds = fp.pd([Variant(nodes=[*sel.nodes, c], mode=mode) for c in cands], batch_size=batch_size)
        best = int(pds.argmin())
        if float(pds[best]) >= current:
            break
        current = float(pds[best])
        sel.nodes.append(cands[best])
        sel.pd.append(current)
    return sel


def study_prompt(fp: FreePD, *, n: int = 10, n_candidates: int = 32, seeds: Sequence[int] = (0, 1, 2, 3, 4),
                 batch_size: int = 32, objective: str = "ablate") -> dict:
    """Every measurement of one prompt's case study (module docstring), as a JSON-able dict.

    Returns:
        ``{"pd": {name: value}, "digit_mass": {name: value}, "selected": [[layer, pos, feature], ...]``
        (chosen by the greedy search for ``objective``: ablation, or patching to counterfactual),
        "greedy_pd": [...], "n_active": int, "n_at_differing": int, "differing_positions": [...]}``
        where the names are ``clean``, ``selected`` (ablated), ``selected_counterfactual``
        (selected nodes patched to their counterfactual values), ``all_at_differing`` (every
        feature at the differing positions ablated), ``all_at_differing_counterfactual``,
        ``first_order_top`` (the top ``n`` by attribution patching, edited as ``objective``), ``top_activation``,
        ``random_seed{S}``, ``errors_counterfactual`` (error nodes patched, features free),
        ``features_counterfactual`` (every feature patched at every position, errors clean),
        ``all_features_ablated`` (every feature after position 0 ablated), and for heads (output
        at the last position patched to counterfactual): ``top_heads_counterfactual`` (the ``n``
        heads with the largest single effects, :func:`head_scan`, together) and
        ``all_heads_counterfactual``; ``head_effects`` holds each head's single effect.
    """
    if objective not in ("ablate", "counterfactual"):
        raise CaseStudyError(f"objective {objective!r}: use ablate or counterfactual")
    sel = greedy_select(fp, n, n_candidates=n_candidates, batch_size=batch_size, mode=objective)
    active = fp.active_nodes()
    diff = fp.differing_positions() if fp.cf_tokens is not None else []
    variants = {"clean": Variant(), "selected": Variant(nodes=sel.nodes),
                "first_order_top": Variant(nodes=sel.first_order_top, mode=objective),
                "top_activation": Variant(nodes=[node for node, _ in sorted(active, key=lambda t: -t[1])[:n]]),
                "all_features_ablated": Variant(positions=list(range(1, fp.n_pos)))}
    for s in seeds:
        rng = random.Random(s)
        variants[f"random_seed{s}"] = Variant(nodes=[node for node, _ in rng.sample(active, min(n, len(active)))])
    if fp.cf_tokens is not None:
        variants |= {"selected_counterfactual": Variant(nodes=sel.nodes, mode="counterfactual"),
                     "all_at_differing": Variant(positions=diff),
                     "all_at_differing_counterfactual": Variant(positions=diff, mode="counterfactual"),
                     "errors_counterfactual": Variant(patch_errors=True),
                     "features_counterfactual": Variant(positions=list(range(fp.n_pos)), mode="counterfactual"),
                     "counterfactual_both": Variant(positions=list(range(fp.n_pos)), mode="counterfactual",
                                                    patch_errors=True)}
    heads: dict = {}
    if fp.cf_tokens is not None:
        heads = head_scan(fp, batch_size=batch_size)
        top_heads = sorted(heads, key=heads.get)[:n]
        variants["top_heads_counterfactual"] = Variant(heads=top_heads)
        variants["all_heads_counterfactual"] = Variant(heads=list(heads))
    names = list(variants)
    pds, mass = fp.measure([variants[k] for k in names], batch_size=batch_size)
    pd = dict(zip(names, pds.tolist()))
    if fp.cf_tokens is not None:
        pd["counterfactual_prompt"] = fp.counterfactual_pd()
    return {"pd": pd, "digit_mass": dict(zip(names, mass.tolist())),
            "selected": [list(x) for x in sel.nodes], "greedy_pd": sel.pd,
            "first_order_top": [list(x) for x in sel.first_order_top], "n_active": len(active),
            "head_effects": {f"{layer}.{h}": d for (layer, h), d in heads.items()},
            "n_at_differing": sum(1 for (_, p, _), _ in active if p in diff), "differing_positions": diff}


def head_scan(fp: FreePD, *, positions: Sequence[int] = (-1,), batch_size: int = 32) -> dict[tuple[int, int], float]:
    """``{(layer, head): PD change}`` when that one head's output at ``positions`` (default: the
    last, where the answer is read out) is patched to its value on the counterfactual prompt, every
    other head and feature free (negative: the head carries PD into those positions)."""
    heads = [(layer, h) for layer in range(fp.adapter.n_layers) for h in range(fp.n_heads(layer))]
    base = float(fp.pd([Variant()])[0])
    pds = fp.pd([Variant(heads=[lh], head_positions=positions) for lh in heads], batch_size=batch_size)
    return {lh: float(p) - base for lh, p in zip(heads, pds)}


def feature_frequency(studies: Sequence[dict], n: int = 10) -> list[tuple[int, int, int, float]]:
    """The ``n`` feature ids ``(layer, feature)`` the per-prompt selections name most often, as
    ``(layer, feature, count, summed greedy gain)``; ties broken by the summed gain (the PD
    each one's addition removed)."""
    stats: dict[tuple[int, int], list[float]] = {}
    for st in studies:
        for (layer, _, feat), before, after in zip(st["selected"], st["greedy_pd"], st["greedy_pd"][1:]):
            s = stats.setdefault((layer, feat), [0, 0.0])
            s[0] += 1
            s[1] += before - after
    ranked = sorted(stats.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))
    return [(layer, feat, int(c), g) for (layer, feat), (c, g) in ranked[:n]]


def global_variant(fp: FreePD, features: Sequence[tuple[int, int]], *, skip_positions: Sequence[int] = (0,),
                   mode: str = "ablate") -> Variant:
    """Edit the given ``(layer, feature)`` ids (``mode``: ablate, or patch to counterfactual) at
    every position of ``fp``'s prompt but the skipped ones where the clean run (or, to patch,
    either run) has them active."""
    nodes = []
    for layer, feat in features:
        active = fp.clean_acts[layer][:, feat] > 0
        if mode == "counterfactual":
            active = active | (fp.cf_acts[layer][:, feat] > 0)
        for p in torch.nonzero(active).flatten().tolist():
            if p not in skip_positions:
                nodes.append((layer, p, feat))
    return Variant(nodes=nodes, mode=mode)


__all__ = ["CaseStudyError", "FreePD", "Selection", "Variant", "feature_frequency", "global_variant", "greedy_select",
           "head_scan", "study_prompt"]
