"""Command-line interface for tasks: ``transcoders task make | trace`` (a task is a JSON lines
file of prompts with targets and counterfactuals, :mod:`transcoders.circuits.tasks`).

``task make`` writes one of our generated tasks (:mod:`transcoders.circuits.task_gen`);
``task trace`` builds one attribution graph per prompt with the item's own target, through the
same :func:`~transcoders.circuit_cli.trace_prompt` as ``transcoders trace`` and the viewer.
"""

from __future__ import annotations

import math
from pathlib import Path

import click

from .circuit_cli import BOS_OPT, MODEL_OPT
from .cli_common import user_errors
from .files import check_writable


def run_task_args(fn):
    """The arguments every task command over a run shares: RUN_DIR, TASK_FILE and --model."""
    fn = MODEL_OPT(fn)
    fn = click.argument("task_file", type=click.Path(path_type=Path))(fn)
    return click.argument("run_dir", type=click.Path(path_type=Path))(fn)


def load_items(task_file: Path, limit: int | None, *, at_least: int = 1, why: str = "") -> list:
    """The first ``limit`` items (all when None) of a task file.

    Raises:
        TaskFileError: the file is malformed (the message names the line).
        ValueError: ``limit`` is below ``at_least``.
    """
    from .circuits.tasks import load_task

    if limit is not None and limit < at_least:
        raise ValueError(f"--limit must be at least {at_least}{why} (got {limit})")
    items = load_task(task_file)
    return items if limit is None else items[:limit]


@click.group()
def task():
    """Run a whole task (JSON lines of prompt, target, counterfactual) in one command."""


@task.command("make")
@click.argument("kind", type=click.Choice(["greater-than", "ioi", "capitals", "arithmetic"]))
@click.option("--n", "n", default=200, show_default=True, help="number of prompts")
@click.option("--seed", default=0, show_default=True, help="seed of the sampling")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="task file [default: KIND.jsonl]")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@user_errors
def make(kind, n, seed, out, force):
    """Generate a task of KIND: greater-than (Hanna et al. 2023, by the tens digit), ioi (Wang
    et al. 2022), capitals (capital-of-country recall) or arithmetic (single-digit sums)."""
    from .circuits.task_gen import GENERATORS
    from .circuits.tasks import save_task

    out = out if out is not None else Path(f"{kind}.jsonl")
    items = GENERATORS[kind](n, seed)
    save_task(items, out, force=force)
    click.echo(f"wrote {len(items)} {kind} prompts to {out} (seed {seed}); e.g. {items[0].prompt!r} with "
               f"target {items[0].target}")


@task.command("trace")
@run_task_args
@click.option("--limit", type=int, default=None, help="only the first N prompts")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="where the graphs go, as <task>-<i>.json [default: RUN_DIR/graphs]")
@click.option("--max-feature-nodes", default=2000, show_default=True, help="feature budget, chosen by influence (0: all)")
@click.option("--batch-size", default=64, show_default=True, help="attribution rows per backward sweep")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--node-threshold", default=0.8, show_default=True, help="pruning: cumulative node influence kept")
@click.option("--edge-threshold", default=0.98, show_default=True, help="pruning: cumulative edge influence kept")
@click.option("--format", "fmt", type=click.Choice(["json", "compact"]), default="json", show_default=True,
              help="json (circuit-tracer's frontend reads it) or compact (safetensors: node table and CSR edges, "
                   "about 12x smaller)")
@BOS_OPT
@user_errors
def trace(run_dir, task_file, model, limit, out_dir, max_feature_nodes, batch_size, dtype, node_threshold,
          edge_threshold, fmt, prepend_bos):
    """Build the attribution graph of every prompt of TASK_FILE for its own target with the
    transcoders in RUN_DIR; print each target's value and probability difference (PD: the
    summed probability of the target's + tokens minus that of its - tokens)."""
    from .circuit_cli import load_model_and_coders, rows_bar, target_prob_diffs, trace_prompt
    from .circuits.export import save_graph
    from .circuits.tasks import item_targets, task_name

    items = load_items(task_file, limit)
    name = task_name(task_file)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "graphs"
    suffix = ".json" if fmt == "json" else ".safetensors"
    paths = [out_dir / f"{name}-{i}{suffix}" for i in range(len(items))]
    existing = [p for p in paths if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists ({len(existing)} of the {len(paths)} graph files do); "
                              "task trace never replaces graphs: pass another --out-dir or move them away")
    check_writable(out_dir)
    preloaded = load_model_and_coders(model, run_dir)
    loaded, coders = preloaded
    ad = loaded.adapter
    item_targets(items, tokenizer=loaded.tokenizer, vocab_size=ad.vocab_size, n_layers=ad.n_layers,
                 d_sae={layer: c.cfg.d_sae for layer, c in coders.items()}, d_model=ad.d_model)  # fail before any work
    click.echo(f"{name}: {len(items)} prompts -> {out_dir}")
    values, pds = [], []
    for i, (item, path) in enumerate(zip(items, paths)):
        with rows_bar() as bar:
            traced = trace_prompt(run_dir, item.prompt, model=model, target_specs=(item.target,),
                                  max_feature_nodes=max_feature_nodes, batch_size=batch_size, dtype=dtype,
                                  node_threshold=node_threshold, edge_threshold=edge_threshold,
                                  prepend_bos=prepend_bos, preloaded=preloaded, row_progress=bar)
        graph = traced.graph
        graph.meta["task"] = {"name": name, "index": i, "target": item.target, "counterfactual": item.counterfactual,
                              "answer": item.answer, "meta": item.meta}
        save_graph(graph, path)
        value = float(graph.value[graph.target_nodes[0]])
        pd = target_prob_diffs(traced)[0]
        values.append(value)
        if pd is not None:
            pds.append(pd)
        scores = graph.meta["scores"]["full"]
        click.echo(f"{i}: {graph.targets[0].label} = {value:+.3f}" + (f"  PD={pd:+.3f}" if pd is not None else "")
                   + f"  (replacement {scores['replacement_score']:.3f})  {item.prompt!r} -> {path.name}")
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    click.echo(f"mean target value {mean(values):+.3f}" + (f", mean PD {mean(pds):+.3f}, PD > 0 in "
                                                            f"{sum(p > 0 for p in pds)}/{len(pds)}" if pds else "")
               + f"; wrote {len(items)} graphs to {out_dir}")


@task.command("verify")
@run_task_args
@click.option("--graphs", "graph_dir", type=click.Path(path_type=Path), default=None,
              help="the folder `task trace` wrote the graphs to, as JSON or compact [default: RUN_DIR/graphs]")
@click.option("--top-edges", default=20, show_default=True)
@click.option("--top-nodes", default=10, show_default=True)
@click.option("--mean-tokens", default=2048, show_default=True,
              help="corpus tokens for the mean activations of the faithfulness check (0: the prompt's own)")
@click.option("--limit", type=int, default=None, help="only the first N prompts")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write every report as JSON")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@user_errors
def verify(run_dir, task_file, model, graph_dir, top_edges, top_nodes, mean_tokens, limit, out, force):
    """Check the graph `task trace` wrote for every prompt of TASK_FILE against interventions
    (as `transcoders verify` does one graph: edges in the frozen model, nodes in the linearised
    and free models, faithfulness of top-k circuits) and print the means over prompts."""

    from .circuit_cli import graph_means, load_model_and_coders, verify_graph
    from .circuits.export import load_graph
    from .circuits.session import check_graph_matches
    from .circuits.tasks import task_name
    from .files import atomic_write_json, refuse_to_replace

    if out is not None:
        refuse_to_replace(out, force)
        check_writable(Path(out).parent)
    items = load_items(task_file, limit)
    name = task_name(task_file)
    graph_dir = Path(graph_dir) if graph_dir is not None else Path(run_dir) / "graphs"
    paths = [next((p for p in (graph_dir / f"{name}-{i}.json", graph_dir / f"{name}-{i}.safetensors") if p.exists()),
                  graph_dir / f"{name}-{i}.json") for i in range(len(items))]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist ({len(missing)} of {len(paths)} graphs are missing); "
                                f"run `transcoders task trace {run_dir} {task_file}` first, or pass --graphs")
    loaded, coders = load_model_and_coders(model, run_dir)
    means = None
    reports, summaries = [], []
    for i, path in enumerate(paths):
        graph = load_graph(path)
        check_graph_matches(graph, loaded, coders)
        if i == 0:
            means = graph_means(loaded, coders, graph, mean_tokens)
        report = verify_graph(loaded, coders, graph, top_edges=top_edges, top_nodes=top_nodes, means=means)
        s = report.summary
        summaries.append(s)
        reports.append({"graph": str(path), **report.to_dict()})
        click.echo(f"{i}: edges max |error| {s['edge_max_abs_error']:.1e}; nodes: linear gap "
                   f"{s['node_max_abs_gap_linear']:.1e}, free gap {s['node_mean_abs_gap_free']:.3f}; F "
                   + ", ".join(f"k={k}: {f:.2f}" for k, f in s["faithfulness"].items()) + f"  ({path.name})")
    mean = lambda key: sum(s[key] for s in summaries) / len(summaries)
    ks = sorted({k for s in summaries for k in s["faithfulness"]})
    f_means = {k: sum(s["faithfulness"][k] for s in summaries if k in s["faithfulness"])
               / sum(1 for s in summaries if k in s["faithfulness"]) for k in ks}
    click.echo(f"{name}, {len(paths)} graphs: worst edge error {max(s['edge_max_abs_error'] for s in summaries):.1e}; "
               f"mean free-model node gap {mean('node_mean_abs_gap_free'):.3f}; mean F "
               + ", ".join(f"k={k}: {f:.3f}" for k, f in f_means.items()))
    if out is not None:
        atomic_write_json(out, {"task": str(task_file), "run_dir": str(run_dir), "graphs": reports,
                                "mean_faithfulness": {str(k): f for k, f in f_means.items()}}, indent=1)
        click.echo(f"wrote {out}")


@task.command("study")
@run_task_args
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="folder for study.json, study.md and study.png")
@click.option("--limit", type=int, default=None, help="only the first N prompts")
@click.option("--n-features", default=10, show_default=True, help="features named per prompt and task-wide")
@click.option("--n-candidates", default=32, show_default=True,
              help="nodes measured per greedy step (the top by attribution patching)")
@click.option("--select", "n_select", type=int, default=None,
              help="prompts that choose the task-wide features; the rest check them [default: half]")
@click.option("--seeds", default=5, show_default=True, help="seeds of the random-feature baseline")
@click.option("--objective", type=click.Choice(["ablate", "counterfactual"]), default="ablate", show_default=True,
              help="choose the features whose ablation, or whose patching to the counterfactual prompt's "
                   "activations, cuts PD most")
@click.option("--features", "store_dir", type=click.Path(path_type=Path), default=None,
              help="feature store for labels [default: RUN_DIR/features when it exists]")
@click.option("--force", is_flag=True, help="replace the files of an earlier study in --out")
@BOS_OPT
@user_errors
def study(run_dir, task_file, model, out_dir, limit, n_features, n_candidates, n_select, seeds, objective, store_dir,
          force, prepend_bos):
    """Case study of a task: per prompt, the at most --n-features feature nodes whose ablation in
    the free replacement model cuts the probability difference (PD) most, chosen greedily with
    attribution patching (no hand choice); against every feature at the positions where prompt
    and counterfactual differ, random and top-activation features, and what the error nodes
    carry. Then the task-wide features (the ones the first --select prompts name most) ablated on
    the held-out prompts, described by logit effects, de-embeddings and virtual weights."""
    run_study(run_dir, task_file, model=model, out_dir=out_dir, limit=limit, n_features=n_features,
              n_candidates=n_candidates, n_select=n_select, seeds=seeds, objective=objective, store_dir=store_dir,
              force=force, prepend_bos=prepend_bos)


def run_study(run_dir: Path, task_file: Path, *, model: str, out_dir: Path, limit: int | None = None,
              n_features: int = 10, n_candidates: int = 32, n_select: int | None = None, seeds: int = 5,
              objective: str = "ablate", store_dir: Path | None = None, force: bool = False,
              prepend_bos: bool | None = None) -> dict:
    """``transcoders task study`` as a function: writes ``study.json``, ``study.md`` and
    ``study.png`` into ``out_dir`` and returns the result of
    :func:`~transcoders.circuits.case_run.run_case_study`.

    Raises:
        OutputExistsError: a study file exists in ``out_dir`` and ``force`` is not set.
        TaskFileError, CaseStudyError: the task does not fit (no counterfactual, a target
            without token sets, a counterfactual of another length).
    """
    from .circuit_cli import load_model_and_coders
    from .circuits.case_report import plot
    from .circuits.case_run import run_case_study
    from .circuits.session import prompt_bos_policy
    from .circuits.tasks import item_targets, task_name
    from .files import atomic_write_json, atomic_write_text, refuse_to_replace

    if n_features < 1 or n_candidates < 1 or seeds < 0:
        raise ValueError("--n-features and --n-candidates must be at least 1, --seeds at least 0")
    items = load_items(task_file, limit, at_least=2, why=" (one prompt to choose, one to check)")
    paths = {k: Path(out_dir) / f"study.{k}" for k in ("json", "md", "png")}
    for p in paths.values():
        refuse_to_replace(p, force)
    check_writable(out_dir)
    loaded, coders = load_model_and_coders(model, run_dir)
    ad = loaded.adapter
    targets = item_targets(items, tokenizer=loaded.tokenizer, vocab_size=ad.vocab_size, n_layers=ad.n_layers)
    bos = prompt_bos_policy(loaded, run_dir, prepend_bos)
    store = None
    folder = store_dir if store_dir is not None else Path(run_dir) / "features"
    if (Path(folder) / "store.json").exists():
        from .features.store import FeatureStore

        store = FeatureStore(folder)
    elif store_dir is not None:
        raise ValueError(f"{store_dir} is not a feature store (no store.json); make one with `transcoders features`")

    def progress(i, st, seconds):
        pd = st["pd"]
        chosen = pd["selected" if objective == "ablate" else "selected_counterfactual"]
        click.echo(f"{i + 1}/{len(items)} ({seconds:.0f} s): PD {pd['clean']:+.3f} -> {chosen:+.3f} with "
                   f"{len(st['selected'])} features; all {st['n_at_differing']} at the differing positions "
                   f"{pd['all_at_differing']:+.3f}" + (f"; task-wide {pd['global']:+.3f}" if "global" in pd else "")
                   + f"  {st['prompt']!r}")

    result = run_case_study(loaded, coders, items, targets, bos=bos, n_features=n_features,
                            n_candidates=n_candidates, n_select=n_select, seeds=tuple(range(seeds)),
                            objective=objective, store=store,
                            progress=progress)
    result |= {"run_dir": str(run_dir), "task": str(task_file), "model": model, "n_features": n_features,
               "n_candidates": n_candidates}
    name = task_name(task_file)
    atomic_write_json(paths["json"], result)
    atomic_write_text(paths["md"], study_markdown(result, name))
    plot(result["summary"], paths["png"], title=f"{name}: {len(items)} prompts, {Path(run_dir).name}")
    s = result["summary"]["interventions"]
    chosen = s["selected" if objective == "ablate" else "selected_counterfactual"]
    click.echo(f"mean PD {s['clean']['mean_pd']:+.3f}; the chosen features ({objective}) cut it by {100 * chosen['cut']:.0f}%, "
               f"every feature at the differing positions by {100 * s['all_at_differing']['cut']:.0f}%, "
               f"{n_features} random features by {100 * s['random']['cut']:.0f}%; wrote {out_dir}")
    return result


def study_markdown(result: dict, name: str) -> str:
    """The report of :func:`run_study` as markdown: the tables of both summaries, the error
    nodes' share, the task-wide features and the virtual weights among them."""
    from .circuits.case_report import head_ranking, markdown_table

    s, h = result["summary"], result["summary_held_out"]
    share = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"
    lines = [f"# Case study: {name}", "",
             f"`transcoders task study {result['run_dir']} {result['task']} --n-features {result['n_features']} "
             f"--objective {result['objective']}` "
             f"({s['n_prompts']} prompts, {result['seconds']:.0f} s).", "",
             f"## All prompts (features chosen per prompt, by {result['objective']})", "", markdown_table(s), "",
             f"Error nodes: patching them to their counterfactual values closes {share(s['error_share'])} of the PD "
             f"gap between prompt and counterfactual; patching every feature closes {share(s['feature_share'])}.",
             "", f"## Held-out prompts ({h['n_prompts']}): task-wide features chosen on the first "
             f"{result['n_select']}", "", markdown_table(h), "", "## Task-wide features", "",
             "| feature | chosen in | label | promotes | de-embedding |", "|---|---|---|---|---|"]
    for d in result["global_features"]:
        lines.append(f"| {d['layer']}.{d['feature']} | {d.get('chosen_in', '')} | {d['label'] or ''} | "
                     f"{' '.join(repr(t) for t in d['promotes'])} | {' '.join(repr(t) for t in d['deembedding'])} |")
    if result["virtual_weights"]:
        lines += ["", "Virtual weights among them (direct path, per unit of activation):", ""]
        top = sorted(result["virtual_weights"], key=lambda w: -abs(w["weight"]))[:10]
        lines += [f"- {w['from'][0]}.{w['from'][1]} -> {w['to'][0]}.{w['to'][1]}: {w['weight']:+.3f}" for w in top]
    heads = head_ranking(result["studies"])
    if heads:
        lines += ["", "Heads that carry PD into the last position (output there patched alone to its counterfactual "
                  "value; mean PD change, and how often among a prompt's 10 strongest):", ""]
        lines += [f"- {k}: {d:+.3f} ({100 * f:.0f}% of prompts)" for k, d, f in heads]
    lines += ["", "Tokens at which the per-prompt features sit (most common): "
              + ", ".join(f"{t!r} x{c}" for t, c in result["selected_tokens"].items()), ""]
    return "\n".join(lines)


def _register_benchmark() -> None:
    """``task benchmark TASK.jsonl --run RUN`` is ``benchmark-faithfulness`` under the task group."""
    from .faithfulness_cli import benchmark_faithfulness

    task.add_command(benchmark_faithfulness, "benchmark")


_register_benchmark()
TASK_COMMANDS = (task,)
