"""The engine against step-by-step argmax over full forward passes (expanded attention, no cache)."""

import pytest
import torch
from conftest import randomise, small_config

import leanseek
from leanseek import Engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(leanseek.Transformer(small_config(vocab_size=97)), seed=11)


def reference_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7], [9] * 12, [42, 7]]


@pytest.mark.parametrize("max_batch, chunk", [(4, 512), (2, 5), (1, 3)])
def test_greedy_equals_full_forward_argmax(model, max_batch, chunk):
    """Ragged prompts; with max_batch below the number of prompts, sequences join and leave mid-run; a small
    prefill chunk splits the longer prompts."""
    engine = Engine(model, max_batch=max_batch, max_len=64, prefill_chunk=chunk)
    outs = engine.generate(PROMPTS, max_new_tokens=8)
    assert outs == [reference_greedy(model, p, 8) for p in PROMPTS]


def test_cache_holds_only_the_latent(model):
    cfg = model.cfg
    engine = Engine(model, max_batch=2, max_len=32)
    assert engine.cache.values_per_token() == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert engine.cache_bytes_per_token() == engine.cache.values_per_token() * 4  # float32


def test_seeded_sampling_and_streaming(model):
    engine = Engine(model, max_batch=3, max_len=64)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9)
    a = engine.generate(PROMPTS[:2], seed=3, **kw)
    assert a == engine.generate(PROMPTS[:2], seed=3, **kw)
    assert a != engine.generate(PROMPTS[:2], seed=4, **kw)
    assert list(engine.stream(PROMPTS[1], max_new_tokens=5)) == reference_greedy(model, PROMPTS[1], 5)
    stop_at = reference_greedy(model, PROMPTS[0], 8)[2]
    assert engine.generate([PROMPTS[0]], max_new_tokens=8, stop=[stop_at])[0][-1] == stop_at


def test_bad_requests_are_named(model):
    engine = Engine(model, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="request 1: the prompt is empty"):
        engine.generate([[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"request 0: token ids \[97\] are outside the vocabulary"):
        engine.generate([[1, 97]], max_new_tokens=4)
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        engine.generate([[1] * 10], max_new_tokens=7)
    with pytest.raises(ValueError, match="top_p=0"):
        engine.generate([[1]], max_new_tokens=4, top_p=0)
    with pytest.raises(NotImplementedError, match="speculative"):
        engine.generate([[1]], max_new_tokens=4, speculative=True)
