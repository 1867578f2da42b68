"""The features pass and the feature store: tokens/s of the pass, and the time to answer
"feature (layer, index)" from the store.

    .venv/bin/python benchmarks/features_speed.py runs/l6 --tokens 2000000
    .venv/bin/python benchmarks/features_speed.py runs/all --tokens 1000000 --lookups 300

The pass grows the store at RUN/features to --tokens (what is already there is not redone: the
figures are for the part read in this run). Lookups pick random (layer, feature) pairs with a
fixed seed, each from a store object opened once (warm: files memory-mapped) and from a fresh
one (cold: opening the files included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def lookup_times(folder: Path, n: int, seed: int = 0) -> dict:
    from transcoders.features.store import FeatureStore

    store = FeatureStore(folder)
    keys = store.keys
    g = torch.Generator().manual_seed(seed)
    picks = [(keys[int(torch.randint(len(keys), (1,), generator=g))], None) for _ in range(n)]
    picks = [(k, int(torch.randint(store.d_sae(k), (1,), generator=g))) for k, _ in picks]
    warm, cold = [], []
    for key, f in picks:
        t = time.perf_counter()
        store.feature(key.layer, f, key.variant)
        warm.append(time.perf_counter() - t)
    for key, f in picks[: max(1, n // 10)]:
        t = time.perf_counter()
        FeatureStore(folder).feature(key.layer, f, key.variant)
        cold.append(time.perf_counter() - t)
    q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1e3
    return {"n": n, "layers": len(keys), "warm_median_ms": statistics.median(warm) * 1e3, "warm_p95_ms": q(warm, 0.95),
            "cold_median_ms": statistics.median(cold) * 1e3, "cold_p95_ms": q(cold, 0.95)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=300)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from transcoders.features.collect import collect_features
    from transcoders.features.config import FeaturesConfig

    t0 = time.perf_counter()
    store = collect_features(args.run, FeaturesConfig(tokens=args.tokens))
    wall = time.perf_counter() - t0
    infos = {str(k): store.info(k) for k in store.keys}
    size = sum(p.stat().st_size for p in store.folder.rglob("*") if p.is_file())
    out = {"run": str(args.run), "coders": len(infos), "wall_s": wall,
           "pass_s": max(i["seconds"] for i in infos.values()), "store_tokens": max(i["n_tokens"] for i in infos.values()),
           "store_bytes": size, "threads": torch.get_num_threads(), **lookup_times(store.folder, args.lookups)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
