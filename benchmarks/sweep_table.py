"""The table of a training sweep: one row per layer and variant of a run trained with
``transcoders train --sweep`` (all variants from the same activations), from its ``metrics.json``
and training log.

Columns: held-out L0, FVU, loss recovered and KL (single layer spliced), dead in training (silent
for the last ``dead_window`` training tokens), and the training FVU and dead fraction at a few
points of the run, which show when features die.

    transcoders train --layers 6,15 --total-tokens 1228800 --run-dir runs/dead-sweep \\
        --sweep '[{"auxk_coefficient":0.03125},{"auxk_coefficient":0.125},{"auxk_coefficient":0.5}]'
    python benchmarks/sweep_table.py runs/dead-sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--at", default="0.1,0.25,0.5", help="fractions of the run at which to show training FVU / dead")
    args = ap.parse_args()
    metrics = json.loads((args.run / "metrics.json").read_text())
    log = [json.loads(line) for line in (args.run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = log[-1]["step"]
    points = [min(log, key=lambda r, f=float(f): abs(r["step"] - f * last)) for f in args.at.split(",")]
    head = " | ".join(f"step {p['step']} FVU / dead" for p in points)
    print(f"| coder | L0 | FVU | loss recovered | KL | dead in training | {head} |")
    print("|---|---|---|---|---|---|" + "---|" * len(points))
    for key, m in metrics["layers"].items():
        dead = "n/a" if m.get("dead_in_training") is None else f"{m['dead_in_training']:.1%}"
        trail = " | ".join(f"{p['layers'][key]['fvu']:.3f} / {p['layers'][key]['dead_fraction']:.1%}" for p in points)
        print(f"| {key} | {m['l0']:.1f} | {m['fvu']:.3f} | {m['ce_loss_recovered']:.3f} | {m['kl']:.4f} | {dead} | {trail} |")
    for label, part in (metrics.get("by_source") or {}).items():
        row = ", ".join(f"{key} {x['ce_loss_recovered']:.3f}" for key, x in part["layers"].items())
        print(f"\nloss recovered on {label}: {row}")


if __name__ == "__main__":
    main()
