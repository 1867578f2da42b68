"""Circuit analysis: the local replacement model, attribution graphs, paths, input-invariant
weights, interventions and their verification (Dunefsky et al. 2024; Ameisen et al. 2025)."""

from .attribution import attribute
from .export import GraphFileError, load_graph, save_graph
from .graph import KINDS, Graph
from .paths import format_path, greedy_paths, top_paths
from .prune import graph_scores, node_influence, prune
from .replacement import LocalReplacement, ReplacementError, bos_constant_positions
from .targets import Target, TargetError, group_target, parse_target, prob_diff, target_values, top_logit_targets

__all__ = [
    "KINDS", "Graph", "GraphFileError", "LocalReplacement", "ReplacementError", "Target", "TargetError", "attribute",
    "bos_constant_positions", "format_path", "graph_scores", "greedy_paths", "group_target", "load_graph", "node_influence",
    "parse_target", "prob_diff", "prune", "save_graph", "target_values", "top_logit_targets", "top_paths",
]
