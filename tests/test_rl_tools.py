"""GRPO with a tool: multi-turn rollouts (the engine stops at a turn's tool calls, they are run, their results are
appended and the model goes on) give exactly the sequence leanseek's chat template renders for the conversation,
and a mask that is exactly SFT's assistant mask of it (no tool result nor markup trained on); the define task's
reward; a batch mixing tasks; and a real GRPO run on `--task sums,define` that resumes exactly."""

import argparse
import json

import pytest
import torch
from test_post_training import base, metric_lines, rewind  # noqa: F401  (base: the micro model fixture)

from leanseek.data import train_tokenizer
from leanseek.data.chat import encode_chat
from leanseek.eval.tasks import ROUND_SEED, prompt_ids, rollouts
from leanseek.rl import trainer
from leanseek.tasks import get_task, parse_mix
from leanseek.tools import define, run_tool, tool_definitions, wordnet

needs_wordnet = pytest.mark.skipif(not wordnet().available(), reason="WordNet (wordnet-base) is not installed")


@pytest.fixture(scope="module")
def tok():
    """A tokenizer that writes the tools' definitions and results in few tokens (short sequences, fast tests)."""
    texts = [json.dumps(tool_definitions(), separators=(",", ":")), define("harbor"), define("port"),
             "What does 'harbor' mean? I do not know it. A sheltered port, wine. {\"word\": \"harbor\"} 12+34"]
    return train_tokenizer(iter(texts * 20), 1000)


class Scripted:
    """A stand-in engine: each generate call answers every context with script(text of the context, round, its
    seed), encoded as a model would have written it, cut at max_new_tokens; it records each call's arguments."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []

    def generate(self, prompts, max_new_tokens, temperature, seed, stop):
        self.calls.append({"contexts": [list(p) for p in prompts], "max_new_tokens": max_new_tokens, "seed": seed})
        return [self.tok.encode_markup(self.script(self.tok.decode(p), len(self.calls) - 1,
                                                   None if seed is None else seed[i]))[:max_new_tokens]
                for i, p in enumerate(prompts)]


CALL = '<think>I do not know it.</think><|tool_call|>define<|tool_args|>{"word": "harbor"}<|end|>'
ANSWER = "<think></think>harbor (noun): a sheltered port.<|end|>"


def question(w="harbor"):
    return [{"role": "user", "content": f"What does '{w}' mean?"}]


def call_message(reasoning, *words):
    return {"role": "assistant", "reasoning_content": reasoning, "content": "",
            "tool_calls": [{"id": f"c{i}", "type": "function",
                            "function": {"name": "define", "arguments": json.dumps({"word": w})}}
                           for i, w in enumerate(words)]}


def results(*words):
    return [{"role": "tool", "tool_call_id": f"c{i}", "content": define(w)} for i, w in enumerate(words)]


def rendered(tok, messages):
    """The conversation as leanseek's template encodes it, and SFT's mask: what the rollout must equal."""
    return encode_chat(tok, messages, tools=tool_definitions())


def whole(prompt, r):
    return prompt + r.tokens, [False] * len(prompt) + r.own


@needs_wordnet
def test_rollout_runs_the_call_and_masks_the_tool_turn(tok):
    """A call, its result, the answer: the sequence and mask are the template's (tool turn and the markup around
    it masked out); a reply without calls ends at once; the continuation is one engine call for the replies that
    need it, with the budget left and the round's seed."""
    script = {("harbor", 0): CALL, ("harbor", 1): ANSWER, ("port", 0): "<think></think>a place.<|end|>"}
    engine = Scripted(tok, lambda text, k, seed: script[("harbor" if "harbor" in text else "port", k)])
    tools = tool_definitions()
    prompts = [encode_chat(tok, question(w), add_generation_prompt=True, tools=tools)[0] for w in ("harbor", "port")]
    out = rollouts(engine, tok, prompts, 100, temperature=1.0, seeds=[7, 8], offers=True)

    want = rendered(tok, question() + [call_message("I do not know it.", "harbor"), *results("harbor"),
                                       {"role": "assistant", "reasoning_content": "", "content": "harbor (noun): a "
                                                                                              "sheltered port."}])
    assert whole(prompts[0], out[0]) == want
    assert out[0].final == tok.encode_markup(ANSWER) and len(out[0].calls) == 1 and out[0].finished
    assert sum(out[0].own) == len(tok.encode_markup(CALL)) + len(tok.encode_markup(ANSWER))
    assert whole(prompts[1], out[1]) == rendered(tok, question("port") + [
        {"role": "assistant", "content": "a place."}])
    assert len(out[1].calls) == 0 and out[1].finished

    assert [len(c["contexts"]) for c in engine.calls] == [2, 1]
    first = len(tok.encode_markup(CALL))
    assert engine.calls[1] == {"contexts": [prompts[0] + out[0].tokens[:len(out[0].tokens) - len(out[0].final)]],
                               "max_new_tokens": 100 - first, "seed": [7 + ROUND_SEED]}


@needs_wordnet
def test_several_calls_and_rounds_up_to_the_bound(tok):
    """Two calls in one turn: two tool turns, in order. A reply that calls every round has max_rounds rounds run;
    its last calls are not, and it ends there, with no answer for the task."""
    two = '<think></think><|tool_call|>define<|tool_args|>{"word": "harbor"}<|tool_call|>define<|tool_args|>' \
          '{"word": "port"}<|end|>'
    engine = Scripted(tok, lambda text, k, seed: two if k == 0 else ANSWER)
    prompt = encode_chat(tok, question(), add_generation_prompt=True, tools=tool_definitions())[0]
    (r,) = rollouts(engine, tok, [prompt], 200, offers=True, tool_tokens=1000)
    assert whole(prompt, r) == rendered(tok, question() + [call_message("", "harbor", "port"),
                                                           *results("harbor", "port"),
                                                           {"role": "assistant", "content": "harbor (noun): a "
                                                                                            "sheltered port."}])
    assert len(r.calls) == 2 and len(engine.calls) == 2

    engine = Scripted(tok, lambda text, k, seed: CALL)
    (r,) = rollouts(engine, tok, [prompt], 400, offers=True, max_rounds=2, tool_tokens=1000)
    assert len(engine.calls) == 3 and len(r.calls) == 2 and r.written == 3 and r.finished
    assert r.calls[1] == {"name": "define", "arguments": '{"word": "harbor"}',
                          "result": run_tool("define", '{"word": "harbor"}')}
    messages = question()
    for _ in range(2):
        messages += [call_message("I do not know it.", "harbor"), *results("harbor")]
    assert whole(prompt, r) == rendered(tok, messages + [call_message("I do not know it.", "harbor")])
    verdict = get_task("define").verdict(get_task("define").problem("harbor"), tok.decode(r.final))
    assert not verdict.formatted and verdict.reward(0.1) == 0.0


def test_a_malformed_call_is_not_run_and_ends_the_reply(tok):
    bad = '<think></think><|tool_call|>define<|tool_args|>{"word": harbor<|end|>'
    engine = Scripted(tok, lambda text, k, seed: bad)
    prompt = encode_chat(tok, question(), add_generation_prompt=True, tools=tool_definitions())[0]
    (r,) = rollouts(engine, tok, [prompt], 100, offers=True)
    assert len(engine.calls) == 1 and len(r.calls) == 0 and r.malformed == r.written == 1
    assert r.tokens == r.final == tok.encode_markup(bad) and all(r.own)


@needs_wordnet
def test_budgets_and_tasks_without_tools(tok):
    """The model's own tokens are at most max_new_tokens over all rounds (a reply cut off is unfinished); tool turns
    past tool_tokens end the reply; a prompt whose task offers no tools has its calls left unrun."""
    prompt = encode_chat(tok, question(), add_generation_prompt=True, tools=tool_definitions())[0]
    n = len(tok.encode_markup(CALL))
    engine = Scripted(tok, lambda text, k, seed: CALL if k == 0 else ANSWER)
    (r,) = rollouts(engine, tok, [prompt], n + 3, offers=True)
    assert engine.calls[1]["max_new_tokens"] == 3 and r.final == tok.encode_markup(ANSWER)[:3]
    assert sum(r.own) == n + 3 and not r.finished

    engine = Scripted(tok, lambda text, k, seed: CALL if k == 0 else ANSWER)
    (r,) = rollouts(engine, tok, [prompt], n, offers=True)  # the call takes the whole budget: no room to answer
    assert len(engine.calls) == 1 and not r.finished and r.tokens == tok.encode_markup(CALL)

    turn = 2 + len(tok.encode(run_tool("define", '{"word": "harbor"}'))) + 1
    for room, calls in ((turn, 2), (turn - 1, 1)):
        engine = Scripted(tok, lambda text, k, seed: CALL if k == 0 else ANSWER)
        (r,) = rollouts(engine, tok, [prompt], 500, offers=True, tool_tokens=room)
        assert len(engine.calls) == calls and r.finished == (calls == 2) and len(r.calls) == calls - 1

    engine = Scripted(tok, lambda text, k, seed: CALL)
    (r,) = rollouts(engine, tok, [prompt], 500, offers=False)
    assert len(engine.calls) == 1 and len(r.calls) == 0 and r.tokens == tok.encode_markup(CALL)


@needs_wordnet
def test_define_reward_on_written_answers():
    """F1 of the words after 'word (pos):' with define's first line, counted by hand."""
    task = get_task("define")
    p = task.problem("port")
    assert p.answer == define("port").split("\n")[0] and p.prompt == "What does 'port' mean?"
    # "a place (seaport or airport) where people and merchandise can enter or leave a country": 15 words

    def reward(answer, format_reward=0.0):
        return task.verdict(p, f"<think>x</think>{answer}<|end|>").reward(format_reward)

    assert reward(p.answer) == 1.0
    # 3 words, all in the gloss: precision 1, recall 3/15 -> 2 x 0.2 / 1.2
    assert reward("port (noun): a country place") == pytest.approx(2 * 0.2 / 1.2)
    # "a", "ship" -> 1 of 2 in the gloss: precision 1/2, recall 1/15
    assert reward("a ship") == pytest.approx(2 * (1 / 2) * (1 / 15) / (1 / 2 + 1 / 15))
    assert reward("wine") == 0.0 and reward("wine", 0.1) == 0.1
    assert task.verdict(p, "<think>x</think>" + p.answer).reward(0.1) == 0.0  # cut off: not well-formed
    v = task.verdict(p, f"<think>x</think>{p.answer}<|end|>")
    assert v.correct and task.check(p, "port (noun): a country place") is False
    held, lookup = {q.data[0] for q in task.test_set(50)}, {q.data[0] for q in task.train_set(200, 1)}
    from leanseek.data.instructions import word_group
    assert {word_group(w) for w in held} == {"held_out"} and {word_group(w) for w in lookup} == {"lookup"}


@needs_wordnet
def test_a_batch_mixing_tasks(tok):
    """sums and define in one batch: each problem rewarded by its own task (sums exact, define by F1), rewards
    and accuracy per task, the tool turn masked out, the draw dealing prompts to the tasks by weight."""
    sums, task = get_task("sums"), get_task("define")
    mix = parse_mix("sums:2,define")
    assert trainer.mix_name(mix) == "sums:2,define:1" and trainer.mix_name(parse_mix("sums,define")) == \
        "sums,define"
    pools = {"sums": sums.train_set(30, 0), "define": task.train_set(30, 0)}
    drawn = [trainer.draw_problems(mix, pools, step, 2, 0) for step in range(3)]
    assert [t.name for step in drawn for t, _ in step] == ["sums", "sums", "define"] * 2
    assert [p for _, p in trainer.draw_problems(parse_mix("sums"), pools, 4, 2, 0)] == \
        __import__("random").Random(4).sample(pools["sums"], 2)  # a single task draws as before mixes

    s, d = sums.train_set(1, 5)[0], task.problem("harbor")

    def script(text, k, seed):
        if "harbor" not in text:  # sums: the first of each pair right, the second wrong
            seen[0] += 1
            return f"<think></think>{s.answer if seen[0] % 2 else 1}<|end|>"
        return CALL if k == 0 else ANSWER

    seen = [0]
    args = argparse.Namespace(group=2, seed=0, max_new_tokens=60, temperature=1.0, format_reward=0.0,
                              shuffle_rewards=False, scale="group", keep_zero_std=True, mask_truncated=False)
    batch = trainer.sample_batch(Scripted(tok, script), tok, [(sums, s), (task, d)], args, 0)
    f1 = task.verdict(d, ANSWER).f1
    assert batch.rewards.tolist() == pytest.approx([1.0, 0.0, f1, f1], abs=1e-7) and 0 < f1 < 1
    assert batch.stats["reward/sums"] == 0.5 and batch.stats["accuracy/define"] == float(f1 >= 0.5)
    assert batch.stats["tool_calls"] == 1.0 and batch.stats["malformed_calls"] == 0.0
    ids, mask = rendered(tok, question() + [call_message("I do not know it.", "harbor"), *results("harbor"),
                                            {"role": "assistant", "content": "harbor (noun): a sheltered port."}])
    n = len(ids)
    assert batch.ids[2, :n].tolist() == ids and batch.mask[2, :n - 1].tolist() == [float(m) for m in mask[1:]]
    assert not batch.mask[2, n - 1:].any()
    sums_ids, sums_mask = encode_chat(tok, [{"role": "user", "content": s.prompt},
                                            {"role": "assistant", "content": s.answer}])
    assert batch.ids[0, :len(sums_ids)].tolist() == sums_ids == prompt_ids(tok, s) + sums_ids[len(prompt_ids(tok, s)):]
    assert batch.mask[0].tolist()[:len(sums_ids) - 1] == [float(m) for m in sums_mask[1:]]


def rl_args(base, out, steps, *extra):
    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    return parser.parse_args(["--init", str(base / "base"), "--task", "sums,define", "--out", str(out),
                              "--steps", str(steps), "--prompts", "2", "--group", "2", "--max-new-tokens", "40",
                              "--pool", "20", "--eval-every", "2", "--eval-problems", "2", "--save-every", "1",
                              "--keep", "5", "--keep-zero-std", "--mu", "2", "--beta", "0.04", "--device", "cpu",
                              "--threads", "1", *extra])


class Calling(trainer.Engine):
    """The real engine, but a reply's first turn where the tools are offered is a call to define (the micro model
    has not learned to call): the rest, the answer after the tool's result included, is the model's."""

    def generate(self, prompts, **params):
        outs = super().generate(prompts, **params)
        tool, tools = self.tokenizer.token_id("<|tool|>"), self.tokenizer.token_id("<|tools|>")
        call = self.tokenizer.encode_markup(CALL)
        return [call if tools in p and tool not in p else o for p, o in zip(prompts, outs)]


@needs_wordnet
def test_grpo_on_a_mix_runs_and_resumes_exactly(base, tmp_path, monkeypatch):  # noqa: F811
    """Two real GRPO steps on sums,define from a micro model, its define replies calling the tool: figures per
    task, and a run killed after step 1 and resumed writes the same metrics; another mix is refused on resume."""
    monkeypatch.setattr(trainer, "Engine", Calling)
    trainer.run(rl_args(base, tmp_path / "rl", 2))
    trainer.run(rl_args(base, rewind(tmp_path / "rl", 1, tmp_path / "rl-resumed"), 2))
    straight = metric_lines(tmp_path / "rl")
    assert straight == metric_lines(tmp_path / "rl-resumed")
    assert [x["step"] for x in straight] == [0, 1, 2]
    for key in ("reward/sums", "reward/define", "accuracy/define", "malformed_calls", "kl"):
        assert key in straight[1], key
    assert straight[1]["tool_calls"] == straight[2]["tool_calls"] == 1.0  # each define reply: one call, answered
    for key in ("eval_pass@1/sums", "eval_pass@1/define", "eval_reward/define", "eval_pass@1"):
        assert key in straight[0] and key in straight[2], key
    assert straight[0]["eval_pass@1"] == straight[0]["eval_pass@1/sums"]
    saved = json.loads((tmp_path / "rl" / "latest" / "trainer_state.json").read_text())["args"]
    assert saved["task"] == "sums,define"
    with pytest.raises(ValueError, match="task 'sums,define' -> 'sums:2,define:1'"):
        trainer.run(rl_args(base, tmp_path / "rl", 3, "--task", "sums:2,define"))


@needs_wordnet
def test_the_update_trains_only_on_the_models_own_tokens(tok):
    """The trainer's micro-batched update over a batch with a tool turn has the gradient of the policy-gradient
    objective summed over SFT's assistant mask of the conversation (an independent full forward): the tool result
    and its markup get none."""
    from conftest import randomise, small_config

    import leanseek
    from leanseek.rl.trainer import accumulate, micro_batches, score

    task = get_task("define")
    d = task.problem("harbor")
    # the group's first sample (seed 0) looks the word up, the second (seed 1) answers at once, worse
    engine = Scripted(tok, lambda text, k, seed: ("<think></think>wine.<|end|>" if seed == 1 else
                                                  CALL if k == 0 else ANSWER))

    args = argparse.Namespace(group=2, seed=0, max_new_tokens=60, temperature=1.0, format_reward=0.0,
                              shuffle_rewards=False, scale="group", keep_zero_std=False, mask_truncated=False,
                              loss_type="dapo", eps_low=0.2, eps_high=None, beta=0.0)
    batch = trainer.sample_batch(engine, tok, [(task, d)], args, 0)
    assert len(batch.ids) == 2 and batch.adv[0] > 0 > batch.adv[1]
    conversations = [question() + [call_message("I do not know it.", "harbor"), *results("harbor"),
                                   {"role": "assistant", "content": "harbor (noun): a sheltered port."}],
                     question() + [{"role": "assistant", "content": "wine."}]]
    own = torch.zeros_like(batch.mask)
    for i, messages in enumerate(conversations):
        ids, mask = rendered(tok, messages)
        assert batch.ids[i, :len(ids)].tolist() == ids
        own[i, :len(ids) - 1] = torch.tensor(mask[1:], dtype=own.dtype)
    assert torch.equal(batch.mask, own) and own[0].sum() < len(conversations[0]) + 200

    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size, max_position_embeddings=1024)),
                      seed=1).double()
    batch.mask, batch.adv = batch.mask.double(), batch.adv.double()
    parts = micro_batches(batch, batch.ids.shape[1], "cpu")
    assert len(parts) == 2
    score(parts, model, None, 1.0)
    model.zero_grad(set_to_none=True)
    accumulate(model, parts, args)
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.zero_grad(set_to_none=True)
    logp = torch.log_softmax(model(batch.ids)[:, :-1], -1).gather(-1, batch.ids[:, 1:, None])[..., 0]
    (-(batch.adv[:, None] * logp * own).sum() / own.sum()).backward()
    want = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(got, want):  # float64 but for the router, which keeps float32 by design
        assert (a - b).norm() <= 1e-6 * b.norm() + 1e-12

