"""Task files: many prompts with one kind of target, so a whole task runs in one command
(``transcoders task trace RUN TASK.jsonl``).

A task file is JSON lines, one :class:`TaskItem` per line::

    {"prompt": "The war lasted from 1732 to 17", "target": "group:+4,5,6,7,8,9;-0,1,2,3",
     "counterfactual": "The war lasted from 1701 to 17", "answer": null, "meta": {"start": 1732}}

- ``prompt``: the text whose next token (or the position in ``target``'s ``@POS``) is explained;
- ``target``: a target spec as ``--target`` takes it (:mod:`transcoders.circuits.targets`),
  usually ``diff:`` or ``group:``;
- ``counterfactual``: a prompt of the same shape that flips the answer (for activation
  patching and faithfulness), or null;
- ``answer``: the expected next token's text when there is one (e.g. ``" Mary"``), or null;
- ``meta``: anything else (template, names, years), free-form JSON.

Blank lines are skipped; unknown fields are rejected (a misspelt ``counterfactual`` would
otherwise be silently dropped). Generators of our own tasks are in
:mod:`transcoders.circuits.task_gen`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..files import atomic_write_text, refuse_to_replace
from .targets import Target, TargetError, parse_target, target_prob_diff


class TaskFileError(ValueError):
    """A task file is missing, malformed (the message names the line), or names tokens the
    tokenizer cannot give as one token."""


class TaskItem(BaseModel):
    """One prompt of a task: see the module docstring for the fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    target: str = Field(min_length=1)
    counterfactual: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


def task_name(path: str | os.PathLike) -> str:
    """The name of the task in ``path``: the file name without ``.jsonl`` (``greater-than``)."""
    name = Path(path).name
    for suffix in (".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "the item"
    if err.get("type") == "missing":
        return f"missing field {where!r}"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {where!r} (fields: prompt, target, counterfactual, answer, meta)"
    return f"{where}: {err.get('msg', 'invalid')}"


def load_task(path: str | os.PathLike) -> list[TaskItem]:
    """Read a task file (JSON lines of :class:`TaskItem`).

    Raises:
        TaskFileError: the file is missing or unreadable, holds no item, or a line is not a
            JSON object of the right fields; the message names the file and the line number.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"no task file at {path}; make one with `transcoders task make`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"cannot read task file {path}: {exc}") from None
    items = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"{path}:{n} (line {n}) is not JSON ({exc.msg} at column {exc.colno}); each line must be "
                                'one object like {"prompt": ..., "target": ...}') from None
        if not isinstance(obj, dict):
            raise TaskFileError(f"{path}:{n} (line {n}) is a JSON {type(obj).__name__}, not an object with prompt and target")
        try:
            items.append(TaskItem.model_validate(obj))
        except ValidationError as exc:
            raise TaskFileError(f"{path}:{n} (line {n}): {_first_error(exc)}") from None
    if not items:
        raise TaskFileError(f"{path} holds no task items (one JSON object per line)")
    return items


def save_task(items: Sequence[TaskItem], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``items`` as JSON lines, atomically (:func:`transcoders.files.atomic_write_text`).

    Raises:
        transcoders.files.OutputExistsError: ``path`` exists and ``force`` is not set.
        TaskFileError: ``items`` is empty.
    """
    if not items:
        raise TaskFileError("no task items to write")
    path = Path(path)
    refuse_to_replace(path, force)
    lines = [json.dumps(item.model_dump(), ensure_ascii=False, allow_nan=False) for item in items]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def item_targets(items: Sequence[TaskItem], *, tokenizer, vocab_size: int, n_layers: int = 0,
                 d_sae: dict[int, int] | None = None, d_model: int | None = None) -> list[Target]:
    """The parsed target of each item (:func:`~transcoders.circuits.targets.parse_target`), and a
    check that each ``answer`` is one token.

    Raises:
        TaskFileError: an item's target does not parse (a multi-token or unknown token...) or its
            answer is not one token; the message names the item (0-based, as graph files are
            numbered) and the fix.
    """
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_target(item.target, tokenizer=tokenizer, vocab_size=vocab_size, n_layers=n_layers,
                                    d_sae=d_sae, d_model=d_model))
        except TargetError as exc:
            raise TaskFileError(f"task item {i} ({item.prompt[:40]!r}...): {exc}") from None
        if item.answer is not None and tokenizer is not None:
            ids = tokenizer.encode(item.answer, add_special_tokens=False)
            if len(ids) != 1:
                raise TaskFileError(f"task item {i}: the answer {item.answer!r} encodes to {len(ids)} tokens {ids}; "
                                    "answers must be one token")
    return out


@torch.no_grad()
def next_token_logits(loaded, prompts: Sequence[str], *, bos: bool | None = None, batch_size: int = 32) -> torch.Tensor:
    """``[n, vocab]`` float32 logits of the token after each prompt's last token, as the model
    samples from them (after any soft-cap), each prompt tokenized as ``trace`` does
    (:func:`~transcoders.circuits.session.tokenize_prompt`, BOS by ``bos`` or the model's policy).

    Prompts are right-padded into batches: in a causal model the padding after a prompt cannot
    change its logits, so no attention mask is needed.

    Args:
        loaded: a :class:`~transcoders.models.loading.LoadedModel`.
    """
    from .session import tokenize_prompt

    ids = [tokenize_prompt(loaded, p, bos=bos) for p in prompts]
    device = next(loaded.model.parameters()).device
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        lengths = torch.tensor([len(x) for x in chunk])
        batch = torch.zeros(len(chunk), int(lengths.max()), dtype=torch.long)
        for i, x in enumerate(chunk):
            batch[i, : len(x)] = x
        logits = loaded.model(batch.to(device)).logits
        out.append(logits[torch.arange(len(chunk)), (lengths - 1).to(device)].float().cpu())
    return torch.cat(out)


def _uncapped(loaded, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(getattr(loaded.model, "config", None), "final_logit_softcapping", None)
    if not cap:
        return logits
    return cap * torch.atanh((logits.double() / cap).clamp(-1 + 1e-7, 1 - 1e-7))


def task_metrics(items: Sequence[TaskItem], targets: Sequence[Target], logits: torch.Tensor, *, tokenizer,
                 counterfactual_logits: torch.Tensor | None = None, uncap=None) -> dict:
    """How well a model does a task, from its next-token logits on the prompts.

    Per item: the target's value (:meth:`Target.value` on the last position; uncapped logits,
    as graphs explain them), its probability difference (:func:`~transcoders.circuits.targets.prob_diff`
    over the target's ``+`` and ``-`` tokens; for greater-than Hanna et al. 2023's PD over the
    tens digit), whether the ``+`` side carries more probability than the ``-`` side (PD > 0),
    and, for items with an ``answer``, whether it is the top-1 token over the whole vocabulary.

    Args:
        items, targets: the task and its parsed targets (:func:`item_targets`), at the last position.
        logits: ``[n, vocab]`` (:func:`next_token_logits`: after any soft-cap).
        counterfactual_logits: ``[n, vocab]`` on the items' counterfactual prompts (same targets):
            adds ``counterfactual_value`` and ``counterfactual_pd``.
        uncap: maps capped logits to the logits targets read (default: identity).

    Returns:
        ``{"n", "mean_value", "mean_pd", "pd_positive", "top1_accuracy" (None without answers),
        "mean_answer_prob", "by_template": {template: {"n", "mean_value", "mean_pd", "top1_accuracy"}},
        ["counterfactual_value", "counterfactual_pd"]}``; means over items.
    """
    uncap = uncap or (lambda x: x)
    values = [float(t.value(uncap(logits[i : i + 1]))) for i, t in enumerate(targets)]
    pds = [target_prob_diff(t, logits[i : i + 1]) for i, t in enumerate(targets)]
    pds = [float("nan") if p is None else p for p in pds]
    top1: list[bool | None] = [None] * len(items)
    p_answer: list[float] = []
    for i, item in enumerate(items):
        if item.answer is not None:
            tid = tokenizer.encode(item.answer, add_special_tokens=False)[0]
            top1[i] = int(logits[i].argmax()) == tid
            p_answer.append(float(logits[i].double().softmax(-1)[tid]))
    mean = lambda xs: float(sum(xs) / len(xs)) if len(xs) else None
    answered = lambda ix: [top1[i] for i in ix if top1[i] is not None]
    out = {"n": len(items), "mean_value": mean(values), "mean_pd": mean(pds), "pd_positive": mean([p > 0 for p in pds]),
           "top1_accuracy": mean(answered(range(len(items)))), "mean_answer_prob": mean(p_answer)}
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(str(item.meta.get("template", "")), []).append(i)
    out["by_template"] = {
        k: {"n": len(ix), "mean_value": mean([values[i] for i in ix]), "mean_pd": mean([pds[i] for i in ix]),
            "top1_accuracy": mean(answered(ix))}
        for k, ix in sorted(groups.items())}
    if counterfactual_logits is not None:
        cl = counterfactual_logits
        out["counterfactual_value"] = mean([float(t.value(uncap(cl[i : i + 1]))) for i, t in enumerate(targets)])
        out["counterfactual_pd"] = mean([target_prob_diff(t, cl[i : i + 1]) or 0.0 for i, t in enumerate(targets)])
    return out


def measure_task(loaded, items: Sequence[TaskItem], *, bos: bool | None = None, batch_size: int = 32) -> dict:
    """:func:`task_metrics` of ``loaded`` on ``items`` (and on their counterfactuals when every
    item has one): the model's accuracy on a task before any circuit is traced.

    Raises:
        TaskFileError: an item's target or answer does not fit the tokenizer.
    """
    ad = loaded.adapter
    targets = item_targets(items, tokenizer=loaded.tokenizer, vocab_size=ad.vocab_size, n_layers=ad.n_layers)
    logits = next_token_logits(loaded, [it.prompt for it in items], bos=bos, batch_size=batch_size)
    cf = None
    counterfactuals = [it.counterfactual for it in items]
    if all(counterfactuals):
        cf = next_token_logits(loaded, [str(c) for c in counterfactuals], bos=bos, batch_size=batch_size)
    return task_metrics(items, targets, logits, tokenizer=loaded.tokenizer, counterfactual_logits=cf,
                        uncap=lambda x: _uncapped(loaded, x))


__all__ = ["TaskFileError", "TaskItem", "item_targets", "load_task", "measure_task", "next_token_logits", "save_task",
           "task_metrics", "task_name"]
