"""Interventions on transcoder features: ablate, clamp or scale, and steer generation.

Three settings, from most to least constrained:

- ``frozen``: the local replacement model with attention patterns, norm denominators and every
  other feature held (:meth:`LocalReplacement.forward`, ``features="held"``). An edit's effect on
  a target is then exactly the graph's direct edge, scaled by the change in activation.
- ``linear``: as ``frozen``, but other active features follow their pre-activations (the active
  set frozen): effects flow through the graph's paths.
- ``free``: the replacement model run for real (every MLP replaced by its transcoder plus the
  error node held at its clean value, attention and norms recomputed, features re-encoded), as
  circuit-tracer's interventions and Marks et al. (2024)'s circuits do.

Edit specs (CLI ``--edit``): ``LAYER.FEATURE[@POS[,POS...]]=ablate|clamp:VALUE|scale:FACTOR``
(no ``@``: every prompt position), e.g. ``6.123=ablate``, ``6.123@4,5=clamp:8``.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from ..coders.clt import CrossLayerTranscoder, require_per_layer
from ..coders.coder import SparseCoder
from ..data.activations import harvest
from ..evaluation.splice import splice_clt, splice_mlps
from ..models.adapters import ModelAdapter
from .replacement import FrozenRun, LocalReplacement
from .targets import Target, target_values


class EditError(ValueError):
    """An edit spec is malformed or names a layer, feature or position that does not exist."""


@dataclass
class FeatureEdit:
    """Set feature ``feature`` of ``layer`` at ``positions`` (None: all) to ``0`` (ablate),
    ``value`` (clamp) or ``value x`` its activation (scale)."""

    layer: int
    feature: int
    mode: str = "ablate"
    value: float = 0.0
    positions: list[int] | None = None

    def apply(self, a: torch.Tensor) -> torch.Tensor:
        """New activations for current activations ``a``."""
        if self.mode == "ablate":
            return torch.zeros_like(a)
        if self.mode == "clamp":
            return torch.full_like(a, self.value)
        if self.mode == "scale":
            return a * self.value
        raise EditError(f"unknown edit mode {self.mode!r}; use ablate, clamp or scale")

    def mask(self, n_pos: int, device=None) -> torch.Tensor:
        m = torch.zeros(n_pos, dtype=torch.bool, device=device)
        if self.positions is None:
            m[:] = True
        else:
            m[torch.tensor(self.positions, dtype=torch.long)] = True
        return m


def parse_edit(spec: str, *, n_layers: int, d_sae: dict[int, int], n_pos: int | None = None) -> FeatureEdit:
    """Parse an edit spec (module docstring).

    Raises:
        EditError: malformed, or out of range.
    """
    lhs, sep, rhs = spec.partition("=")
    if not sep:
        raise EditError(f"edit {spec!r} needs '=': e.g. 6.123@5=ablate or 6.123=clamp:4")
    where, _, at = lhs.partition("@")
    try:
        layer, feature = (int(x) for x in where.split("."))
        positions = [int(p) for p in at.split(",")] if at else None
    except ValueError:
        raise EditError(f"edit {spec!r}: write LAYER.FEATURE[@POS,...]=MODE") from None
    mode, _, val = rhs.partition(":")
    if mode not in ("ablate", "clamp", "scale"):
        raise EditError(f"edit {spec!r}: mode must be ablate, clamp:VALUE or scale:FACTOR")
    try:
        value = float(val) if val else (0.0 if mode == "ablate" else float("nan"))
    except ValueError:
        raise EditError(f"edit {spec!r}: {val!r} is not a number") from None
    if mode != "ablate" and math.isnan(value):
        raise EditError(f"edit {spec!r}: {mode} needs a number, e.g. {mode}:2")
    if not 0 <= layer < n_layers:
        raise EditError(f"edit {spec!r}: layer {layer} is out of range (0..{n_layers - 1})")
    if layer not in d_sae or not 0 <= feature < d_sae[layer]:
        raise EditError(f"edit {spec!r}: feature {feature} is out of range for layer {layer}")
    if positions is not None and n_pos is not None:
        positions = [p + n_pos if p < 0 else p for p in positions]
        if any(not 0 <= p < n_pos for p in positions):
            raise EditError(f"edit {spec!r}: a position is outside the {n_pos}-token prompt")
    return FeatureEdit(layer, feature, mode, value, positions)


# ---------------------------------------------------------------------------- frozen / linear
def frozen_target_values(rep: LocalReplacement, run: FrozenRun, targets: list[Target]) -> torch.Tensor:
    """``[n_targets]`` target values (:meth:`Target.value`) in a frozen run, in ``rep.dtype``
    (logits before any soft-cap)."""
    return target_values(targets, run.logits, mlp_in=run.mlp_in, resid_pre=run.resid_pre, coders=rep.coders)


@torch.no_grad()
def intervene_frozen(rep: LocalReplacement, edits: list[FeatureEdit], targets: list[Target],
                     *, features: str = "held") -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``edits`` in the frozen (``features="held"``) or linearised (``"linear"``) local
    replacement model.

    Features folded into the bias nodes (``rep.constant_positions``, e.g. a BOS position) can be
    edited too: their change is written like any feature's, but in ``"linear"`` mode other folded
    features do not respond to it (they are constants of the graph).

    Returns:
        ``(before, after)``, each ``[n_targets]`` in ``rep.dtype``.
    """
    delta: dict[int, torch.Tensor] = {}
    pinned: dict[int, torch.Tensor] = {}
    for e in edits:
        f = rep.layers[e.layer].features
        pos_mask = e.mask(rep.n_pos, rep.device)
        current = torch.zeros(rep.n_pos, dtype=rep.dtype, device=rep.device)
        here = f.feature == e.feature
        current[f.pos[here]] = f.activation[here]
        folded = rep.layers[e.layer].folded
        if folded is not None:
            at = folded.feature == e.feature
            current[folded.pos[at]] = folded.activation[at]
        change = torch.where(pos_mask, e.apply(current) - current, torch.zeros_like(current))
        for t, write in rep.feature_writes(e.layer, e.feature, change).items():  # several layers for a CLT
            delta[t] = delta.get(t, 0) + write
        pin = here & pos_mask[f.pos]
        pinned[e.layer] = pinned.get(e.layer, torch.zeros_like(pin)) | pin
    before = frozen_target_values(rep, rep.forward(), targets)
    after = frozen_target_values(rep, rep.forward(delta, features=features, pinned=pinned), targets)
    return before, after


# ---------------------------------------------------------------------------- free
class ReplacementRunner:
    """Runs the replacement model for real: every MLP becomes ``coder(x) + error`` with the error
    node held at its clean value; attention, norms and features are recomputed.

    Args:
        adapter: the model's adapter; coders: ``{layer: transcoder}`` for every layer;
        tokens: ``[T]`` prompt.
    """

    def __init__(self, adapter: ModelAdapter, coders: dict[int, SparseCoder] | CrossLayerTranscoder, tokens: torch.Tensor):
        self.clt = coders if isinstance(coders, CrossLayerTranscoder) else None
        if self.clt is not None:
            coders = self.clt.layer_coders()
        self.adapter, self.coders = adapter, coders
        self.tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
        self.softcap = getattr(adapter.config, "final_logit_softcapping", None)
        self.errors: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            if self.clt is not None:  # a CLT layer's reconstruction needs every earlier layer's features
                outs: dict = {}
                with splice_clt(adapter, self.clt, (), outputs=outs) as acts:
                    adapter.model(input_ids=self.tokens[None].to(adapter.device))
                for t, y in outs.items():
                    self.errors[t] = y - self.clt.reconstruct(t, acts).to(y.dtype)
                return
            clean = harvest(adapter, self.tokens[None], list(coders))
        for layer, (x, y) in clean.items():
            coder = coders[layer]
            self.errors[layer] = y - coder(x.to(coder.W_enc.dtype)).to(y.dtype)

    def clean_activations(self) -> dict[int, torch.Tensor]:
        """``{layer: [T, d_sae]}`` feature activations on the clean prompt."""
        acts = {}
        self.run(record_acts=acts)
        return acts

    @torch.no_grad()
    def run(self, edits: list[FeatureEdit] = (), *, keep: dict[int, torch.Tensor] | None = None,
            means: dict[int, torch.Tensor] | None = None, record_acts: dict | None = None) -> dict:
        """One forward pass of the replacement model.

        Args:
            edits: feature edits (activations replaced after encoding).
            keep, means: mean ablation: where ``keep[layer] [T, d_sae]`` is False the
                activation becomes ``means[layer] [d_sae]``.
            record_acts: if a dict, filled with ``{layer: [T, d_sae]}`` activations used.

        Returns:
            ``{"mlp_in": {layer: [T, d]}, "resid_pre": {layer: [T, d]}, "logits": [T, vocab]}``
            (logits before any soft-cap).
        """
        ad = self.adapter
        cap: dict = {"mlp_in": {}, "resid_pre": {}}
        by_layer: dict[int, list[FeatureEdit]] = {}
        for e in edits:
            by_layer.setdefault(e.layer, []).append(e)

        def pre(layer):
            def fn(_module, args, kwargs):
                cap["resid_pre"][layer] = (args[0] if args else kwargs["hidden_states"])[0]

            return fn

        def edit(layer, a):  # a [1, T, d_sae] as encoded -> as the edits leave it
            if keep is not None and layer in keep:
                a = torch.where(keep[layer][None].to(a.device), a, means[layer].to(a.dtype))
            for e in by_layer.get(layer, ()):
                m = e.mask(a.shape[1], a.device)
                a[0, m, e.feature] = e.apply(a[0, m, e.feature])
            if record_acts is not None:
                record_acts[layer] = a[0]
            return a

        def replace(layer):
            coder = self.coders[layer]

            def fn(x):
                cap["mlp_in"][layer] = x[0]
                xc = x.to(coder.W_enc.dtype)
                return coder.decode(edit(layer, coder.encode(xc)), xc).to(x.dtype) + self.errors[layer]

            return fn

        with ExitStack() as stack:
            if self.clt is not None:
                read: dict = {}
                stack.enter_context(splice_clt(ad, self.clt, edit=edit, add=self.errors, inputs=read))
                stack.callback(lambda: cap["mlp_in"].update({layer: x[0] for layer, x in read.items()}))
            else:
                stack.enter_context(splice_mlps(ad, {layer: replace(layer) for layer in self.coders}))
            handles = [block.register_forward_pre_hook(pre(i), with_kwargs=True) for i, block in enumerate(ad.layers())]
            handles.append(ad.final_norm().module.register_forward_pre_hook(pre(ad.n_layers), with_kwargs=True))
            stack.callback(lambda: [h.remove() for h in handles])
            logits = ad.model(input_ids=self.tokens[None].to(ad.device)).logits[0]
        if self.softcap:  # undo Gemma 2's soft-cap so logit targets match the graph's
            logits = self.softcap * torch.atanh((logits / self.softcap).clamp(-1 + 1e-7, 1 - 1e-7))
        cap["logits"] = logits
        return cap

    def target_values(self, cap: dict, targets: list[Target]) -> torch.Tensor:
        """``[n_targets]`` target values (:meth:`Target.value`, float64) from a :meth:`run`."""
        return target_values(targets, cap["logits"], mlp_in=cap["mlp_in"], resid_pre=cap["resid_pre"],
                             coders=self.coders, dtype=torch.float64).detach()

    def intervene(self, edits: list[FeatureEdit], targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(before, after)`` target values ``[n_targets]`` (float64) in the free replacement model."""
        return self.target_values(self.run(), targets), self.target_values(self.run(edits), targets)


@torch.no_grad()
def mean_activations(adapter: ModelAdapter, coders: dict[int, SparseCoder] | CrossLayerTranscoder, contexts: torch.Tensor, *,
                     batch_size: int = 8, skip_first: bool = True) -> dict[int, torch.Tensor]:
    """``{layer: [d_sae]}`` mean feature activations of every coder on the real model's MLP
    inputs over ``contexts [n, ctx]`` (the reference for mean ablation).

    ``skip_first`` leaves out each context's first position, the attention sink, whose
    activations are unlike any other position's.
    """
    sums = {layer: torch.zeros(c.cfg.d_sae, dtype=torch.float64) for layer, c in coders.items()}
    count = 0
    start = 1 if skip_first else 0
    for i in range(0, len(contexts), batch_size):
        batch = contexts[i : i + batch_size]
        if isinstance(coders, CrossLayerTranscoder):  # encoded on what the CLT reads (resid_mid or the MLP input)
            with splice_clt(adapter, coders, ()) as enc:
                adapter.model(input_ids=batch.to(adapter.device))
        else:
            acts = harvest(adapter, batch, list(coders))
            enc = {layer: coder.encode(acts[layer][0].to(coder.W_enc.dtype)) for layer, coder in coders.items()}
        for layer in coders:
            sums[layer] += enc[layer][:, start:].double().sum((0, 1)).cpu()
        count += batch.shape[0] * (batch.shape[1] - start)
    return {layer: (s / max(count, 1)).float() for layer, s in sums.items()}


# ---------------------------------------------------------------------------- steering
@torch.no_grad()
def steer(adapter: ModelAdapter, coders: dict[int, SparseCoder], tokenizer, prompt: str | torch.Tensor,
          edits: list[FeatureEdit],
          *, max_new_tokens: int = 20, only_generated: bool = True) -> tuple[str, str]:
    """Greedy generation with and without clamping/scaling features.

    Each edit adds ``(new_a - a) W_dec[feature]`` to the real MLP output of its layer, where
    ``a`` is the feature's activation on the current input, so the rest of the model is
    untouched. With ``only_generated`` the edit applies to generated positions only;
    otherwise to every position (edit ``positions`` are ignored). ``prompt`` is text, or its
    ``[T]`` token ids (as ``trace`` tokenizes it, with the run's BOS policy).

    Returns:
        ``(baseline continuation, steered continuation)``.
    """
    require_per_layer(coders, "steering generation")
    ids = prompt[None] if torch.is_tensor(prompt) else tokenizer(prompt, return_tensors="pt").input_ids
    ids = ids.to(adapter.device)
    n_prompt = ids.shape[1]
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    base = adapter.model.generate(ids, **gen)[0, n_prompt:]
    seen = {"len": 0, "offset": 0}

    def post(layer, x, out):
        coder = coders[layer]
        x = x.to(coder.W_enc.dtype)
        acts = coder.encode(x)  # [B, t, d_sae]
        # Absolute positions of this call's tokens (generation feeds one token at a time).
        absolute = torch.arange(x.shape[1], device=x.device) + seen["offset"]
        new = out
        for e in by_layer[layer]:
            a = acts[..., e.feature]
            delta = e.apply(a) - a
            if only_generated:
                delta = delta * (absolute >= n_prompt)
            new = new + (delta[..., None] * coder.W_dec[e.feature]).to(out.dtype)
        return new

    def count(_module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        seen["offset"] = seen["len"]
        seen["len"] += x.shape[1]

    by_layer: dict[int, list[FeatureEdit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    handle = adapter.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with adapter.hook_mlps(by_layer, on_output=post):
            steered = adapter.model.generate(ids, **gen)[0, n_prompt:]
    finally:
        handle.remove()
    return tokenizer.decode(base), tokenizer.decode(steered)
