"""Do transcoders hold up off their training text? A cross-genre check (issue: "transcoders that hold up").

Builds the held-out split of a text mixture once (each source split by the same per-document hash
rule as training, so a run trained on any of these sources never saw these documents), then
evaluates every given run on each source's held-out contexts alone: FVU, L0, next-token loss with
the coder spliced in, loss recovered against zero-ablation, and KL (nats/token). Prints a markdown
table and writes every number to ``--json``.

    .venv/bin/python benchmarks/cross_genre.py runs/l6 runs/mix-l6 \
        --data books:0.3,email:0.15,pydocs:0.15,djangodocs:0.1,stdlib:0.2,sotu:0.1 --eval-tokens 12288
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from transcoders.coders.io import load_coder
from transcoders.coders.run_folder import find_coders
from transcoders.data.tokens import build_token_split
from transcoders.evaluation.metrics import evaluate_coders
from transcoders.evaluation.run import read_train_config
from transcoders.files import atomic_write_json
from transcoders.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", required=True, help="a mixture; each source is reported alone")
    ap.add_argument("--eval-tokens", type=int, default=12288, help="held-out tokens over all sources")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "cross_genre.json")
    args = ap.parse_args()

    configs = {run: read_train_config(run) for run in args.runs}
    first = next(iter(configs.values()))
    ctx_len, eval_fraction = first.ctx_len, first.eval_fraction
    for run, cfg in configs.items():
        if (cfg.ctx_len, cfg.eval_fraction, cfg.prepend_bos) != (ctx_len, eval_fraction, first.prepend_bos):
            raise SystemExit(f"{run} was trained with other contexts (ctx_len, eval_fraction, BOS); compare like runs")
    lm = load_model(first.model)
    split = build_token_split(args.data, lm.tokenizer, ctx_len, eval_fraction=eval_fraction, max_train_tokens=ctx_len,
                              max_eval_tokens=args.eval_tokens)
    rows = []
    for run, cfg in configs.items():
        folders = find_coders(run)
        coders = {str(key): load_coder(folder) for key, folder in folders.items()}
        means = {key.layer: load_file(folder / "stats.safetensors")["mlp_out_mean"]
                 for key, folder in folders.items() if (folder / "stats.safetensors").exists()}
        for label, part in split.eval_sources:
            t0 = time.perf_counter()
            m = evaluate_coders(lm.adapter, coders, split.eval[part], mlp_out_means=means, progress=False,
                                skip_first=cfg.skip_first_tokens)
            for key, x in m["layers"].items():
                rows.append({"run": str(run), "trained_on": cfg.data or "sotu", "coder": key, "source": label,
                             "eval_tokens": m["eval_tokens"], **x, "seconds": time.perf_counter() - t0})
    print("| source | run (trained on) | coder | tokens | L0 | FVU | CE clean | CE spliced | loss recovered | KL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["source"], r["run"])):
        print(f"| {r['source']} | {r['run']} ({r['trained_on']}) | {r['coder']} | {r['eval_tokens']:,} | {r['l0']:.1f} | "
              f"{r['fvu']:.3f} | {r['ce_clean']:.3f} | {r['ce_spliced']:.3f} | {r['ce_loss_recovered']:.3f} | {r['kl']:.3f} |")
    atomic_write_json(args.json, {"data": args.data, "eval_tokens": args.eval_tokens, "rows": rows}, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
