"""Harvest (MLP input, MLP output) pairs with forward hooks, and stream them shuffled.

The forward pass stops right after the MLP of the last requested layer, so training a
layer-6 transcoder of a 30-layer model pays for 7 layers, not 30.

Shuffling is deterministic and position-addressable, which makes resume exact without
saving a buffer: contexts are visited in a seeded random order (a new permutation per
epoch); each *block* of ``block_contexts`` contexts is harvested together and its tokens are
permuted with a generator seeded by the block index. Token ``p`` of the stream is therefore a
pure function of ``(seed, p)``, and training step ``s`` reads stream tokens
``[s * batch_size, (s + 1) * batch_size)``.

The contexts come either from a token tensor held in memory, or from a
:class:`~transcoders.data.stream.TokenStream` (text too large to hold, see
:mod:`transcoders.data.stream`): then block ``b`` is the stream's contexts
``[b * block_contexts, (b + 1) * block_contexts)``, already shuffled there, and a stream that
starts at block ``b`` replays the tokenization (not the model) up to it.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..models.adapters import ModelAdapter

if TYPE_CHECKING:
    from .stream import TokenStream


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


@torch.inference_mode()
def harvest(
    adapter: ModelAdapter, input_ids: torch.Tensor, layers: Sequence[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run the model on ``input_ids`` and capture each layer's MLP input and output.

    Args:
        adapter: the model's adapter.
        input_ids: ``[batch, pos]`` token ids.
        layers: layer indices to capture.

    Returns:
        ``{layer: (mlp_in, mlp_out)}``, each ``[batch, pos, d_model]`` in the model's dtype.

    Raises:
        AdapterError: a layer is out of range.
    """
    layers = sorted({adapter.check_layer(layer) for layer in layers})
    if not layers:
        raise ValueError("harvest needs at least one layer")
    last = layers[-1]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        captured[layer] = (x, y)
        if layer == last:
            raise _StopForward

    with adapter.hook_mlps(layers, on_output=grab):
        try:
            adapter.decoder()(input_ids.to(adapter.device), use_cache=False)
        except _StopForward:
            pass
    return {layer: captured[layer] for layer in layers}


class ActivationStream:
    """A deterministic, shuffled stream of ``(mlp_in, mlp_out)`` token batches.

    Args:
        adapter: the model's adapter (the model may be in bfloat16 for speed).
        tokens: ``[n_ctx, ctx_len]`` training token ids, or a
            :class:`~transcoders.data.stream.TokenStream` whose consecutive blocks of
            ``block_contexts`` contexts are harvested in turn (memory: the stream's shuffle
            buffer and queue, and one block, however large the text).
        layers: layers to harvest, all from one forward pass.
        batch_size: tokens per training batch.
        seed: shuffle seed of the tokens within a block (and of the context order of a tensor).
        block_contexts: contexts harvested and shuffled together (the shuffle buffer);
            ``block_contexts * ctx_len`` tokens of every layer are held in memory at once.
        model_batch: contexts per forward pass.
        skip_first: leading positions of every context left out (the attention sink).

    Raises:
        ValueError: an empty or non-2-D token tensor, no layers, or ``skip_first`` not below
            the context length.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        tokens: torch.Tensor | TokenStream,
        layers: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        block_contexts: int = 64,
        model_batch: int = 16,
        skip_first: int = 0,
    ):
        self.contexts: TokenStream | None = None
        if isinstance(tokens, torch.Tensor):
            if tokens.ndim != 2 or tokens.shape[0] == 0:
                raise ValueError(f"tokens must be [n_ctx, ctx_len] with n_ctx > 0, got shape {tuple(tokens.shape)}")
            ctx_len = tokens.shape[1]
        else:
            self.contexts, ctx_len = tokens, tokens.ctx_len
        self.adapter = adapter
        self.tokens = tokens if isinstance(tokens, torch.Tensor) else None
        self._blocks: Generator[torch.Tensor, None, None] | None = None  # a TokenStream's blocks, positioned at _next_block
        self._next_block = 0
        self.layers = sorted(set(layers))
        if not self.layers:
            raise ValueError("ActivationStream needs at least one layer")
        self.batch_size = batch_size
        self.seed = seed
        self.block_contexts = block_contexts
        self.model_batch = model_batch
        if not 0 <= skip_first < ctx_len:
            raise ValueError(f"skip_first={skip_first} must be below the context length {ctx_len}")
        self.skip_first = skip_first
        self.block_tokens = block_contexts * (ctx_len - skip_first)

    def context_index(self, i: int) -> int:
        """Index into ``tokens`` of the ``i``-th context of the (endless, multi-epoch) order
        (a token tensor only: a stream has no index)."""
        if self.tokens is None:
            raise TypeError("context_index needs a token tensor; this stream reads a TokenStream")
        n = self.tokens.shape[0]
        epoch, j = divmod(i, n)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return int(torch.randperm(n, generator=gen)[j])

    def block_ids(self, b: int) -> torch.Tensor:
        """The contexts of block ``b``, [block_contexts, ctx_len] int64: rows of ``tokens`` in the
        seeded order, or the next block of the TokenStream (which is restarted at block ``b``,
        replaying its tokenization, when ``b`` is not the block after the last one read)."""
        if self.contexts is None:
            assert self.tokens is not None
            ids = [self.context_index(b * self.block_contexts + i) for i in range(self.block_contexts)]
            return self.tokens[ids]
        if self._blocks is None or b != self._next_block:
            self.close()
            self._blocks = self.contexts.blocks(self.block_contexts, b)
        rows = next(self._blocks)
        self._next_block = b + 1
        return rows

    def close(self) -> None:
        """Stop the TokenStream's background thread, if one runs (a later block starts it again)."""
        if self._blocks is not None:
            blocks, self._blocks = self._blocks, None
            blocks.close()

    def block(self, b: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Harvest and shuffle block ``b``: ``{layer: (x, y)}``, each ``[block_tokens, d_model]``."""
        ids = self.block_ids(b)
        chunks: dict[int, tuple[list, list]] = {layer: ([], []) for layer in self.layers}
        for start in range(0, len(ids), self.model_batch):
            acts = harvest(self.adapter, ids[start : start + self.model_batch], self.layers)
            for layer, (x, y) in acts.items():
                chunks[layer][0].append(x[:, self.skip_first :].flatten(0, 1))
                chunks[layer][1].append(y[:, self.skip_first :].flatten(0, 1))
        gen = torch.Generator().manual_seed((self.seed * 7_919 + b + 1) % 2**63)
        perm = torch.randperm(self.block_tokens, generator=gen)
        return {layer: (torch.cat(xs)[perm], torch.cat(ys)[perm]) for layer, (xs, ys) in chunks.items()}

    def batches(self, start_step: int = 0) -> Generator[dict[int, tuple[torch.Tensor, torch.Tensor]], None, None]:
        """Yield batches ``{layer: (x [batch_size, d_model], y [batch_size, d_model])}`` forever,
        starting at training step ``start_step``. Closing the generator stops a TokenStream's
        background thread."""
        pos = start_step * self.batch_size
        b, offset = divmod(pos, self.block_tokens)
        try:
            current = self.block(b)
            while True:
                parts: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
                need = self.batch_size
                while need > 0:
                    take = min(need, self.block_tokens - offset)
                    parts.append({k: (x[offset : offset + take], y[offset : offset + take]) for k, (x, y) in current.items()})
                    offset += take
                    need -= take
                    if offset == self.block_tokens:
                        b, offset = b + 1, 0
                        current = self.block(b)
                yield {
                    layer: (torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
                    for layer in self.layers
                }
        finally:
            self.close()


class MergedStream:
    """Concatenates, step by step, the batches of several streams: the global batch that
    data-parallel ranks (one stream each) train on together, as a single process sees it."""

    def __init__(self, streams: Sequence[ActivationStream]):
        self.streams = list(streams)
        self.layers = self.streams[0].layers
        self.batch_size = sum(s.batch_size for s in self.streams)

    def batches(self, start_step: int = 0) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        for parts in zip(*(s.batches(start_step) for s in self.streams)):
            yield {layer: (torch.cat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
                   for layer in self.layers}


def rank_stream(adapter: ModelAdapter, tokens: torch.Tensor | TokenStream, layers: Sequence[int], batch_size: int, *,
                seed: int, rank: int, world: int, block_contexts: int = 64, model_batch: int = 16,
                skip_first: int = 0) -> ActivationStream:
    """Rank ``rank``'s share of a data-parallel stream: contexts ``rank::world`` (of a token
    tensor's rows, or of a TokenStream's contexts in stream order: ``i % world == rank``), its
    own shuffle seed, ``batch_size / world`` tokens per step. With ``world == 1`` it is the
    plain stream.

    Raises:
        ValueError: ``batch_size`` not divisible by ``world``.
    """
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world} processes: pick a multiple of {world}")
    rank_seed = seed if world == 1 else seed * 65_537 + rank
    share = tokens[rank::world] if isinstance(tokens, torch.Tensor) else tokens.shard(rank, world) if world > 1 else tokens
    return ActivationStream(adapter, share, layers, batch_size // world, seed=rank_seed,
                            block_contexts=block_contexts, model_batch=model_batch, skip_first=skip_first)
