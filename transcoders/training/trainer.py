"""Train one coder per requested layer from a single activation stream.

Objective per layer (data normalised so that E||x||^2 = d_in and E||y||^2 = d_out):
- TopK:  FVU + auxk_coefficient * AuxK, where AuxK reconstructs the residual error with the
  top ``d_out / 2`` dead features (Gao et al. 2024), and decoder rows are kept unit-norm.
- ReLU:  FVU + lambda * mean_t sum_i f_i ||W_dec_i|| / sqrt(d_out), lambda warmed up linearly
  (the decoder-norm-weighted L1 of Dunefsky et al. 2024 / Anthropic, April 2024).

FVU is ``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` over the batch.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..coders.coder import SparseCoder
from ..coders.config import CoderConfig
from ..coders.kernels import sparse_topk_encode
from ..coders.io import atomic_save_tensors, atomic_write_bytes, save_coder
from ..data.activations import ActivationStream
from ..models.adapters import ModelAdapter
from .checkpoint import CHECKPOINT, load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from .config import TrainConfig

STATS = "stats.safetensors"


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class TrainingDiverged(RuntimeError):
    """A loss or weight became NaN/inf; the last good checkpoint was left untouched."""


@dataclass
class LayerState:
    """Everything that evolves for one layer's coder."""

    coder: SparseCoder
    optimizer: torch.optim.Adam
    tokens_since_fired: torch.Tensor  # [d_sae] int64
    fire_count: torch.Tensor  # [d_sae] int64, over all training tokens
    in_sum: torch.Tensor  # [d_in] float64, raw units
    out_sum: torch.Tensor  # [d_out] float64, raw units
    scale_in: float = 1.0
    scale_out: float = 1.0


def default_lr(d_sae: int) -> float:
    """Adam step size scaled with width like sparsify's ``2e-4 * sqrt(16384 / d_sae)``, but 15x
    larger: with encoder rows initialised at norm 0.1 our runs of 0.4-2M tokens reach lower FVU
    this way (layer-6 SmolLM2 sweep, 400k tokens, d_sae 9216: held-out FVU 0.61 at 5e-4, 0.50 at
    1e-3, 0.41 at 2e-3, 0.37 at 4e-3). Capped at 1.2e-2."""
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

    def __init__(self, cfg: TrainConfig, adapter: ModelAdapter, train_tokens: torch.Tensor, run_dir: str | Path):
        self.cfg = cfg
        self.adapter = adapter
        self.run_dir = Path(run_dir)
        self.device = adapter.device
        wanted = range(adapter.n_layers) if cfg.layers == "all" else cfg.layers
        self.layers = sorted({adapter.check_layer(layer) for layer in wanted})
        self.stream = ActivationStream(
            adapter, train_tokens, self.layers, cfg.batch_size,
            seed=cfg.seed, block_contexts=cfg.block_contexts, model_batch=cfg.model_batch,
        )
        self.d_sae = cfg.d_sae or cfg.expansion_factor * adapter.d_model
        self.lr = cfg.lr or default_lr(self.d_sae)
        self.states = {layer: self._new_state(layer) for layer in self.layers}
        self.step = 0
        self.timing = {"harvest_s": 0.0, "train_s": 0.0}
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ setup
    def _new_state(self, layer: int) -> LayerState:
        cfg, d = self.cfg, self.adapter.d_model
        coder_cfg = CoderConfig(
            kind=cfg.kind, activation=cfg.activation, d_in=d, d_out=d, d_sae=self.d_sae,
            k=cfg.k if cfg.activation == "topk" else None,
            model_name=cfg.model, layer=layer,
            hookpoint_in=f"{self.adapter.hookpoint(layer)}.input",
            hookpoint_out=f"{self.adapter.hookpoint(layer)}.output" if cfg.kind != "sae" else f"{self.adapter.hookpoint(layer)}.input",
            training=cfg.model_dump(mode="json"),
        )
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + layer)
        coder = SparseCoder(coder_cfg)
        coder.reset_parameters(gen)
        coder.to(self.device)
        opt = torch.optim.Adam(coder.parameters(), lr=self.lr, betas=(0.9, 0.999))
        zeros = lambda n, dt: torch.zeros(n, dtype=dt, device=self.device)  # noqa: E731
        return LayerState(coder, opt, zeros(self.d_sae, torch.int64), zeros(self.d_sae, torch.int64), zeros(d, torch.float64), zeros(d, torch.float64))

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the
        final ``decay_fraction`` of steps."""
        total = self.cfg.total_steps
        warm = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        decay_start = total * (1 - self.cfg.decay_fraction)
        decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1.0, total - decay_start))
        return self.lr * warm * decay

    # ------------------------------------------------------------------ one step
    def _train_layer(self, st: LayerState, x_raw: torch.Tensor, y_raw: torch.Tensor) -> dict[str, float]:
        cfg, coder = self.cfg, st.coder
        if self.step == 0:
            self._init_from_data(st, x_raw, y_raw)
        st.in_sum += x_raw.double().sum(0)
        st.out_sum += y_raw.double().sum(0)
        x = x_raw.float() * st.scale_in
        y = x if cfg.kind == "sae" else y_raw.float() * st.scale_out
        n = x.shape[0]
        matmul_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        dead = st.tokens_since_fired >= cfg.dead_tokens
        k_aux = 0
        if cfg.activation == "topk":
            if cfg.auxk_coefficient > 0 and bool(dead.any()):
                k_aux = min(coder.cfg.d_out // 2, int(dead.sum()))
            values, indices, aux_values, aux_indices = sparse_topk_encode(
                x, coder.W_enc, coder.b_enc, coder.cfg.k, dead=dead if k_aux else None, k_aux=k_aux, matmul_dtype=matmul_dtype)
            values = F.relu(values)
            y_hat = coder.decode_sparse(values, indices, x)
            active = indices[values > 0]
            l0 = (values > 0).sum() / n
        else:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                pre = coder.pre_acts(x)
            f = F.relu(pre.float())
            y_hat = coder.decode(f, x)
            active = (f > 0).any(0).nonzero().squeeze(1)
            l0 = (f > 0).sum() / n
        err = y - y_hat
        total_var = (y - y.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        loss = fvu
        if k_aux:
            err_hat = F.embedding_bag(aux_indices, coder.W_dec, per_sample_weights=F.relu(aux_values), mode="sum")
            loss = loss + cfg.auxk_coefficient * (err.detach() - err_hat).pow(2).sum() / total_var
        if cfg.activation == "relu":
            lam = cfg.l1_coefficient * min(1.0, (self.step + 1) / max(1.0, cfg.l1_warmup_fraction * cfg.total_steps))
            l1 = (f * coder.W_dec.norm(dim=1)).sum() / (n * math.sqrt(coder.cfg.d_out))
            loss = loss + lam * l1
        loss.backward()
        for group in st.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        if cfg.activation == "topk":
            coder.normalize_decoder()
        fired = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        fired[active] = True
        st.fire_count += torch.bincount(active, minlength=self.d_sae) if cfg.activation == "topk" else (f > 0).sum(0)
        st.tokens_since_fired += n
        st.tokens_since_fired[fired] = 0
        return {"loss": loss.item(), "fvu": fvu.item(), "l0": l0.item(), "dead_fraction": dead.float().mean().item()}

    @torch.no_grad()
    def _init_from_data(self, st: LayerState, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fix the normalisation scales and start ``b_dec`` at the mean target."""
        x, y = x.float(), y.float()
        st.scale_in = math.sqrt(x.shape[1] / x.pow(2).sum(1).mean().clamp_min(1e-12).item())
        st.scale_out = st.scale_in if self.cfg.kind == "sae" else math.sqrt(y.shape[1] / y.pow(2).sum(1).mean().clamp_min(1e-12).item())
        target = x * st.scale_in if self.cfg.kind == "sae" else y * st.scale_out
        st.coder.b_dec.copy_(target.mean(0))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Path:
        """Write the full training state atomically (see :mod:`.checkpoint`)."""
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        state = {"step": self.step, "config": self.cfg.model_dump(mode="json"), "timing": self.timing, "layers": {}}
        for layer, st in self.states.items():
            for name, p in st.coder.named_parameters():
                if not torch.isfinite(p).all():
                    raise TrainingDiverged(f"layer {layer} parameter {name} is not finite at step {self.step}")
                tensors[f"{layer}.coder.{name}"] = p
            opt_t, opt_meta = optimizer_tensors(st.optimizer, f"{layer}.opt")
            tensors.update(opt_t)
            tensors.update({f"{layer}.tokens_since_fired": st.tokens_since_fired, f"{layer}.fire_count": st.fire_count,
                            f"{layer}.in_sum": st.in_sum, f"{layer}.out_sum": st.out_sum})
            state["layers"][str(layer)] = {"optimizer": opt_meta, "scale_in": st.scale_in, "scale_out": st.scale_out}
        return save_checkpoint(self.run_dir, tensors, state)

    def restore(self) -> None:
        """Load ``checkpoint.safetensors`` from the run folder into this trainer.

        Raises:
            CheckpointError: no checkpoint, a corrupt one, or one from a different config.
        """
        from .checkpoint import CheckpointError

        tensors, state = load_checkpoint(self.run_dir)
        saved = TrainConfig.model_validate(state["config"])
        if saved != self.cfg:
            diff = {k: (v, getattr(self.cfg, k)) for k, v in saved.model_dump().items() if getattr(self.cfg, k) != v}
            raise CheckpointError(f"checkpoint in {self.run_dir} was made with different settings {diff}; resume with the same settings.")
        self.step = state["step"]
        self.timing = state["timing"]
        torch.set_rng_state(tensors["rng.torch"])
        for layer, st in self.states.items():
            meta = state["layers"][str(layer)]
            with torch.no_grad():
                for name, p in st.coder.named_parameters():
                    p.copy_(tensors[f"{layer}.coder.{name}"])
            restore_optimizer(st.optimizer, tensors, meta["optimizer"], f"{layer}.opt")
            for attr in ("tokens_since_fired", "fire_count", "in_sum", "out_sum"):
                getattr(st, attr).copy_(tensors[f"{layer}.{attr}"])
            st.scale_in, st.scale_out = meta["scale_in"], meta["scale_out"]

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self, *, resume: bool = False, progress: bool = True, on_step=None) -> dict[int, SparseCoder]:
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
        else:
            atomic_write_bytes(self.run_dir / "train_config.json", self.cfg.model_dump_json(indent=2).encode())
        total = self.cfg.total_steps
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=total * self.cfg.batch_size, initial=self.step * self.cfg.batch_size, unit="tok",
                   unit_scale=True, disable=not progress, desc="train")
        log = self._open_log(resume)
        try:
            batches = self.stream.batches(self.step)
            while self.step < total:
                t0 = time.perf_counter()
                batch = next(batches)
                t1 = time.perf_counter()
                metrics = {layer: self._train_layer(self.states[layer], *batch[layer]) for layer in self.layers}
                t2 = time.perf_counter()
                self.timing["harvest_s"] += t1 - t0
                self.timing["train_s"] += t2 - t1
                bad = [layer for layer, m in metrics.items() if not math.isfinite(m["loss"])]
                if bad:
                    ckpt = self.run_dir / CHECKPOINT
                    kept = (f"{ckpt} still holds the last good state (or --resume from it)" if ckpt.exists()
                            else "no checkpoint had been written yet")
                    raise TrainingDiverged(
                        f"loss became {metrics[bad[0]]['loss']} at step {self.step} (layers {bad}); stopped without "
                        f"saving: {kept}. Lower --lr (or the L1 coefficient), check the data for inf/NaN, and start again."
                    )
                self.step += 1
                bar.update(self.cfg.batch_size)
                if self.step % self.cfg.log_every == 0 or self.step == total:
                    self._log(log, bar, metrics)
                if on_step is not None:
                    on_step(self, metrics)
                if self._stop_signal is not None:
                    self.checkpoint()
                    raise TrainingInterrupted(
                        f"stopped by signal {signal.Signals(self._stop_signal).name} at step {self.step}/{total}; "
                        f"checkpoint saved in {self.run_dir}. Continue with `transcoders train --resume {self.run_dir}`."
                    )
                if self.step % self.cfg.checkpoint_every == 0 and self.step < total:
                    self.checkpoint()
            self.checkpoint()
        finally:
            log.close()
            bar.close()
            for s, handler in old.items():
                signal.signal(s, handler)
        return self.save_coders()

    def _open_log(self, resume: bool):
        """A fresh log, or on resume the old one cut back to the checkpoint's step (a crash may
        have logged steps that the checkpoint does not hold)."""
        path = self.run_dir / "train_log.jsonl"
        kept = []
        if resume and path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.step]
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        return open(path, "a")

    def _log(self, log, bar, metrics: dict[int, dict[str, float]]) -> None:
        seen = self.step * self.cfg.batch_size
        wall = self.timing["harvest_s"] + self.timing["train_s"]
        record = {"step": self.step, "tokens": seen, "lr": self.lr_at(self.step - 1), "tokens_per_s": seen / max(wall, 1e-9),
                  "layers": {str(k): v for k, v in metrics.items()}}
        log.write(json.dumps(record) + "\n")
        log.flush()
        first = metrics[self.layers[0]]
        bar.set_postfix(L0=f"{first['l0']:.1f}", FVU=f"{first['fvu']:.3f}", dead=f"{first['dead_fraction']:.1%}")

    def save_coders(self) -> dict[int, SparseCoder]:
        """Fold normalisation into copies of the coders and save each to ``run_dir/<hookpoint>/``
        with ``stats.safetensors`` (mean MLP input/output in raw units, firing counts)."""
        out = {}
        tokens = max(1, self.step * self.cfg.batch_size)
        for layer, st in self.states.items():
            coder = SparseCoder(st.coder.cfg, device=self.device)
            coder.load_state_dict(st.coder.state_dict())
            coder.fold_scales(st.scale_in, st.scale_out)
            folder = save_coder(coder, self.run_dir / self.adapter.hookpoint(layer))
            atomic_save_tensors(
                {"mlp_in_mean": (st.in_sum / tokens).float(), "mlp_out_mean": (st.out_sum / tokens).float(),
                 "fire_count": st.fire_count, "tokens": torch.tensor(tokens)},
                folder / STATS,
            )
            out[layer] = coder
        return out
