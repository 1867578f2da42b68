"""The features pass: run the model once over text and accumulate every feature's statistics.

One forward pass per batch of contexts (stopping after the deepest layer needed) feeds every
coder of the run; each coder's activations go to a :class:`~.accumulate.LayerAccumulator`.
Contexts are taken in a seeded random order over the chosen split, so a store of N tokens is a
random sample of the text, and extending it to more tokens continues the same order. Under
``torchrun`` batches are dealt round-robin to ranks and the accumulators merge exactly on rank 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..coders.coder import SparseCoder
from ..coders.io import check_compatible, load_coder
from ..coders.run_folder import CoderKey, find_coders
from ..data.activations import harvest
from ..models.loading import LoadedModel
from .accumulate import BatchEvents, LayerAccumulator
from .config import FeaturesConfig
from .store import FeatureStore, FeatureStoreError, StoreWriter


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run_coders(path: Path) -> dict[CoderKey, SparseCoder]:
    """The coders of a run folder of ours, or of a coder in another format this project reads
    (sparsify, SAELens, circuit-tracer, Dunefsky et al.: :func:`~transcoders.coders.formats.read_coder`).

    Raises:
        CoderFileError: nothing there is a coder; a coder that names no layer.
    """
    from ..coders.formats import read_coder
    from ..coders.io import CoderFileError

    try:
        return {key: load_coder(folder).requires_grad_(False) for key, folder in find_coders(path).items()}
    except CoderFileError as ours:
        try:
            read = read_coder(path)
        except (ValueError, OSError):
            raise ours from None
    coders = read if isinstance(read, dict) else {read.cfg.layer: read}
    if None in coders:
        raise CoderFileError(f"the coder at {path} names no layer; convert it with `transcoders convert --to transcoders` "
                             "into a folder layers.N.mlp of a run")
    return {CoderKey(int(layer or 0)): c.requires_grad_(False) for layer, c in coders.items()}  # None refused above


def default_store(path: Path) -> Path:
    """Where a store goes by default: ``RUN/features`` (``FILE.features`` beside a coder file)."""
    return path / "features" if path.is_dir() else path.with_name(path.name + ".features")


def pass_tokens(loaded: LoadedModel, train_cfg, cfg: FeaturesConfig, bos_id: int | None) -> tuple[torch.Tensor, str]:
    """All contexts of the chosen split in the pass order ``[n_ctx, ctx_len]``, and a description
    of the text. The order is a seeded permutation, so any prefix is a uniform sample."""
    from ..data.sources import describe_source
    from ..data.tokens import build_token_split

    data = cfg.data if cfg.data is not None else train_cfg.data
    ctx_len = cfg.ctx_len or train_cfg.ctx_len
    if ctx_len > loaded.adapter.max_context:
        raise ValueError(f"contexts of {ctx_len} tokens are longer than the model's context ({loaded.adapter.max_context} "
                         f"tokens): pass --ctx-len {loaded.adapter.max_context} or less")
    split = build_token_split(data, loaded.tokenizer, ctx_len, eval_fraction=train_cfg.eval_fraction, bos_id=bos_id)
    tokens = split.train if cfg.split == "train" else split.eval
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    return tokens[order], f"{cfg.split} split of {describe_source(data)}"


def encode_batch(coder: SparseCoder, mlp_in: torch.Tensor, contexts: torch.Tensor, skip_first: int,
                 acc: LayerAccumulator) -> None:
    """Encode one batch ``mlp_in [B, T, d_in]`` and fold it into ``acc``. Positions below
    ``skip_first`` (the attention sink, BOS) are counted apart and left out of everything else."""
    B, T, _ = mlp_in.shape
    dense = coder.encode(mlp_in.reshape(B * T, -1).to(coder.W_enc.dtype)).reshape(B, T, -1).float()
    dense += 0.0  # JumpReLU's pre * (pre > threshold) leaves -0.0 where pre < 0: store +0.0
    if skip_first:
        sink = dense[:, :skip_first]
        _, _, f = sink.nonzero(as_tuple=True)
        acc.add_sink(f, sink[sink > 0])
        dense[:, :skip_first] = 0
    b, p, f = dense.nonzero(as_tuple=True)
    ev = BatchEvents(ctx=contexts[b], pos=p, feat=f, val=dense[b, p, f], dense=dense, contexts=contexts)
    acc.add(ev, n_tokens=B * (T - skip_first))


def collect_features(run_dir: str | Path, cfg: FeaturesConfig | None = None, *, out: str | Path | None = None,
                     loaded: LoadedModel | None = None, progress: bool = True,
                     log: Callable[[str], None] = print) -> FeatureStore:
    """Run (or extend) the features pass for the coders of ``run_dir``; return the store.

    The store (``out``, default ``run_dir/features``) grows: layers it already covers are
    extended from where they stopped to ``cfg.tokens``; new layers start at the first context.

    Raises:
        CoderFileError: no coders, or coders that do not fit the model.
        FeatureStoreError: the store was built with other settings, text or coders.
        DataSourceError: an unreadable text source.
        FolderLockedError: another pass writes into the store.
    """
    from ..evaluation.run import read_train_config
    from ..files import folder_lock
    from ..hardware import bf16_is_fast
    from ..models.bos import bos_id_if, check_run_policy, resolve_prepend_bos
    from ..models.loading import load_model
    from ..models.trust import model_from_file
    from ..training.config import TrainConfig
    from ..training.distributed import barrier, init_from_env, is_main

    cfg = cfg or FeaturesConfig()
    run_dir = Path(run_dir)
    coders = load_run_coders(run_dir)
    if cfg.layers not in (None, "all"):
        wanted = set(cfg.layers)
        coders = {k: v for k, v in coders.items() if k.layer in wanted}
        if not coders:
            raise FeatureStoreError(f"{run_dir} has no coders for layers {sorted(wanted)}")
    recorded = read_train_config(run_dir)
    train_cfg = recorded or TrainConfig()  # coders from elsewhere: the sink position is left out all the same
    device = _device(cfg.device)
    dtype_name = cfg.harvest_dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if bf16_is_fast(device.type) else "float32"
    if loaded is None:
        name = next(iter(coders.values())).cfg.model_name
        loaded = load_model(cfg.model or model_from_file(name, f"the coders in {run_dir}"), dtype=getattr(torch, dtype_name),
                            device=device)
    ad = loaded.adapter
    for coder in coders.values():
        check_compatible(coder, ad.d_model, ad.n_layers)
        coder.to(ad.device)
    use_bos = resolve_prepend_bos(check_run_policy(None if recorded is None else bool(recorded.prepend_bos), None,
                                                   f"the run {run_dir}"), ad, loaded.tokenizer)
    skip_first = max(train_cfg.skip_first_tokens, 1 if use_bos else 0)
    store_dir = Path(out) if out is not None else default_store(run_dir)

    rank, world = init_from_env(ad.device)
    t0 = time.perf_counter()
    tokens, source = pass_tokens(loaded, train_cfg, cfg, bos_id_if(use_bos, loaded.tokenizer))
    n_target = min(tokens.shape[0], math.ceil(cfg.tokens / tokens.shape[1]))
    if n_target * tokens.shape[1] < cfg.tokens and is_main():
        log(f"the {source} has {tokens.numel():,} tokens; the store covers all of them, not {cfg.tokens:,}")
    writer = StoreWriter(store_dir, cfg, model=loaded.name, source=source, ctx_len=tokens.shape[1],
                         prepend_bos=use_bos, skip_first=skip_first)
    lock = folder_lock(store_dir, "features pass") if is_main() else None
    if lock is not None:
        lock.__enter__()
    try:
        done = writer.check(tokens, coders)  # {key: contexts already covered}
        todo = {key: c for key, c in coders.items() if done.get(key, 0) < n_target}
        if not todo:
            if is_main():
                log(f"the store at {store_dir} already covers {n_target * tokens.shape[1]:,} tokens for these coders")
            return FeatureStore(store_dir)
        accs = {key: LayerAccumulator(c.cfg.d_sae, tokens.shape[1], top_k=cfg.top_k, n_samples=cfg.n_samples,
                                      before=cfg.before, after=cfg.after, random_every=cfg.random_every, seed=cfg.seed)
                for key, c in todo.items()}
        start = min(done.get(key, 0) for key in todo)
        batches = list(range(start, n_target, cfg.model_batch))
        mine = batches[rank::world]
        it = mine
        if progress and is_main():
            from tqdm import tqdm

            it = tqdm(mine, desc=f"features ({len(todo)} coders)", unit="batch")
        n_seen = 0
        for lo in it:
            hi = min(lo + cfg.model_batch, n_target)
            need = {key: c for key, c in todo.items() if hi > done.get(key, 0)}
            acts = harvest(ad, tokens[lo:hi], sorted({key.layer for key in need}))
            for key, coder in need.items():
                first = max(lo, done.get(key, 0))  # contexts this layer already has are skipped
                contexts = torch.arange(first, hi)
                mlp_in = acts[key.layer][0][first - lo:]
                with torch.inference_mode():
                    encode_batch(coder, mlp_in, contexts, skip_first, accs[key])
            n_seen += (hi - lo) * tokens.shape[1]
        if world > 1:
            accs = _gather_to_main(accs)
        if is_main():
            seconds = time.perf_counter() - t0
            writer.save(tokens[:n_target], accs, {k: coders[k] for k in todo}, done, n_target, loaded,
                        all_coders=coders, seconds=seconds)
            log(f"features: {len(todo)} coders, {n_target * tokens.shape[1]:,} tokens in the store "
                f"({n_seen * world:,} read now in {seconds:.0f} s) -> {store_dir}")
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    barrier()  # other ranks read the store once rank 0 has written it
    return FeatureStore(store_dir)


def _gather_to_main(accs: dict[CoderKey, LayerAccumulator]) -> dict[CoderKey, LayerAccumulator]:
    """Merge every rank's accumulators on rank 0 (gloo or NCCL object gather)."""
    import torch.distributed as dist

    states = {key: acc.state() for key, acc in accs.items()}
    gathered: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(states, gathered if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return accs
    merged = {}
    for key in accs:
        acc = LayerAccumulator.from_state(gathered[0][key])
        for other in gathered[1:]:
            acc.merge(LayerAccumulator.from_state(other[key]))
        merged[key] = acc
    return merged
