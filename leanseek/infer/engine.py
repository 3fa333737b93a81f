"""The inference engine: a latent KV cache with a slot per running sequence, chunked prefill, batched decode, and
continuous batching (a waiting request takes the slot of one that finished, between decode steps).

    engine = Engine(model, tokenizer)
    outs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.0)
    for token in engine.stream([1, 2, 3], max_new_tokens=16): ...
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model.transformer import Transformer
from .cache import LatentCache
from .sampling import SamplingParams, apply_penalties, sample


@dataclass
class _Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    slot: int = -1
    output: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # how often each token was generated (frequency/presence penalties)


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.max_len = max_len or self.cfg.max_position_embeddings
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        weight = model.lm_head.weight
        self.device = weight.device
        self.cache = LatentCache(self.cfg, max_batch, self.max_len, self.device, weight.dtype)

    def cache_bytes_per_token(self) -> int:
        """Bytes the cache holds per token: num_hidden_layers x (kv_lora_rank + qk_rope_head_dim) values."""
        return self.cache.bytes_per_token()

    def generate(self, prompts: list[list[int]], **params) -> list[list[int]]:
        """New tokens for each prompt (token id lists). Keyword arguments are SamplingParams fields; `stop` may
        hold token ids and strings (strings need the tokenizer)."""
        outs: list[list[int]] = [[] for _ in prompts]
        for index, token in self._run(prompts, params):
            outs[index].append(token)
        return outs

    def stream(self, prompt: list[int], **params) -> Iterator[int]:
        """Yield one prompt's new tokens as they are produced."""
        for _, token in self._run([prompt], params):
            yield token

    # ------------------------------------------------------------------------------------------ scheduling

    def _requests(self, prompts: list[list[int]], params: dict) -> list[_Request]:
        stop = params.pop("stop", None) or []
        ids = [s for s in stop if isinstance(s, int)]
        strings = [s for s in stop if isinstance(s, str)]
        if strings and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer: Engine(model, tokenizer)")
        if params.pop("speculative", False):
            raise NotImplementedError("MTP speculative decoding is not in the engine yet")
        requests = []
        for i, prompt in enumerate(prompts):
            p = SamplingParams(**{**params, "stop_token_ids": ids, "stop": strings})
            if not prompt:
                raise ValueError(f"request {i}: the prompt is empty")
            bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"request {i}: token ids {bad[:5]} are outside the vocabulary "
                                 f"(0..{self.cfg.vocab_size - 1})")
            if len(prompt) + p.max_new_tokens > self.max_len:
                raise ValueError(f"request {i}: prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                                 f"exceeds the context of {self.max_len}")
            g = torch.Generator(self.device).manual_seed(p.seed) if p.seed is not None else None
            requests.append(_Request(i, list(prompt), p, g))
        return requests

    @torch.no_grad()
    def _run(self, prompts: list[list[int]], params: dict) -> Iterator[tuple[int, int]]:
        waiting = deque(self._requests(prompts, dict(params)))
        active: list[_Request] = []
        free = list(range(self.max_batch - 1, -1, -1))
        while waiting or active:
            while waiting and free:  # join: prefill into a free slot
                r = waiting.popleft()
                r.slot = free.pop()
                self.cache.lengths[r.slot] = 0
                r.counts = torch.zeros(self.cfg.vocab_size, device=self.device)
                for start in range(0, len(r.prompt), self.prefill_chunk):
                    chunk = torch.tensor([r.prompt[start:start + self.prefill_chunk]], device=self.device)
                    logits = self.model.step(chunk, [r.slot], self.cache)
                token = self._next(r, logits[0, -1])
                yield r.index, token
                if self._finished(r):
                    free.append(r.slot)
                else:
                    active.append(r)
            if not active:
                continue
            ids = torch.tensor([[r.output[-1]] for r in active], device=self.device)
            logits = self.model.step(ids, [r.slot for r in active], self.cache)[:, -1]
            still = []
            for r, row in zip(active, logits):
                yield r.index, self._next(r, row)
                if self._finished(r):  # leave: the slot is free for the next waiting request
                    free.append(r.slot)
                else:
                    still.append(r)
            active = still

    def _next(self, r: _Request, logits: torch.Tensor) -> int:
        p = r.params
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            logits = apply_penalties(logits, torch.tensor(r.prompt + r.output, device=self.device), r.counts, p)
        token = sample(logits, p, r.generator)
        r.output.append(token)
        r.counts[token] += 1
        return token

    def _finished(self, r: _Request) -> bool:
        p = r.params
        if len(r.output) >= p.max_new_tokens or r.output[-1] in p.stop_token_ids:
            return True
        if p.stop:
            text = self.tokenizer.decode(r.output[-16:])  # stop strings end in the last few tokens
            return any(s in text for s in p.stop)
        return False
