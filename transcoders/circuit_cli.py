"""Command-line interface for circuits: ``transcoders trace | paths | intervene | verify | feature``.

Each command is a plain function; :func:`~transcoders.cli_common.user_errors` turns the
library's errors into one-line messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from .circuits.paths import DEFAULT_SOURCES
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
    help="logit:TOKEN, diff:A,B, group:+A,B;-C,D (mean logit of a set minus that of another), feature:L.F or "
         "direction:L:FILE, each with optional @POS "
         "[default: the top next-token logits, up to 95%% probability, at most 10]",
)


PATHS_TARGET_HELP = ("which target the paths and shares explain: an index as `trace` lists them, a label, the token "
                     "text (' Paris'), or 'all' (every target, each path weighted by its target's probability) "
                     "[default: the most probable target]")
RANK_OPT = click.option("--rank", type=click.Choice(["weight", "per-edge"]), default="weight", show_default=True,
                        help="order paths by |weight| (their contribution in the target's units), or per edge (the "
                             "geometric mean of each edge's share of its row's input: long paths are not penalised)")
MIN_LENGTH_OPT = click.option("--min-length", default=2, show_default=True,
                              help="at least this many edges (2: through at least one feature)")
FEATURES_OPT = click.option("--features", "store_dir", type=click.Path(path_type=Path), default=None,
                            help="feature store for labels [default: RUN_DIR/features when it exists]")


def load_model_and_coders(model: str, run_dir: Path):
    """``(loaded, coders)``: the model (float32) and the run's transcoders, one per layer; pass
    them to :func:`trace_prompt` as ``preloaded`` to trace many prompts with one load."""
    from .circuits.session import load_layer_coders
    from .models.loading import load_model

    loaded = load_model(model, dtype=torch.float32)
    return loaded, load_layer_coders(run_dir, loaded)


def _load(model: str, run_dir: Path, prompt: str, prepend_bos: bool | None, preloaded=None):
    """The model, the run's transcoders, the prompt's tokens and the BOS policy used for them
    (``preloaded``: ``(loaded, coders)`` from :func:`load_model_and_coders`, else loaded here)."""
    from .circuits.session import prompt_bos_policy, tokenize_prompt

    loaded, coders = preloaded if preloaded is not None else load_model_and_coders(model, run_dir)
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


def _resolve_target(graph, spec: str | None):
    """A ``--target``/``--paths-target`` SPEC against a graph's targets: None (the most probable),
    ``all``, an index as listed by ``trace``, a label (``logit(' Paris')``), or the token text
    (`` Paris``, ``logit: Paris``)."""
    if spec is None or spec == "":
        return None
    if spec == "all":
        return "all"
    if spec.isdigit():
        return int(spec)
    text = spec.split(":", 1)[1] if spec.split(":", 1)[0] in ("logit", "rawlogit") and ":" in spec else spec
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    hits = [i for i, t in enumerate(graph.targets) if t.label == spec or f"({text!r})" in (t.label or "")]
    if not hits:
        listed = ", ".join(f"{i}: {t.label or t.kind}" for i, t in enumerate(graph.targets))
        raise ValueError(f"no target of the graph matches {spec!r}; it has {listed} (give an index, a label, "
                         "the token text or 'all')")
    return max(hits, key=lambda i: (float(graph.targets[i].weight), -i))


def _labels(graph, store_dir: Path | None):
    """``(label(node) -> str | None, note)``: feature labels from the feature store (``store_dir``,
    else the graph's RUN_DIR/features when it exists), checked against the graph's per-layer
    coder fingerprints; ``note`` says where they came from (None: no store)."""
    folder = store_dir if store_dir is not None else (
        Path(graph.meta["run_dir"]) / "features" if graph.meta.get("run_dir") else None)
    if folder is None or not (Path(folder) / "store.json").exists():
        if store_dir is not None:
            raise ValueError(f"{store_dir} is not a feature store (no store.json); make one with `transcoders features`")
        return (lambda _i: None), None
    from .features.store import FeatureStore

    label, stale = graph_labels(graph, FeatureStore(folder))
    if stale is None:
        return label, f"no labels from {folder}: the graph does not record its coders' fingerprints (re-run trace)"
    note = f"labels from {folder}" + (f" (layers {stale} skipped: the store describes other weights)" if stale else "")
    return label, note


def graph_labels(graph, store) -> tuple[Callable[[int], str | None], list[int] | None]:
    """``(label(node) -> str | None, stale)``: the labels a :class:`~transcoders.features.store.FeatureStore`
    holds for the feature nodes of ``graph``, for the layers whose stored coder fingerprint
    matches the graph's ``meta["layer_fingerprints"]``. ``stale`` lists the layers skipped
    because the store describes other weights; it is None (and no node has a label) when the
    graph records no fingerprints."""
    from .circuits.graph import FEATURE

    fps = {int(k): v for k, v in graph.meta.get("layer_fingerprints", {}).items()}
    if not fps:
        return (lambda _i: None), None
    labels, stale = store.labels_for(fps)

    def label(i: int) -> str | None:
        if int(graph.kind[i]) != FEATURE:
            return None
        return labels.get(int(graph.layer[i]), {}).get(str(int(graph.feature[i])))

    return label, stale


def _value_note(t) -> str:
    """What a logit-like target's value means, printed beside it."""
    if t.kind == "logit" and t.centered:
        return " (centred logit: logit - mean logit)"
    if t.kind == "logit_group":
        return " (mean logit of the + set - mean logit of the - set" + (", centred)" if t.centered else ")")
    return ""


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _report(graph, *, target=None, n: int = 10, rank: str = "weight", min_length: int = 2, greedy: bool = False,
            beam: int = 5, depth: int = 4, rep=None, store_dir: Path | None = None, n_features: int = 12,
            middle: bool = False, **filters) -> None:
    """Print, for the chosen target: its paths (with the heads carrying each edge between
    positions when the replacement model ``rep`` is given), what makes up its value, the
    features with the largest total effect by position (with labels when a feature store
    matches), and the heads moving the most into its position. ``middle``: also the best paths
    through the middle layers."""
    from .circuits.contributions import explained_shares, top_effects
    from .circuits.graph import BIAS
    from .circuits.heads import heads_into_position, split_edge_last
    from .circuits.paths import format_path, greedy_paths, middle_layers, node_name, target_weights_of, top_paths

    choice = _resolve_target(graph, target)
    chosen = target_weights_of(graph, choice)
    common = dict(target=choice, min_length=min_length, **filters)
    if greedy:
        if rank != "weight" or "through" in filters or "via_layers" in filters:
            raise ValueError("--rank per-edge, --through and --via-layers work with the exact search only; drop --greedy")
        found = greedy_paths(graph, beam=beam, depth=depth, **common)[:n]
    else:
        found = top_paths(graph, n=n, rank=rank, **common)
    if middle and "via_layers" not in filters and not greedy:
        lo, hi = middle_layers(graph.n_layers)
        deep = top_paths(graph, n=3, rank=rank, via_layers=(lo, hi), **common)
    label, note = _labels(graph, store_dir)
    named = lambda i: node_name(graph, i) + (f" [{_short(label(i), 40)}]" if label(i) else "")
    how = ("greedy search" if greedy else f"exact top {n}") + (
        ", ranked by |weight|" if rank == "weight" else ", ranked per edge (geometric mean of |w| / row input)")
    click.echo(f"paths ({how}; weight = the path's contribution to its target: the first edge's weight times each "
               f"later edge's gain w/a; at least {min_length} edges, from {', '.join(filters.get('sources') or ['any node'])}):")
    if not found:
        click.echo("  none")
    for p in found:
        click.echo("  " + format_path(graph, p, names=named))
        if rep is None:
            continue
        for src, dst in zip(p.nodes[:-1], p.nodes[1:]):
            if int(graph.kind[src]) == BIAS or int(graph.pos[src]) == int(graph.pos[dst]):
                continue
            parts = [c for c in split_edge_last(rep, graph, src, dst) if c.kind == "head"]
            total = sum(c.weight for c in parts) or 1.0
            heads = ", ".join(f"{c.layer}.{c.head} ({100 * c.weight / total:+.0f}%)" for c in parts[:3])
            click.echo(f"      {graph.label(src)} -> {graph.label(dst)}: moved into pos{int(graph.pos[dst])} "
                       f"mostly by heads {heads}")
    if middle and "via_layers" not in filters and not greedy:
        click.echo(f"paths through the middle layers (a feature of L{lo}-L{hi} on the way; --via-layers A-B to choose):")
        for p in deep:
            click.echo("  " + format_path(graph, p, names=named))
        if not deep:
            click.echo("  none")
    for ti in sorted(chosen, key=lambda i: -chosen[i])[:3]:
        t = graph.targets[ti]
        shares = explained_shares(graph, ti, [p for p in found if p.target == ti])
        click.echo(f"what makes up {shares.label}@{int(graph.pos[graph.target_nodes[ti]])} = {shares.value:+.3f} "
                   f"{shares.units}{_value_note(t)}"
                   " in the linearised replacement model (parts sum to the value):")
        for line in shares.table():
            click.echo(line)
        effects = top_effects(graph, ti, n_features, per_position=3)
        click.echo(f"features with the largest total effect (direct + indirect, {shares.units}; at most 3 per position), "
                   "by position:")
        for pos in sorted({int(graph.pos[i]) for i, _ in effects}):
            click.echo(f"  pos{pos} {graph.token_strs[pos]!r}:")
            for i, c in effects:
                if int(graph.pos[i]) == pos:
                    click.echo(f"    {graph.label(i).split(' @')[0]:<12} {c:+8.3f}  {_short(label(i))}")
        if rep is not None:
            flow = heads_into_position(rep, graph, ti)
            heads = ", ".join(f"{lay}.{h} {a:+.3f}" for lay, h, a in flow.heads[:6])
            click.echo(f"heads moving the most into pos{int(graph.pos[graph.target_nodes[ti]])} ({shares.units}, over the "
                       f"{flow.n_split} strongest of {flow.n_total} edges from other positions, carrying "
                       f"{flow.split:+.3f} of {flow.total:+.3f}): {heads or 'none'}")
    if note:
        click.echo(note)


@dataclass
class Traced:
    """What :func:`trace_prompt` made: the full ``graph`` (influence filled in, ``meta`` with
    the model's and coders' identity, the prompt, BOS policy and ``scores``), its ``pruned``
    version, the replacement model ``rep`` it was built from, the prompt's ``tokens`` ``[T]``,
    whether BOS was prepended, and ``seconds`` spent on ``load``, ``graph`` and ``scores``."""

    graph: Any
    pruned: Any
    rep: Any
    tokens: torch.Tensor
    bos: bool
    seconds: dict[str, float] = field(default_factory=dict)


def trace_prompt(run_dir: Path, prompt: str, *, model: str = DEFAULT_MODEL, target_specs=(),
                 max_feature_nodes: int = 2000, batch_size: int = 64, dtype: str = "float32",
                 node_threshold: float = 0.8, edge_threshold: float = 0.98, prepend_bos: bool | None = None,
                 progress: Callable[[float, str], None] | None = None, preloaded=None,
                 row_progress: Callable[[int, int], None] | None = None, qk_heads: int = 0,
                 max_memory_gib: float | None = None) -> Traced:
    """The work of ``transcoders trace`` without printing or saving: load ``model`` and the
    transcoders of ``run_dir``, build the attribution graph of ``prompt`` for ``target_specs``
    (default: the top next-token logits), compute influence, prune with the thresholds and
    record the replacement/completeness scores in ``graph.meta["scores"]``.

    Args:
        max_feature_nodes: feature budget (0: every active feature).
        progress: called with ``(fraction in [0, 1], what is happening)`` between stages.
        preloaded: ``(loaded, coders)`` from :func:`load_model_and_coders` (``model`` then only
            names it): skips loading, for many prompts in a row (``transcoders task trace``).
        row_progress: passed to :func:`~transcoders.circuits.attribution.attribute` (feature
            rows done, planned), e.g. for a progress bar with the time left.
        qk_heads: when > 0, the QK breakdown of the ``qk_heads`` (head, query, key) triples that
            carry the most of the graph's cross-position edges, with the edges' head loadings
            (:func:`~transcoders.circuits.head_loadings.head_loadings`), in ``graph.meta["qk"]``.
        max_memory_gib: GiB the process may hold while attributing (``attribute``'s
            ``max_memory``; None: no limit).

    Raises:
        ValueError / OSError subclasses (the CLI's user errors): a model, run, prompt or target
        that cannot be used; the message names the fix.
    """
    from .circuits import LocalReplacement, attribute
    from .circuits.prune import graph_scores, node_influence, prune
    from .circuits.replacement import bos_constant_positions
    from .circuits.session import graph_identity

    say = progress or (lambda _f, _m: None)
    t0 = time.perf_counter()
    say(0.0, "loading the model and transcoders")
    loaded, coders, tokens, bos = _load(model, run_dir, prompt, prepend_bos, preloaded)
    t_load = time.perf_counter()
    say(0.2, f"building the replacement model of {len(tokens)} tokens")
    constant = bos_constant_positions(loaded.adapter, tokens, loaded.tokenizer) if bos else ()
    rep = LocalReplacement(loaded.adapter, coders, tokens, dtype=getattr(torch, dtype), tokenizer=loaded.tokenizer,
                           constant_positions=constant)
    targets = _targets(target_specs, loaded, coders, rep.logits)
    say(0.3, "attributing")
    graph = attribute(rep, targets, max_feature_nodes=max_feature_nodes or None, batch_size=batch_size,
                      progress=row_progress, max_memory=None if max_memory_gib is None else max_memory_gib * 2**30)
    t_graph = time.perf_counter()
    say(0.8, "influence, pruning and scores")
    graph.meta.update(graph_identity(loaded, coders), run_dir=str(Path(run_dir).resolve()), prompt=prompt,
                      prepend_bos=bos, constant_positions=list(constant))
    node_influence(graph)
    pruned = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    graph.meta["scores"] = {"full": graph_scores(graph), "pruned": graph_scores(graph, pruned=pruned)}
    t_scores = time.perf_counter()
    seconds = {"load": t_load - t0, "graph": t_graph - t_load, "scores": t_scores - t_graph}
    if qk_heads > 0:
        from .circuits.head_loadings import head_loadings

        say(0.85, f"QK attribution of the top {qk_heads} heads")
        graph.meta["qk"] = head_loadings(rep, graph, n_heads=qk_heads, batch_size=batch_size)
        seconds["qk"] = time.perf_counter() - t_scores
    say(0.95, "saving")
    return Traced(graph, pruned, rep, tokens, bos, seconds)


@contextmanager
def rows_bar():
    """A progress bar of attribution rows with the time left (tqdm, on stderr; silent when stderr
    is not a terminal), as a ``row_progress`` callback for :func:`trace_prompt`."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="attribution rows", unit="row", disable=None, leave=False)
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def target_prob_diffs(traced: Traced) -> list[float | None]:
    """Per target of a traced graph: the probability difference of a ``group:`` or ``diff:``
    target (:func:`~transcoders.circuits.targets.prob_diff`: summed probability of its ``+``
    tokens minus that of its ``-`` tokens, from the model's own next-token distribution at the
    target's position, after any soft-cap), None for other kinds."""
    from .circuits.targets import target_prob_diff

    logits = traced.rep.capped(traced.rep.logits)
    return [target_prob_diff(t, logits) for t in traced.graph.targets]


def target_summary(traced: Traced) -> str:
    """``0: label@pos = value (p=weight[, PD=+0.123])`` for each target of a traced graph; PD
    (see :func:`target_prob_diffs`) beside ``group:`` and ``diff:`` targets."""
    graph = traced.graph
    pds = target_prob_diffs(traced)
    return ", ".join(
        f"{i}: {t.label}@{int(graph.pos[n])} = {float(graph.value[n]):.3f} (p={float(t.weight):.3f}"
        + (f", PD={pd:+.3f})" if pd is not None else ")")
        for i, (t, n, pd) in enumerate(zip(graph.targets, graph.target_nodes.tolist(), pds)))


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@MODEL_OPT
@PROMPT_OPT
@TARGET_OPT
@click.option("--max-feature-nodes", default=2000, show_default=True, help="feature budget, chosen by influence (0: all)")
@click.option("--batch-size", default=64, show_default=True, help="attribution rows per backward sweep")
@click.option("--max-memory", "max_memory_gib", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GiB this process may hold while tracing; the batch shrinks and feature rows stop before the "
                   "estimate passes 95% of it (fewer feature nodes, still exact) [default: no limit]")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--node-threshold", default=0.8, show_default=True, help="pruning: cumulative node influence kept")
@click.option("--edge-threshold", default=0.98, show_default=True, help="pruning: cumulative edge influence kept")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="graph file: .json, or .safetensors for the compact file [default: RUN_DIR/graphs/<prompt-slug>.json]")
@click.option("--pruned-out", type=click.Path(path_type=Path), default=None,
              help="also save the pruned graph here (small; what circuit-tracer's frontend should open)")
@click.option("--force", is_flag=True, help="replace --out / --pruned-out if they exist")
@click.option("--paths", "n_paths", default=5, show_default=True, help="top paths to print")
@click.option("--paths-target", default=None, help=PATHS_TARGET_HELP)
@click.option("--qk", "qk", is_flag=True,
              help="also explain why the heads carrying the graph's strongest edges between positions attend there "
                   "(QK attribution; stored in the graph file, read with `transcoders qk GRAPH`)")
@click.option("--qk-heads", default=20, show_default=True, help="with --qk: (head, query, key) triples to explain")
@RANK_OPT
@MIN_LENGTH_OPT
@FEATURES_OPT
@BOS_OPT
@user_errors
def trace(run_dir, model, prompt, target_specs, max_feature_nodes, batch_size, max_memory_gib, dtype, node_threshold,
          edge_threshold, out, pruned_out, force, n_paths, paths_target, qk, qk_heads, rank, min_length, store_dir,
          prepend_bos):
    """Build the attribution graph of PROMPT with the transcoders in RUN_DIR (one per layer, or a
    cross-layer transcoder folder in circuit-tracer's format)."""
    from .circuits.export import save_graph

    out = out if out is not None else Path(run_dir) / "graphs" / f"{slugify(prompt)}.json"
    for path in (out, pruned_out):
        if path is not None:
            refuse_to_replace(path, force)
            check_writable(path.parent)  # before the work, not after
    with rows_bar() as bar:
        traced = trace_prompt(run_dir, prompt, model=model, target_specs=target_specs,
                              max_feature_nodes=max_feature_nodes, batch_size=batch_size, dtype=dtype,
                              node_threshold=node_threshold, edge_threshold=edge_threshold, prepend_bos=prepend_bos,
                              row_progress=bar, qk_heads=qk_heads if qk else 0, max_memory_gib=max_memory_gib)
    graph, pruned, rep, tokens = traced.graph, traced.pruned, traced.rep, traced.tokens
    full_s, pruned_s = graph.meta["scores"]["full"], graph.meta["scores"]["pruned"]
    t_save = time.perf_counter()
    save_graph(graph, out)
    if pruned_out is not None:
        pruned.meta = {**graph.meta, **pruned.meta}
        save_graph(pruned, pruned_out)
    t_save = time.perf_counter() - t_save
    sec = traced.seconds
    click.echo(f"prompt: {len(tokens)} tokens; {graph.meta['n_active_features']} active features; "
               f"{graph.meta['feature_rows']} feature rows")
    click.echo(f"graph: {graph.n_nodes} nodes, {graph.n_edges} edges; pruned: {pruned.n_nodes} nodes, {pruned.n_edges} edges")
    if graph.meta.get("memory_limited"):
        click.echo(f"--max-memory {max_memory_gib:g} GiB: stopped at {graph.meta['feature_rows']} feature rows of the "
                   f"{max_feature_nodes or graph.meta['n_active_features']} asked (projected peak "
                   f"{graph.meta['memory_estimate_bytes'] / 2**30:.2f} GiB); the graph is exact over the nodes it has")
    click.echo(f"scores: replacement {full_s['replacement_score']:.3f}, completeness {full_s['completeness_score']:.3f} "
               f"(pruned: {pruned_s['replacement_score']:.3f}, {pruned_s['completeness_score']:.3f})")
    qk_time = f", {sec['qk']:.1f} s QK attribution ({sec['qk'] / sec['graph']:.2f}x the graph)" if "qk" in sec else ""
    click.echo(f"time: {sec['graph']:.1f} s graph, {sec['scores']:.1f} s influence/pruning/scores{qk_time}, "
               f"{t_save:.1f} s saving ({sec['load']:.1f} s loading model and transcoders)")
    click.echo("targets (most probable first): " + target_summary(traced))
    _report(graph, target=paths_target, n=n_paths, rank=rank, min_length=min_length, rep=rep, store_dir=store_dir,
            middle=True, sources=DEFAULT_SOURCES)
    if "qk" in graph.meta:
        _qk_summary(graph.meta["qk"], graph.token_strs)
    click.echo(f"wrote {out}" + (f" and {pruned_out}" if pruned_out is not None else ""))


def _split(value: str | None, cast=int) -> list | None:
    return None if value is None else [cast(x) for x in value.split(",") if x.strip()]


def _through_nodes(graph, specs: tuple[str, ...]) -> list[int] | None:
    """Graph nodes named by ``--through L.F`` or ``L.F@POS`` specs (any position without @)."""
    from .circuits.graph import FEATURE

    if not specs:
        return None
    nodes = []
    for spec in specs:
        body, _, at = spec.partition("@")
        try:
            layer, feature = (int(x) for x in body.split("."))
            pos = int(at) if at else None
        except ValueError:
            raise ValueError(f"--through {spec!r} must read LAYER.FEATURE or LAYER.FEATURE@POS, e.g. 12.345@4") from None
        hit = (graph.kind == FEATURE) & (graph.layer == layer) & (graph.feature == feature)
        if pos is not None:
            hit &= graph.pos == pos
        if not bool(hit.any()):
            raise ValueError(f"feature {spec} is not a node of this graph (not active, or beyond the node budget)")
        nodes += hit.nonzero().flatten().tolist()
    return nodes


def _layer_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ValueError(f"--via-layers {text!r} must read A-B (inclusive) or one layer, e.g. 8-20") from None


@click.command()
@click.argument("graph_file", type=click.Path(path_type=Path))
@click.option("-n", "n", default=10, show_default=True, help="paths to print")
@click.option("--target", default=None, help=PATHS_TARGET_HELP)
@RANK_OPT
@MIN_LENGTH_OPT
@click.option("--max-depth", default=None, type=int, help="at most this many edges [default: any]")
@click.option("--through", multiple=True, help="only paths through this feature: LAYER.FEATURE[@POS] (repeatable: any of them)")
@click.option("--via-layers", default=None, help="only paths through a feature of layers A-B (inclusive)")
@click.option("--greedy", is_flag=True, help="Dunefsky et al.'s greedy beam search instead of the exact top N")
@click.option("--beam", default=5, show_default=True)
@click.option("--depth", default=4, show_default=True)
@click.option("--layers", default=None, help="comma-separated layers every node inside a path must be in")
@click.option("--positions", default=None, help="comma-separated positions every node inside a path must be at")
@click.option("--kinds", default=None, help="comma-separated node kinds every node inside a path must be (feature, ...)")
@click.option("--sources", default=",".join(DEFAULT_SOURCES), show_default=True,
              help="comma-separated node kinds a path may start at (embedding, feature, bias, error)")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="also name the heads that carry each edge between positions and move the most into the target's "
                   "position (loads the model and transcoders, checked against the graph)")
@click.option("--model", default=None, help="with --run-dir: the model [default: the graph's, if known locally]")
@FEATURES_OPT
@user_errors
def paths(graph_file, n, target, rank, min_length, max_depth, through, via_layers, greedy, beam, depth, layers, positions,
          kinds, sources, run_dir, model, store_dir):
    """Print the strongest paths of a saved graph into one target, what they explain, and the
    features with the largest total effect on it."""
    from .circuits.export import load_graph

    graph = load_graph(graph_file)
    filters = {k: v for k, v in (("layers", _split(layers)), ("positions", _split(positions)),
                                 ("kinds", _split(kinds, str)), ("through", _through_nodes(graph, through)),
                                 ("via_layers", _layer_range(via_layers)))
               if v is not None}
    if max_depth is not None:
        if greedy:
            raise ValueError("--max-depth is for the exact search; the greedy search uses --depth")
        filters["max_depth"] = max_depth
    rep = None
    if run_dir is not None or model is not None:
        rep = replacement_for_graph(graph, graph_file, model, run_dir)
    _report(graph, target=target, n=n, rank=rank, min_length=min_length, greedy=greedy, beam=beam, depth=depth,
            rep=rep, store_dir=store_dir, sources=_split(sources, str), **filters)


def replacement_for_graph(graph, graph_file: Path, model: str | None, run_dir: Path | None):
    """The :class:`~transcoders.circuits.LocalReplacement` a saved graph was built from: its
    prompt's tokens, dtype and constant positions, with ``model`` / ``run_dir`` (default: the
    graph's own; its model only if known locally), checked against the graph.

    Raises:
        ValueError subclasses: no run folder, an untrusted or unloadable model, or a mismatch.
    """
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


def graph_means(loaded, coders, graph, mean_tokens: int) -> dict | None:
    """``{layer: [d_sae]}`` mean feature activations over ``mean_tokens`` corpus tokens, taken with
    the graph's BOS policy (the reference of mean ablation); None when ``mean_tokens`` is 0."""
    if not mean_tokens:
        return None
    from .circuits.interventions import mean_activations
    from .circuits.session import reference_tokens

    bos = bool(graph.meta.get("prepend_bos", False))
    return mean_activations(loaded.adapter, coders, reference_tokens(loaded, mean_tokens, bos=bos))


def verify_graph(loaded, coders, graph, *, top_edges: int = 20, top_nodes: int = 10, sizes=None, means=None):
    """:func:`~transcoders.circuits.verify.verify` of a saved graph with the model and transcoders
    it was traced with: the frozen local replacement model in the graph's dtype and the free one."""
    from .circuits import LocalReplacement
    from .circuits.interventions import ReplacementRunner
    from .circuits.verify import verify as run_verify

    tokens = torch.tensor(graph.tokens)
    rep = LocalReplacement(loaded.adapter, coders, tokens, dtype=getattr(torch, graph.meta.get("dtype", "float32")),
                           constant_positions=tuple(graph.meta.get("constant_positions", ())))
    runner = ReplacementRunner(loaded.adapter, coders, tokens)
    return run_verify(rep, graph, runner=runner, top_edges=top_edges, top_nodes=top_nodes, sizes=sizes, means=means)


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
    from .circuits.export import load_graph

    if out is not None:
        refuse_to_replace(out, force)
        check_writable(out.parent)
    graph = load_graph(graph_file)
    loaded, coders, _ = _load_for_graph(graph, graph_file, model, run_dir)
    means = graph_means(loaded, coders, graph, mean_tokens)
    report = verify_graph(loaded, coders, graph, top_edges=top_edges, top_nodes=top_nodes, sizes=_split(sizes),
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


def _tok(token_strs, pos: int) -> str:
    return repr(token_strs[pos]) if 0 <= pos < len(token_strs) else ""


def _print_qk(h: dict, token_strs: list[str], n: int = 10) -> None:
    """Print one head's QK breakdown (a :func:`~transcoders.circuits.head_loadings.qk_section`)."""
    from .circuits.qk import source_label

    name = lambda src: source_label(src, token_strs)
    cap = f", {h['capped_score']:+.4g} after the soft-cap" if h.get("softcap") else ""
    click.echo(f"head {h['layer']}.{h['head']}, query pos{h['q']} {_tok(token_strs, h['q'])} -> key pos{h['k']} "
               f"{_tok(token_strs, h['k'])}: score {h['score']:+.4g} (pre-softmax, scale {h['scale']:.4g} included"
               f"{cap}), attention weight {h['pattern']:.3f}")
    click.echo("  the score is exactly the sum of (query-side source x key-side source) terms; each side's sources "
               "reach it through the frozen linear paths")
    for side, title in (("query", f"query side at pos{h['q']}"), ("key", f"key side at pos{h['k']}")):
        by_pos = ", ".join(f"pos{p} {_tok(token_strs, p)} {t:+.3g}" for p, t in h.get("positions", {}).get(side, [])[:5])
        if by_pos:
            click.echo(f"  {title}, terms by source position: {by_pos}")
        click.echo(f"  {title} (each source's terms summed over the other side):")
        for item in h[side][:n]:
            click.echo(f"    {item['term']:+9.4g}  {name(item['source'])}")
        click.echo(f"    {h['head_bias'][side]:+9.4g}  the head's own {'b_Q' if side == 'query' else 'b_K'} "
                   "(norm bias and projection bias)")
    click.echo("  strongest pairs:")
    for pair in h["pairs"][:n]:
        click.echo(f"    {pair['term']:+9.4g}  {name(pair['query'])}  x  {name(pair['key'])}")


def _qk_summary(section: dict, token_strs: list[str], full: bool = False) -> None:
    """Print a graph's stored QK section: the head loadings of its strongest edges, then each
    explained head in one line (``full``: with its whole breakdown)."""
    from .circuits.head_loadings import because, loading_sentences

    heads = section.get("heads", [])
    click.echo(f"QK attribution ({section['seconds']['total']:.1f} s): the strongest edges between positions, by the "
               "heads that carry them (share of the edge), and why those heads attend there:")
    for line in loading_sentences(section, token_strs, n=10 if full else 5):
        click.echo("  " + line)
    click.echo(f"the {len(heads)} (head, query, key) carrying the most" + ("" if full else
               " (`transcoders qk GRAPH --head L.H --q Q --k K` prints one whole)") + ":")
    for h in heads:
        if full:
            _print_qk(h, token_strs, n=5)
        else:
            click.echo(f"  {h['layer']}.{h['head']} pos{h['q']} -> pos{h['k']}: " + because(h, token_strs))


def _head_spec(text: str) -> tuple[int, int]:
    try:
        layer, head = (int(x) for x in text.split("."))
    except ValueError:
        raise ValueError(f"--head {text!r} must read LAYER.HEAD, e.g. 20.7") from None
    return layer, head


@click.command()
@click.argument("graph_file", type=click.Path(path_type=Path))
@click.option("--head", default=None, help="the head, LAYER.HEAD [default: list what `trace --qk` stored]")
@click.option("--q", "q", type=int, default=None, help="query position [default: the prompt's last]")
@click.option("--k", "k", type=int, default=None, help="key position [default: where the head attends most from --q]")
@click.option("-n", "n", default=10, show_default=True, help="sources per side and pairs to print")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="the transcoders [default: the graph's]; giving it (or --model) recomputes even a stored breakdown")
@click.option("--model", default=None, help="the model [default: the graph's, if known locally]")
@click.option("--check", is_flag=True,
              help="check by intervention: remove the strongest query-side and key-side sources (features, error "
                   "nodes, embeddings) and report the head's score and attention, frozen and in the real model")
@user_errors
def qk(graph_file, head, q, k, n, run_dir, model, check):
    """Why a head attends where it does: split head LAYER.HEAD's pre-softmax score from query
    position --q to key position --k into (query-side node x key-side node) terms, exactly.
    Without --head, print the breakdowns and head loadings `trace --qk` stored in GRAPH_FILE."""
    from .circuits.attribution import SourceIndex
    from .circuits.export import load_graph
    from .circuits.head_loadings import find_head, qk_section, read_qk_section
    from .circuits.qk import qk_attribution

    graph = load_graph(graph_file)
    section = read_qk_section(graph, str(graph_file))
    if head is None:
        if section is None:
            raise ValueError(f"{graph_file} holds no QK breakdown; trace it with --qk, or give --head LAYER.HEAD "
                             "(and --q, --k) to compute one")
        _qk_summary(section, graph.token_strs, full=True)
        return
    layer, h = _head_spec(head)
    T = len(graph.tokens)
    q_pos = T - 1 if q is None else (q + T if q < 0 else q)
    stored = None
    if section is not None and k is not None and run_dir is None and model is None:
        stored = find_head(section, layer, h, q_pos, k + T if k < 0 else k)
    if stored is not None and not check:
        _print_qk(stored, graph.token_strs, n)
        return
    rep = replacement_for_graph(graph, graph_file, model, run_dir)
    if k is None and 0 <= layer < rep.n_layers and 0 <= h < rep.layers[layer].pattern.shape[0] and 0 <= q_pos < T:
        k = int(rep.layers[layer].pattern[h, q_pos, : q_pos + 1].argmax())
    index = SourceIndex(rep)
    a = qk_attribution(rep, layer, h, q_pos, -1 if k is None else k, index=index)
    _print_qk(qk_section(a, rep, index, n), graph.token_strs, n)
    if check:
        _print_checks(rep, a, index, graph.token_strs)


def _print_checks(rep, a, index, token_strs) -> None:
    from .circuits.qk import column_source, source_label
    from .circuits.qk_check import check_source

    click.echo("check by intervention (remove the source's write; frozen: features, errors, patterns and norms held, "
               "so the score moves by exactly minus its terms; free: the real model recomputes everything):")
    for side, marg, pos in (("key", a.key_marginals(), a.k), ("query", a.query_marginals(), a.q)):
        for col in marg[:-1].abs().argsort(descending=True)[:50].tolist():
            src = column_source(rep, index, col, layer=a.layer, pos=pos, side=side[0])
            if src["kind"] in ("feature", "error", "embedding"):
                break
        else:
            continue
        c = check_source(rep, a, col, src)
        click.echo(f"  strongest {side}-side source {source_label(src, token_strs)} (terms {float(marg[col]):+.4g}): "
                   f"score {c.score:+.4g} -> {c.score_frozen:+.4g} frozen (terms predict {c.score + c.predicted_change:+.4g}); "
                   f"attention {c.pattern:.3f} -> {c.pattern_frozen:.3f} frozen, {c.pattern_free:.3f} free")


CIRCUIT_COMMANDS = (trace, paths, intervene, verify, qk)
