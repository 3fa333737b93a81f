"""The engine's log-probabilities (logprobs, prompt_logprobs) against log_softmax of a plain full forward pass over
the prompt and output (expanded attention, no cache)."""

import pytest
import torch
from conftest import alternating_drafter, randomise, small_config

import leanseek
import leanseek.infer.engine as engine_module
from leanseek import Engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(leanseek.Transformer(small_config(vocab_size=97, num_nextn_predict_layers=1)), seed=11)


def full_logprobs(model, ids):
    """[T, V]: row i is the distribution of token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def run(engine, requests, between=None):
    """Submit (prompt, params) pairs and step until all finish, calling between(request) for each running one
    after every step: each request's Outputs."""
    ids = [engine.submit(p, **kw) for p, kw in requests]
    outs = {i: [] for i in ids}
    while engine.pending:
        for o in engine.step():
            outs[o.request].append(o)
        for r in engine._running:
            if between is not None:
                between(r)
    return [outs[i] for i in ids]


def tokens_and_logprobs(outputs):
    tokens, entries = [], []
    for o in outputs:
        assert o.logprobs is None or len(o.logprobs) == len(o.tokens)
        tokens += o.tokens
        entries += o.logprobs or []
    return tokens, entries


def check(entry, row, token, n):
    """entry (a TokenLogprob) against a full forward's log-probabilities `row` [V] at its position."""
    assert entry.token == token
    assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
    values, ids = row.topk(n)
    assert [t for t, _ in entry.top] == ids.tolist()
    assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert all(a[1] >= b[1] for a, b in zip(entry.top, entry.top[1:]))


def check_generated(model, prompt, outputs, n):
    tokens, entries = tokens_and_logprobs(outputs)
    assert len(entries) == len(tokens) > 0
    ref = full_logprobs(model, prompt + tokens)
    for k, (token, entry) in enumerate(zip(tokens, entries)):
        check(entry, ref[len(prompt) + k - 1], token, n)
    return tokens


REQUESTS = [([5, 17, 3], dict(max_new_tokens=7, logprobs=5)),
            ([1, 2, 3, 4, 5, 6, 7], dict(max_new_tokens=5)),
            ([9] * 12, dict(max_new_tokens=9, temperature=1.0, top_p=0.9, repetition_penalty=1.3, seed=3,
                            logprobs=3)),
            ([42, 7], dict(max_new_tokens=6, temperature=0.7, seed=1)),
            ([8, 8, 1, 2], dict(max_new_tokens=4, logprobs=0))]


def test_generated_logprobs_equal_the_full_forward(model):
    """Greedy and seeded sampled requests of different lengths share decode steps with requests that did not ask
    (three slots for five requests: they join and leave). Each asked token's log-probability and top-N come from
    the raw logits it was chosen from (the penalty and top_p of the sampled one change nothing there); asking
    changes no request's tokens."""
    outputs = run(Engine(model, max_batch=3, max_len=64, prefill_chunk=5), REQUESTS)
    plain = run(Engine(model, max_batch=3, max_len=64, prefill_chunk=5),
                [(p, {k: v for k, v in kw.items() if k != "logprobs"}) for p, kw in REQUESTS])
    for (prompt, kw), outs, without in zip(REQUESTS, outputs, plain):
        assert all(o.prompt_logprobs is None for o in outs)
        if "logprobs" in kw:
            tokens = check_generated(model, prompt, outs, kw["logprobs"])
        else:
            assert all(o.logprobs is None for o in outs)
            tokens = tokens_and_logprobs(outs)[0]
        assert tokens == tokens_and_logprobs(without)[0]
        assert len(tokens) == kw["max_new_tokens"]


def test_the_chosen_tokens_logprob_is_given_outside_the_top(model):
    """Sampled at a high temperature, most tokens are not the most likely one: with top-1 their own
    log-probability still comes, equal to the full forward's; with logprobs=0, only their own."""
    prompt = [3, 1, 4, 1, 5]
    for n in (1, 0):
        outs = run(Engine(model, max_batch=1, max_len=64),
                   [(prompt, dict(max_new_tokens=12, temperature=5.0, seed=2, logprobs=n))])[0]
        check_generated(model, prompt, outs, n)
        entries = tokens_and_logprobs(outs)[1]
        assert sum(e.token not in [t for t, _ in e.top] for e in entries) >= 6
        assert all(len(e.top) == n for e in entries)


def check_prompt(model, prompt, entries, n):
    assert len(entries) == len(prompt) and entries[0] is None
    ref = full_logprobs(model, prompt)
    for i in range(1, len(prompt)):
        check(entries[i], ref[i - 1], prompt[i], n)


PROMPTS = [[5, 17], [1, 2, 3, 4, 5, 6, 7], [42, 7, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


def test_prompt_logprobs_of_ragged_prompts_in_one_prefill(model, monkeypatch):
    """Four prompts of different lengths prefilled in one batched forward, three asking for their prompt's
    log-probabilities (with different N), one not: on each request's first Output only."""
    engine = Engine(model, max_batch=4, max_len=64, prefill_chunk=64)
    forwards = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda ids, at: forwards.append(ids.shape) or step(ids, at))
    asks = [2, None, 0, 20]
    outputs = run(engine, [(p, dict(max_new_tokens=3, prompt_logprobs=n)) for p, n in zip(PROMPTS, asks)])
    assert forwards[0] == (4, 12)  # one prefill forward for all four
    for prompt, n, outs in zip(PROMPTS, asks, outputs):
        assert all(o.prompt_logprobs is None for o in outs[1:])
        if n is None:
            assert outs[0].prompt_logprobs is None
        else:
            check_prompt(model, prompt, outs[0].prompt_logprobs, n)


def test_prompt_logprobs_of_a_prompt_longer_than_a_prefill_chunk(model):
    """A 23-token prompt prefilled 5 tokens a forward (and its logits taken 5 positions at a time), with a short
    one beside it; both also generate, with logprobs, speculatively."""
    long = [(7 * i + 3) % 97 for i in range(23)]
    engine = Engine(model, max_batch=2, max_len=64, prefill_chunk=5)
    outputs = run(engine, [(long, dict(max_new_tokens=4, prompt_logprobs=3, logprobs=2, speculative=True)),
                           ([4, 5, 6], dict(max_new_tokens=4, prompt_logprobs=1))])
    check_prompt(model, long, outputs[0][0].prompt_logprobs, 3)
    check_prompt(model, [4, 5, 6], outputs[1][0].prompt_logprobs, 1)
    check_generated(model, long, outputs[0], 2)


def test_scoring_only(model):
    """max_new_tokens=0 with prompt_logprobs: one finished Output with no tokens and the prompt's
    log-probabilities; the slot is free at once (a second round fits in the one slot); without prompt_logprobs it
    is refused, naming the parameter."""
    engine = Engine(model, max_batch=1, max_len=32)
    for speculative in (False, True):
        outputs = run(engine, [(p, dict(max_new_tokens=0, prompt_logprobs=1, speculative=speculative))
                               for p in PROMPTS])
        for prompt, outs in zip(PROMPTS, outputs):
            assert len(outs) == 1 and outs[0].finished and outs[0].tokens == [] and outs[0].error is None
            check_prompt(model, prompt, outs[0].prompt_logprobs, 1)
    assert engine.generate(PROMPTS, max_new_tokens=0, prompt_logprobs=0) == [[]] * len(PROMPTS)
    assert engine.stats["generated_tokens"] == 0 and engine.pending == 0
    with pytest.raises(ValueError, match=r"max_new_tokens=0: must be >= 1 \(0 only with prompt_logprobs"):
        engine.submit([1, 2], max_new_tokens=0)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_speculative_logprobs(model, temperature):
    """A speculative request asking logprobs gives the tokens and MTP drafts it gives without (greedy: two passes
    instead of the one-pass step), each log-probability from the main model's logits at its position, also for
    the bonus token of an accepted draft (an oracle drafter, right at every other step, makes acceptances
    happen)."""
    prompts = [[5, 17, 3], [1, 2, 3, 4, 5, 6, 7], [42, 7]]
    kw = dict(max_new_tokens=10, speculative=True, temperature=temperature, seed=4)
    drafts = [], []
    without = run(Engine(model, max_batch=3, max_len=64), [(p, kw) for p in prompts],
                  lambda r: drafts[0].append((tuple(r.prompt), len(r.output), r.draft)))
    without = [tokens_and_logprobs(outs)[0] for outs in without]
    outputs = run(Engine(model, max_batch=3, max_len=64), [(p, dict(kw, logprobs=2)) for p in prompts],
                  lambda r: drafts[1].append((tuple(r.prompt), len(r.output), r.draft)))
    for prompt, outs, tokens in zip(prompts, outputs, without):
        assert check_generated(model, prompt, outs, 2) == tokens
    assert drafts[0] == drafts[1] and len(drafts[0]) >= 3 * 4
    if temperature:
        return

    truth = {tuple(p): t for p, t in zip(prompts, without)}
    oracle = alternating_drafter(truth, model.cfg.vocab_size)
    engine = Engine(model, max_batch=3, max_len=64)
    outputs = run(engine, [(p, dict(kw, logprobs=2)) for p in prompts], oracle)
    assert engine.stats["accepted"] > 0
    for prompt, outs in zip(prompts, outputs):
        assert check_generated(model, prompt, outs, 2) == truth[tuple(prompt)]


def test_logprobs_cost_nothing_when_nobody_asks(model, monkeypatch):
    """No log-probability is computed for requests that did not ask: none at all when nobody did, and only the
    asking rows' when some did."""
    rows = []
    real = engine_module.token_logprobs
    monkeypatch.setattr(engine_module, "token_logprobs", lambda logits, *a: rows.append(len(logits)) or
                        real(logits, *a))
    prompts = [[5, 17, 3], [1, 2, 3, 4], [42, 7]]
    engine = Engine(model, max_batch=3, max_len=64)
    engine.generate(prompts, max_new_tokens=5)
    engine.generate(prompts, max_new_tokens=5, speculative=True)
    engine.generate(prompts, max_new_tokens=5, temperature=1.0, seed=0, speculative=True)
    assert rows == []
    run(engine, [(prompts[0], dict(max_new_tokens=5, logprobs=1))] + [(p, dict(max_new_tokens=5)) for p in prompts])
    assert rows == [1] * 5


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 2.5, "3", True])
def test_bad_logprobs_are_named(model, name, value):
    engine = Engine(model, max_batch=1, max_len=32)
    with pytest.raises(ValueError, match=rf"request 0: {name}={value!r}: must be None \(off\) or an integer in 0..20"):
        engine.generate([[1, 2]], max_new_tokens=2, **{name: value})
    with pytest.raises(ValueError, match=rf"the request: {name}="):
        engine.submit([1, 2], **{name: value})
    assert engine.pending == 0
