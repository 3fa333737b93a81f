"""Choosing the next token from logits: penalties, temperature, top-k, top-p, min-p, a per-request seed; and the
speculative-sampling rule that checks a draft token against the model.

The order follows transformers' logits processors: penalties on the raw logits, then temperature, top-k, top-p and
min-p; each filter keeps at least the most likely token. Temperature 0 is greedy. Everything works on a batch of
rows at once, each with its own parameters, and draws by inverse CDF from one uniform number per row, so a
request's seeded generator alone decides its tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # the most alternatives a log-probability comes with (OpenAI's top_logprobs limit)


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
    # None: off; N: each generated (prompt) token's log-probability and its N most likely alternatives
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LOGPROBS):
                raise ValueError(f"{name}={n!r}: must be None (off) or an integer in 0..{MAX_LOGPROBS}")
        scoring = self.prompt_logprobs is not None  # scoring a prompt may generate nothing
        checks = [("max_new_tokens", self.max_new_tokens >= (0 if scoring else 1),
                   ">= 0" if scoring else ">= 1 (0 only with prompt_logprobs, to score the prompt alone)"),
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

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty or self.presence_penalty)


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


def filter_logits(logits: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Set to -inf what top-k, top-p (nucleus) and min-p remove from logits [V] or [B, V]; each parameter is a
    number or a tensor [B] of one per row (top_k 0, top_p 1, min_p 0: off)."""
    x = logits if logits.dim() == 2 else logits[None]
    B, V = x.shape
    k, p, m = (torch.as_tensor(v, device=x.device).expand(B)[:, None] for v in (top_k, top_p, min_p))
    if bool(((k > 0) & (k < V)).any() or (p < 1).any()):
        srt, order = x.sort(-1, descending=True)
        drop = (k > 0) & (srt < srt.gather(1, (k.clamp(1, V) - 1)))  # below the k-th largest (ties stay)
        probs = srt.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= probs.cumsum(-1) - probs >= p  # the more likely tokens already reach top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    if bool((m > 0).any()):  # keep tokens at least min_p times as likely as the most likely one
        probs = x.softmax(-1)
        x = x.masked_fill(probs < m * probs.amax(-1, keepdim=True), float("-inf"))
    return x if logits.dim() == 2 else x[0]


def batch_params(params: list[SamplingParams], device=None) -> dict[str, torch.Tensor]:
    """Per-row tensors of the parameters probabilities() takes."""
    return {"temperature": torch.tensor([p.temperature for p in params], device=device),
            "top_k": torch.tensor([p.top_k for p in params], device=device),
            "top_p": torch.tensor([p.top_p for p in params], device=device),
            "min_p": torch.tensor([p.min_p for p in params], device=device)}


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Each row's sampling distribution [B, V] (float32) from logits [B, V] (penalties already applied):
    temperature, then the filters. A temperature of 0 puts all the mass on the argmax."""
    greedy = temperature == 0
    scaled = logits.float() / torch.where(greedy, 1.0, temperature.float())[:, None]
    probs = filter_logits(scaled, top_k, top_p, min_p).softmax(-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs [B, V] (unnormalised is fine) by inverse CDF, u [B] uniform in [0, 1)."""
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].to(cdf.dtype), right=True)[:, 0]
    return token.clamp_(max=probs.shape[-1] - 1)  # rounding at the top end


def verify_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u_accept: torch.Tensor,
                  u_resample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft d drawn from q is kept with
    probability min(1, p(d) / q(d)); otherwise a token is drawn from max(0, p - q), renormalised. The token that
    comes out follows p exactly. p, q [B, V]; drafts, u_accept, u_resample [B]. Returns (kept [B], token [B])."""
    rows = torch.arange(len(drafts), device=p.device)
    kept = u_accept * q[rows, drafts] < p[rows, drafts]
    residual = (p - q).clamp_(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)  # p == q: nothing left over
    return kept, torch.where(kept, drafts, draw(residual, u_resample))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under raw logits [B, V] (log_softmax in float32, before temperature, filters and
    penalties): of each row's token tokens [B], and the `top` highest [B, top] with their ids, highest first."""
    lp = logits.float().log_softmax(-1)
    values, ids = lp.topk(top, -1)
    return lp.gather(1, tokens[:, None])[:, 0], values, ids


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] (penalties already applied)."""
    if params.greedy:
        return int(logits.argmax())
    probs = probabilities(logits[None], **batch_params([params], logits.device))
    return int(draw(probs, torch.rand(1, generator=generator, device=logits.device))[0])
