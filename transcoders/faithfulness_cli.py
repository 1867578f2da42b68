"""``transcoders benchmark-faithfulness``: faithfulness curves, CPR and CMD of transcoder feature
circuits against EAP-IG component circuits and MLP-neuron circuits on the same prompts
(:mod:`transcoders.circuits.faithfulness`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click
import torch

from .cli_common import quiet_progress, user_errors
from .files import atomic_savefig, atomic_write_json, check_writable, refuse_to_replace
from .models.loading import DEFAULT_MODEL


def _read_task(path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` items of a task file (:func:`~transcoders.circuits.tasks.load_task`,
    which raises ``TaskFileError`` naming the line of a malformed item) as the dicts the
    benchmark runs on."""
    from .circuits.tasks import load_task

    items = load_task(path)[:limit]
    return [{"prompt": it.prompt, "targets": [it.target], "counterfactual": it.counterfactual, "line": i + 1,
             "meta": it.meta} for i, it in enumerate(items)]


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated numbers, e.g. 0.01,0.1,1") from None
    if len(out) < 2 or any(not 0 < f <= 1 for f in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise click.BadParameter(f"{text!r}: give at least two increasing fractions in (0, 1]")
    return out


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise click.BadParameter(f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return out


def _clean(obj):
    """``obj`` with NaN floats as None (strict JSON)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _pct(f: float) -> str:
    return f"{f * 100:g}%"


def _num(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "   nan"
    return f"{0.0 if abs(x) < 5e-4 else x:6.3f}"  # no "-0.000"


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"features": "tab:blue", "eap-ig": "tab:orange", "neurons": "tab:green"}
    styles = {"counterfactual": "-", "mean": "--"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["ranking"] not in ("influence", "signed"):
            continue
        F = [math.nan if f is None else f for f in r["F"]]
        ax.plot(r["fractions"], F, styles.get(r["ablation"], ":"), marker="o", ms=3, color=colors.get(r["method"]),
                label=f"{r['method']}, {r['ablation']}: CPR {_num(r['cpr']).strip()}")
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("circuit size: fraction of features (features), of edges (eap-ig); neurons: same k as features")
    ax.set_ylabel("faithfulness F")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


@click.command("benchmark-faithfulness")
@click.argument("task_file", type=click.Path(path_type=Path))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), required=True,
              help="run folder with a transcoder for every layer")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="the model the transcoders belong to")
@click.option("--limit", type=int, default=None, help="only the first N items")
@click.option("--fractions", default=None, help="comma-separated circuit sizes in (0, 1] [default: MIB's 0.001,...,1]")
@click.option("--methods", default="features,eap-ig,neurons", show_default=True)
@click.option("--ablations", default="counterfactual,mean", show_default=True)
@click.option("--ig-steps", default=5, show_default=True, help="integrated-gradient steps for EAP-IG and neurons")
@click.option("--max-feature-nodes", default=2000, show_default=True,
              help="attribution graph feature budget (0: every active feature)")
@click.option("--mean-tokens", default=2048, show_default=True,
              help="held-out corpus tokens for mean ablation (0: the task's own prompts)")
@click.option("--keep-first/--no-keep-first", default=True, show_default=True,
              help="never ablate the first position (the attention sink), in every method")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the full report as JSON")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="save the curves (png, pdf, svg)")
@click.option("--force", is_flag=True, help="replace --out / --plot if they exist")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--prepend-bos/--no-prepend-bos", "prepend_bos", default=None,
              help="start prompts with BOS [default: as the transcoders were trained, else the model's policy]")
@click.option("--quiet", is_flag=True, help="no per-item progress lines")
@user_errors
def benchmark_faithfulness(task_file, run_dir, model, limit, fractions, methods, ablations, ig_steps, max_feature_nodes,
                           mean_tokens, keep_first, out, plot_path, force, dtype, device, prepend_bos, quiet):
    """Faithfulness of circuits of growing size on the items of TASK_FILE (JSONL: prompt, target,
    counterfactual): transcoder features (by graph influence), EAP-IG edges between heads and MLPs,
    and MLP neurons, under counterfactual and mean ablation, with MIB's CPR and CMD."""
    from .circuits.faithfulness import (
        FRACTIONS,
        METHODS,
        BenchmarkItem,
        aggregate,
        benchmark_prompt,
        check_item,
        mib_summary,
        reference_means,
    )
    from .circuits.replacement import bos_constant_positions
    from .circuits.session import load_layer_coders, prompt_bos_policy, reference_tokens, tokenize_prompt
    from .circuits.targets import parse_target
    from .models.loading import load_model

    quiet_progress(True)
    fr = _floats(fractions) if fractions else list(FRACTIONS)
    methods = _names(methods, METHODS, "method")
    ablations = _names(ablations, ("counterfactual", "mean"), "ablation")
    if ig_steps < 1:
        raise click.BadParameter("--ig-steps must be at least 1")
    for path in (out, plot_path):
        if path is not None:
            refuse_to_replace(path, force)
            check_writable(path.parent)
    raw = _read_task(task_file, limit)
    t0 = time.perf_counter()
    loaded = load_model(model, dtype=getattr(torch, dtype), device=device)
    ad = loaded.adapter
    coders = load_layer_coders(run_dir, loaded)
    bos = prompt_bos_policy(loaded, run_dir, prepend_bos)
    d_sae = {layer: c.cfg.d_sae for layer, c in coders.items()}
    items = []
    for r in raw:
        where = f"{task_file}:{r['line']}"
        try:
            tokens = tokenize_prompt(loaded, r["prompt"], bos=bos)
            cf = tokenize_prompt(loaded, r["counterfactual"], bos=bos) if r["counterfactual"] is not None else None
            targets = [parse_target(s, tokenizer=loaded.tokenizer, vocab_size=ad.vocab_size, n_layers=ad.n_layers,
                                    d_sae=d_sae, d_model=ad.d_model) for s in r["targets"]]
            item = BenchmarkItem(tokens, cf, targets, r["prompt"], r["counterfactual"] or "", ",".join(r["targets"]),
                                 r["meta"])
            check_item(item, ablations)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        items.append(item)
    means = None
    if "mean" in ablations:
        if mean_tokens:
            ctx = max(2, min(128, ad.max_context, mean_tokens))
            contexts = reference_tokens(loaded, mean_tokens, ctx, bos=bos)
        else:
            contexts = [i.tokens for i in items]
        means = reference_means(ad, coders, contexts, methods)
    t_load = time.perf_counter() - t0
    keep = (0,) if keep_first else ()

    def report(per_prompt: list, report_items: list, complete: bool) -> dict:
        rows = aggregate(per_prompt)
        return {
            "task": str(task_file), "model": loaded.name, "run_dir": str(Path(run_dir).resolve()), "prepend_bos": bos,
            "complete": complete, "n_items": len(items),
            "settings": {"fractions": fr, "methods": methods, "ablations": ablations, "ig_steps": ig_steps,
                         "max_feature_nodes": max_feature_nodes or None, "mean_tokens": mean_tokens,
                         "keep_positions": list(keep), "dtype": dtype, "device": device},
            "notes": ["features: fractions of active transcoder features (nodes) ranked by graph influence, free "
                      "replacement model, error nodes and inactive features free; not edges",
                      "eap-ig: EAP-IG (Hanna et al. 2024) over component edges of the original model, exact edge "
                      "patching",
                      "neurons: MLP neurons (layer, pos, i) by attribution, same k as features",
                      "F per fraction: ratio of means over prompts (MIB); areas: trapezoids on a linear axis (MIB)"],
            "seconds_loading": t_load, "items": report_items, "aggregate": rows, "summary": mib_summary(rows),
        }

    per_prompt, report_items = [], []
    for n, item in enumerate(items, 1):
        t1 = time.perf_counter()
        constant = bos_constant_positions(ad, item.tokens, loaded.tokenizer) if bos else ()
        curves = benchmark_prompt(ad, coders, item, fractions=fr, methods=methods, ablations=ablations, means=means,
                                  ig_steps=ig_steps, max_feature_nodes=max_feature_nodes or None, keep_positions=keep,
                                  constant_positions=constant, tokenizer=loaded.tokenizer)
        per_prompt.append(curves)
        report_items.append({"prompt": item.prompt, "counterfactual": item.counterfactual, "target": item.target_spec,
                             "n_tokens": int(item.tokens.numel()), "meta": item.meta,
                             "curves": [c.to_dict() for c in curves]})
        if out is not None and n < len(items):  # an interrupted run keeps the items done ("complete": false)
            atomic_write_json(out, _clean(report(per_prompt, report_items, complete=False)), indent=1)
        if not quiet:
            first = next((c for c in curves if c.method == "features"), curves[0])
            click.echo(f"[{n}/{len(items)}] {item.prompt!r}: m(model) = {first.m_full:+.3f}, "
                       f"{time.perf_counter() - t1:.1f} s", err=True)
    rows = aggregate(per_prompt)
    summary = mib_summary(rows)

    click.echo(f"faithfulness F = (m(C) - m(empty)) / (m(model) - m(empty)) over {len(items)} prompts "
               "(ratio of the means over prompts, as MIB); sizes are fractions of each method's units:")
    click.echo("  features: active transcoder features (graph nodes, not edges) by influence; eap-ig: edges between "
               "embeddings, heads, MLPs and logits; neurons: MLP neurons, the same k as the feature circuit")
    head = f"{'method':<9} {'ablation':<15} {'ranking':<10}" + "".join(f"{_pct(f):>7}" for f in fr) + f"{'CPR':>7}{'CMD':>7}"
    click.echo(head)
    for r in rows:
        click.echo(f"{r['method']:<9} {r['ablation']:<15} {r['ranking']:<10}" + "".join(f" {_num(x)}" for x in r["F"])
                   + f" {_num(r['cpr'])} {_num(r['cmd'])}")
    click.echo("MIB's convention: CPR (higher is better) from the signed ranking, CMD (lower is better) from the "
               "absolute ranking (features: influence for both):")
    for s in summary:
        click.echo(f"  {s['method']:<9} {s['ablation']:<15} CPR {_num(s['cpr'])}  CMD {_num(s['cmd'])}")
    undefined = sum(r["n_undefined"] for r in rows)
    if undefined:
        click.echo(f"note: {undefined} (prompt, curve) pairs had m(model) = m(empty) (F undefined, left out of the "
                   "per-prompt means)")
    if out is not None:
        atomic_write_json(out, _clean(report(per_prompt, report_items, complete=True)), indent=1)
        click.echo(f"wrote {out}")
    if plot_path is not None:
        _plot(_clean(rows), plot_path, f"{Path(task_file).name}: {len(items)} prompts, {loaded.name}")
        click.echo(f"wrote {plot_path}")


FAITHFULNESS_COMMANDS = (benchmark_faithfulness,)
