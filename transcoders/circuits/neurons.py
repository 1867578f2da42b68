"""Neuron-level circuits: MLP neurons of the original model, ranked by attribution, the rest
ablated.

A *neuron* is one hidden unit of one layer's MLP at one position: ``(layer, pos, i)``, the
``i``-th entry of the MLP's hidden activations (after the nonlinearity, and the gate for gated
MLPs, before the down projection; :meth:`~transcoders.models.adapters.ModelAdapter.mlp_hidden_module`),
the same granularity as a transcoder feature node ``(layer, pos, feature)``. A circuit of ``k``
neurons keeps the ``k`` highest-scoring neurons; every other candidate neuron is set to its value
on the counterfactual prompt (same length) or to its mean over reference text; attention and
everything else is recomputed. Neurons at ``keep_positions`` (default: none; the benchmark keeps
the first position, the attention sink, as it does for features) are never ablated.

Scores (attribution patching, Nanda 2023; Syed, Rager & Conmy 2023; with integrated gradients
over the input as EAP-IG, Hanna et al. 2024): ``(a_clean - a_ref) . (1/m) sum_{k=1..m} dM/da``
with the input embeddings interpolated to ``ref0 + (k/m)(clean0 - ref0)``: the estimated drop of
the metric when the neuron is ablated (``m = 1``: the gradient at the clean run). This is the
comparison of Dunefsky, Chlenski & Nanda (2024, "Transcoders Find Interpretable LLM Feature
Circuits", arXiv 2406.11944, greater-than on GPT-2): top-k transcoder features against top-k
MLP neurons on the same prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import ExitStack

import torch

from ..models.adapters import ModelAdapter
from .eap import block0_input, embeddings_in, task_metric, uncapped_logits
from .targets import Target


class NeuronError(ValueError):
    """Neuron references or masks do not fit the model or the prompt."""


class NeuronRunner:
    """Runs the original model with MLP neurons replaced or perturbed (module docstring)."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.modules = [adapter.mlp_hidden_module(layer) for layer in range(adapter.n_layers)]

    def run(self, tokens: torch.Tensor, *, keep: dict[int, torch.Tensor] | None = None,
            reference: dict[int, torch.Tensor] | None = None, deltas: dict[int, torch.Tensor] | None = None,
            resid0: torch.Tensor | None = None, record: dict | None = None) -> torch.Tensor:
        """One forward pass on ``tokens [T]``; returns the logits ``[T, vocab]`` (before any soft-cap).

        Args:
            keep: ``{layer: [T, d_mlp] bool}``; where False the neuron becomes ``reference[layer]``
                (``[T, d_mlp]`` counterfactual values, or ``[d_mlp]`` means). Layers not given are untouched.
            deltas: ``{layer: [T, d_mlp]}`` added to the hidden activations (zeros requiring grad
                give ``dM/da``).
            resid0: ``[T, d]`` replaces the embeddings block 0 reads (IG interpolation).
            record: if a dict, filled with ``{layer: [T, d_mlp]}`` hidden activations as used.

        Raises:
            NeuronError: a mask without its reference, or shapes that do not fit.
        """
        ad = self.adapter
        tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()

        def pre(layer):
            def fn(_module, args, kwargs):
                a = args[0] if args else next(iter(kwargs.values()))
                new = a
                if keep is not None and layer in keep:
                    if reference is None or layer not in reference:
                        raise NeuronError(f"layer {layer}'s neurons are ablated but no reference values were given")
                    m, ref = keep[layer].to(a.device), reference[layer].to(device=a.device, dtype=a.dtype)
                    if m.shape != a.shape[1:] or ref.shape[-1] != a.shape[-1] or (ref.dim() == 2 and ref.shape != a.shape[1:]):
                        raise NeuronError(f"layer {layer}: mask {tuple(m.shape)} / reference {tuple(ref.shape)} do not "
                                          f"fit the hidden activations {tuple(a.shape[1:])} (same-length prompts?)")
                    new = torch.where(m[None], new, ref)
                if deltas is not None and layer in deltas:
                    new = new + deltas[layer][None].to(a.dtype)
                if record is not None:
                    record[layer] = new[0]
                if new is a:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, next(iter(kwargs)): new})

            return fn

        with ExitStack() as stack:
            stack.enter_context(block0_input(ad, replace=resid0))
            handles = [m.register_forward_pre_hook(pre(layer), with_kwargs=True) for layer, m in enumerate(self.modules)]
            stack.callback(lambda: [h.remove() for h in handles])
            logits = ad.model(input_ids=tokens[None].to(ad.device)).logits[0]
        return uncapped_logits(ad, logits)

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: [T, d_mlp]}`` hidden activations on ``tokens [T]``."""
        rec: dict = {}
        self.run(tokens, record=rec)
        return rec

    @torch.no_grad()
    def mean_hidden(self, contexts: Iterable[torch.Tensor], *, skip_first: bool = True) -> dict[int, torch.Tensor]:
        """``{layer: [d_mlp]}`` hidden activations averaged over every position of ``contexts``
        (``[ctx]`` tensors or rows of ``[n, ctx]``), without each first position with ``skip_first``.

        Raises:
            ValueError: no positions to average over.
        """
        sums: dict[int, torch.Tensor] = {}
        count = 0
        start = 1 if skip_first else 0
        for ctx in contexts:
            for layer, a in self.hidden(ctx).items():
                s = a[start:].double().sum(0)
                sums[layer] = s if layer not in sums else sums[layer] + s
            count += max(int(torch.as_tensor(ctx).numel()) - start, 0)
        if not count:
            raise ValueError("no reference positions to average over: give longer or more contexts")
        return {layer: (s / count).to(self.adapter.dtype) for layer, s in sums.items()}


def neuron_scores(runner: NeuronRunner, tokens: torch.Tensor, targets: Sequence[Target],
                  reference: dict[int, torch.Tensor], *, baseline_resid0: torch.Tensor | None = None,
                  steps: int = 1, clean: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Attribution scores of every neuron (module docstring).

    Args:
        reference: ``{layer: [T, d_mlp] or [d_mlp]}`` the ablation values.
        baseline_resid0: ``[T, d]`` the embeddings IG starts from (the counterfactual prompt's, or
            the mean); needed when ``steps > 1``.
        steps: IG steps ``m`` (1: the gradient at the clean run).

    Returns:
        ``[n_layers, T, d_mlp]`` float64, the estimated drop of the metric when each neuron alone
        is ablated.

    Raises:
        ValueError: ``steps < 1``, or ``steps > 1`` without ``baseline_resid0``.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > 1 and baseline_resid0 is None:
        raise ValueError("integrated gradients over more than one step need the baseline embeddings")
    clean = runner.hidden(tokens) if clean is None else clean
    L = len(runner.modules)
    clean0 = embeddings_in(runner.adapter, tokens) if steps > 1 else None
    grads = {layer: torch.zeros_like(clean[layer], dtype=torch.float64) for layer in range(L)}
    for k in range(1, steps + 1):
        resid0 = None if k == steps else baseline_resid0 + (k / steps) * (clean0 - baseline_resid0)
        deltas = {layer: torch.zeros_like(clean[layer], requires_grad=True) for layer in range(L)}
        with torch.enable_grad():
            m = task_metric(targets, runner.run(tokens, deltas=deltas, resid0=resid0))
            gs = torch.autograd.grad(m, [deltas[layer] for layer in range(L)])
        for layer, g in enumerate(gs):
            grads[layer] += g.double()
    diff = [(clean[layer] - reference[layer].to(clean[layer])).double() for layer in range(L)]
    return torch.stack([diff[layer] * grads[layer] / steps for layer in range(L)]).cpu()


def neuron_ranking(scores: torch.Tensor, *, absolute: bool = False, keep_positions: Sequence[int] = ()) -> torch.Tensor:
    """``[n, 3]`` long ``(layer, pos, neuron)`` of the candidate neurons (all but those at
    ``keep_positions``), highest score first (``|score|`` with ``absolute``; ties by index)."""
    s = scores.abs() if absolute else scores
    L, T, D = s.shape
    cand = torch.ones(L, T, D, dtype=torch.bool)
    cand[:, list(keep_positions)] = False
    idx = cand.flatten().nonzero().flatten()
    order = idx[s.flatten()[idx].argsort(descending=True, stable=True)]
    return torch.stack([order // (T * D), (order // D) % T, order % D], dim=1)


@torch.no_grad()
def neuron_circuit_values(runner: NeuronRunner, tokens: torch.Tensor, targets: Sequence[Target],
                          reference: dict[int, torch.Tensor], scores: torch.Tensor, sizes: Sequence[int], *,
                          absolute: bool = False, keep_positions: Sequence[int] = ()) -> tuple[float, float, list[float]]:
    """The metric for the model, for every candidate neuron ablated, and for the top ``k``
    neurons kept (rest ablated) for each ``k`` in ``sizes``.

    Returns:
        ``(m_full, m_empty, [m(C_k)])`` in the metric's units.
    """
    L, T, D = scores.shape
    ranking = neuron_ranking(scores, absolute=absolute, keep_positions=keep_positions)
    base = torch.zeros(L, T, D, dtype=torch.bool)
    base[:, list(keep_positions)] = True

    def m(keep: torch.Tensor) -> float:
        masks = {layer: keep[layer] for layer in range(L)}
        return float(task_metric(targets, runner.run(tokens, keep=masks, reference=reference)))

    full = float(task_metric(targets, runner.run(tokens)))
    empty = m(base)
    values = []
    for k in sizes:
        keep = base.clone()
        top = ranking[:k]
        keep[top[:, 0], top[:, 1], top[:, 2]] = True
        values.append(m(keep))
    return full, empty, values
