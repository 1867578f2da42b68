"""A feature's example: a window of text around one token, with the feature's activation on
every token of the window.

This is what explanations and scores read (Bills et al. 2023, "Language models can explain
neurons in language models"; Paulo et al. 2024, "Automatically interpreting millions of
features in large language models"): activating examples (the top ones, and ones drawn
across activation quantiles) and non-activating ones (random windows, and near misses where a
feature with a similar decoder direction fires).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ExampleKind = Literal["top", "quantile", "random", "near_miss"]


@dataclass(frozen=True)
class Example:
    """One context window.

    Attributes:
        tokens: the window's tokens as text, ``[W]`` (decoded one by one).
        acts: the feature's activation on each token, ``[W]`` (the coder's units; 0 = silent).
        kind: ``top`` (among the feature's highest activations), ``quantile`` (drawn at random
            from the activating tokens; ``quantile`` gives its group), ``random`` (a random
            window where the feature is silent) or ``near_miss`` (a window where a feature with
            a similar decoder direction fires and this one is silent).
        quantile: for ``quantile`` examples, the activation quantile group, 0 (lowest) to
            ``n_groups - 1`` (highest); None otherwise.
        center: index in the window of the token the example was chosen for.
        token_ids: the window's token ids ``[W]``.
        where: ``(context, position)`` of the centre token in the token stream of the pass.
    """

    tokens: list[str]
    acts: list[float]
    kind: ExampleKind = "top"
    quantile: int | None = None
    center: int = 0
    token_ids: list[int] = field(default_factory=list)
    where: tuple[int, int] = (-1, -1)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise ValueError(f"an example needs one activation per token: {len(self.tokens)} tokens, {len(self.acts)} acts")

    @property
    def max_act(self) -> float:
        """The largest activation in the window (0 for a silent window)."""
        return max(self.acts, default=0.0)

    @property
    def activating(self) -> bool:
        """Whether the feature fires anywhere in the window."""
        return self.max_act > 0
