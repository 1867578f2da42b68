"""Train coders for every requested layer, and every sweep variant, from one activation stream.

One forward pass of the model (stopped after the last requested layer) feeds every coder; the
objectives are in :mod:`.losses`. Data are normalised to ``E||x||^2 = d_in``, ``E||y||^2 = d_out``
with scales fixed on the first batch and folded into the weights at save time.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..coders.coder import SparseCoder
from ..coders.config import CoderConfig
from ..coders.io import save_coder
from ..coders.run_folder import CoderKey
from ..data.activations import rank_stream
from ..files import atomic_save_tensors, atomic_write_bytes, signals_deferred
from ..models.adapters import ModelAdapter
from .checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from .config import RESUME_OVERRIDABLE, TrainConfig
from .distributed import Reducer, barrier, init_from_env, is_main
from .losses import LOSSES

STATS = "stats.safetensors"


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class TrainingDiverged(RuntimeError):
    """A loss or weight became NaN/inf; the last good checkpoint was left untouched."""


@dataclass
class CoderState:
    """Everything that evolves for one coder (one layer, one sweep variant)."""

    key: CoderKey  # (layer, sweep variant)
    cfg: TrainConfig  # the run's settings with this variant's overrides
    coder: SparseCoder
    optimizer: torch.optim.Adam
    lr: float
    tokens_since_fired: torch.Tensor  # [d_sae] int64
    fire_count: torch.Tensor  # [d_sae] int64, over all training tokens
    in_sum: torch.Tensor  # [d_in] float64, raw units
    out_sum: torch.Tensor  # [d_out] float64, raw units
    scale_in: float = 1.0
    scale_out: float = 1.0
    threshold_ema: float = 0.0  # BatchTopK: running mean of the batch threshold


def default_lr(d_sae: int) -> float:
    """Adam step size scaled with width like sparsify's ``2e-4 * sqrt(16384 / d_sae)``, but 15x
    larger: with encoder rows initialised at norm 0.1 our runs of 0.4-2M tokens reach lower FVU
    this way (layer-6 SmolLM2 sweep, 400k tokens, d_sae 9216: held-out FVU 0.61 at 5e-4, 0.50 at
    1e-3, 0.41 at 2e-3, 0.37 at 4e-3). Twice this (8e-3 at d_sae 9216) lowers FVU a little more at
    layers 3, 15 and 26 but leaves more features dead: 24.0% against 9.8% at the end of the demo
    (benchmarks/RESULTS.md, session 8). Capped at 1.2e-2."""
    return min(1.2e-2, 3e-3 / math.sqrt(d_sae / 16384))


class Trainer:
    """Trains coders for ``cfg.layers`` of the model behind ``adapter`` on ``train_tokens``.

    Args:
        cfg: run settings.
        adapter: adapter of the model used to harvest activations (may be bfloat16).
        train_tokens: ``[n_ctx, ctx_len]`` training token ids (never the eval split).
        run_dir: run folder; holds ``checkpoint.safetensors``, ``train_log.jsonl`` and one
            folder per hookpoint with the final coder.
    """

    def __init__(self, cfg: TrainConfig, adapter: ModelAdapter, train_tokens: torch.Tensor | None, run_dir: str | Path,
                 *, stream=None):
        self.cfg = cfg = cfg.resolved(adapter.device.type)
        self.adapter = adapter
        self.run_dir = Path(run_dir)
        self.device = adapter.device
        wanted = range(adapter.n_layers) if cfg.layers == "all" else cfg.layers
        self.layers = sorted({adapter.check_layer(layer) for layer in wanted})
        self.rank, self.world = init_from_env(self.device)
        data_parallel = self.world > 1 and not cfg.shard_layers
        self.reducer = Reducer(self.world, self.rank, active=data_parallel, device=self.device)
        self.stream = stream or rank_stream(
            adapter, train_tokens, self.layers, cfg.batch_size, seed=cfg.seed,
            rank=self.rank if data_parallel else 0, world=self.world if data_parallel else 1,
            block_contexts=cfg.block_contexts, model_batch=cfg.model_batch, skip_first=cfg.skip_first_tokens,
        )
        names = [(layer, suffix, variant) for layer in self.layers for suffix, variant in cfg.variants()]
        if cfg.shard_layers and self.world > 1:
            names = names[self.rank :: self.world]  # round-robin: this rank's coders only
        self.states: dict[CoderKey, CoderState] = {}
        for layer, suffix, variant in names:
            key = CoderKey(layer, suffix)
            self.states[key] = self._new_state(key, variant)
        self.ckpt_name = f"checkpoint.rank{self.rank}.safetensors" if cfg.shard_layers and self.world > 1 else CHECKPOINT
        self.step = 0
        self.timing = {"harvest_s": 0.0, "train_s": 0.0}
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ setup
    def _new_state(self, key: CoderKey, cfg: TrainConfig) -> CoderState:
        layer = key.layer
        d = self.adapter.d_model
        d_sae = cfg.d_sae or cfg.expansion_factor * d
        hook = self.adapter.hookpoint(layer)
        coder_cfg = CoderConfig(
            kind=cfg.kind, activation=cfg.activation, d_in=d, d_out=d, d_sae=d_sae,
            k=cfg.k if cfg.activation in ("topk", "batchtopk") else None,
            model_name=cfg.model, layer=layer,
            hookpoint_in=f"{hook}.input", hookpoint_out=f"{hook}.output" if cfg.kind != "sae" else f"{hook}.input",
            training=cfg.model_dump(mode="json"),
        )
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
        coder = SparseCoder(coder_cfg)
        coder.reset_parameters(gen)
        coder.to(self.device)
        lr = cfg.lr or default_lr(d_sae)
        opt = torch.optim.Adam(coder.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)  # fused: ~3x faster step
        zeros = lambda n, dt: torch.zeros(n, dtype=dt, device=self.device)
        return CoderState(key, cfg, coder, opt, lr, zeros(d_sae, torch.int64), zeros(d_sae, torch.int64),
                          zeros(d, torch.float64), zeros(d, torch.float64))

    @property
    def lr(self) -> float:
        """Peak learning rate of the first coder."""
        return next(iter(self.states.values())).lr

    def lr_at(self, step: int, peak: float | None = None) -> float:
        """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the
        final ``decay_fraction`` of steps."""
        total = self.cfg.total_steps
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        decay_start = total * (1 - self.cfg.decay_fraction)
        decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1.0, total - decay_start))
        return (self.lr if peak is None else peak) * warm * decay

    # ------------------------------------------------------------------ one step
    def _train_one(self, st: CoderState, x_raw: torch.Tensor, y_raw: torch.Tensor) -> dict[str, float]:
        cfg, coder = st.cfg, st.coder
        x_raw, y_raw = x_raw.to(self.device, non_blocking=True), y_raw.to(self.device, non_blocking=True)  # a cache lives on CPU
        if self.step == 0:
            self._init_from_data(st, x_raw, y_raw)
        st.in_sum += x_raw.sum(0, dtype=torch.float64)
        st.out_sum += y_raw.sum(0, dtype=torch.float64)
        x = x_raw.float() * st.scale_in
        y = x if cfg.kind == "sae" else y_raw.float() * st.scale_out
        dead = st.tokens_since_fired >= cfg.dead_window
        red = self.reducer
        result = LOSSES[cfg.activation](cfg, coder, x, y, dead, self.step, red)
        result.loss.backward()
        red.grads_(coder.parameters())
        for group in st.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, st.lr)
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        if cfg.activation != "relu":
            coder.normalize_decoder()  # scale lives in the activations (and thresholds)
        if coder.threshold is not None and cfg.activation == "jumprelu":
            with torch.no_grad():
                coder.threshold.clamp_(min=1e-4)
        if result.threshold is not None:
            # a short memory (~20 steps): thresholds rise fast early in training, and the saved
            # value should be the one of the final weights
            st.threshold_ema = result.threshold if st.threshold_ema == 0 else 0.95 * st.threshold_ema + 0.05 * result.threshold
        counts = red.sum_(result.counts)
        st.fire_count += counts
        st.tokens_since_fired += red.n(x.shape[0])
        st.tokens_since_fired[counts > 0] = 0
        # loss and FVU are per-rank shares of global values; L0 is a per-token mean
        stats = red.sum_(torch.stack([result.loss.detach(), result.fvu.detach(), result.l0 * x.shape[0]]).double())
        return {"loss": stats[0].item(), "fvu": stats[1].item(), "l0": stats[2].item() / red.n(x.shape[0]),
                "dead_fraction": dead.float().mean().item()}

    @torch.no_grad()
    def _init_from_data(self, st: CoderState, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the normalisation scales and start ``b_dec`` at the mean target. A JumpReLU coder
        starts each feature's threshold at the ``1 - k / d_sae`` quantile of its pre-activations on
        this batch, so that about ``k`` features fire per token from the first step (a fixed
        threshold of 0.5 let ~1,900 of 9,216 fire, and training spent its first ~50 steps at FVU
        over 1 pruning them)."""
        x, y = x.float(), y.float()
        sae, red = st.cfg.kind == "sae", self.reducer
        norms = red.sum_(torch.stack([x.pow(2).sum(), y.pow(2).sum()]).double()) / red.n(x.shape[0])
        st.scale_in = math.sqrt(x.shape[1] / max(norms[0].item(), 1e-12))
        st.scale_out = st.scale_in if sae else math.sqrt(y.shape[1] / max(norms[1].item(), 1e-12))
        target = x * st.scale_in if sae else y * st.scale_out
        st.coder.b_dec.copy_(red.sum_(target.double().sum(0)).float() / red.n(x.shape[0]))
        coder = st.coder
        if st.cfg.activation == "jumprelu" and coder.threshold is not None:
            pre = coder.pre_acts(x * st.scale_in)  # [n, d_sae]
            q = 1.0 - min(1.0, st.cfg.k / coder.cfg.d_sae)
            rank = min(pre.shape[0], max(1, math.ceil(q * pre.shape[0])))
            theta = pre.kthvalue(rank, dim=0).values.double()  # ranks' shards differ: average them
            theta = red.sum_(theta) / (red.world if red.active else 1)
            coder.threshold.copy_(theta.float().clamp(min=1e-4))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        """Write the full training state atomically (see :mod:`.checkpoint`)."""
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        state = {"step": self.step, "config": self.cfg.model_dump(mode="json"), "timing": self.timing, "coders": {}}
        for key, st in self.states.items():
            for name, p in st.coder.named_parameters():
                if not torch.isfinite(p).all():
                    raise TrainingDiverged(f"coder {key} parameter {name} is not finite at step {self.step}")
                tensors[f"{key}.coder.{name}"] = p
            opt_t, opt_meta = optimizer_tensors(st.optimizer, f"{key}.opt")
            tensors.update(opt_t)
            tensors.update({f"{key}.{attr}": getattr(st, attr) for attr in _COUNTERS})
            state["coders"][str(key)] = {"optimizer": opt_meta, "scale_in": st.scale_in, "scale_out": st.scale_out,
                                    "threshold_ema": st.threshold_ema}
        path = self.run_dir / self.ckpt_name
        if self.reducer.active:
            # data parallel: ranks hold identical state except the in/out sums, which are summed at save
            if is_main():
                save_checkpoint(self.run_dir, tensors, state, name=self.ckpt_name)
            barrier()
            return path
        return save_checkpoint(self.run_dir, tensors, state, name=self.ckpt_name)

    def restore(self) -> None:
        """Load ``checkpoint.safetensors`` from the run folder into this trainer.

        Raises:
            CheckpointError: no checkpoint, a corrupt one, or one from a different config.
        """
        tensors, state = load_checkpoint(self.run_dir, name=self.ckpt_name)
        try:
            saved = TrainConfig.model_validate(state["config"])
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint in {self.run_dir} has no valid config ({exc}); start a new run.") from exc
        diff = {k: (v, getattr(self.cfg, k)) for k, v in saved.model_dump().items()
                if getattr(self.cfg, k) != v and k not in RESUME_OVERRIDABLE}
        if diff:
            raise CheckpointError(
                f"checkpoint in {self.run_dir} was made with different settings {diff}; resume with the same settings."
            )
        self.step = state["step"]
        self.timing = state["timing"]
        torch.set_rng_state(tensors["rng.torch"])
        for key, st in self.states.items():
            meta = state["coders"][str(key)]
            with torch.no_grad():
                for name, p in st.coder.named_parameters():
                    p.copy_(tensors[f"{key}.coder.{name}"])
            restore_optimizer(st.optimizer, tensors, meta["optimizer"], f"{key}.opt")
            for attr in _COUNTERS:
                getattr(st, attr).copy_(tensors[f"{key}.{attr}"])
            st.scale_in, st.scale_out, st.threshold_ema = meta["scale_in"], meta["scale_out"], meta["threshold_ema"]

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def fit(self, *, resume: bool = False, progress: bool = True, on_step=None) -> dict[CoderKey, SparseCoder]:
        """Train to ``cfg.total_tokens``; save the coders; return them (raw units, unfolded
        copies are not kept).

        Args:
            resume: continue from ``run_dir/checkpoint.safetensors``.
            progress: show a progress bar with tokens/s, L0, FVU and dead fraction.
            on_step: optional ``callback(trainer, metrics)`` after every step.

        Raises:
            TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
            TrainingDiverged: NaN/inf loss; the previous checkpoint is kept.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.restore()
        elif is_main():
            atomic_write_bytes(self.run_dir / "train_config.json", self.cfg.model_dump_json(indent=2).encode())
        total = self.cfg.total_steps
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=total * self.cfg.batch_size, initial=self.step * self.cfg.batch_size, unit="tok",
                   unit_scale=True, disable=not (progress and is_main()), desc="train")
        self._open_log(resume)
        try:
            batches = self.stream.batches(self.step)
            while self.step < total:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                metrics = {str(key): self._train_one(st, *batch[key.layer]) for key, st in self.states.items()}
                t2 = time.perf_counter()
                self.timing["harvest_s"] += t1 - t0
                self.timing["train_s"] += t2 - t1
                bad = [key for key, m in metrics.items() if not math.isfinite(m["loss"])]
                if self.reducer.any_(bool(bad)):
                    bad = bad or ["(another rank)"]
                    ckpt = self.run_dir / self.ckpt_name
                    kept = (f"{ckpt} still holds the last good state (or --resume from it)" if ckpt.exists()
                            else "no checkpoint had been written yet")
                    raise TrainingDiverged(
                        f"loss became {metrics[bad[0]]['loss'] if bad[0] in metrics else 'NaN'} at step {self.step} "
                        f"(coders {bad}); stopped without "
                        f"saving: {kept}. Lower --lr (or the L1 coefficient), check the data for inf/NaN, and start again."
                    )
                self.step += 1
                bar.update(self.cfg.batch_size)
                if self.step % self.cfg.log_every == 0 or self.step == total:
                    self._log(bar, metrics)
                if on_step is not None:
                    on_step(self, metrics)
                if self.reducer.any_(self._stop_signal is not None):
                    self._stop_signal = self._stop_signal or signal.SIGTERM
                    self.checkpoint()
                    raise TrainingInterrupted(
                        f"stopped by signal {signal.Signals(self._stop_signal).name} at step {self.step}/{total}; "
                        f"checkpoint saved in {self.run_dir}. Continue with `transcoders train --resume {self.run_dir}`."
                    )
                if self.step % self.cfg.checkpoint_every == 0 and self.step < total:
                    self.checkpoint()
            self.checkpoint()
        finally:
            bar.close()
            for s, handler in old.items():
                signal.signal(s, handler)
        return self.save_coders()

    def _open_log(self, resume: bool) -> None:
        """Start the log: empty, or on resume the old one cut back to the checkpoint's step (a
        crash may have logged steps that the checkpoint does not hold; a torn last line from a
        log written by an older version is dropped)."""
        log_name = "train_log.jsonl" if self.ckpt_name == CHECKPOINT else f"train_log.rank{self.rank}.jsonl"
        self._log_path = self.run_dir / log_name
        self._log_lines: list[str] = []
        if self.reducer.active and not is_main():
            self._log_path = None  # data parallel: rank 0 logs the (global) metrics
            return
        if resume and self._log_path.exists():
            for line in self._log_path.read_text(errors="replace").split("\n"):
                try:
                    if line.strip() and json.loads(line)["step"] <= self.step:
                        self._log_lines.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._write_log()

    def _write_log(self) -> None:
        # rewritten whole and atomically (a few hundred short lines): never a torn line
        if self._log_path is not None:
            atomic_write_bytes(self._log_path, "".join(line + "\n" for line in self._log_lines).encode())

    def _log(self, bar, metrics: dict[str, dict[str, float]]) -> None:
        seen = self.step * self.cfg.batch_size
        wall = self.timing["harvest_s"] + self.timing["train_s"]
        record = {"step": self.step, "tokens": seen, "lr": self.lr_at(self.step - 1), "tokens_per_s": seen / max(wall, 1e-9),
                  "layers": metrics}
        self._log_lines.append(json.dumps(record))
        self._write_log()
        first = next(iter(metrics.values()))
        bar.set_postfix(L0=f"{first['l0']:.1f}", FVU=f"{first['fvu']:.3f}", dead=f"{first['dead_fraction']:.1%}")

    def save_coders(self) -> dict[CoderKey, SparseCoder]:
        """Fold normalisation into copies of the coders and save each to ``run_dir/<hookpoint>/``
        (``run_dir/<hookpoint>/<variant>/`` in a sweep) with ``stats.safetensors`` (mean MLP
        input/output in raw units, firing counts). BatchTopK coders are saved as JumpReLU with
        their fitted threshold."""
        out = {}
        tokens = max(1, self.step * self.cfg.batch_size)
        for st in self.states.values():  # every rank joins the collectives, then rank 0 writes
            self.reducer.sum_(st.in_sum)
            self.reducer.sum_(st.out_sum)
        if self.reducer.active and not is_main():
            barrier()
            return {key: st.coder for key, st in self.states.items()}
        for key, st in self.states.items():
            cfg = st.coder.cfg
            if cfg.activation == "batchtopk":
                cfg = cfg.model_copy(update={"activation": "jumprelu"})
            coder = SparseCoder(cfg, device=self.device)
            coder.load_state_dict(st.coder.state_dict())
            if st.cfg.activation == "batchtopk":
                with torch.no_grad():
                    coder.threshold.fill_(st.threshold_ema)
            coder.fold_scales(st.scale_in, st.scale_out)
            folder = key.folder(self.run_dir, self.adapter.hookpoint(key.layer))
            with signals_deferred():  # a signal now cannot pair new weights with old stats
                save_coder(coder, folder)
                atomic_save_tensors(
                    {"mlp_in_mean": (st.in_sum / tokens).float(), "mlp_out_mean": (st.out_sum / tokens).float(),
                     "fire_count": st.fire_count, "tokens_since_fired": st.tokens_since_fired,
                     "dead_window": torch.tensor(st.cfg.dead_window), "tokens": torch.tensor(tokens)},
                    folder / STATS,
                )
            out[key] = coder
        if self.reducer.active:
            barrier()
        return out


_COUNTERS = ("tokens_since_fired", "fire_count", "in_sum", "out_sum")
