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
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("task_file", type=click.Path(path_type=Path))
@MODEL_OPT
@click.option("--limit", type=int, default=None, help="only the first N prompts")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="where the graphs go, as <task>-<i>.json [default: RUN_DIR/graphs]")
@click.option("--max-feature-nodes", default=2000, show_default=True, help="feature budget, chosen by influence (0: all)")
@click.option("--batch-size", default=64, show_default=True, help="attribution rows per backward sweep")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--node-threshold", default=0.8, show_default=True, help="pruning: cumulative node influence kept")
@click.option("--edge-threshold", default=0.98, show_default=True, help="pruning: cumulative edge influence kept")
@BOS_OPT
@user_errors
def trace(run_dir, task_file, model, limit, out_dir, max_feature_nodes, batch_size, dtype, node_threshold,
          edge_threshold, prepend_bos):
    """Build the attribution graph of every prompt of TASK_FILE for its own target with the
    transcoders in RUN_DIR; print each target's value and probability difference (PD: the
    summed probability of the target's + tokens minus that of its - tokens)."""
    from .circuit_cli import load_model_and_coders, target_prob_diffs, trace_prompt
    from .circuits.export import save_graph
    from .circuits.tasks import item_targets, load_task, task_name

    items = load_task(task_file)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1 (got {limit})")
        items = items[:limit]
    name = task_name(task_file)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "graphs"
    paths = [out_dir / f"{name}-{i}.json" for i in range(len(items))]
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
        traced = trace_prompt(run_dir, item.prompt, model=model, target_specs=(item.target,),
                              max_feature_nodes=max_feature_nodes, batch_size=batch_size, dtype=dtype,
                              node_threshold=node_threshold, edge_threshold=edge_threshold, prepend_bos=prepend_bos,
                              preloaded=preloaded)
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


TASK_COMMANDS = (task,)
