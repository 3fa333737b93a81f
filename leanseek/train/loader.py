"""Training batches from a tokenized split, as a pure function of (seed, step): resuming needs no loader state.

The token stream is cut into windows of seq_len + 1 tokens; each epoch visits them in an order drawn from
(seed, epoch). The global batch of step s is the next `batch_size` windows of that sequence; rank r of W takes
its contiguous share, and gradient-accumulation micro-steps split that share again, so a step trains on the same
sequences whatever the number of devices. An optional mask (one flag per token) marks the tokens to learn; the
others are not targets (SFT learns only the assistant's tokens). The token stream may be a plain array or a split's
lazy view over its shard files (`ShardedTokens`): windows are read one by one, so only the sampled windows are
ever in memory, and a window may start in one shard and end in the next.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.shards import ShardedTokens
from .losses import IGNORE_INDEX

Tokens = np.ndarray | ShardedTokens


class WindowSampler:
    def __init__(self, tokens: Tokens, seq_len: int, batch_size: int, seed: int, mask: np.ndarray | None = None):
        self.tokens, self.seq_len, self.batch_size, self.seed, self.mask = tokens, seq_len, batch_size, seed, mask
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < batch_size:
            raise ValueError(f"the training split holds {self.windows} windows of {seq_len + 1} tokens, fewer than "
                             f"one batch of {batch_size}: use more data, a smaller --batch-size or --seq-len")
        self._epoch, self._order = -1, None

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.windows)
        return self._order

    def global_batch(self, step: int) -> np.ndarray:
        """Window indices of step `step`'s global batch."""
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.windows)
            out.extend(self._order_of(epoch)[offset:offset + self.batch_size - len(out)])
        return np.asarray(out)

    def micro_batches(self, step: int, rank: int, world: int, accumulation: int) -> list[tuple[torch.Tensor, ...]]:
        """(inputs, targets) [micro, seq_len] for each micro-step of this rank."""
        mine = np.array_split(self.global_batch(step), world)[rank]
        return [self.read(idx) for idx in np.array_split(mine, accumulation)]

    def read(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.tokens, self.mask, windows, self.seq_len)


def _windows(tokens: Tokens, mask: np.ndarray | None, windows, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the given windows; targets the mask leaves out are IGNORE_INDEX."""
    spans = [slice(w * seq_len, w * seq_len + seq_len + 1) for w in windows]
    rows = torch.from_numpy(np.stack([tokens[s] for s in spans]).astype(np.int64))
    targets = rows[:, 1:].clone()
    if mask is not None:
        keep = torch.from_numpy(np.stack([mask[s] for s in spans]))[:, 1:]
        targets[~keep] = IGNORE_INDEX
    return rows[:, :-1], targets


def eval_windows(tokens: Tokens, seq_len: int, max_tokens: int,
                 mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first validation windows (a fixed set, so evaluations compare), up to max_tokens targets."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise ValueError(f"the validation split holds {len(tokens)} tokens, less than one window of {seq_len + 1}")
    return _windows(tokens, mask, range(max(1, min(available, max_tokens // seq_len))), seq_len)
