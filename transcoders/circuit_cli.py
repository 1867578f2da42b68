"""Command-line interface for circuits: ``transcoders trace | paths | intervene | verify | feature``.

Each command is a plain function; :func:`~transcoders.cli_common.user_errors` turns the
library's errors into one-line messages.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from .cli_common import user_errors
from .files import atomic_write_json, check_writable, refuse_to_replace, slugify
from .models.loading import DEFAULT_MODEL

MODEL_OPT = click.option("--model", default=DEFAULT_MODEL, show_default=True, help="the model the transcoders belong to")
PROMPT_OPT = click.option("--prompt", required=True, help="the text to analyse")
BOS_OPT = click.option("--prepend-bos/--no-prepend-bos", "prepend_bos", default=None,
                       help="start the prompt with the model's BOS token [default: as the transcoders were trained, "
                            "else the model's policy: yes for Gemma and Llama 3, no for SmolLM2 and GPT-2]")
TARGET_OPT = click.option(
    "--target", "target_specs", multiple=True,
    help="logit:TOKEN, diff:A,B, feature:L.F or direction:L:FILE, each with optional @POS "
         "[default: the top next-token logits, up to 95%% probability, at most 10]",
)


def _load(model: str, run_dir: Path, prompt: str, prepend_bos: bool | None):
    """The model, the run's transcoders, the prompt's tokens and the BOS policy used for them."""
    from .circuits.session import load_layer_coders, prompt_bos_policy, tokenize_prompt
    from .models.loading import load_model

    loaded = load_model(model, dtype=torch.float32)
    coders = load_layer_coders(run_dir, loaded)
    bos = prompt_bos_policy(loaded, run_dir, prepend_bos)
    return loaded, coders, tokenize_prompt(loaded, prompt, bos=bos), bos


def _load_for_graph(graph, graph_file: Path, model: str | None, run_dir: Path | None):
    """The model and transcoders a saved graph belongs to: ``--model``/``--run-dir``, else the
    graph's own (its model only if it is known locally), checked against the graph."""
    from .circuits.session import check_graph_matches, load_layer_coders
    from .models.loading import load_model
    from .models.trust import model_from_file

    name = model or model_from_file(graph.meta.get("model"), f"the graph {graph_file}")
    rd = run_dir or graph.meta.get("run_dir")
    if rd is None:
        raise ValueError(f"the graph {graph_file} does not name its transcoders; pass --run-dir")
    loaded = load_model(name, dtype=torch.float32)
    coders = load_layer_coders(rd, loaded)
    check_graph_matches(graph, loaded, coders)
    return loaded, coders, Path(rd)


def _targets(specs, loaded, coders, logits: torch.Tensor):
    from .circuits.targets import parse_target, top_logit_targets

    ad = loaded.adapter
    if not specs:
        return top_logit_targets(logits, tokenizer=loaded.tokenizer)
    d_sae = {layer: c.cfg.d_sae for layer, c in coders.items()}
    return [parse_target(s, tokenizer=loaded.tokenizer, vocab_size=ad.vocab_size, n_layers=ad.n_layers,
                         d_sae=d_sae, d_model=ad.d_model) for s in specs]


def _print_paths(graph, n: int, greedy: bool = False, beam: int = 5, depth: int = 4, rep=None, **filters) -> None:
    """Print paths; with the replacement model ``rep``, name the attention head that carries
    each edge between positions (its largest share, from the exact per-head split)."""
    from .circuits.graph import BIAS
    from .circuits.heads import split_edge_last
    from .circuits.paths import format_path, greedy_paths, top_paths

    found = greedy_paths(graph, beam=beam, depth=depth, **filters) if greedy else top_paths(graph, n=n, **filters)
    for p in found[:n]:
        click.echo("  " + format_path(graph, p))
        if rep is None:
            continue
        for src, dst in zip(p.nodes[:-1], p.nodes[1:]):
            if int(graph.kind[src]) == BIAS or int(graph.pos[src]) == int(graph.pos[dst]):
                continue
            parts = [c for c in split_edge_last(rep, graph, src, dst) if c.kind == "head"]
            total = sum(c.weight for c in parts) or 1.0
            heads = ", ".join(f"{c.layer}.{c.head} ({100 * c.weight / total:+.0f}%)" for c in parts[:3])
            click.echo(
                f"      {graph.label(src)} -> {graph.label(dst)}: moved into pos{int(graph.pos[dst])} mostly by heads {heads}"
            )



@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@MODEL_OPT
@PROMPT_OPT
@TARGET_OPT
@click.option("--max-feature-nodes", default=2000, show_default=True, help="feature budget, chosen by influence (0: all)")
@click.option("--batch-size", default=64, show_default=True, help="attribution rows per backward sweep")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--node-threshold", default=0.8, show_default=True, help="pruning: cumulative node influence kept")
@click.option("--edge-threshold", default=0.98, show_default=True, help="pruning: cumulative edge influence kept")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="graph file [default: RUN_DIR/graphs/<prompt-slug>.json]")
@click.option("--pruned-out", type=click.Path(path_type=Path), default=None,
              help="also save the pruned graph here (small; what circuit-tracer's frontend should open)")
@click.option("--force", is_flag=True, help="replace --out / --pruned-out if they exist")
@click.option("--paths", "n_paths", default=5, show_default=True, help="top paths to print")
@BOS_OPT
@user_errors
def trace(run_dir, model, prompt, target_specs, max_feature_nodes, batch_size, dtype, node_threshold, edge_threshold,
          out, pruned_out, force, n_paths, prepend_bos):
    """Build the attribution graph of PROMPT with the transcoders in RUN_DIR (one per layer)."""
    from .circuits import LocalReplacement, attribute
    from .circuits.export import save_graph
    from .circuits.prune import graph_scores, node_influence, prune
    from .circuits.replacement import bos_constant_positions
    from .circuits.session import graph_identity

    out = out if out is not None else Path(run_dir) / "graphs" / f"{slugify(prompt)}.json"
    for path in (out, pruned_out):
        if path is not None:
            refuse_to_replace(path, force)
            check_writable(path.parent)  # before the work, not after
    t0 = time.perf_counter()
    loaded, coders, tokens, bos = _load(model, run_dir, prompt, prepend_bos)
    t_load = time.perf_counter()
    constant = bos_constant_positions(loaded.adapter, tokens, loaded.tokenizer) if bos else ()
    rep = LocalReplacement(loaded.adapter, coders, tokens, dtype=getattr(torch, dtype), tokenizer=loaded.tokenizer,
                           constant_positions=constant)
    targets = _targets(target_specs, loaded, coders, rep.logits)
    graph = attribute(rep, targets, max_feature_nodes=max_feature_nodes or None, batch_size=batch_size)
    t_graph = time.perf_counter()
    graph.meta.update(graph_identity(loaded, coders), run_dir=str(Path(run_dir).resolve()), prompt=prompt,
                      prepend_bos=bos, constant_positions=list(constant))
    node_influence(graph)
    pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    full_s, pruned_s = graph_scores(graph), graph_scores(graph, pruned=pruned)
    graph.meta["scores"] = {"full": full_s, "pruned": pruned_s}
    t_scores = time.perf_counter()
    save_graph(graph, out)
    if pruned_out is not None:
        pruned.meta = {**graph.meta, **pruned.meta}
        save_graph(pruned, pruned_out)
    t_save = time.perf_counter()
    click.echo(f"prompt: {len(tokens)} tokens; {graph.meta['n_active_features']} active features; "
               f"{graph.meta['feature_rows']} feature rows")
    click.echo(f"graph: {graph.n_nodes} nodes, {graph.n_edges} edges; pruned: {pruned.n_nodes} nodes, {pruned.n_edges} edges")
    click.echo(f"scores: replacement {full_s['replacement_score']:.3f}, completeness {full_s['completeness_score']:.3f} "
               f"(pruned: {pruned_s['replacement_score']:.3f}, {pruned_s['completeness_score']:.3f})")
    click.echo(f"time: {t_graph - t_load:.1f} s graph, {t_scores - t_graph:.1f} s influence/pruning/scores, "
               f"{t_save - t_scores:.1f} s saving ({t_load - t0:.1f} s loading model and transcoders)")
    click.echo("targets: " + ", ".join(f"{t.label}@{t.pos}={float(v):.3f}" for t, v in
                                        zip(graph.targets, graph.value[graph.target_nodes])))
    click.echo("top paths from the prompt's tokens (pruned graph):")
    _print_paths(pruned, n_paths, rep=rep, source_kinds=["embedding"])
    click.echo(f"wrote {out}" + (f" and {pruned_out}" if pruned_out is not None else ""))


def _split(value: str | None, cast=int) -> list | None:
    return None if value is None else [cast(x) for x in value.split(",") if x.strip()]


@click.command()
@click.argument("graph_file", type=click.Path(path_type=Path))
@click.option("-n", "n", default=10, show_default=True)
@click.option("--greedy", is_flag=True, help="Dunefsky et al.'s greedy beam search instead of exact top-N")
@click.option("--beam", default=5, show_default=True)
@click.option("--depth", default=4, show_default=True)
@click.option("--layers", default=None, help="comma-separated layers allowed on a path")
@click.option("--positions", default=None, help="comma-separated positions allowed on a path")
@click.option("--kinds", default=None, help="comma-separated node kinds allowed inside a path (feature,error,...)")
@click.option("--sources", default=None, help="comma-separated node kinds a path may start at (embedding,feature,...)")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="also name the heads that carry each edge between positions (loads the model and transcoders, "
                   "checked against the graph)")
@click.option("--model", default=None, help="with --run-dir: the model [default: the graph's, if known locally]")
@user_errors
def paths(graph_file, n, greedy, beam, depth, layers, positions, kinds, sources, run_dir, model):
    """Print the strongest computational paths of a saved graph."""
    from .circuits.export import load_graph

    graph = load_graph(graph_file)
    filters = {k: v for k, v in (("layers", _split(layers)), ("positions", _split(positions)),
                                 ("kinds", _split(kinds, str))) if v is not None}
    if sources is not None:
        if greedy:
            raise ValueError("--sources works with the exact search only; drop --greedy or --sources")
        filters["source_kinds"] = _split(sources, str)
    rep = None
    if run_dir is not None or model is not None:
        rep = _replacement_for_graph(graph, graph_file, model, run_dir)
    _print_paths(graph, n, greedy, beam, depth, rep=rep, **filters)


def _replacement_for_graph(graph, graph_file: Path, model: str | None, run_dir: Path | None):
    from .circuits import LocalReplacement

    loaded, coders, _ = _load_for_graph(graph, graph_file, model, run_dir)
    return LocalReplacement(loaded.adapter, coders, torch.tensor(graph.tokens),
                            dtype=getattr(torch, graph.meta.get("dtype", "float32")),
                            constant_positions=tuple(graph.meta.get("constant_positions", ())))


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@MODEL_OPT
@PROMPT_OPT
@TARGET_OPT
@click.option("--edit", "edit_specs", multiple=True, required=True, help="LAYER.FEATURE[@POS,...]=ablate|clamp:V|scale:F")
@click.option("--mode", type=click.Choice(["free", "frozen", "linear"]), default="free", show_default=True)
@click.option("--generate", "n_generate", default=0, help="also generate N tokens with the edits on generated positions")
@BOS_OPT
@user_errors
def intervene(run_dir, model, prompt, target_specs, edit_specs, mode, n_generate, prepend_bos):
    """Ablate, clamp or scale features and report the change in the targets."""
    from .circuits import LocalReplacement
    from .circuits.interventions import ReplacementRunner, intervene_frozen, parse_edit, steer

    loaded, coders, tokens, bos = _load(model, run_dir, prompt, prepend_bos)
    d_sae = {layer: c.cfg.d_sae for layer, c in coders.items()}
    edits = [parse_edit(s, n_layers=loaded.adapter.n_layers, d_sae=d_sae, n_pos=len(tokens)) for s in edit_specs]
    runner = ReplacementRunner(loaded.adapter, coders, tokens)
    targets = _targets(target_specs, loaded, coders, runner.run()["logits"])
    if mode == "free":
        before, after = runner.intervene(edits, targets)
    else:
        rep = LocalReplacement(loaded.adapter, coders, tokens, dtype=torch.float64, tokenizer=loaded.tokenizer,
                               constant_positions=None if bos else ())  # as trace folds it
        before, after = intervene_frozen(rep, edits, targets, features="held" if mode == "frozen" else "linear")
    click.echo(f"{'target':<40} {'before':>10} {'after':>10} {'change':>10}")
    for t, b, a in zip(targets, before.tolist(), after.tolist()):
        where = t.pos if t.pos >= 0 else len(tokens) + t.pos
        click.echo(f"{t.label + '@' + str(where):<40} {b:>10.4f} {a:>10.4f} {a - b:>+10.4f}")
    if n_generate:
        base, steered = steer(loaded.adapter, coders, loaded.tokenizer, tokens, edits, max_new_tokens=n_generate)
        click.echo(f"generated (no edit): {base!r}")
        click.echo(f"generated (edited):  {steered!r}")


@click.command()
@click.argument("graph_file", type=click.Path(path_type=Path))
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="[default: the graph's]")
@click.option("--model", default=None, help="[default: the graph's, if it is a known local model]")
@click.option("--top-edges", default=20, show_default=True)
@click.option("--top-nodes", default=10, show_default=True)
@click.option("--sizes", default=None, help="comma-separated circuit sizes for faithfulness [default: 1,5,10,...]")
@click.option("--mean-tokens", default=2048, show_default=True,
              help="held-out corpus tokens for the mean activations used in ablation (0: the prompt's mean)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write the full report as JSON")
@click.option("--force", is_flag=True, help="replace --out if it exists")
@user_errors
def verify(graph_file, run_dir, model, top_edges, top_nodes, sizes, mean_tokens, out, force):
    """Check a saved graph against interventions: predicted versus measured effects and the
    faithfulness of its top-k circuits."""
    from .circuits import LocalReplacement
    from .circuits.export import load_graph
    from .circuits.interventions import ReplacementRunner
    from .circuits.verify import verify as run_verify

    if out is not None:
        refuse_to_replace(out, force)
        check_writable(out.parent)
    graph = load_graph(graph_file)
    loaded, coders, _ = _load_for_graph(graph, graph_file, model, run_dir)
    tokens = torch.tensor(graph.tokens)
    rep = LocalReplacement(loaded.adapter, coders, tokens, dtype=getattr(torch, graph.meta.get("dtype", "float32")),
                           constant_positions=tuple(graph.meta.get("constant_positions", ())))
    runner = ReplacementRunner(loaded.adapter, coders, tokens)
    means = None
    if mean_tokens:
        from .circuits.interventions import mean_activations
        from .circuits.session import reference_tokens

        means = mean_activations(loaded.adapter, coders,
                                 reference_tokens(loaded, mean_tokens, bos=bool(graph.meta.get("prepend_bos", False))))
    report = run_verify(rep, graph, runner=runner, top_edges=top_edges, top_nodes=top_nodes, sizes=_split(sizes),
                        means=means)
    s = report.summary
    click.echo(f"edges (frozen model, {len(report.edges)} strongest): max |measured - predicted| = "
               f"{s['edge_max_abs_error']:.2e} (largest |edge| {s['edge_max_abs_weight']:.3f})")
    click.echo(f"nodes ({len(report.nodes)} most influential, ablated): graph paths vs linearised model: "
               f"max gap {s['node_max_abs_gap_linear']:.2e}; vs free replacement model: mean gap "
               f"{s['node_mean_abs_gap_free']:.3f}")
    for node in report.nodes[:5]:
        click.echo(f"  {node['node']:<24} predicted {node['predicted'][0]:+.4f}  linear {node['measured_linear'][0]:+.4f}  "
                   f"free {node['measured_free'][0]:+.4f}  ({node['targets'][0]})")
    click.echo(f"faithfulness F(top-k features), rest mean-ablated ({'corpus' if means else 'prompt'} means, "
               "first position kept): " + ", ".join(f"k={f['k']}: {f['F_mean']:.3f}" for f in report.faithfulness))
    if out is not None:
        atomic_write_json(out, report.to_dict(), indent=1)
        click.echo(f"wrote {out}")


CIRCUIT_COMMANDS = (trace, paths, intervene, verify)
