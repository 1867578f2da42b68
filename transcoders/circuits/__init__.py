"""Circuit analysis: the local replacement model, attribution graphs, paths, input-invariant
weights, interventions and their verification (Dunefsky et al. 2024; Ameisen et al. 2025)."""

from .attribution import attribute
from .graph import KINDS, Graph
from .replacement import LocalReplacement, ReplacementError
from .targets import Target, TargetError, parse_target, top_logit_targets

__all__ = [
    "KINDS", "Graph", "LocalReplacement", "ReplacementError", "Target", "TargetError", "attribute",
    "parse_target", "top_logit_targets",
]
