"""The sparsity-fidelity frontier (Dunefsky et al. 2024, Fig. 2; Paulo et al. 2025, Figs. 1-2).

Transcoders, skip transcoders and SAEs on the same layers (early, middle, late), at several
sparsity levels (TopK ``k``), with the same token budget: all of them are trained side by side from
one activation stream (``transcoders train --sweep``), so every coder sees exactly the same
tokens in the same order. Then each is evaluated spliced into the model on held-out text: L0,
FVU, next-token loss with the coder in place of the MLP (an SAE's reconstruction of the MLP input
is fed to the real MLP, as ``evaluate`` does), loss recovered against zero-ablating that MLP, and
KL from the clean model.

FVU is not comparable across kinds: an SAE's is of the MLP input, a transcoder's of the MLP
output. The spliced loss is: it is what the paper plots.

Writes ``--json`` (every number), a markdown table on stdout, and three PNGs in ``--plots``
(loss recovered, KL and FVU against L0, one panel per layer).

    .venv/bin/python benchmarks/frontier.py --run-dir runs/frontier          # train, evaluate, plot
    .venv/bin/python benchmarks/frontier.py --run-dir runs/frontier --plot   # re-plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from transcoders.files import atomic_write_json
from transcoders.training.config import TrainConfig
from transcoders.training.run import train_run

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("transcoder", "skip_transcoder", "sae")
LABELS = {"transcoder": "transcoder", "skip_transcoder": "skip transcoder", "sae": "SAE"}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _train(args) -> dict:
    sweep = [{"kind": kind, "k": k} for kind in args.kinds.split(",") for k in _ints(args.ks)]
    cfg = TrainConfig(layers=_ints(args.layers), expansion_factor=args.expansion_factor, total_tokens=args.tokens,
                      data=args.data, sweep=sweep, seed=args.seed)
    t0 = time.perf_counter()
    resume = (args.run_dir / "train_config.json").exists()
    out = train_run(cfg, args.run_dir, resume=resume, eval_tokens=args.eval_tokens, log=print)
    seconds = time.perf_counter() - t0
    settings = {suffix: variant for suffix, variant in cfg.variants()}
    rows = []
    for key, m in out["metrics"]["layers"].items():
        layer, suffix = key.split("/")
        rows.append({"layer": int(layer), "kind": settings[suffix].kind, "k": settings[suffix].k, **m})
    return {"config": cfg.model_dump(), "seconds": seconds, "timing": out["timing"], "rows": rows,
            "eval_tokens": out["metrics"].get("eval_tokens")}


def _table(result: dict) -> None:
    print("| layer | kind | k | L0 | FVU | CE spliced | loss recovered | KL | dead in training | silent on the eval tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(result["rows"], key=lambda r: (r["layer"], KINDS.index(r["kind"]), r["k"])):
        dead = "n/a" if r.get("dead_in_training") is None else f"{r['dead_in_training']:.2f}"
        print(f"| {r['layer']} | {LABELS[r['kind']]} | {r['k']} | {r['l0']:.1f} | {r['fvu']:.3f} | "
              f"{r['ce_spliced']:.3f} | {r['ce_loss_recovered']:.3f} | {r['kl']:.3f} | {dead} | {r['dead_fraction']:.2f} |")


def _plot(result: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in result["rows"]})
    written = []
    for metric, ylabel, name in (("ce_loss_recovered", "loss recovered (spliced, vs zero-ablation)", "frontier_loss.png"),
                                 ("kl", "KL from the clean model (nats/token)", "frontier_kl.png"),
                                 ("fvu", "FVU (SAE: of the MLP input)", "frontier_fvu.png")):
        fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for kind in KINDS:
                pts = sorted((r["l0"], r[metric]) for r in result["rows"] if r["layer"] == layer and r["kind"] == kind)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS[kind])
            ax.set_xscale("log")
            ax.set_xlabel("L0 (active features per token)")
            ax.set_title(f"layer {layer}")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][0].legend()
        fig.suptitle(f"SmolLM2-135M, {result['config']['total_tokens']:,} training tokens each, "
                     f"d_sae {result['config']['expansion_factor']}x d_model")
        fig.tight_layout()
        path = folder / name
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "frontier")
    ap.add_argument("--layers", default="3,15,26", help="early, middle, late (SmolLM2 has 30)")
    ap.add_argument("--ks", default="8,16,32,64,128", help="TopK k of each sparsity level")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--tokens", type=int, default=409_600, help="training tokens, the same for every coder")
    ap.add_argument("--expansion-factor", type=int, default=4)
    ap.add_argument("--data", default=None, help="training text [default: the training default]")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "frontier.json")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs" / "images")
    ap.add_argument("--plot", action="store_true", help="only re-plot and re-print from --json")
    args = ap.parse_args()
    if args.plot:
        result = json.loads(args.json.read_text())
    else:
        result = _train(args)
        atomic_write_json(args.json, result, indent=1)
        print(f"wrote {args.json}")
    _table(result)
    for path in _plot(result, args.plots):
        print(f"wrote {path}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
