"""Runs EleutherAI sparsify inside the peer venv (see setup_peers.sh); called by train_speed.py.

    PEER_PY peer_sparsify.py train --model DIR --dataset DIR --tokens N --save-dir DIR --out OUT.json
    PEER_PY peer_sparsify.py coder-step --acts ACTS.pt --steps N --warmup W --out OUT.json

`train` runs sparsify's own CLI entry point (`sparsify.__main__.run()`) with the model loaded on
the CPU (sparsify hard-codes `device_map={"": "cuda:<rank>"}`), and times `Trainer.fit` minus
its checkpoint saves. `coder-step` times one training step of sparsify's SparseCoder as its
trainer does it (forward with FVU, backward, ScheduleFree-SignSGD step) on given activations,
in float32 and under bfloat16 autocast. Only this file imports sparsify.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _cpu_device_map() -> None:
    import transformers

    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def patched(klass, *args, _original=original, **kwargs):
            if "device_map" in kwargs:
                kwargs["device_map"] = {"": "cpu"}
            return _original(klass, *args, **kwargs)

        cls.from_pretrained = classmethod(patched)


def train(args) -> dict:
    _cpu_device_map()
    import sparsify.__main__ as cli
    from sparsify.trainer import Trainer

    timing = {"fit_s": 0.0, "save_s": 0.0, "steps": 0}
    original_fit, original_save = Trainer.fit, Trainer.save

    def save(self):
        t = time.perf_counter()
        original_save(self)
        timing["save_s"] += time.perf_counter() - t

    def fit(self):
        timing["setup_s"] = time.perf_counter() - t_start
        t = time.perf_counter()
        original_fit(self)
        timing["fit_s"] = time.perf_counter() - t
        timing["steps"] = self.global_step
        timing["model_dtype"] = str(self.model.dtype)

    Trainer.fit, Trainer.save = fit, save
    n_examples = args.tokens // args.ctx_len
    sys.argv = [
        "sparsify", args.model, args.dataset,
        "--transcode", "--hookpoints", "layers.6.mlp",
        "--expansion_factor", "16", "-k", "32",
        "--ctx_len", str(args.ctx_len), "--batch_size", str(args.batch_size),
        "--max_examples", str(n_examples),
        "--save_every", str(10**9), "--log_to_wandb", "false",
        "--save_dir", args.save_dir, "--run_name", "run",
    ]
    t_start = time.perf_counter()
    cli.run()
    tokens = timing["steps"] * args.batch_size * args.ctx_len
    train_s = timing["fit_s"] - timing["save_s"]
    return {**timing, "argv": sys.argv[1:], "tokens": tokens, "train_s": train_s,
            "tokens_per_s": tokens / max(train_s, 1e-9), "coder_dir": f"{args.save_dir}/run/layers.6.mlp"}


def _encoder_matmul_s(prof, n: int, d_in: int, d_sae: int) -> float | None:
    """Mean time of the dense [n, d_in] x [d_in, d_sae] matmuls recorded by the profiler
    (the same reading as train_speed.encoder_matmul_s)."""
    total, count = 0.0, 0
    for e in prof.key_averages(group_by_input_shape=True):
        mats = [list(s) for s in e.input_shapes if len(s) == 2][-2:]  # (mat1, mat2) of addmm / mm
        # any row count: our encoder runs the matmul in token chunks (CHUNK rows at a time)
        if e.key in ("aten::addmm", "aten::mm") and len(mats) == 2 and mats[0][1:] == [d_in] and mats[1] == [d_in, d_sae]:
            total += e.cpu_time_total / 1e6
            count += e.count * mats[0][0]  # rows multiplied
    return total * n / count if count else None  # time per n-row matmul


def coder_step(args) -> dict:
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sparsify.config import SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from sparsify.sparse_coder import SparseCoder
    from torch.profiler import ProfilerActivity, profile

    acts = torch.load(args.acts)
    xs, ys = acts["x"].float(), acts["y"].float()  # [n_batches, n, d]
    n, d = xs.shape[1], xs.shape[2]
    out = {"tokens_per_step": n}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        sae = SparseCoder(d, SparseCoderConfig(transcode=True, expansion_factor=16, k=32), "cpu", dtype=torch.float32)
        with torch.no_grad():  # the trainer's data-dependent init of the biases
            sae.encoder.bias.data = -xs[0].mean(0) @ sae.encoder.weight.data.T
            sae.b_dec.data = ys[0].mean(0)
        lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5  # sparsify's default for signum
        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
        opt.train()
        fired = torch.zeros(sae.num_latents, dtype=torch.bool)
        since = torch.zeros(sae.num_latents, dtype=torch.long)
        times = []
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        prof.start()
        for i in range(args.warmup + args.steps):
            x, y = xs[i % len(xs)], ys[i % len(ys)]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                res = sae(x=x, y=y, dead_mask=None)
            res.fvu.backward()
            opt.step()
            opt.zero_grad()
            fired[res.latent_indices.flatten()] = True
            with torch.no_grad():
                since += n
                since[fired] = 0
                fired.zero_()
            times.append(time.perf_counter() - t)
        prof.stop()
        step_s = statistics.median(times[args.warmup:])
        mm_s = _encoder_matmul_s(prof, n, d, sae.num_latents)
        flops = 2 * n * d * sae.num_latents
        out[precision] = {"step_s_median": step_s, "tokens_per_s": n / step_s, "fvu_last": float(res.fvu.detach()),
                          "enc_matmul_s": mm_s, "enc_matmul_gflops": flops / mm_s / 1e9 if mm_s else None,
                          "step_gflops": flops / step_s / 1e9}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--dataset", required=True)
    t.add_argument("--tokens", type=int, required=True)
    t.add_argument("--ctx-len", type=int, default=256)
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    t.add_argument("--save-dir", required=True)
    t.add_argument("--out", required=True)
    c = sub.add_parser("coder-step")
    c.add_argument("--acts", required=True)
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--out", required=True)
    args = p.parse_args()
    import importlib.metadata as md

    import torch

    result = train(args) if args.cmd == "train" else coder_step(args)
    result["versions"] = {"sparsify": md.version("eai-sparsify"), "torch": torch.__version__,
                          "transformers": md.version("transformers"), "threads": torch.get_num_threads()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
