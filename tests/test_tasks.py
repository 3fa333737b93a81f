"""The verifiable tasks: their worked reasoning reaches the answer, held-out sets are fixed and disjoint from
training, and the rewards are strict against adversarial completions."""

import pytest

from leanseek.data.builtin import BUILTINS
from leanseek.eval.tasks import pass_at_k
from leanseek.tasks import TASKS, get_task
from leanseek.tasks.countdown import evaluate


def completion(reasoning: str, answer: str) -> str:
    return f"<think>{reasoning}</think>{answer}<|end|>"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    n == "define" and not BUILTINS["wordnet"].available(), reason="needs WordNet (Debian's wordnet-base)"))
    for n in TASKS])
def test_reasoning_reaches_the_answer_and_sets_are_fixed(name):
    task = get_task(name)
    test = task.test_set(200)
    assert test == task.test_set(200)  # the same held-out problems every time
    assert len({p.prompt for p in test}) == 200
    train = task.train_set(300, seed=1)
    assert not {p.prompt for p in train} & {p.prompt for p in task.test_set(500)}
    for p in test[:50] + train[:50]:
        v = task.verdict(p, completion(task.reasoning(p), p.answer))
        assert v.correct and v.formatted and v.reward() == 1.0


def test_sums_reasoning_is_a_chain_of_running_sums():
    task = get_task("sums")
    p = next(q for q in task.test_set(50) if len(q.data) == 4)
    a, b, c, d = p.data
    assert task.reasoning(p) == f"{a}+{b}={a + b} {a + b}+{c}={a + b + c} {a + b + c}+{d}={a + b + c + d}"


@pytest.mark.parametrize("text", [
    "", "<think></think><|end|>",  # empty answer
    "<think>x</think>12 13<|end|>",  # two answers
    "<think>x</think>{answer} or 1<|end|>",
    "<think>x</think>{answer}",  # cut off: no end of turn
    "<think>x</think>{answer}<|end|>more",
    "<think>x</think><think>y</think>{answer}<|end|>",
    "{answer}<|end|>",  # no think block
    "<think>x</think>0{answer}0<|end|>",
    "<think>x</think>" + "9" * 40 + "<|end|>",  # huge number
    "<think>x</think>{answer}.5<|end|>",
])
def test_rewards_reject_adversarial_completions(text):
    task = get_task("sums")
    p = task.test_set(1)[0]
    v = task.verdict(p, text.format(answer=p.answer))
    assert not v.correct and v.reward() == 0.0


def test_format_reward_only_for_well_formed_wrong_answers():
    task = get_task("addition")
    p = task.test_set(1)[0]
    assert task.verdict(p, completion("", "1")).reward(0.1) == 0.1
    assert task.verdict(p, completion("", "")).reward(0.1) == 0.0
    assert task.verdict(p, completion("", p.answer)).reward(0.1) == 1.0
    assert task.verdict(p, " " + completion("", p.answer)).reward(0.1) == 0.0


def test_countdown_checker():
    task = get_task("countdown")
    p = task.test_set(1)[0]
    (a, b, c), target = p.data
    assert task.check(p, p.answer)
    assert evaluate("(3*4)+5") == (17, [3, 4, 5])
    assert evaluate("3*(4+5)")[0] == 27 and evaluate("8/(3-1)")[0] == 4
    for bad in ["3*4+", "(3*4", "3**4", "__import__('os')", "3*4)+5", "1/0", "-3+4", "3 4", "", "9" * 41]:
        assert evaluate(bad) is None, bad
    assert not task.check(p, f"{target}")  # the target alone does not use the numbers
    assert not task.check(p, f"({a}+{b})+{c}+0") or target != a + b + c  # an extra number breaks the multiset
    assert not task.check(p, f"{p.answer}+{a}-{a}")


def test_pass_at_k():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    assert abs(pass_at_k(8, 2, 1) - 0.25) < 1e-12
    assert abs(pass_at_k(4, 1, 2) - 0.5) < 1e-12  # 1 - C(3,2)/C(4,2)
