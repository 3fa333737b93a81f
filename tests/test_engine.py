"""The engine against step-by-step argmax over full forward passes (expanded attention, no cache)."""

import os

import pytest
import torch
from conftest import alternating_drafter, randomise, small_config

import leanseek
from leanseek import Engine


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(leanseek.Transformer(small_config(vocab_size=97, num_nextn_predict_layers=1)), seed=11)


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
    assert engine.stats["prompt_tokens"] == sum(map(len, PROMPTS))  # the token counts cost accounting uses
    assert engine.stats["generated_tokens"] == 8 * len(PROMPTS)


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
    with pytest.raises(ValueError, match=r"request 0: the prompt \(16 tokens\) leaves no room in the context of 16"):
        engine.generate([[1] * 16], max_new_tokens=1)
    with pytest.raises(ValueError, match="request 0: unexpected keyword argument 'top_q'|top_q"):
        engine.generate([[1]], top_q=0.5)
    with pytest.raises(ValueError, match="must be a list of token ids"):
        engine.generate([[1.5]], max_new_tokens=1)
    no_mtp = Engine(leanseek.Transformer(small_config(vocab_size=97)), max_len=16)
    with pytest.raises(ValueError, match="speculative decoding drafts with an MTP module"):
        no_mtp.generate([[1]], max_new_tokens=2, speculative=True)
    assert engine.pending == 0  # nothing was queued


def test_speculative_greedy_equals_plain(model):
    """MTP drafts (mostly wrong for random weights, so rejections and rollbacks are exercised) never change greedy
    output; sequences join and leave, prompts are prefilled in chunks."""
    assert len(model.mtp) == 1
    engine = Engine(model, max_batch=2, max_len=64, prefill_chunk=5)
    outs = engine.generate(PROMPTS, max_new_tokens=9, speculative=True)
    assert outs == [reference_greedy(model, p, 9) for p in PROMPTS]
    assert engine.stats["drafted"] > 0


def drive(engine, prompts, between=None, **params):
    """Run requests through submit/step, calling between(request) for each running one after every step."""
    ids = [engine.submit(p, **params) for p in prompts]
    outs = {i: [] for i in ids}
    while engine.pending:
        for o in engine.step():
            outs[o.request] += o.tokens
        for r in engine._running:
            if between is not None:
                between(r)
    return [outs[i] for i in ids]


@pytest.mark.parametrize("temperature", [0.0, 1e-4], ids=["fused-greedy", "sampling-path"])
def test_speculative_drafts_are_the_mtp_modules(model, temperature):
    """Every draft equals the argmax of the MTP head of a full forward pass (forward_train) at its position: the
    MTP module's own latent cache, its pairing of hidden states with next tokens and its rollback are right, in
    the one-pass greedy step and in the step that samples between the two models (a tiny temperature: greedy in
    effect, but through sampling and the acceptance rule)."""
    engine = Engine(model, max_batch=2, max_len=64, prefill_chunk=4)
    seen = []  # (prompt, tokens generated so far, draft)
    outs = drive(engine, PROMPTS[:3], lambda r: seen.append((tuple(r.prompt), len(r.output), r.draft)),
                 max_new_tokens=8, speculative=True, temperature=temperature, seed=0)
    assert outs == [reference_greedy(model, p, 8) for p in PROMPTS[:3]]
    assert len([d for d in seen if d[2] is not None]) >= 3 * 3
    with torch.no_grad():
        for prompt, n, draft in seen:
            if draft is None:  # one token left: nothing to draft
                continue
            out = outs[PROMPTS.index(list(prompt))]
            mtp = model.forward_train(torch.tensor([list(prompt) + out])).mtp_hidden[0]  # i predicts token i + 2
            assert draft == int(model.lm_head(mtp[0, len(prompt) + n - 2]).argmax())


def test_speculative_accepted_drafts_commit_two_tokens(model):
    """An oracle drafter that is right at every other step: the output is still the reference, accepted drafts
    are counted, and each accepted step commits the draft plus a bonus token."""
    engine = Engine(model, max_batch=4, max_len=64)
    ref = {tuple(p): reference_greedy(model, p, 10) for p in PROMPTS}
    oracle = alternating_drafter(ref, model.cfg.vocab_size)
    outs = drive(engine, PROMPTS, oracle, max_new_tokens=10, speculative=True)
    assert outs == [ref[tuple(p)] for p in PROMPTS]
    assert 0 < engine.stats["accepted"] < engine.stats["drafted"]
    assert engine.acceptance_rate == engine.stats["accepted"] / engine.stats["drafted"]


def test_speculative_sampling_keeps_the_distribution():
    """The acceptance rule: draft d ~ q, kept with probability min(1, p(d)/q(d)), else a token from
    norm(max(0, p - q)). The tokens that come out follow p, not q."""
    from leanseek.infer.sampling import verify_drafts

    g = torch.Generator().manual_seed(0)
    V, n = 12, 200_000
    p = (torch.randn(V, generator=g) * 2).softmax(-1)
    q = (torch.randn(V, generator=g) * 2).softmax(-1)
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    kept, tokens = verify_drafts(p.expand(n, V), q.expand(n, V), drafts, torch.rand(n, generator=g),
                                 torch.rand(n, generator=g))
    freq = torch.bincount(tokens, minlength=V) / n
    assert (freq - p).abs().max() < 0.005
    assert (freq - q).abs().max() > 0.05  # the draft distribution alone would fail
    assert abs(kept.float().mean() - torch.minimum(p, q).sum()) < 0.005  # the acceptance rate is sum min(p, q)


def test_speculative_sampling_is_seeded(model):
    engine = Engine(model, max_batch=2, max_len=64)
    kw = dict(max_new_tokens=10, temperature=0.8, top_k=20, seed=5, speculative=True)
    a = engine.generate(PROMPTS[:2], **kw)
    assert a == engine.generate(PROMPTS[:2], **kw)
    assert all(len(o) == 10 for o in a)


def test_a_failing_request_does_not_disturb_the_others(model):
    """A stop-string check that raises for one request (its tokenizer breaks on one token): that request ends
    with the error, the others give what they give alone."""
    ref = [reference_greedy(model, p, 8) for p in PROMPTS]
    poison = ref[1][3]

    class Tokenizer:
        def decode(self, ids):
            if poison in ids:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return " ".join(map(str, ids))

    engine = Engine(model, Tokenizer(), max_batch=2, max_len=64)
    ids = [engine.submit(p, max_new_tokens=8, stop=["never"] if i == 1 else None) for i, p in enumerate(PROMPTS)]
    outs, errors = {i: [] for i in ids}, {}
    while engine.pending:
        for o in engine.step():
            outs[o.request] += o.tokens
            if o.error:
                errors[o.request] = o.error
    assert list(errors) == [ids[1]] and "UnicodeDecodeError" in errors[ids[1]]
    assert outs[ids[1]] == ref[1][:4]
    assert [outs[i] for i in ids if i != ids[1]] == [r for j, r in enumerate(ref) if j != 1]
    with pytest.raises(leanseek.infer.engine.GenerationError, match="request 1: UnicodeDecodeError") as e:
        engine.generate(PROMPTS, max_new_tokens=8, stop=["never"])
    assert e.value.outputs[0] == ref[0] and e.value.outputs[1] == ref[1][:4]


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=1, max_len=64)
    a = engine.submit(PROMPTS[0], max_new_tokens=50)
    b = engine.submit(PROMPTS[1], max_new_tokens=3)
    engine.step()
    assert engine.cancel(a) and not engine.cancel(a)
    got = []
    while engine.pending:
        got += [t for o in engine.step() if o.request == b for t in o.tokens]
    assert got == reference_greedy(model, PROMPTS[1], 3)


def test_memory_report(model):
    cfg = model.cfg
    report = Engine(model, max_batch=2, max_len=32).memory_report()
    assert report["mla_bytes_per_token"] == cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert report["mha_bytes_per_token"] == (cfg.num_hidden_layers * cfg.num_attention_heads
                                             * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * 4)
    assert report["mla_cache_bytes"] == report["mla_bytes_per_token"] * 64


def test_compiled_decoding_equals_eager(model):
    """Engine(compile=True): compiled decode steps (padded batch, attention over the filled positions rounded up
    to a bucket, latents stored after the pass) give the eager engine's tokens, plain and speculative, greedy and
    seeded sampling; one graph per batch size serves every length (no compilation as a reply grows)."""
    compiled = Engine(model, max_batch=1, max_len=48, compile=True)
    eager = Engine(model, max_batch=1, max_len=48)
    assert compiled.warm_up(progress=False) == [1] and eager.warm_up() == []  # what serve and chat do at start
    assert not any(compiled.stats.values())
    for kw in [dict(), dict(speculative=True), dict(temperature=0.9, top_p=0.9, seed=1)]:
        assert compiled.generate(PROMPTS[:3], max_new_tokens=6, **kw) == eager.generate(PROMPTS[:3],
                                                                                         max_new_tokens=6, **kw)
    assert compiled.stats == eager.stats
    # a lone greedy request takes GREEDY_STEPS tokens a call; a stop token inside such a call ends it there
    from leanseek.infer.engine import GREEDY_STEPS, _greedy_steps_fn
    calls = []
    steps = compiled._compiled[_greedy_steps_fn]
    compiled._compiled[_greedy_steps_fn] = lambda *a: calls.append(1) or steps(*a)
    want = eager.generate(PROMPTS[:1], max_new_tokens=12)[0]
    assert compiled.generate(PROMPTS[:1], max_new_tokens=12) == [want] and len(calls) == (12 - 1) // GREEDY_STEPS
    stop = want[2]  # the second token of the first call (the first comes from the prefill)
    assert compiled.generate(PROMPTS[:1], max_new_tokens=12, stop=[stop]) == eager.generate(
        PROMPTS[:1], max_new_tokens=12, stop=[stop])
    # each engine compiles for its own model (its graphs do not check the model's modules): a wider model
    # compiled in the same process decodes its own tokens
    wide = randomise(leanseek.Transformer(small_config(vocab_size=97, hidden_size=48)), seed=12)
    assert Engine(wide, max_batch=1, max_len=48, compile=True).generate(PROMPTS[:2], max_new_tokens=4) == [
        reference_greedy(wide, p, 4) for p in PROMPTS[:2]]  # one graph: single steps (too few for GREEDY_STEPS)

    from torch._dynamo.utils import counters

    long = Engine(model, max_batch=2, max_len=200, compile=True)
    long.warm_up(progress=False)
    graphs = counters["stats"]["unique_graphs"]
    prompts = [PROMPTS[0], PROMPTS[1] * 6]
    assert long.generate(prompts, max_new_tokens=150) == Engine(model, max_batch=2, max_len=200).generate(
        prompts, max_new_tokens=150)  # spans of 64, 128 and 192 positions
    assert counters["stats"]["unique_graphs"] == graphs


def test_batched_prefill_of_ragged_prompts(model, monkeypatch):
    """A GRPO-like submission (each prompt several times, prompts of different lengths, one longer than a
    prefill chunk): the admitted prompts are prefilled in a few batched forwards, greedy outputs equal the full
    forward's argmax, speculative drafts are still the MTP head's, and seeded samples are the ones a one-slot
    engine (each prompt prefilled alone) draws."""
    distinct = PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
    prompts = [p for p in distinct for _ in range(3)]
    engine = Engine(model, max_batch=len(prompts), max_len=64, prefill_chunk=64)
    forwards = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda ids, at: forwards.append(ids.shape) or step(ids, at))
    ids = [engine.submit(p, max_new_tokens=6) for p in prompts]
    first = engine.step()
    # 15 prefills in three forwards of at most 64 tokens: lengths 2, 3 and 7 (three of each) padded to 7, then
    # 12s and 20s; then one decode step for all
    assert forwards == [(9, 7), (3, 12), (3, 20), (len(prompts), 1)]
    assert sorted(o.request for o in first) == sorted(ids * 2)  # each request's first token, then its second
    monkeypatch.undo()
    got = {i: [] for i in ids}
    while first:
        for o in first:
            got[o.request] += o.tokens
        first = engine.step()
    ref = {tuple(p): reference_greedy(model, p, 6) for p in distinct}
    assert [got[i] for i in ids] == [ref[tuple(p)] for p in prompts]
    chunked = Engine(model, max_batch=len(prompts), max_len=64, prefill_chunk=8)  # the longest in 3 chunks
    assert chunked.generate(prompts, max_new_tokens=6) == [ref[tuple(p)] for p in prompts]
    assert chunked.stats["prompt_tokens"] == sum(map(len, prompts))

    seen = []
    outs = drive(Engine(model, max_batch=len(prompts), max_len=64), prompts,
                 lambda r: seen.append((tuple(r.prompt), len(r.output), r.draft)), max_new_tokens=6, speculative=True)
    assert outs == [ref[tuple(p)] for p in prompts]
    with torch.no_grad():  # the MTP head's choice at every position of each prompt and its output
        mtp = {p: model.lm_head(model.forward_train(torch.tensor([list(p) + out])).mtp_hidden[0][0]).argmax(-1)
               for p, out in ref.items()}
    for prompt, n, draft in seen:
        if draft is not None:
            assert draft == int(mtp[prompt][len(prompt) + n - 2])
    assert len([d for d in seen if d[2] is not None]) >= len(prompts)

    kw = dict(max_new_tokens=6, temperature=1.0, seed=list(range(len(prompts))))
    alone = Engine(model, max_batch=1, max_len=64).generate(prompts, **kw)
    assert Engine(model, max_batch=len(prompts), max_len=64).generate(prompts, **kw) == alone
    assert len(set(map(tuple, alone))) > len(distinct)  # the samples of one prompt differ


def test_compile_cache_outlives_tmp(monkeypatch, tmp_path):
    """torch.compile's cache goes to the user's cache folder unless TORCHINDUCTOR_CACHE_DIR names one."""
    from leanseek.infer.engine import compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache() == tmp_path / "leanseek" / "torch-compile"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "leanseek" / "torch-compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache() == tmp_path / "mine"
    # what `leanseek chat` imports, in a fresh process: torch.distributed's first import writes torch's own default
    # (/tmp) into the environment, so leanseek sets its folder on import, before that
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    code = "import os, leanseek.serve.terminal; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "XDG_CACHE_HOME": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "leanseek" / "torch-compile")


@pytest.fixture(scope="module")
def sparse_model():
    """DeepSeek-V3.2's sparse attention, selecting 8 keys per query: most of these sequences are longer."""
    cfg = small_config(vocab_size=97, num_nextn_predict_layers=1, index_n_heads=8, index_head_dim=16, index_topk=8)
    return randomise(leanseek.Transformer(cfg), seed=13)


@pytest.mark.parametrize("max_batch, chunk", [(4, 512), (1, 5)])
def test_sparse_attention_greedy_equals_full_forward_argmax(sparse_model, max_batch, chunk):
    """The cache holds each position's indexer key beside its latent; each decode step selects over it. Prompts
    shorter and longer than index_topk, prefilled whole or in chunks; plain and speculative (the MTP module's
    own indexer) decoding."""
    cfg = sparse_model.cfg
    engine = Engine(sparse_model, max_batch=max_batch, max_len=64, prefill_chunk=chunk)
    assert engine.cache.values_per_token() == cfg.num_hidden_layers * (
        cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim)
    prompts = PROMPTS + [list(range(1, 21))]
    want = [reference_greedy(sparse_model, p, 16) for p in prompts]
    assert engine.generate(prompts, max_new_tokens=16) == want
    assert engine.generate(prompts, max_new_tokens=16, speculative=True) == want


def test_sparse_attention_compiled_equals_eager(sparse_model):
    """Compiled steps select over the cache's indexer keys as the eager ones do (sampled: one token a call; greedy:
    GREEDY_STEPS tokens a call, the later ones selecting over keys written in the same call)."""
    prompts = [PROMPTS[0], list(range(1, 21))]
    eager = Engine(sparse_model, max_batch=1, max_len=64)
    compiled = Engine(sparse_model, max_batch=1, max_len=64, compile=True)
    kw = dict(temperature=0.9, seed=1)
    assert compiled.generate(prompts, max_new_tokens=12, **kw) == eager.generate(prompts, max_new_tokens=12, **kw)
    assert compiled.generate(prompts, max_new_tokens=12) == [reference_greedy(sparse_model, p, 12) for p in prompts]
