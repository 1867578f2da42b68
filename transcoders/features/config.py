"""Settings of a features pass (`transcoders features`): one place, read by the CLI and the API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# settings a store is built with: extending it with other values would mix incompatible records
STORE_SETTINGS = ("data", "split", "seed", "top_k", "n_samples", "before", "after", "random_every")


class FeaturesConfig(BaseModel):
    """What a features pass reads and keeps. Token counts are in tokens."""

    model_config = ConfigDict(extra="forbid")

    data: str | None = Field(default=None, description="text source, or a weighted mixture such as "
                             "a.jsonl:0.5,sotu:0.5 [default: the run's training text]")
    split: Literal["train", "eval"] = Field(default="train", description="which side of the run's document split to read")
    tokens: int = Field(default=1_000_000, gt=0, description="tokens the store covers in all (it grows to this)")
    ctx_len: int | None = Field(default=None, gt=1, description="tokens per context [default: the run's, else 256]")
    layers: list[int] | Literal["all"] | None = Field(
        default=None, description="comma-separated layers, or all [default: every coder of the run]")
    model: str | None = Field(default=None, description="model [default: the coders' model, if known locally]")
    top_k: int = Field(default=20, gt=0, description="top activating examples kept per feature")
    n_samples: int = Field(default=60, gt=0, description="activating examples sampled per feature (quantile groups)")
    n_groups: int = Field(default=10, gt=0, description="activation quantile groups")
    before: int = Field(default=16, ge=0, description="tokens shown before an example's centre token")
    after: int = Field(default=4, ge=0, description="tokens shown after it")
    random_every: int = Field(default=4, gt=0, description="one random window per this many contexts")
    seed: int = Field(default=0, description="seed of the context order, samples and random windows")
    model_batch: int = Field(default=16, gt=0, description="contexts per forward pass")
    device: str = Field(default="auto", description="cpu, cuda, or auto")
    harvest_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="dtype of the model's forward pass (auto: bf16 where the device runs it fast)")

    @field_validator("data")
    @classmethod
    def _check_data(cls, data: str | None) -> str | None:
        from ..data.mixture import parse_data

        parse_data(data)  # a malformed mixture fails here, before the model is loaded
        return data
