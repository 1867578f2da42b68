"""Turn a run of TopK transcoders into JumpReLU ones that circuit-tracer loads, for the trace
benchmark (benchmarks/trace_speed.py needs the same transcoders on both sides, and
circuit-tracer 0.4/0.5 reads only ReLU or JumpReLU sets faithfully).

Each layer keeps its weights; its threshold becomes the mean, over held-out tokens of the
bundled corpus, of each token's k-th largest pre-activation: the rule BatchTopK uses to fit its
inference threshold (Bussmann et al. 2024), so L0 stays near k on average. Writes a run folder
(``layers.{i}.mlp/``, our format) and prints L0 and FVU per layer before and after.

    .venv/bin/python benchmarks/topk_to_jumprelu.py runs/viewer-all runs/viewer-all-jumprelu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from transcoders.coders.coder import SparseCoder
from transcoders.coders.io import save_coder
from transcoders.coders.run_folder import find_coders
from transcoders.data.activations import harvest
from transcoders.data.tokens import build_token_split
from transcoders.models.loading import load_model


def _fvu(coder: SparseCoder, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((coder(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="run folder of TopK coders")
    ap.add_argument("dest", type=Path, help="new run folder (must not exist)")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens to fit thresholds on")
    a = ap.parse_args(argv)
    if a.dest.exists():
        sys.exit(f"{a.dest} exists; pick a new folder")
    loaded = load_model()
    found = {key.layer: folder for key, folder in find_coders(a.source).items() if not key.variant}
    from transcoders.coders.io import load_coder

    coders = {layer: load_coder(folder) for layer, folder in found.items()}
    if any(c.cfg.activation != "topk" for c in coders.values()):
        sys.exit("every coder must be TopK")
    split = build_token_split(None, loaded.tokenizer, 256, max_train_tokens=256, max_eval_tokens=a.tokens)
    kth = {layer: [] for layer in coders}
    xs: dict[int, list] = {layer: [] for layer in coders}
    ys: dict[int, list] = {layer: [] for layer in coders}
    with torch.no_grad():
        for i in range(0, len(split.eval), 8):
            acts = harvest(loaded.adapter, split.eval[i : i + 8], list(coders))
            for layer, (x, y) in acts.items():
                x, y = x[:, 1:].flatten(0, 1).float(), y[:, 1:].flatten(0, 1).float()  # leave the sink out
                kth[layer].append(coders[layer].pre_acts(x).topk(coders[layer].cfg.k, dim=-1).values[:, -1])
                xs[layer].append(x)
                ys[layer].append(y)
    a.dest.mkdir(parents=True)
    report = {}
    for layer, coder in sorted(coders.items()):
        threshold = float(torch.cat(kth[layer]).mean().clamp_min(0))
        new = SparseCoder(coder.cfg.model_copy(update={"activation": "jumprelu", "k": None}))
        state = coder.state_dict() | {"threshold": torch.full((coder.cfg.d_sae,), threshold)}
        new.load_state_dict(state)
        x, y = torch.cat(xs[layer]), torch.cat(ys[layer])
        with torch.no_grad():
            report[layer] = {"threshold": threshold, "l0_topk": float((coder.encode(x) > 0).sum(-1).float().mean()),
                             "l0_jumprelu": float((new.encode(x) > 0).sum(-1).float().mean()),
                             "fvu_topk": _fvu(coder, x, y), "fvu_jumprelu": _fvu(new, x, y)}
        save_coder(new, a.dest / found[layer].relative_to(a.source))
        print(f"layer {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in report[layer].items()), flush=True)
    (a.dest / "converted_from_topk.json").write_text(json.dumps({"source": str(a.source), "tokens": a.tokens,
                                                                 "layers": report}, indent=2))


if __name__ == "__main__":
    main()
