"""How well the default model (SmolLM2-135M-Instruct) does each generated circuit task, before any
circuit is traced: greater-than (Hanna et al. 2023, by the tens digit), IOI (Wang et al. 2022),
capital-of-country recall and single-digit sums (:mod:`transcoders.circuits.task_gen`).

For each task: ``--n`` prompts (seed ``--seed``), the model's next-token distribution on each
prompt and its counterfactual (CPU, float32, the model's BOS policy), and
:func:`transcoders.circuits.tasks.task_metrics`: the mean target value (greater-than: mean logit of
the digits above the start year's tens digit minus the mean of the others; IOI and capitals:
logit(answer) - logit(other name/capital); arithmetic: logit(answer) - mean logit of the other
digits), the mean probability difference PD and the share with PD > 0 (greater-than: summed
probability of the greater digits beats that of the others), and top-1 accuracy where an item
has one answer. Prints a table and writes ``benchmarks/results/tasks.json``.

    .venv/bin/python benchmarks/tasks.py                 # 200 prompts per task, a minute or two on CPU
    .venv/bin/python benchmarks/tasks.py --n 50 --out /tmp/tasks.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from transcoders.circuits.task_gen import GENERATORS
from transcoders.circuits.tasks import measure_task
from transcoders.files import atomic_write_json
from transcoders.models.bos import default_prepend_bos
from transcoders.models.loading import DEFAULT_MODEL, load_model

OUT = Path(__file__).parent / "results" / "tasks.json"


def _fmt(x) -> str:
    return "-" if x is None else f"{x:+.3f}" if abs(x) < 10 else f"{x:+.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=200, help="prompts per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default=",".join(GENERATORS), help="comma-separated tasks")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model)
    bos = default_prepend_bos(loaded.adapter, loaded.tokenizer)
    results = {"model": loaded.name, "prepend_bos": bos, "n": args.n, "seed": args.seed, "tasks": {}}
    print(f"{loaded.name}, {'BOS first' if bos else 'no BOS'}, {args.n} prompts per task (seed {args.seed})")
    print("| task | target | mean value | mean PD | PD > 0 | top-1 | p(answer) | counterfactual value | "
          "counterfactual PD | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        t0 = time.perf_counter()
        items = GENERATORS[name](args.n, args.seed)
        m = measure_task(loaded, items, bos=bos)
        m["seconds"] = time.perf_counter() - t0
        m["example"] = items[0].model_dump()
        results["tasks"][name] = m
        kind = items[0].target.split(":")[0]
        share = lambda x: "-" if x is None else f"{x:.3f}"
        print(f"| {name} | {kind}: | {_fmt(m['mean_value'])} | {_fmt(m['mean_pd'])} | {share(m['pd_positive'])} | "
              f"{share(m['top1_accuracy'])} | {share(m['mean_answer_prob'])} | {_fmt(m.get('counterfactual_value'))} | "
              f"{_fmt(m.get('counterfactual_pd'))} | {m['seconds']:.0f} |")
    for name, m in results["tasks"].items():
        per = ", ".join(f"{k}: {_fmt(v['mean_pd'])}" + (f" / {v['top1_accuracy']:.2f}" if v["top1_accuracy"] is not None
                                                         else "") for k, v in m["by_template"].items())
        print(f"{name} by template (mean PD{' / top-1' if m['top1_accuracy'] is not None else ''}): {per}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
