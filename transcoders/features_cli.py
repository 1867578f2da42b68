"""Feature commands: ``features`` (the pass that fills the store), ``feature`` (one feature's
dashboard), ``explain`` (LLM explanations and scores), ``serve-llm`` (a local OpenAI-compatible
endpoint), ``export-features`` (circuit-tracer's frontend format) and ``blind`` (blind case
studies)."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from .cli_common import config_options, quiet_progress, user_errors
from .features.config import FeaturesConfig


def _parse_feature(spec: str) -> tuple[int, int, str]:
    """``L.F`` or ``L/VARIANT.F`` -> (layer, feature, variant)."""
    head, _, feat = spec.rpartition(".")
    layer, _, variant = head.partition("/")
    try:
        return int(layer), int(feat), variant
    except ValueError:
        raise ValueError(f"feature {spec!r} must read LAYER.FEATURE, e.g. 12.345") from None


def _store(run_dir: Path, store_dir: Path | None):
    from .features.collect import default_store
    from .features.store import FeatureStore

    return FeatureStore(store_dir or default_store(run_dir))


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@config_options(FeaturesConfig)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="the store [default: RUN_DIR/features]")
@click.option("--quiet", is_flag=True, help="no progress bars")
@user_errors
def features(run_dir, out, quiet, **settings):
    """Run the model over text once and record every feature's statistics, examples, weight
    tables and label in the feature store (it grows: run again with more --tokens or layers)."""
    from .features.collect import collect_features

    quiet_progress(quiet)
    from .training.distributed import is_main

    store = collect_features(run_dir, FeaturesConfig(**settings), out=out, progress=not quiet, log=click.echo)
    for key in store.keys if is_main() else ():
        info = store.info(key)
        labels = store.labels(key)["labels"]
        click.echo(f"layer {key}: {info['n_tokens']:,} tokens, {len(labels):,} of {info['d_sae']:,} features fire "
                   f"(labelled)")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("feature_spec", metavar="LAYER.FEATURE")
@click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None,
              help="the feature store [default: RUN_DIR/features]")
@click.option("--model", default=None, help="model, for --head and stores without weight tables")
@click.option("-k", "k", default=8, show_default=True, help="entries per list")
@click.option("--top", "n_top", default=8, show_default=True, help="top examples shown")
@click.option("--head", "heads", multiple=True, help="ATTN_LAYER.HEAD: also de-embed through this head's OV circuit")
@user_errors
def feature(run_dir, feature_spec, store_dir, model, k, n_top, heads):
    """One feature's dashboard: statistics, histogram, top and quantile examples (active tokens
    marked [token|activation]), logit effects, de-embedding, pullback, OV heads, co-occurring
    features, label and explanations. Without a store (`transcoders features` not run yet):
    what the weights alone say."""
    from .features.dashboard import render
    from .features.interpret import read_explanations
    from .features.store import MANIFEST

    layer, index, variant = _parse_feature(feature_spec)
    from .features.collect import default_store

    folder = store_dir or default_store(run_dir)
    if (folder / MANIFEST).exists():
        from .coders.run_folder import CoderKey

        store = _store(run_dir, store_dir)
        rec = store.feature(layer, index, variant)
        mine = [e for e in read_explanations(store, CoderKey(layer, variant)) if e["index"] == index]
        click.echo(render(rec, n_top=n_top, explanations=mine, k=k))
    else:
        _weights_view(run_dir, layer, index, model, k, heads)
        click.echo(f"(no feature store in {folder}: run `transcoders features {run_dir}` for examples and statistics)",
                   err=True)
        return
    if heads:
        _weights_view(run_dir, layer, index, model, k, heads, heads_only=True)


def _weights_view(run_dir, layer, feat, model, k, heads, heads_only: bool = False) -> None:
    """De-embedding, logit effects and pullback of one feature from weights alone."""
    from .circuits import weights as W
    from .coders.io import check_compatible, load_coder
    from .coders.run_folder import CoderKey, find_coders
    from .models.loading import load_model
    from .models.trust import model_from_file

    found = find_coders(Path(run_dir))
    coders = {}
    for wanted in {layer, layer - 1} - {-1}:
        if CoderKey(wanted) in found:
            coders[wanted] = load_coder(found[CoderKey(wanted)]).requires_grad_(False)
    if layer not in coders:
        raise ValueError(f"{run_dir} has no transcoder for layer {layer}")
    loaded = load_model(model or model_from_file(coders[layer].cfg.model_name, f"the coders in {run_dir}"),
                        dtype=torch.float32)
    ad, tok = loaded.adapter, loaded.tokenizer
    for c in coders.values():
        check_compatible(c, ad.d_model, ad.n_layers)

    def show(title, top):
        click.echo(title)
        for side, _, label, score in top.rows(tok):
            click.echo(f"  {side} {label:<24} {score:+.4f}")

    if not heads_only:
        show(f"tokens that excite L{layer} f{feat} directly (de-embedding):", W.deembedding(ad, coders, layer, feat, k=k))
    for spec in heads:
        try:
            a_layer, head = (int(x) for x in spec.split("."))
        except ValueError:
            raise ValueError(f"--head {spec!r} must read ATTN_LAYER.HEAD, e.g. 3.5") from None
        show(f"tokens that excite L{layer} f{feat} through head {a_layer}.{head}'s OV circuit:",
             W.head_deembedding(ad, coders, layer, feat, a_layer, head, k=k))
    if heads_only:
        return
    show("logits it pushes up (+) and down (-) directly, per unit of activation:", W.logit_effects(ad, coders, layer, feat, k=k))
    if layer - 1 in coders:
        show(f"layer-{layer - 1} features that excite it directly (pullback, virtual weights):",
             W.pullback(coders, layer, feat, layer - 1, ad, k=k))


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--layer", "layer_spec", required=True, help="LAYER or LAYER/VARIANT of the coder")
@click.option("--features", "feature_list", default=None, help="comma-separated feature indices [default: --n random live ones]")
@click.option("-n", "n", default=100, show_default=True, help="random live features to explain")
@click.option("--seed", default=0, show_default=True, help="seed of the feature choice and the scoring examples")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
              "(`transcoders serve-llm`); without it only the LLM-free labels are scored")
@click.option("--model", "llm_model", default=None, help="the endpoint's model name [default: the server's first]")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True, help="environment variable holding the API key")
@click.option("--requests-per-minute", type=float, default=None, help="rate limit")
@click.option("--n-activating", default=10, show_default=True, help="held-out activating examples per score")
@click.option("--n-non-activating", default=10, show_default=True, help="non-activating examples per score "
              "(half near misses, half random)")
@click.option("--judge-labels/--no-judge-labels", default=True, show_default=True,
              help="also score the LLM-free labels with the LLM judge")
@click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None, help="[default: RUN_DIR/features]")
@user_errors
def explain(run_dir, layer_spec, feature_list, n, seed, base_url, llm_model, api_key_env, requests_per_minute,
            n_activating, n_non_activating, judge_labels, store_dir):
    """Explain features and score the explanations (detection, fuzzing, simulation), beside the
    LLM-free labels scored the same way. Records go to the store's explanations.jsonl; an
    interrupted batch resumes, and LLM replies are cached in the store (never paid twice)."""
    from .features.interpret import interpret
    from .features.store import parse_key

    store = _store(run_dir, store_dir)
    key = parse_key(layer_spec)
    store.info(key)
    if feature_list:
        chosen = [int(x) for x in feature_list.split(",") if x.strip()]
    else:
        live = [int(i) for i in store.labels(key)["labels"]]
        g = torch.Generator().manual_seed(seed)
        chosen = sorted(live[i] for i in torch.randperm(len(live), generator=g)[:n].tolist())
    client = None
    if base_url:
        from .features.llm import LLMClient

        client = LLMClient(base_url, llm_model or _first_model(base_url), api_key_env=api_key_env,
                           cache_dir=store.folder / "llm_cache", requests_per_minute=requests_per_minute)
    records = interpret(store, key, chosen, client=client, explainer_name=client.model if client else "", seed=seed,
                        n_activating=n_activating, n_non_activating=n_non_activating, judge_labels=judge_labels,
                        log=click.echo)
    click.echo(f"{len(records)} new records in {store.folder}")


def _first_model(base_url: str) -> str:
    import requests

    try:
        return requests.get(base_url.rstrip("/") + "/models", timeout=30).json()["data"][0]["id"]
    except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"could not list the models of {base_url} ({exc}); pass --model") from None


@click.command("serve-llm")
@click.option("--model", default=None, help="the model to serve [default: SmolLM2-135M-Instruct, offline]")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to listen on (loopback by default)")
@click.option("--port", default=8000, show_default=True)
@user_errors
def serve_llm(model, host, port):
    """Serve a local causal LM behind an OpenAI-compatible API (chat and completions, with
    log-probs), for `transcoders explain --base-url http://HOST:PORT/v1`."""
    from .features.server import serve

    serve(model, host=host, port=port)


@click.command("export-features")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--layers", default=None, help="comma-separated layers [default: every layer in the store]")
@click.option("--features", "feature_list", default=None, help="comma-separated feature indices [default: every live one]")
@click.option("--scan", default=None, help="the graphs' metadata.scan [default: the model name, as `trace` writes it]")
@click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None, help="[default: RUN_DIR/features]")
@click.option("--force", is_flag=True, help="replace feature files that exist")
@user_errors
def export_features(run_dir, out_dir, layers, feature_list, scan, store_dir, force):
    """Write the store's features as circuit-tracer frontend feature files,
    OUT_DIR/<scan>/<feature id>.json, so graphs from `trace` open with their examples."""
    from .features.export import export_circuit_tracer

    store = _store(run_dir, store_dir)
    split = lambda v: None if v is None else [int(x) for x in v.split(",") if x.strip()]
    paths = export_circuit_tracer(store, out_dir, layers=split(layers), features=split(feature_list), scan=scan,
                                  force=force)
    click.echo(f"wrote {len(paths):,} feature files under {out_dir}")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="folder for evidence.md, blind.json, hypotheses.jsonl and, with --reveal, reveal.md")
@click.option("--n", "n", default=10, show_default=True, help="random live features")
@click.option("--seed", default=0, show_default=True, help="seed of the draw and of the scoring examples")
@click.option("--layers", default=None, help="comma-separated layers to draw from [default: all in the store]")
@click.option("--min-count", default=20, show_default=True,
              help="draw only features that fire on at least this many tokens of the store (so they can be scored)")
@click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None,
              help="feature store [default: RUN_DIR/features]")
@click.option("--reveal", is_flag=True, help="score the hypotheses written in OUT/hypotheses.jsonl and show the examples")
@click.option("--force", is_flag=True, help="replace an earlier draw's files in --out")
@user_errors
def blind(run_dir, out_dir, n, seed, layers, min_count, store_dir, reveal, force):
    """Blind case study (Dunefsky et al. 2024, Sec. 4.4): draw --n random live features and write
    only their input-invariant evidence (de-embeddings, pullbacks, OV heads, logit effects) to
    OUT/evidence.md with a hypotheses.jsonl to fill in; then, with --reveal, score each written
    hypothesis (detection and fuzzing by the rule judge), show the features' top examples and
    tally successes, partial successes and failures."""
    run_blind(run_dir, out_dir, n=n, seed=seed, layers=layers, min_count=min_count, store_dir=store_dir,
              reveal=reveal, force=force)


def run_blind(run_dir: Path, out_dir: Path, *, n: int = 10, seed: int = 0, layers: str | None = None,
              min_count: int = 20, store_dir: Path | None = None, reveal: bool = False, force: bool = False) -> dict:
    """``transcoders blind`` as a function; returns what it wrote (``blind.json``'s content, with
    ``results`` and ``tally`` after --reveal).

    Raises:
        BlindError: too few live features, or a hypothesis without tokens.
        OutputExistsError: a draw's files exist in ``out_dir`` (draw) or ``reveal.md`` does (reveal)
            and ``force`` is not set.
        FileNotFoundError: --reveal without an earlier draw in ``out_dir``.
    """
    import json

    from .features.blind import (
        BlindError,
        evidence,
        evidence_markdown,
        pick,
        reveal_markdown,
        score_hypothesis,
        tally,
    )
    from .files import atomic_write_json, atomic_write_text, check_writable, refuse_to_replace

    out_dir = Path(out_dir)
    store = _store(run_dir, store_dir)
    drawn_path, hyp_path = out_dir / "blind.json", out_dir / "hypotheses.jsonl"
    if reveal:
        if not drawn_path.exists() or not hyp_path.exists():
            raise FileNotFoundError(f"{drawn_path} or {hyp_path} is missing: draw first (the same command without "
                                    "--reveal), then write the hypotheses")
        refuse_to_replace(out_dir / "reveal.md", force)
        drawn = json.loads(drawn_path.read_text())
        written = {}
        for i, line in enumerate(hyp_path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    h = json.loads(line)
                    written[(int(h["layer"]), int(h["feature"]))] = h
                except (ValueError, KeyError, TypeError) as exc:
                    raise BlindError(f"{hyp_path}:{i}: not a hypothesis line ({exc}); each line is "
                                     '{"layer": L, "feature": F, "hypothesis": "...", "tokens": ["..."]}') from None
        results = []
        for e in drawn["features"]:
            key = (e["layer"], e["feature"])
            if key not in written or not str(written[key].get("hypothesis", "")).strip():
                raise BlindError(f"{hyp_path}: no hypothesis for feature {key[0]}.{key[1]}; write one for every "
                                 "drawn feature before revealing")
            results.append(score_hypothesis(store, key[0], key[1], written[key], seed=drawn["seed"]))
        drawn |= {"results": results, "tally": tally(results)}
        atomic_write_text(out_dir / "reveal.md", reveal_markdown(results))
        atomic_write_json(out_dir / "revealed.json", drawn)
        t = drawn["tally"]
        click.echo(f"{t['success']} successes, {t['partial']} partial, {t['failure']} failures; wrote {out_dir / 'reveal.md'}")
        return drawn
    for p in (drawn_path, hyp_path, out_dir / "evidence.md"):
        refuse_to_replace(p, force, hint=" (it may hold your hypotheses)")
    check_writable(out_dir)
    chosen = pick(store, n, seed, layers=None if layers is None else [int(x) for x in layers.split(",") if x.strip()],
                  min_count=min_count)
    items = [evidence(store, layer, feat) for layer, feat in chosen]
    drawn = {"run_dir": str(run_dir), "store": str(store.folder), "seed": seed, "features": items}
    atomic_write_json(drawn_path, drawn)
    atomic_write_text(out_dir / "evidence.md", evidence_markdown(items))
    atomic_write_text(hyp_path, "".join(json.dumps({"layer": layer, "feature": feat, "hypothesis": "", "tokens": [],
                                                    "context": []}) + "\n" for layer, feat in chosen))
    click.echo(f"drew {n} live features ({', '.join(f'{a}.{b}' for a, b in chosen)}); read {out_dir / 'evidence.md'}, "
               f"write {hyp_path}, then run again with --reveal")
    return drawn


FEATURE_COMMANDS = (features, feature, explain, serve_llm, export_features, blind)
