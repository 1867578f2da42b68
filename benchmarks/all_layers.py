"""Every MLP of the model replaced at once: train a transcoder for each of SmolLM2's 30 layers
on the default text mixture, then splice all of them in together (Dunefsky et al. 2024, Sec. 4.2:
all 12 of GPT-2 small's MLPs replaced, CE 3.59 -> 4.23 nats).

Each job trains one set (``--jobs transcoder:4096000,skip_transcoder:4096000``, KIND:TOKENS) into
``RUN_ROOT/<kind>-<tokens>`` with the training defaults otherwise (TopK k 32, d_sae 16 x d_model,
AuxK, the mixture), and evaluates it on the mixture's held-out documents: every layer alone, all
at once (CE increase, KL, loss recovered against zero- and mean-ablating all 30 MLPs), what each
layer adds on top of the others (leave one out), and the same on each source's documents alone.
The JSON is rewritten after every job, so an interrupted run keeps what it finished.

    .venv/bin/python benchmarks/all_layers.py --jobs transcoder:4096000 --eval-tokens 131072   # a GPU: minutes
    transcoders train --layers all --total-tokens 4096000 --run-dir runs/all-4m                 # the same set, by hand
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transcoders.files import atomic_write_json
from transcoders.models.loading import DEFAULT_MODEL, load_model
from transcoders.training.config import TrainConfig
from transcoders.training.run import train_run

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="transcoder:4096000,skip_transcoder:4096000", help="KIND:TOKENS,...")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--run-root", type=Path, default=ROOT / "runs")
    ap.add_argument("--eval-tokens", type=int, default=131_072)
    ap.add_argument("--model-batch", type=int, default=16, help="contexts per forward pass when harvesting")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps (a checkpoint of 30 coders is ~4 GB)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "all_layers.json")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, device=device)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "jobs": []}
    if args.json.exists():
        result["jobs"] = json.loads(args.json.read_text()).get("jobs", [])
    for job in args.jobs.split(","):
        kind, tokens = job.split(":")
        cfg = TrainConfig(model=args.model, layers="all", kind=kind, total_tokens=int(tokens),
                          model_batch=args.model_batch, checkpoint_every=args.checkpoint_every)
        run_dir = args.run_root / f"all-{kind}-{int(tokens)}"
        t0 = time.perf_counter()
        out = train_run(cfg, run_dir, loaded=loaded, eval_tokens=0, log=print, progress=False)
        t_train = time.perf_counter() - t0
        from transcoders.evaluation.run import evaluate_run

        t1 = time.perf_counter()
        metrics = evaluate_run(run_dir, loaded=loaded, eval_tokens=args.eval_tokens, all_at_once=True, progress=False,
                               batch_size=32 if device == "cuda" else 8)
        t_eval = time.perf_counter() - t1
        together = metrics["spliced_together"]
        print(f"{kind} {int(tokens):,} tokens: trained in {t_train:.0f} s, evaluated in {t_eval:.0f} s; all 30 at once "
              f"CE {together['ce_clean']:.3f} -> {together['ce_spliced']:.3f} ({together['ce_increase']:+.3f}), "
              f"KL {together['kl']:.3f}", flush=True)
        for label, part in (metrics.get("by_source") or {}).items():
            t = part["spliced_together"]
            print(f"  {label}: CE {t['ce_clean']:.3f} -> {t['ce_spliced']:.3f} ({t['ce_increase']:+.3f}), KL {t['kl']:.3f}",
                  flush=True)
        result["jobs"] = [j for j in result["jobs"] if (j["kind"], j["tokens"]) != (kind, int(tokens))]
        result["jobs"].append({"kind": kind, "tokens": int(tokens), "config": cfg.model_dump(), "train_s": t_train,
                               "eval_s": t_eval, "timing": out["timing"], "metrics": metrics})
        atomic_write_json(args.json, result, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
