"""The inference engine: a latent KV cache with a slot per running sequence, batched and chunked prefill, batched
decode, continuous batching (a waiting request takes the slot of one that finished, between decode steps), and MTP
self-speculative decoding.

    engine = Engine(model, tokenizer)
    outs = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.0)
    for token in engine.stream([1, 2, 3], max_new_tokens=16): ...

A server drives it one step at a time: `submit` a request (validated at once), call `step` for what each running
request produced, `cancel` a request whose client left. A request that fails while running ends with its error;
the others carry on.

Speculative decoding (V3 report section 2.2, "MTP in Inference"): the MTP module drafts the token after next from
the main model's last hidden state; the next step feeds [last token, draft] through the main model at once and
keeps the draft when the main model agrees (greedy) or by the speculative-sampling rule (Leviathan et al. 2023),
which leaves the sampled distribution exactly the model's. Either way one or two tokens come out of each forward.

Log-probabilities (`logprobs=N`, `prompt_logprobs=N`: the token's and its N most likely alternatives) are log_softmax
of the raw logits in float32, before temperature, filters and penalties, taken from the logits each token was
chosen from (a prompt token's: those at the position before it). Only the requests that ask pay for them.

Constrained decoding (`constraint=Grammar`, see constrain.py): before a constrained request's token is chosen, the
tokens its grammar does not allow get -inf logits (then penalties, temperature and filters as usual; its
log-probabilities stay the model's own); each committed token advances its matcher, and the request ends when the
grammar is complete. Constrained requests take the plain path, never the speculative one (a draft would need the
grammar's mask for the token after it too). Requests without a constraint pay nothing.
"""

from __future__ import annotations

import gc
import itertools
import operator
import os
import sys
import time
import types
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..model.moe import Experts
from ..model.transformer import Transformer
from .cache import LatentCache, blocks_for
from .compressed_cache import CompressedCache
from .constrain import Grammar, Matcher, mask_logits
from .quantize import QuantExperts, is_quantized
from .sampling import (SamplingParams, apply_penalties, batch_params, draw, probabilities, token_logprobs,
                       verify_drafts)


class GenerationError(RuntimeError):
    """Some requests of a generate() call failed while running. The others finished: `outputs` holds every
    request's tokens (the failed ones up to the failure), `errors` the message of each failed request."""

    def __init__(self, errors: dict[int, str], outputs: list[list[int]]):
        self.errors, self.outputs = errors, outputs
        super().__init__("; ".join(f"request {i}: {e}" for i, e in errors.items()))


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` most likely tokens at its position: (id, logprob), highest first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """What one engine step produced for one request."""

    request: int  # the id submit() returned
    tokens: list[int]
    finished: bool = False
    error: str | None = None  # set when the request failed (it is then finished)
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked (logprobs=N)
    # when the request asked (prompt_logprobs=N), on its first Output: one per prompt token, the first None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cached_tokens: int = 0  # prompt tokens whose latents came from the prefix cache


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    speculative: bool
    generator: torch.Generator | None
    slot: int = -1
    cached: int = 0  # prompt tokens whose latents came from the prefix cache
    output: list[int] = field(default_factory=list)
    sent: int = 0  # how much of output has been reported
    logprobs: list[TokenLogprob] | None = None  # one per output token, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # until the first report
    counts: torch.Tensor | None = None  # how often each token was generated (frequency/presence penalties)
    draft: int | None = None  # MTP's guess at the token after output[-1]
    draft_probs: torch.Tensor | None = None  # the distribution the draft was sampled from (None: greedy)
    matcher: Matcher | None = None  # where the request is in its constraint's grammar


GREEDY_STEPS = 4  # greedy tokens per compiled call for a lone request (Engine._steps)

# The forward passes of a decode step. Engine(compile=True) compiles them for fixed batch sizes; each returns, last,
# the latents its CacheSteps collected (empty when they wrote directly), for Engine._call to store.

def _decode_fn(model: Transformer, ids: torch.Tensor, at):
    """The main model on tokens ids [B, T]: its normed hidden states and logits."""
    h = model.step(ids, at)
    return h, model.lm_head(h), at.written


def _draft_fn(model: Transformer, hidden: torch.Tensor, ids: torch.Tensor, at):
    """The MTP module on the main model's hidden states [B, T, d] paired with the tokens after them: its logits."""
    return model.lm_head(model.mtp_step(hidden, ids, at)[1]), at.written


def _greedy_speculative_fn(model: Transformer, ids: torch.Tensor, at, draft_at):
    """A greedy speculative step in one pass, ids [B, 2] = [last token, draft]. The main model's choices
    top [B, 2] (after the last token, after the draft) settle everything: the draft stands if top[:, 0] equals
    it, and the MTP module's pairs are then (h_0, draft = top_0), (h_1, top_1), or else (h_0, top_0) and a
    placeholder; so the next drafts [B, 2] (after each pair) come out of the same pass."""
    h = model.step(ids, at)
    top = model.lm_head(h).argmax(-1)
    drafts = model.lm_head(model.mtp_step(h, top, draft_at)[1]).argmax(-1)
    return top, drafts, at.written, draft_at.written


def _greedy_steps_fn(model: Transformer, ids: torch.Tensor, at):
    """at.T greedy tokens [B, T] after the last ones ids [B, 1], each the argmax after the one before: several
    decode steps in one compiled call, so the engine's Python and torch.compile's wrappers run once for them."""
    tokens = []
    for k in range(at.T):
        ids = model.lm_head(model.step(ids, at.substep(k))).argmax(-1)
        tokens.append(ids)
    return torch.cat(tokens, dim=1), at.written


def compile_cache() -> Path:
    """Where torch.compile keeps what it builds, so that a restart loads the decode steps instead of compiling them
    again: $TORCHINDUCTOR_CACHE_DIR if set, else leanseek's folder in the user's cache (~/.cache/leanseek), which,
    unlike torch's default under /tmp, outlives a reboot."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / "leanseek" / "torch-compile")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def _own_copy(fn, engine: int):
    """fn with a code object of its own. torch.compile keeps graphs per code object, so an engine compiling its
    own copies gets graphs for its model alone, and their guards can leave the model's modules unchecked."""
    return types.FunctionType(fn.__code__.replace(co_name=f"{fn.__name__}_engine{engine}"), fn.__globals__,
                              fn.__name__)


class Engine:
    _instances = itertools.count()

    def __init__(self, model: Transformer, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, compile: bool = False, cache_tokens: int | None = None,
                 prefix_cache: bool = True):
        """max_batch sequences run at once, each up to max_len tokens (prompt and output). prefill_chunk: the most
        prompt tokens one prefill forward runs (padding included): the prompts admitted together are prefilled in
        batches of about that many tokens, a longer prompt alone in chunks of that many. compile: run decode steps
        through torch.compile, which takes a while on first use and then removes most per-step overhead.
        cache_tokens: positions the paged latent cache holds for all sequences together (default max_batch x
        max_len); a request waits until its worst case (prompt + max_new_tokens) fits beside the running ones'.
        prefix_cache: reuse the cached latents of a prompt's longest prefix seen before (in blocks of
        cache.BLOCK tokens), prefilling only the rest."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.max_len = max_len or self.cfg.max_position_embeddings
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        weight = model.embed_tokens.weight  # the head's may be quantised
        self.device, self.dtype = weight.device, weight.dtype
        if cache_tokens is not None and cache_tokens < self.max_len:
            raise ValueError(f"cache_tokens ({cache_tokens}) must hold at least one sequence of max_len "
                             f"({self.max_len}) tokens")
        if self.cfg.v4:  # its decode state (compressed_cache.py) is per sequence, moves forward only, and eager
            if compile:
                raise ValueError("compile: DeepSeek-V4 models decode eagerly")
            self.cache = CompressedCache(model, max_batch, self.max_len, self.device, self.dtype)
            prefix_cache = False
        else:
            self.cache = LatentCache(self.cfg, max_batch, self.max_len, self.device, self.dtype, tokens=cache_tokens)
        self.prefix_cache = prefix_cache
        self.draft_cache: LatentCache | None = None  # the MTP module's own, made by the first speculative request
        # tokens through the model (prompt tokens prefilled, tokens generated), prompt tokens reused from the prefix
        # cache, and MTP drafts made / accepted
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "drafted": 0, "accepted": 0}
        # compiled decode steps: padded to a power-of-two batch, attending over the filled positions rounded up to
        # a multiple of cache.BUCKET (a dimension left dynamic: one graph per batch size whatever the lengths)
        self._compiled = None
        experts = [m for m in model.modules() if isinstance(m, (Experts, QuantExperts))]
        self._experts = experts[0] if experts else None
        if compile and is_quantized(model):
            raise ValueError("compile: quantised models decode eagerly (their experts' shapes follow the routing)")
        if compile:  # one graph per power-of-two batch, for 1 and 2 tokens a step
            compile_cache()
            graphs = 2 * max_batch.bit_length()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
            # checking the guards on the model's modules and parameters took 0.16 ms of a 1 ms batch-1 step on the
            # tiny model; the model is fixed for the engine's life (weights may change in place, not shapes)
            n = next(self._instances)
            options = {"cpp_wrapper": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            self._compiled = {fn: torch.compile(_own_copy(fn, n), dynamic=False, fullgraph=True, options=options)
                              for fn in (_decode_fn, _draft_fn, _greedy_speculative_fn, _greedy_steps_fn)}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._free = list(range(max_batch - 1, -1, -1))
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------ reports

    def cache_bytes_per_token(self) -> int:
        """Bytes the cache holds per token: num_hidden_layers x (kv_lora_rank + qk_rope_head_dim) values."""
        return self.cache.bytes_per_token()

    def memory_report(self) -> dict[str, float]:
        """The latent cache against what standard multi-head attention with the same heads and head sizes would
        cache (every head's key and value), per token and for the engine's max_batch x max_len. V4: what its
        compressed decode state grows by per token, and holds for max_batch sequences of max_len."""
        if self.cfg.v4:
            return {"bytes_per_token": self.cache.bytes_per_token(),
                    "cache_bytes": self.cfg.kv_cache_values(self.max_len) * self.dtype.itemsize * self.max_batch}
        values = self.cfg.kv_cache_values_per_token()
        size = self.cache.kv.element_size()
        tokens = self.cache.capacity
        return {"mla_bytes_per_token": values["mla"] * size, "mha_bytes_per_token": values["mha"] * size,
                "mla_cache_bytes": values["mla"] * size * tokens, "mha_cache_bytes": values["mha"] * size * tokens,
                "reduction": 1 - values["mla"] / values["mha"]}

    def cache_usage(self) -> float:
        """The fraction of the latent cache's blocks that running requests hold."""
        return self.cache.held_tokens() / self.cache.capacity

    @property
    def processed_tokens(self) -> int:
        """Tokens through the model so far: prompt tokens prefilled and tokens generated."""
        return self.stats["prompt_tokens"] + self.stats["generated_tokens"]

    @property
    def acceptance_rate(self) -> float | None:
        """The fraction of MTP drafts the main model accepted so far (None before any)."""
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else None

    def warm_up(self, progress: bool = True) -> list[int]:
        """Compile the decode step for every batch size a compiled step runs at (or load it from the compile cache,
        compile_cache), so that no request waits for a compilation. Returns those batch sizes ([] uncompiled)."""
        sizes = sorted({pad for b in range(1, self.max_batch + 1) if (pad := self._pad(b, 1)) is not None})
        start = time.perf_counter()
        for size in tqdm(sizes, desc="compiling decode steps", unit="batch size", disable=not progress or not sizes):
            # one request alone also takes GREEDY_STEPS tokens at a time, then single steps near its end
            self.generate([[0]] * min(size, self.max_batch), max_new_tokens=GREEDY_STEPS + 2 if size == 1 else 2)
        if sizes:  # compiling leaves ~600K Python objects that each full garbage collection during decoding would
            gc.collect()  # walk (5-10% of a batch-1 step on the tiny model): move them out of the collector's way
            gc.freeze()
        self.stats = dict.fromkeys(self.stats, 0)  # the counts are of requests served
        if progress and sizes:
            print(f"decode steps ready in {time.perf_counter() - start:.0f} s (compile cache: {compile_cache()})",
                  file=sys.stderr)
        return sizes

    # ------------------------------------------------------------------------------------------ the API

    def generate(self, prompts: list[list[int]], **params) -> list[list[int]]:
        """New tokens for each prompt (token id lists). Keyword arguments are SamplingParams fields, plus `stop`
        (token ids and strings; strings need the tokenizer), `speculative` and `constraint` (a Grammar, see
        constrain.py); `seed` may be a list, one per prompt (several samples of one prompt). Bad input raises
        ValueError before anything runs; failures while running raise GenerationError once the others have
        finished. Log-probabilities (logprobs, prompt_logprobs) come in step()'s Outputs, not here."""
        seeds = params.get("seed")
        if isinstance(seeds, (list, tuple)) and len(seeds) != len(prompts):
            raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts")
        requests = [self._request(p, {**params, "seed": seeds[i]} if isinstance(seeds, (list, tuple)) else params,
                                  f"request {i}") for i, p in enumerate(prompts)]
        index = {r.id: i for i, r in enumerate(requests)}
        outs: list[list[int]] = [[] for _ in prompts]
        errors: dict[int, str] = {}
        self._waiting.extend(requests)
        left = len(requests)
        try:
            while left:
                for o in self.step():
                    i = index.get(o.request)
                    if i is None:  # someone else's request
                        continue
                    outs[i].extend(o.tokens)
                    if o.error:
                        errors[i] = o.error
                    left -= o.finished
        finally:
            for r in requests:
                self.cancel(r.id)
        if errors:
            raise GenerationError(errors, outs)
        return outs

    def stream(self, prompt: list[int], **params) -> Iterator[int]:
        """Yield one prompt's new tokens as they are produced."""
        r = self._request(prompt, params, "the request")
        self._waiting.append(r)
        try:
            while True:
                for o in self.step():
                    if o.request != r.id:
                        continue
                    yield from o.tokens
                    if o.error:
                        raise GenerationError({0: o.error}, [r.output])
                    if o.finished:
                        return
        finally:
            self.cancel(r.id)

    def submit(self, prompt: list[int], **params) -> int:
        """Queue a request; returns its id. Raises ValueError naming the problem for bad input."""
        r = self._request(prompt, params, "the request")
        self._waiting.append(r)
        return r.id

    def cancel(self, request: int) -> bool:
        """Drop a waiting or running request (its slot is free for the next); False if it is not here."""
        for r in self._waiting:
            if r.id == request:
                self._waiting.remove(r)
                return True
        for r in self._running:
            if r.id == request:
                self._release(r)
                return True
        return False

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self._waiting) + len(self._running)

    @torch.no_grad()
    def step(self) -> list[Output]:
        """Admit waiting requests into free slots (prefill, first token), then one decode step for the running
        ones: a token each, or one or two for speculative ones."""
        outs: list[Output] = []
        admitted = []
        while self._waiting and self._free and self._admit(self._waiting[0]):
            r = self._waiting.popleft()
            self._running.append(r)
            admitted.append(r)
        for batch in self._prefill_batches(admitted):
            self._guarded(batch, outs, lambda batch=batch: self._prefill(batch, outs))
        plain = [r for r in self._running if r.draft is None]
        if plain:
            self._guarded(plain, outs, lambda: self._decode_plain(plain, outs))
        drafted = [r for r in self._running if r.draft is not None]
        if drafted:
            self._guarded(drafted, outs, lambda: self._decode_speculative(drafted, outs))
        return outs

    # ------------------------------------------------------------------------------------------ requests

    def _blocks(self, r: _Request) -> int:
        """The most cache blocks a request can hold: its prompt, its output and a speculative step's draft."""
        return blocks_for(min(len(r.prompt) + r.params.max_new_tokens + 1, self.max_len))

    def _admit(self, r: _Request) -> bool:
        """Give the request a slot, and its prompt's cached prefix, if its worst case fits in the blocks the
        running requests' worst cases leave; else leave it waiting."""
        slot = self._free[-1]
        cache = self.cache
        if self.prefix_cache and not r.speculative and r.params.prompt_logprobs is None:
            # the MTP module's cache and prompt log-probabilities need every prompt position computed
            cache.match(slot, r.prompt)
        promised = sum(max(0, self._blocks(o) - len(cache.tables[o.slot])) for o in self._running)
        if self._blocks(r) - len(cache.tables[slot]) > cache.available() - promised:
            cache.release(slot)
            return False
        r.slot = self._free.pop()
        r.cached = cache.lengths[slot]
        self.stats["cached_tokens"] += r.cached
        return True

    def _request(self, prompt: list[int], params: dict, name: str) -> _Request:
        params = dict(params)
        stop = params.pop("stop", None) or []
        if isinstance(stop, (str, int)):
            stop = [stop]
        if any(not isinstance(s, (str, int)) for s in stop):
            raise ValueError(f"{name}: stop must hold token ids and strings, got {stop!r}")
        constraint = params.pop("constraint", None)
        if constraint is not None and not isinstance(constraint, Grammar):
            raise ValueError(f"{name}: constraint must be a Grammar (leanseek.infer.constrain), not "
                             f"{type(constraint).__name__}")
        speculative = bool(params.pop("speculative", False)) and constraint is None
        try:
            p = SamplingParams(**params, stop_token_ids=[s for s in stop if isinstance(s, int)],
                               stop=[s for s in stop if isinstance(s, str)])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None
        if p.stop and self.tokenizer is None:
            raise ValueError(f"{name}: stop strings need the engine's tokenizer: Engine(model, tokenizer)")
        if not prompt:
            raise ValueError(f"{name}: the prompt is empty")
        try:
            prompt = [operator.index(t) for t in prompt]
        except TypeError:
            raise ValueError(f"{name}: the prompt must be a list of token ids (integers)") from None
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"{name}: token ids {bad[:5]} are outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if len(prompt) >= self.max_len:
            raise ValueError(f"{name}: the prompt ({len(prompt)} tokens) leaves no room in the context of "
                             f"{self.max_len}")
        if len(prompt) + p.max_new_tokens > self.max_len:
            raise ValueError(f"{name}: prompt ({len(prompt)} tokens) + max_new_tokens ({p.max_new_tokens}) "
                             f"exceeds the context of {self.max_len}")
        if speculative and self.cfg.v4:
            raise ValueError(f"{name}: speculative decoding is not available for DeepSeek-V4 models (their decode "
                             "state cannot take back a rejected draft)")
        if speculative and not len(self.model.mtp):
            raise ValueError(f"{name}: speculative decoding drafts with an MTP module, and this model has none "
                             "(num_nextn_predict_layers=0)")
        g = torch.Generator(self.device).manual_seed(p.seed) if p.seed is not None else None
        return _Request(next(self._ids), list(prompt), p, speculative, g,
                        logprobs=None if p.logprobs is None else [],
                        matcher=None if constraint is None else constraint.matcher())

    def _guarded(self, requests: list[_Request], outs: list[Output], work) -> None:
        """Run `work` for these requests; if it fails, they end with the error and the engine carries on."""
        try:
            work()
        except Exception as e:  # noqa: BLE001 - whatever broke, it is reported on the requests it broke
            for r in requests:
                if r in self._running:
                    self._release(r)
                    outs.append(self._report(r, True, f"{type(e).__name__}: {e}"))

    def _release(self, r: _Request) -> None:
        self._running.remove(r)
        if self.prefix_cache:  # what the slot computed stays cached for a request that continues it
            self.cache.publish(r.slot, (r.prompt + r.output)[: self.cache.lengths[r.slot]])
        self.cache.release(r.slot)
        if self.draft_cache is not None:
            self.draft_cache.release(r.slot)
        self._free.append(r.slot)
        r.draft = r.draft_probs = None

    def _report(self, r: _Request, finished: bool = False, error: str | None = None) -> Output:
        out = Output(r.id, r.output[r.sent:], finished, error, None if r.logprobs is None else r.logprobs[r.sent:],
                     r.prompt_logprobs, r.cached)
        r.sent, r.prompt_logprobs = len(r.output), None
        return out

    def _emit(self, r: _Request, tokens: list[int], outs: list[Output],
              logprobs: list[TokenLogprob | None] | None = None) -> None:
        """Commit new tokens up to a stop (with their log-probabilities, when the request asked); report them;
        free the slot of a finished request."""
        for i, token in enumerate(tokens):
            r.output.append(token)
            if r.matcher is not None:
                r.matcher.advance(token)
            if r.logprobs is not None:
                r.logprobs.append(logprobs[i])
            self.stats["generated_tokens"] += 1
            if r.counts is not None:
                r.counts[token] += 1
            if self._finished(r):
                outs.append(self._report(r, True))
                self._release(r)
                return
        outs.append(self._report(r))

    def _finished(self, r: _Request) -> bool:
        p = r.params
        if len(r.output) >= p.max_new_tokens or r.output[-1] in p.stop_token_ids:
            return True
        if r.matcher is not None and r.matcher.done:
            return True
        if p.stop:
            text = self.tokenizer.decode(r.output[-16:])  # stop strings end in the last few tokens
            return any(s in text for s in p.stop)
        return False

    # ------------------------------------------------------------------------------------------ choosing tokens

    @staticmethod
    def _plain_greedy(r: _Request) -> bool:
        return r.params.greedy and not r.params.penalised

    def _penalised(self, r: _Request, logits: torch.Tensor, pending: int | None = None) -> torch.Tensor:
        """The request's penalties applied to logits [V], as if `pending` (a token not yet committed) followed."""
        p = r.params
        if not p.penalised:
            return logits
        if r.counts is None:
            r.counts = torch.zeros(self.cfg.vocab_size, device=self.device)
            for t in r.output:
                r.counts[t] += 1
        seen, counts = r.prompt + r.output, r.counts
        if pending is not None:
            seen, counts = seen + [pending], counts.clone()
            counts[pending] += 1
        return apply_penalties(logits, torch.tensor(seen, device=self.device), counts, p)

    def _probs(self, rows: list[_Request], logits: torch.Tensor, pending: list[int] | None = None) -> torch.Tensor:
        """Each request's sampling distribution [B, V] from its logits [B, V], penalties applied."""
        logits = torch.stack([self._penalised(r, row, None if pending is None else pending[i])
                              for i, (r, row) in enumerate(zip(rows, logits))])
        return probabilities(logits, **batch_params([r.params for r in rows], self.device))

    def _uniform(self, rows: list[_Request]) -> torch.Tensor:
        """One uniform number per request, from its own generator when it has a seed."""
        return torch.cat([torch.rand(1, generator=r.generator, device=self.device) for r in rows])

    def _choose(self, rows: list[_Request], logits: torch.Tensor) -> list[int]:
        """The next token of each request from its logits [B, V]: one argmax for all plain greedy requests, one
        batched draw for the others; constrained requests choose among what their grammar allows."""
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if constrained:
            logits = mask_logits(logits, constrained, [rows[i].matcher for i in constrained])
        tokens = logits.argmax(-1).tolist()
        rest = [i for i, r in enumerate(rows) if not self._plain_greedy(r)]
        if rest:
            sub = [rows[i] for i in rest]
            for i, t in zip(rest, draw(self._probs(sub, logits[rest]), self._uniform(sub)).tolist()):
                tokens[i] = t
        return tokens

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[TokenLogprob]:
        """Each row's token under its logits [N, V], with top[i] alternatives."""
        chosen, values, ids = token_logprobs(logits, torch.tensor(tokens, device=logits.device), max(top))
        return [TokenLogprob(t, c, list(zip(i[:n], v[:n])))
                for t, c, v, i, n in zip(tokens, chosen.tolist(), values.tolist(), ids.tolist(), top)]

    def _token_logprobs(self, rows: list[_Request], logits: torch.Tensor,
                        tokens: list[int]) -> list[TokenLogprob | None]:
        """The log-probability of the token each request chose from logits [B, V], for the requests that asked
        (None for the others; nothing is computed when none asked)."""
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(rows)
        if asked:
            if len(asked) < len(rows):
                logits = logits[asked]
            entries = self._logprobs(logits, [tokens[i] for i in asked], [rows[i].params.logprobs for i in asked])
            for i, e in zip(asked, entries):
                out[i] = e
        return out

    def _score_prompts(self, batch: list[_Request], hidden: torch.Tensor) -> None:
        """The prompt log-probabilities of the requests in batch that asked, from the prefill's hidden states
        [B, T, d]: token i's from the logits at position i - 1. The positions of all of them go through lm_head
        prefill_chunk at a time, so a long prompt never holds its whole [T, V] logits."""
        rows = [i for i, r in enumerate(batch) if r.params.prompt_logprobs is not None]
        index = [(i, t) for i in rows for t in range(len(batch[i].prompt) - 1)]
        tokens = [batch[i].prompt[t + 1] for i, t in index]
        top = [batch[i].params.prompt_logprobs for i, _ in index]
        entries: list[TokenLogprob] = []
        for start in range(0, len(index), self.prefill_chunk):
            part = index[start:start + self.prefill_chunk]
            h = hidden[[i for i, _ in part], [t for _, t in part]]
            entries += self._logprobs(self.model.lm_head(h), tokens[start:start + len(part)],
                                      top[start:start + len(part)])
        for i in rows:
            n = len(batch[i].prompt) - 1
            batch[i].prompt_logprobs, entries = [None] + entries[:n], entries[n:]

    def _propose(self, rows: list[_Request], logits: torch.Tensor) -> None:
        """Draft the token after each request's last one from MTP logits [B, V], processed as the main model's
        will be, keeping the distribution it was drawn from for the acceptance rule."""
        q = self._probs(rows, logits)
        for r, d, qr in zip(rows, draw(q, self._uniform(rows)).tolist(), q):
            r.draft, r.draft_probs = d, qr
            self._drop_draft_if_last(r)

    # ------------------------------------------------------------------------------------------ forward passes

    def _pad(self, B: int, T: int) -> int | None:
        """The batch a compiled decode step runs at (a power of two), or None to run eagerly: compiled while the
        experts' path for that many tokens has no data-dependent shapes (Experts.inference_path)."""
        if self._compiled is None:
            return None
        pad = 1 << (B - 1).bit_length()
        static = self._experts is None or self._experts.inference_path(pad * T) != "grouped"
        return pad if static else None

    def _tokens(self, ids: list[list[int]], pad: int | None) -> torch.Tensor:
        return torch.tensor(ids + [[0] * len(ids[0])] * ((pad or 0) - len(ids)), device=self.device)

    def _call(self, fn, steps: list, *args) -> tuple:
        """fn(model, *args, *steps), compiled when the steps have fixed shapes; then the latents are stored and
        the cache positions counted."""
        out = (self._compiled[fn] if steps[0].fixed else fn)(self.model, *args, *steps)
        for at, written in zip(steps, out[-len(steps):]):
            at.store(written)
            at.advance()
        return out[: -len(steps)]

    def _prefill_batches(self, requests: list[_Request]) -> list[list[_Request]]:
        """Requests to prefill together: by the length of what is left to compute (the prompt past its cached
        prefix), as many as fit prefill_chunk tokens with the padding to the longest (so a step's many samples of
        one prompt go in one forward)."""
        batches: list[list[_Request]] = []
        for r in sorted(requests, key=lambda r: len(r.prompt) - r.cached):
            if batches and (len(batches[-1]) + 1) * (len(r.prompt) - r.cached) <= self.prefill_chunk:
                batches[-1].append(r)
            else:
                batches.append([r])
        return batches

    def _run_prompts(self, cache: LatentCache, batch: list[_Request], seqs: list[list[int]], forward,
                     keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run token sequences seqs (one per request, ragged) into the requests' slots of `cache`, each after the
        positions its slot holds, prefill_chunk columns per forward(ids [B, t], at, start). Shorter sequences are
        padded at the end (the padding's latents go to the cache's scratch block). Returns each sequence's last
        output [B, d] and, when keep, all of them [B, T, d]."""
        slots, lengths = [r.slot for r in batch], [len(x) for x in seqs]
        outs, last = [], None
        for start in range(0, max(lengths), self.prefill_chunk):
            width = min(self.prefill_chunk, max(lengths) - start)
            ids = [x[start:start + width] + [0] * (width - len(x[start:start + width])) for x in seqs]
            at = cache.step(slots, width, counts=[min(width, max(0, n - start)) for n in lengths])
            h = forward(torch.tensor(ids, device=self.device), at, start)
            at.advance()
            if keep:
                outs.append(h)
            if last is None:
                last = h.new_empty(len(batch), h.shape[-1])
            ends = [(i, n - 1 - start) for i, n in enumerate(lengths) if start <= n - 1 < start + width]
            if ends:  # the sequences that end in this chunk
                rows, cols = map(list, zip(*ends))
                last[rows] = h[rows, cols]
        return last, torch.cat(outs, dim=1) if keep else None

    def _prefill(self, batch: list[_Request], outs: list[Output]) -> None:
        """The prompts of `batch` through the model (batched, ragged), their log-probabilities for the requests
        that asked, each request's first token (a request with max_new_tokens=0 only scores its prompt: it ends
        here), and the MTP module's first draft for speculative ones."""
        self.stats["prompt_tokens"] += sum(len(r.prompt) - r.cached for r in batch)
        speculative = any(r.speculative for r in batch)
        scored = any(r.params.prompt_logprobs is not None for r in batch)
        last, hidden = self._run_prompts(self.cache, batch, [r.prompt[r.cached:] for r in batch],
                                         lambda ids, at, start: self.model.step(ids, at), speculative or scored)
        if self.prefix_cache:  # a request arriving while these run can reuse their prompts
            for r in batch:
                self.cache.publish(r.slot, r.prompt)
        if scored:
            self._score_prompts(batch, hidden)
        for r in batch:
            if not r.params.max_new_tokens:
                outs.append(self._report(r, True))
                self._release(r)
        rows = [i for i, r in enumerate(batch) if r.params.max_new_tokens]
        going = [batch[i] for i in rows]
        if going:
            logits = self.model.lm_head(last if len(rows) == len(batch) else last[rows])
            tokens = self._choose(going, logits)
            for r, token, lp in zip(going, tokens, self._token_logprobs(going, logits, tokens)):
                self._guarded([r], outs, lambda r=r, token=token, lp=lp: self._emit(r, [token], outs, [lp]))
        rows = [i for i, r in enumerate(batch) if r.speculative and r in self._running]
        if rows:
            self._prefill_draft([batch[i] for i in rows], hidden[rows])

    def _prefill_draft(self, batch: list[_Request], hidden: torch.Tensor) -> None:
        """The MTP module over the prompts: position i pairs the main hidden state [B, T, d] with token i+1 (the
        last with the first generated token); its last output drafts the token after that."""
        if self.draft_cache is None:
            self.draft_cache = LatentCache(self.cfg, self.max_batch, self.max_len, self.device, self.dtype, layers=1)

        def forward(ids, at, start):
            return self.model.mtp_step(hidden[:, start:start + ids.shape[1]], ids, at)[1]

        following = [r.prompt[1:] + r.output[-1:] for r in batch]
        last, _ = self._run_prompts(self.draft_cache, batch, following, forward, False)
        self._propose(batch, self.model.lm_head(last))

    def _drop_draft_if_last(self, r: _Request) -> None:
        """With one token left to generate, a draft has nothing to add (and could run past the context)."""
        if len(r.output) + 1 >= r.params.max_new_tokens:
            r.draft = r.draft_probs = None

    def _steps(self, batch: list[_Request], pad: int | None) -> int:
        """Tokens the next decode step makes: GREEDY_STEPS in one compiled call (pad 1: a lone request, compiled)
        for a request that is plain greedy with nothing to check between its tokens (no stop strings, grammar or
        log-probabilities) and at least that many tokens to go (so that the cache blocks it was admitted with hold
        them), else 1."""
        if pad != 1:
            return 1
        r = batch[0]
        p = r.params
        if (not self._plain_greedy(r) or r.matcher is not None or p.logprobs is not None or p.stop
                or len(r.output) + GREEDY_STEPS > p.max_new_tokens):
            return 1
        return GREEDY_STEPS

    def _decode_plain(self, batch: list[_Request], outs: list[Output]) -> None:
        pad = self._pad(len(batch), 1)
        steps = self._steps(batch, pad)
        at = self.cache.step([r.slot for r in batch], steps, pad)
        ids = self._tokens([[r.output[-1]] for r in batch], pad)
        if steps > 1:  # the tokens after a stop token are dropped with the request's slot
            tokens = self._call(_greedy_steps_fn, [at], ids)[0][: len(batch)].tolist()
            for r, row in zip(batch, tokens):
                self._guarded([r], outs, lambda r=r, row=row: self._emit(r, row, outs))
            return
        _, logits = self._call(_decode_fn, [at], ids)
        logits = logits[: len(batch), -1]
        tokens = self._choose(batch, logits)
        for r, token, lp in zip(batch, tokens, self._token_logprobs(batch, logits, tokens)):
            self._guarded([r], outs, lambda r=r, token=token, lp=lp: self._emit(r, [token], outs, [lp]))

    def _decode_speculative(self, batch: list[_Request], outs: list[Output]) -> None:
        greedy = [r for r in batch if self._plain_greedy(r)]
        if greedy:
            self._guarded(greedy, outs, lambda: self._speculate_greedy(greedy, outs))
        sampled = [r for r in batch if not self._plain_greedy(r)]
        if sampled:
            self._guarded(sampled, outs, lambda: self._speculate(sampled, outs))

    def _speculate_greedy(self, batch: list[_Request], outs: list[Output]) -> None:
        """One greedy speculative step: in one pass, or, when a request asks for log-probabilities, in two (the
        main model, whose logits they come from, then the MTP module on its choices), with the same tokens."""
        B = len(batch)
        pad = self._pad(B, 2)
        slots = [r.slot for r in batch]
        steps = [self.cache.step(slots, 2, pad), self.draft_cache.step(slots, 2, pad)]
        ids = self._tokens([[r.output[-1], r.draft] for r in batch], pad)
        logits = None
        if any(r.params.logprobs is not None for r in batch):
            h, logits = self._call(_decode_fn, steps[:1], ids)
            top = logits.argmax(-1)
            (drafts,) = self._call(_draft_fn, steps[1:], h, top)
            drafts = drafts.argmax(-1)
        else:
            top, drafts = self._call(_greedy_speculative_fn, steps, ids)
        top = top[:B].tolist()
        lps = [(None, None)] * B if logits is None else zip(
            self._token_logprobs(batch, logits[:B, 0], [t0 for t0, _ in top]),
            self._token_logprobs(batch, logits[:B, 1], [t1 for _, t1 in top]))
        for r, (t0, t1), (d0, d1), lp in zip(batch, top, drafts.tolist(), lps):
            ok = t0 == r.draft
            self.stats["drafted"] += 1
            self.stats["accepted"] += ok
            if not ok:  # the draft's position and the placeholder pair are rolled back
                self.cache.lengths[r.slot] -= 1
                self.draft_cache.lengths[r.slot] -= 1
            r.draft = None
            self._guarded([r], outs, lambda r=r, new=[t0, t1] if ok else [t0], lp=lp: self._emit(r, new, outs, lp))
            if r in self._running:
                r.draft = d1 if ok else d0
                self._drop_draft_if_last(r)

    def _speculate(self, batch: list[_Request], outs: list[Output]) -> None:
        """Speculative steps that need the sampler between the main model and the MTP module (sampling,
        penalties): the acceptance rule keeps the output distributed as the main model's."""
        B = len(batch)
        pad = self._pad(B, 2)
        at = self.cache.step([r.slot for r in batch], 2, pad)
        h, logits = self._call(_decode_fn, [at], self._tokens([[r.output[-1], r.draft] for r in batch], pad))
        drafts = [r.draft for r in batch]
        p = self._probs(batch, logits[:B, 0])
        q = torch.stack([r.draft_probs for r in batch])
        kept, first = verify_drafts(p, q, torch.tensor(drafts, device=self.device), self._uniform(batch),
                                    self._uniform(batch))
        # the token after an accepted draft, drawn as if the draft were already committed (penalties)
        bonus = draw(self._probs(batch, logits[:B, 1], pending=drafts), self._uniform(batch)).tolist()
        first = first.tolist()
        lps = zip(self._token_logprobs(batch, logits[:B, 0], first), self._token_logprobs(batch, logits[:B, 1], bonus))
        for r, ok, t0, t1, lp in zip(batch, kept.tolist(), first, bonus, lps):
            self.stats["drafted"] += 1
            self.stats["accepted"] += ok
            r.draft = r.draft_probs = None
            if not ok:
                self.cache.lengths[r.slot] -= 1
            self._guarded([r], outs, lambda r=r, new=[t0, t1] if ok else [t0], lp=lp: self._emit(r, new, outs, lp))
        # the MTP module continues from every committed position: after an accepted draft, the pairs (h of the
        # last token, draft) and (h of the draft, bonus token); after a rejection only the first pair counts, so
        # the second (a placeholder) is rolled back like the main cache's rejected position
        keep = [(i, r, ok) for i, (r, ok) in enumerate(zip(batch, kept.tolist())) if r in self._running]
        if not keep:
            return
        pad = self._pad(len(keep), 2)
        hidden = h[[i for i, _, _ in keep]]
        if pad is not None and pad > len(keep):
            hidden = torch.cat([hidden, hidden.new_zeros(pad - len(keep), *hidden.shape[1:])])
        at = self.draft_cache.step([r.slot for _, r, _ in keep], 2, pad)
        (draft_logits,) = self._call(_draft_fn, [at], hidden,
                                     self._tokens([r.output[-2:] if ok else r.output[-1:] * 2 for _, r, ok in keep],
                                                  pad))
        for _, r, ok in keep:
            if not ok:
                self.draft_cache.lengths[r.slot] -= 1
        rows = [r for _, r, _ in keep]
        self._guarded(rows, outs, lambda: self._propose(
            rows, draft_logits[torch.arange(len(keep)), torch.tensor([int(ok) for _, _, ok in keep])]))
