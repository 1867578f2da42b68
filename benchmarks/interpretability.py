"""Are transcoders more interpretable than SAEs? (Paulo, Shabalin & Belrose 2025; Dunefsky et al. 2024.)

Trains (or takes) an SAE, a transcoder and a skip transcoder on the same layer, the same tokens
(one activation stream: a `--sweep` over `kind`) and the same k, evaluates them on 4,096 held-out
tokens, runs the features pass of all three on the same held-out text, and compares explanation scores of random live features:
the LLM-free labels scored by the rule judge for `--n` features each, and, with `--base-url`
(an OpenAI-compatible endpoint, e.g. `transcoders serve-llm`), LLM explanations and LLM-judged
labels for the first `--llm-n` of them. Prints a markdown table of means with 95% bootstrap
confidence intervals and writes every number to `--json`.

    .venv/bin/python benchmarks/interpretability.py --run runs/interp-l6 --n 200
    .venv/bin/transcoders serve-llm --port 8011 &   # then, for LLM scores:
    .venv/bin/python benchmarks/interpretability.py --run runs/interp-l6 --n 200 --llm-n 30 \
        --base-url http://127.0.0.1:8011/v1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("transcoder", "skip_transcoder", "sae")


def train(run: Path, layer: int, tokens: int) -> None:
    sweep = json.dumps([{"kind": k} for k in KINDS])
    cmd = [str(ROOT / ".venv/bin/transcoders"), "train", "--layers", str(layer), "--total-tokens", str(tokens),
           "--sweep", sweep, "--run-dir", str(run), "--eval-tokens", "4096", "--quiet"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval (1,000 resamples)."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(1000, v.size), replace=True).mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs/interp-l6")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--train-tokens", type=int, default=614_400)
    ap.add_argument("--eval-tokens", type=int, default=1_000_000, help="held-out tokens for the features pass (all, if fewer)")
    ap.add_argument("--n", type=int, default=200, help="random live features per coder (rule-judged labels)")
    ap.add_argument("--llm-n", type=int, default=0, help="of those, how many get LLM explanations and LLM judging")
    ap.add_argument("--base-url", default=None)
    ap.add_argument("--model", default=None, help="the endpoint's model name [default: its first]")
    ap.add_argument("--n-activating", type=int, default=8, help="held-out activating examples per score")
    ap.add_argument("--n-non-activating", type=int, default=8, help="non-activating examples per score")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/interpretability.json")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from transcoders.coders.run_folder import CoderKey
    from transcoders.features.collect import collect_features
    from transcoders.features.config import FeaturesConfig
    from transcoders.features.interpret import LABEL_EXPLAINER, interpret, read_explanations
    from transcoders.features.store import ACTS

    if not (args.run / "train_config.json").exists():
        train(args.run, args.layer, args.train_tokens)
    t0 = time.perf_counter()
    store = collect_features(args.run, FeaturesConfig(split="eval", tokens=args.eval_tokens),
                             out=args.run / "features-eval")
    pass_s = time.perf_counter() - t0
    client = None
    if args.base_url and args.llm_n:
        from transcoders.features.llm import LLMClient
        from transcoders.features_cli import _first_model

        client = LLMClient(args.base_url, args.model or _first_model(args.base_url), cache_dir=store.folder / "llm_cache")
    metrics = json.loads((args.run / "metrics.json").read_text())["layers"] if (args.run / "metrics.json").exists() else {}
    results: dict = {"pass_seconds": pass_s, "coders": {}}
    for kind in KINDS:
        key = CoderKey(args.layer, f"kind-{kind}")  # the sweep's variant folder
        count = store.tensor(key, ACTS, "count")
        live = (count > 0).nonzero().flatten()
        g = torch.Generator().manual_seed(args.seed)
        chosen = sorted(live[torch.randperm(live.numel(), generator=g)[: args.n]].tolist())
        t = time.perf_counter()
        sizes = dict(n_activating=args.n_activating, n_non_activating=args.n_non_activating)
        interpret(store, key, chosen, seed=args.seed, **sizes)
        rule_s = time.perf_counter() - t
        if client is not None:
            t = time.perf_counter()
            interpret(store, key, chosen[: args.llm_n], client=client, explainer_name=client.model, seed=args.seed,
                      log=print, **sizes)
            print(f"{kind}: LLM part {time.perf_counter() - t:.0f} s", flush=True)
        records = [r for r in read_explanations(store, key) if r["index"] in set(chosen)]
        groups: dict = {}
        for r in records:
            groups.setdefault(f"{r['explainer'] if r['explainer'] == LABEL_EXPLAINER else 'llm'} / "
                              f"{'rule' if r['judge'] == 'rule' else 'llm'}", []).append(r)
        m = metrics.get(str(key), {})
        results["coders"][kind] = {
            "live_fraction": float((count > 0).float().mean()), "n_tokens": store.info(key)["n_tokens"],
            "l0": m.get("l0"), "fvu": m.get("fvu"), "loss_recovered": m.get("ce_loss_recovered"),
            "rule_seconds": rule_s,
            "scores": {g: {s: ci([r["scores"].get(s) for r in rs]) + (len(rs),)
                           for s in ("detection", "fuzzing", "simulation", "token_simulation")}
                       for g, rs in groups.items()},
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nfeatures pass over the held-out text: {pass_s:.0f} s")
    print("| coder | live | L0 | FVU | explainer / judge | n | detection | fuzzing | simulation | token simulation |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda t: "n/a" if t[0] != t[0] else f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"
    num = lambda v: "n/a" if v is None else f"{v:.3g}"
    for kind, c in results["coders"].items():
        for g, sc in c["scores"].items():
            print(f"| {kind} | {c['live_fraction']:.1%} | {num(c['l0'])} | {num(c['fvu'])} | {g} | {sc['detection'][3]} | "
                  f"{fmt(sc['detection'])} | {fmt(sc['fuzzing'])} | {fmt(sc['simulation'])} | {fmt(sc['token_simulation'])} |")


if __name__ == "__main__":
    main()
