"""Training settings, saved as ``train_config.json`` in every run folder."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..coders.config import Activation, Kind
from ..data.mixture import DEFAULT_DATA, parse_data
from ..data.sources import DEFAULT_SOURCE
from ..models.loading import DEFAULT_MODEL, canonical_model_name

# Settings a resumed run may change (with --override): the checkpoint does not depend on them.
RESUME_OVERRIDABLE = frozenset({"total_tokens", "checkpoint_every", "log_every", "device", "model_batch", "decay_fraction"})

SWEEPABLE = {"activation", "kind", "k", "d_sae", "expansion_factor", "l1_coefficient", "l0_coefficient", "lr", "auxk_coefficient",
             "dead_tokens", "jumprelu_bandwidth", "auxk_tokens",
             "k_start", "k_anneal_fraction"}


class TrainConfig(BaseModel):
    """One training run: which model, layers, data, coder architecture and optimiser settings.

    Token counts are in tokens; learning rates are Adam step sizes for data normalised so
    that the mean squared norm of inputs and targets equals their width.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=DEFAULT_MODEL, description="hub name, model folder, .gguf file or package shipping one")
    data: str = Field(default=DEFAULT_DATA, description="text file, folder of .txt, .jsonl, a named source (sotu, "
                      "books, email, pydocs, djangodocs, stdlib) or dataset name, or a weighted mixture such as "
                      "a.jsonl:0.5,sotu:0.3,docs/:0.2 [default: bundled books, email, Python and Django docs, "
                      "this Python's standard library and State of the Union addresses]")
    layers: list[int] | Literal["all"] = Field(default_factory=lambda: [6], description="comma-separated layers, or 'all'")
    kind: Kind = Field(default="transcoder", description="transcoder (MLP in -> MLP out), skip_transcoder (+ W_skip x), "
                       "or sae (reconstructs the MLP input)")
    activation: Activation = Field(default="topk", description="batchtopk is saved as jumprelu with its fitted threshold")
    expansion_factor: int = Field(default=16, gt=0, description="d_sae = expansion_factor * d_model")
    d_sae: int | None = Field(default=None, gt=0, description="overrides expansion_factor * d_model")
    k: int = Field(default=32, gt=0, description="active features per token (topk, batchtopk; jumprelu: the L0 its "
                   "thresholds start at)")
    k_start: int | None = Field(
        default=None, gt=0, description="k at the first step, decayed linearly to k over the first k_anneal_fraction of "
        "the steps (topk, batchtopk) [default: k throughout]")
    k_anneal_fraction: float = Field(default=0.1, gt=0, le=1, description="share of steps over which k_start decays to k")
    l1_coefficient: float = Field(default=1.0, ge=0, description="L1 penalty weight (relu)")
    l1_warmup_fraction: float = Field(
        default=0.05, ge=0, le=1, description="share of steps over which L1/L0 coefficients ramp up"
    )
    l0_coefficient: float = Field(default=2e-3, ge=0, description="L0 penalty weight (jumprelu)")
    jumprelu_bandwidth: float = Field(default=0.05, gt=0, description="STE kernel width for JumpReLU thresholds")
    # Gao et al. (2024) use 1/32 with the AuxK loss normalised by the residual's own power; ours is
    # normalised by the target's variance (FVU units), so theirs weighs 1/FVU (3x) more. Sweep at
    # SmolLM2 layers 6 and 15, 1.2M tokens (benchmarks/RESULTS.md): 1/32 -> 1/2 took dead features
    # 22.8% -> 8.0% (layer 6) and 75% -> 61% (layer 15), with lower FVU and KL at both.
    auxk_coefficient: float = Field(default=0.5, ge=0, description="weight of the AuxK loss that revives dead features (topk)")
    auxk_tokens: int | None = Field(
        default=None, gt=0, description="tokens of each batch in the AuxK loss, a random subset (the batch is shuffled) "
        "[default: all]")
    dead_tokens: int | None = Field(
        default=None, gt=0, description="a feature silent this many training tokens counts as dead, and AuxK trains it "
        "[default: a tenth of the run, at least 100,000 and at most 10,000,000 tokens]")
    lr: float | None = Field(
        default=None, gt=0, description="Adam learning rate [default: min(1.2e-2, 3e-3 * sqrt(16384 / d_sae))]"
    )
    warmup_steps: int = Field(default=50, ge=0, description="steps of linear learning-rate warm-up")
    decay_fraction: float = Field(default=0.2, ge=0, le=1, description="final share of steps with linear LR decay to 0")
    batch_size: int = Field(default=4096, gt=0, description="tokens per step")
    total_tokens: int = Field(default=2_000_000, gt=0, description="training tokens")
    ctx_len: int = Field(default=256, gt=1, description="tokens per context")
    skip_first_tokens: int = Field(
        default=1, ge=0,
        description="leading positions of every context left out of training and evaluation: position 0 is the "
                    "attention sink, whose MLP output can be 1000x any other (SmolLM2 layers 11 and 28)")
    prepend_bos: bool | None = Field(
        default=None,
        description="start every context with the model's BOS token [default: as the model was trained: yes for Gemma "
                    "and models whose tokenizer adds BOS itself (Llama 3), no for SmolLM2 and GPT-2; the run records "
                    "the choice]")
    eval_fraction: float = Field(default=0.05, gt=0, lt=1, description="share of documents held out for evaluation")
    seed: int = Field(default=0, description="seed of the initialisation and the data shuffle")
    device: str = Field(default="auto", description="'auto' = cuda if available, else cpu")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="autocast dtype of the coder's matmuls [auto: bf16 where the device runs it fast, "
                                    "else fp32; the run records the choice]")
    harvest_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="dtype of the model when harvesting [auto: as --precision]")
    block_contexts: int = Field(default=64, gt=0, description="contexts shuffled together (shuffle buffer)")
    streaming: bool | None = Field(
        default=None,
        description="read, split and tokenize the text while training, holding a shuffle buffer instead of the "
                    "whole text [default: yes when a source of --data is a Hugging Face dataset or its local files "
                    "total more than 256 MB; the run records the choice]")
    shuffle_contexts: int = Field(
        default=1024, gt=0, description="with --streaming: contexts in the seeded shuffle buffer that spreads the "
                                        "contexts of one document apart")
    model_batch: int = Field(default=16, gt=0, description="contexts per forward pass of the model")
    shard_layers: bool = Field(
        default=False,
        description="under torchrun: each rank trains a share of the coders on the full stream (no gradient sync)",
    )
    activation_cache: str | None = Field(
        default=None, description="folder of an on-disk activation cache to read (built first if absent)"
    )
    cache_dtype: Literal["bfloat16", "float32"] = Field(default="bfloat16", description="dtype of the activation cache")
    checkpoint_every: int = Field(default=100, gt=0, description="steps between checkpoints")
    log_every: int = Field(default=10, gt=0, description="steps between log lines")
    sweep: list[dict[str, Any]] = Field(
        default_factory=list,
        description="variants trained side by side from the same activations, each a dict overriding "
        f"some of {sorted(SWEEPABLE)}, e.g. [{{'k': 16}}, {{'k': 64}}]",
    )

    @field_validator("model")
    @classmethod
    def _canonical_model(cls, name: str) -> str:
        # the package alias of a known model is saved under the model's own hub name
        return canonical_model_name(name)

    @field_validator("data", mode="before")
    @classmethod
    def _check_data(cls, data: str | None) -> str:
        # Runs saved before the default became a mixture recorded null for the State of the Union corpus.
        data = DEFAULT_SOURCE if data is None else data
        parse_data(data)  # a malformed mixture fails here, before the model is loaded
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.d_sae is not None and self.activation in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}: pick k <= d_sae")
        for variant in self.sweep:
            unknown = set(variant) - SWEEPABLE
            if unknown:
                raise ValueError(f"sweep variant {variant} sets {sorted(unknown)}; only {sorted(SWEEPABLE)} can vary in a sweep")
        return self

    def variants(self) -> list[tuple[str, TrainConfig]]:
        """``[(suffix, settings)]``: one entry with suffix ``""`` without a sweep, else one per
        variant, suffixed like ``k64`` or ``activation-relu_l1_coefficient0.5``."""
        if not self.sweep:
            return [("", self)]
        out = []
        for variant in self.sweep:
            suffix = "_".join(f"{k}{v}" if isinstance(v, (int, float)) else f"{k}-{v}" for k, v in sorted(variant.items()))
            out.append((suffix, TrainConfig.model_validate({**self.model_dump(), **variant, "sweep": []})))
        if len({s for s, _ in out}) != len(out):
            raise ValueError(f"sweep variants must differ: {self.sweep}")
        return out

    def resolved(self, device: str = "cpu") -> TrainConfig:
        """These settings with ``auto`` precisions made concrete for ``device`` (``"cpu"``,
        ``"cuda"``): bf16 where :func:`~transcoders.hardware.bf16_is_fast`, else fp32."""
        if self.precision != "auto" and self.harvest_dtype != "auto":
            return self
        from ..hardware import bf16_is_fast

        fast = bf16_is_fast(device)
        precision = self.precision if self.precision != "auto" else ("bf16" if fast else "fp32")
        harvest = self.harvest_dtype if self.harvest_dtype != "auto" else ("bfloat16" if precision == "bf16" else "float32")
        return self.model_copy(update={"precision": precision, "harvest_dtype": harvest})

    @property
    def dead_window(self) -> int:
        """Tokens of silence after which a feature counts as dead: ``dead_tokens``, by default
        ``clamp(total_tokens // 10, 100_000, 10_000_000)``. Gao et al. (2024) use 10M tokens for
        runs of billions; a fixed window longer than a short run means AuxK never acts (a 1.2M-token
        demo with a 250,000-token window ended with a third of its features dead)."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return min(10_000_000, max(100_000, self.total_tokens // 10))

    @property
    def total_steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)
