"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, a per-request seed.

The order follows transformers' logits processors: penalties on the raw logits, then temperature, top-k, top-p and
min-p; each filter keeps at least the most likely token. Temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL's: divide positive logits of seen tokens by it, multiply negative ones
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x count of each generated token
    presence_penalty: float = 0.0  # OpenAI's: minus penalty once per generated token
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        checks = [("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                  ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_penalties(logits: torch.Tensor, prompt_and_output: torch.Tensor, output_counts: torch.Tensor,
                    params: SamplingParams) -> torch.Tensor:
    """logits [V]; prompt_and_output: every token id seen so far (for the repetition penalty); output_counts [V]:
    how often each token was generated (for the frequency and presence penalties)."""
    if params.repetition_penalty != 1.0 and len(prompt_and_output):
        seen = logits[prompt_and_output]
        logits = logits.clone()
        logits[prompt_and_output] = torch.where(seen > 0, seen / params.repetition_penalty,
                                                seen * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        logits = (logits - params.frequency_penalty * output_counts
                  - params.presence_penalty * (output_counts > 0).to(logits.dtype))
    return logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf what top-k, top-p (nucleus) and min-p remove from logits [..., V]."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the more likely tokens
        drop = torch.zeros_like(before, dtype=torch.bool).scatter_(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0:  # keep tokens at least min_p times as likely as the most likely one
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities [V] that sampling draws from (temperature > 0): temperature, then the filters."""
    return filter_logits(logits.float() / params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] (penalties already applied)."""
    if params.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(distribution(logits, params), 1, generator=generator))
