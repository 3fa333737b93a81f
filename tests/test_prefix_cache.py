"""The paged latent cache and prefix reuse: outputs are the same with reuse on and off (and the full forward's
argmax), the prompt positions reused are exactly the full blocks a request shares with what was computed before,
and the pool holds the blocks sequences use, not max_len per slot."""

import pytest
import torch
from conftest import randomise, small_config
from test_engine import reference_greedy

import leanseek
from leanseek import Engine
from leanseek.infer.cache import BLOCK, LatentCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(leanseek.Transformer(small_config(vocab_size=97, num_nextn_predict_layers=1)), seed=11)


SYSTEM = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(3)).tolist()  # two full blocks and 8


def test_block_tables_share_by_reference_count(model):
    cache = LatentCache(model.cfg, slots=2, max_len=64, tokens=64)  # 4 blocks
    cache.reserve(0, 40)
    cache.lengths[0] = 40
    cache.publish(0, SYSTEM)
    assert len(cache.tables[0]) == 3 and len(cache.named) == 2  # the partial third block has no name
    assert cache.match(1, SYSTEM + [5]) == 2 * BLOCK and cache.tables[1] == cache.tables[0][:2]
    assert cache.available() == 1 and cache.held_tokens() == 3 * BLOCK
    cache.release(0)
    assert cache.available() == 2 and cache.held_tokens() == 2 * BLOCK  # slot 1 still holds the shared two
    cache.release(1)
    assert cache.available() == 4 and len(cache.idle) == 2  # cached, not free: a later prompt can match them
    assert cache.match(0, SYSTEM[:33]) == 2 * BLOCK
    cache.release(0)
    assert cache.match(0, SYSTEM[:32]) == BLOCK  # the last token is always computed, never matched
    cache.release(0)
    changed = [SYSTEM[0] + 1] + SYSTEM[1:]
    assert cache.match(0, changed) == 0  # a block's name covers every token before it, not its own alone
    cache.release(0)
    cache.reserve(0, 64)  # needs every block: the cached ones are evicted
    assert not cache.named and cache.available() == 0
    cache.release(0)
    assert cache.match(0, SYSTEM) == 0


def test_shared_prefix_reuse_is_exact(model):
    """Requests sharing a 40-token prefix: each after the first reuses its two full blocks, and every output is
    the one computed without reuse."""
    prompts = [SYSTEM + [i, i + 1, i + 2] for i in range(5)]
    ref = [reference_greedy(model, p, 8) for p in prompts]
    off = Engine(model, max_batch=2, max_len=96, prefix_cache=False)
    assert off.generate(prompts, max_new_tokens=8) == ref and off.stats["cached_tokens"] == 0
    on = Engine(model, max_batch=2, max_len=96)
    assert on.generate(prompts[:1], max_new_tokens=8) == ref[:1] and on.stats["cached_tokens"] == 0
    assert on.generate(prompts[1:], max_new_tokens=8) == ref[1:]
    assert on.stats["cached_tokens"] == 4 * 2 * BLOCK
    assert on.stats["prompt_tokens"] == len(prompts[0]) + 4 * (len(prompts[0]) - 2 * BLOCK)
    # sampled: the same draws with and without reuse
    kw = dict(max_new_tokens=8, temperature=1.0, seed=[1, 2, 3, 4, 5])
    assert on.generate(prompts, **kw) == off.generate(prompts, **kw)


def test_a_chat_reuses_its_history(model):
    """Each turn's prompt is the last one, the reply and a new message: it reuses every full block the last turn
    computed (its prompt and all of its reply but the last token, which was never fed back)."""
    on, off = Engine(model, max_batch=1, max_len=200), Engine(model, max_batch=1, max_len=200, prefix_cache=False)
    prompt, held = SYSTEM[:20], 0
    for turn in range(6):
        before = on.stats["cached_tokens"]
        out = on.generate([prompt], max_new_tokens=10)[0]
        assert out == off.generate([prompt], max_new_tokens=10)[0] == reference_greedy(model, prompt, 10)
        assert on.stats["cached_tokens"] - before == min(held // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK
        held = len(prompt) + len(out) - 1
        prompt = prompt + out + [turn + 3] * 5
    assert on.stats["cached_tokens"] > 0.6 * on.stats["prompt_tokens"]


def test_the_pool_holds_what_sequences_use(model):
    """Four slots over a pool of 64 positions: short requests run four at once, each holding one block; requests
    whose worst case (prompt + max_new_tokens) needs three blocks run one at a time; both give the full forward's
    tokens. A reused prefix evicted for a new request is simply recomputed."""
    engine = Engine(model, max_batch=4, max_len=64, cache_tokens=64)
    for prompts, new, at_once in [([[i, 2 * i, 3] for i in range(1, 5)], 8, 4), ([SYSTEM[:12] + [i] for i in range(3)],
                                                                              30, 1)]:
        ids = [engine.submit(p, max_new_tokens=new) for p in prompts]
        outs = {i: [] for i in ids}
        for step in range(10 ** 4):
            for o in engine.step():
                outs[o.request] += o.tokens
            if step == 0:
                assert len(engine._running) == at_once
                assert engine.cache.held_tokens() == at_once * -(-(len(prompts[0]) + 1) // BLOCK) * BLOCK
            if not engine.pending:
                break
        assert [outs[i] for i in ids] == [reference_greedy(model, p, new) for p in prompts]

    whole = Engine(model, max_batch=3, max_len=40)  # by default every slot can fill a context of partial blocks
    for _ in range(3):
        whole.submit([1, 2, 3], max_new_tokens=36)
    whole.step()
    assert len(whole._running) == 3

    small = Engine(model, max_batch=1, max_len=64, cache_tokens=64)
    assert small.generate([SYSTEM], max_new_tokens=8) == [reference_greedy(model, SYSTEM, 8)]
    other = [(t + 1) % 97 for t in SYSTEM]
    assert small.generate([other], max_new_tokens=20) == [reference_greedy(model, other, 20)]  # evicts SYSTEM's
    before = small.stats["cached_tokens"]
    assert small.generate([SYSTEM], max_new_tokens=8) == [reference_greedy(model, SYSTEM, 8)]
    assert small.stats["cached_tokens"] == before
    with pytest.raises(ValueError, match=r"cache_tokens \(32\) must hold at least one sequence of max_len \(64\)"):
        Engine(model, max_len=64, cache_tokens=32)


def test_requests_that_need_every_prompt_position_compute_them(model):
    """Speculative decoding (the MTP module's cache is built over the whole prompt) and prompt log-probabilities
    do not reuse a prefix, and still give the plain engine's results."""
    engine = Engine(model, max_batch=1, max_len=96)
    prompts = [SYSTEM + [1], SYSTEM + [2]]
    ref = [reference_greedy(model, p, 8) for p in prompts]
    assert engine.generate(prompts, max_new_tokens=8, speculative=True) == ref
    assert engine.stats["cached_tokens"] == 0
    r = engine.submit(prompts[0], max_new_tokens=1, prompt_logprobs=0)
    scored = [o for _ in range(3) for o in engine.step() if o.request == r and o.prompt_logprobs]
    assert engine.stats["cached_tokens"] == 0 and len(scored[0].prompt_logprobs) == len(prompts[0])
    assert engine.generate(prompts, max_new_tokens=8) == ref and engine.stats["cached_tokens"] == 2 * 2 * BLOCK


def test_compiled_decoding_with_reuse_equals_eager(model):
    compiled = Engine(model, max_batch=1, max_len=96, compile=True)
    prompts = [SYSTEM + [i] for i in range(3)]
    assert compiled.generate(prompts, max_new_tokens=12) == [reference_greedy(model, p, 12) for p in prompts]
    assert compiled.stats["cached_tokens"] == 2 * 2 * BLOCK
