"""Dashboards of features drawn at random (seeded, never picked by hand), for the docs:

    .venv/bin/python benchmarks/random_dashboards.py runs/l6/features 4 --seed 2026

Each draw picks a coder of the store, then one of its live features, uniformly.
"""

from __future__ import annotations

import argparse

import torch

from transcoders.features.dashboard import render
from transcoders.features.store import ACTS, FeatureStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("n", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    store = FeatureStore(args.store)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.n):
        key = store.keys[int(torch.randint(len(store.keys), (1,), generator=g))]
        live = (store.tensor(key, ACTS, "count") > 0).nonzero().flatten()
        f = int(live[int(torch.randint(live.numel(), (1,), generator=g))])
        print("```")
        print(render(store.feature(key.layer, f, key.variant), n_top=5, n_per_group=1, k=6))
        print("```\n")


if __name__ == "__main__":
    main()
