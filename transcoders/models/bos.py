"""Whether a model's sequences start with a BOS token, and a check that the choice is right.

Many models were trained with a BOS token at the start of every sequence (Gemma, Llama 2 and 3,
Mistral): without it they are off-distribution and every loss, activation and graph is wrong,
silently (Gemma 3 270M on the bundled text: 5.19 nats/token without BOS, 3.56 with it). Others
have no such token, or a ``bos_token`` that is really a chat marker: SmolLM2's ``<|im_start|>``
makes its loss worse (3.70 -> 3.76). The policy is decided per model:

- Gemma-family models: always (their tokenizers are not always set to add it);
- otherwise, when the model's own tokenizer puts ``bos_token`` first by itself (Llama 3,
  Llama 2, Mistral, Gemma);
- otherwise not (GPT-2, Pythia, SmolLM2).

With BOS, position 0 of every context and prompt is the BOS token: the attention sink, left out
of training (``skip_first_tokens``) and folded into bias nodes in graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# a clean loss this much lower with the other policy means the policy is probably wrong (nats/token)
SUSPICIOUS_GAIN = 0.3
# no working language model has a clean loss this high on plain English prose (nats/token)
IMPLAUSIBLE_CE = 7.0


class BosPolicyError(ValueError):
    """BOS asked for a model whose tokenizer has none, or a run used with the other policy."""


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` itself puts its ``bos_token`` first when it encodes text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and int(ids[0]) == int(bos)


def default_prepend_bos(adapter: Any, tokenizer: Any) -> bool:
    """The model's policy (see the module docstring): Gemma family, or a tokenizer that adds
    its BOS token itself."""
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    return getattr(adapter, "family", "") == "gemma" or tokenizer_adds_bos(tokenizer)


def resolve_prepend_bos(setting: bool | None, adapter: Any, tokenizer: Any) -> bool:
    """``setting`` when given (``--prepend-bos/--no-prepend-bos``), else the model's default.

    Raises:
        BosPolicyError: BOS asked for, but the tokenizer has no BOS token.
    """
    if setting is None:
        return default_prepend_bos(adapter, tokenizer)
    if setting and getattr(tokenizer, "bos_token_id", None) is None:
        raise BosPolicyError("--prepend-bos: this model's tokenizer has no BOS token; drop the option")
    return setting


def bos_id_if(prepend_bos: bool, tokenizer: Any) -> int | None:
    """The BOS id to start contexts with under ``prepend_bos``, else None."""
    return int(tokenizer.bos_token_id) if prepend_bos else None


def check_run_policy(recorded: bool | None, wanted: bool | None, where: str) -> bool | None:
    """The policy to use with a run that recorded ``recorded`` when the user asked for
    ``wanted`` (None: not asked).

    Raises:
        BosPolicyError: both are set and differ (coders trained with BOS, used without it, or
            the reverse): the numbers would be off-distribution.
    """
    if recorded is not None and wanted is not None and recorded != wanted:
        trained = "with" if recorded else "without"
        raise BosPolicyError(f"{where} was trained {trained} a BOS token at the start of every context; using it "
                             f"{'with' if wanted else 'without'} one gives off-distribution numbers. Drop "
                             f"--{'' if wanted else 'no-'}prepend-bos.")
    return recorded if recorded is not None else wanted


@dataclass
class ModelCheck:
    """Clean next-token loss (nats/token) on the same text tokens with the chosen policy and
    with the other one, and a warning when the choice looks wrong."""

    prepend_bos: bool
    ce: float
    ce_other: float | None
    n_tokens: int
    warning: str | None

    def line(self) -> str:
        other = "" if self.ce_other is None else f" ({'without' if self.prepend_bos else 'with'} BOS: {self.ce_other:.3f})"
        return (f"model check: clean CE {self.ce:.3f} nats/token {'with' if self.prepend_bos else 'without'} BOS "
                f"on {self.n_tokens} tokens of the bundled text{other}")


@torch.no_grad()
def check_model(model: torch.nn.Module, tokenizer: Any, prepend_bos: bool, *, n_tokens: int = 512,
                ctx_len: int = 128) -> ModelCheck:
    """Measure the clean loss on ``n_tokens`` of the bundled State of the Union text under both
    BOS policies (the same predicted tokens: each context's second token onward) and say when
    the chosen one looks wrong: the other is ``SUSPICIOUS_GAIN`` nats/token better, or the loss
    is above ``IMPLAUSIBLE_CE``.

    Returns:
        a :class:`ModelCheck`.
    """
    from ..data.sources import load_documents
    from ..data.tokens import tokenize_documents

    docs = load_documents(None)[:4]
    device = next(model.parameters()).device
    ctx_len = min(ctx_len, int(getattr(model.config, "max_position_embeddings", ctx_len + 1)) - 1)
    text = tokenize_documents(docs, tokenizer, ctx_len, max_tokens=max(n_tokens, ctx_len)).to(device)
    bos = getattr(tokenizer, "bos_token_id", None)

    def ce(with_bos: bool) -> float:
        ids = torch.cat([torch.full_like(text[:, :1], int(bos)), text], 1) if with_bos else text
        logits = model(ids).logits.float()
        shift = 1 if with_bos else 0  # logits[:, t + shift] predict text[:, t + 1]
        pred = logits[:, 1 + shift: text.shape[1] - 1 + shift]
        return float(torch.nn.functional.cross_entropy(pred.flatten(0, 1), text[:, 2:].flatten()))

    chosen = ce(prepend_bos and bos is not None)
    other = ce(not prepend_bos) if bos is not None else None
    warning = None
    if other is not None and chosen - other > SUSPICIOUS_GAIN:
        fix = "--no-prepend-bos" if prepend_bos else "--prepend-bos"
        warning = (f"the clean loss is {chosen - other:.2f} nats/token lower {'without' if prepend_bos else 'with'} a BOS "
                   f"token first ({other:.3f} vs {chosen:.3f}): this model likely expects {fix.removeprefix('--')}; "
                   f"pass {fix}")
    elif chosen > IMPLAUSIBLE_CE:
        warning = (f"the clean loss {chosen:.2f} nats/token is implausible for a working model: check the weights "
                   "(a bad GGUF conversion?) and the tokenizer")
    return ModelCheck(prepend_bos, chosen, other, int(text[:, 2:].numel()), warning)
