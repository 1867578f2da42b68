"""The configuration saved next to every coder as ``cfg.json``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["transcoder", "skip_transcoder", "sae"]
Activation = Literal["relu", "topk", "batchtopk", "jumprelu"]


class CoderConfig(BaseModel):
    """Everything needed to rebuild a coder and to know what it was trained on.

    ``kind`` picks what the coder reconstructs: a transcoder maps the MLP input to the MLP
    output (Dunefsky et al. 2024), a skip transcoder adds an affine ``W_skip x`` term (Paulo et
    al. 2025), an SAE reconstructs its own input.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Kind = "transcoder"
    activation: Activation = "topk"
    d_in: int = Field(gt=0)
    d_out: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    k: int | None = Field(default=32, gt=0, description="active features per token (topk)")
    model_name: str = ""
    layer: int | None = None
    hookpoint_in: str = ""
    hookpoint_out: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    format_version: int = 1

    @model_validator(mode="after")
    def _check(self) -> CoderConfig:
        if self.activation in ("topk", "batchtopk") and (self.k is None or self.k > self.d_sae):
            raise ValueError(f"topk needs 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}")
        if self.kind == "sae" and self.d_in != self.d_out:
            raise ValueError(f"an SAE reconstructs its input, so d_in must equal d_out (got {self.d_in}, {self.d_out})")
        return self
