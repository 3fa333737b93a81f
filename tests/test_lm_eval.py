"""lm-evaluation-harness against a live leanseek server (issue 13): its `local-completions` model, on a task this
test writes (JSONL on disk, a multiple-choice part scored by log-likelihood and a generate_until part), with the
model folder's tokenizer and token-id requests (lm-eval's defaults). Every score is checked against the model
itself: the choices' summed log-probabilities from a full forward, the generations from the engine's greedy
decoding. Nothing may touch the network: the hub and datasets run offline and any connection off loopback fails
the test."""

import json
import socket

import pytest
import torch
from conftest import LiveServer, randomise, small_config

import leanseek
from leanseek.data import train_tokenizer
from leanseek.data.tokenizer import END_OF_TURN, EOS
from leanseek.serve import create_app

pytest.importorskip("lm_eval")

MODEL = "micro"
TEXTS = ["What is the sum of numbers? A harbor is a port. Be brief and think about it. Ships dock in a bay."] * 50
MULTIPLE_CHOICE = [
    ("Where do ships dock?", ["a harbor", "a desert", "the sky"]),
    ("What is a harbor?", ["a port", "a number", "a think"]),
    ("What is the sum of numbers?", ["a total", "a port", "brief"]),
    ("Be brief and", ["think about it", "dock", "sum it up"]),
    ("Ships dock in", ["a bay", "numbers", "the sum"]),
    ("A port is", ["a harbor", "brief", "a ship"]),
]
QUESTIONS = ["What is a harbor?", "Where do ships dock?", "Be brief.", "What is the sum?"]
MAX_GEN = 6
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub and datasets offline, their caches in tmp_path, and a record of every attempt to reach a host
    other than this one (the attempt fails)."""
    for name, value in [("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                        ("HF_DATASETS_CACHE", str(tmp_path / "datasets")), ("HF_HOME", str(tmp_path / "hf"))]:
        monkeypatch.setenv(name, value)
    import datasets
    import huggingface_hub.constants

    # already imported by an earlier test, they read the environment then: set what they read
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"no network in tests: connect to {address}")
        return connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in LOOPBACK and host is not None:
            attempts.append(host)
            raise OSError(f"no network in tests: look up {host}")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


def recording(app, bodies: list):
    """The app, keeping the JSON body of every /v1/completions request."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/completions":
            return await app(scope, receive, send)
        parts = []

        async def receive_and_keep():
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                bodies.append(json.loads(b"".join(parts)))
            return message

        return await app(scope, receive_and_keep, send)

    return wrapped


def write_task(folder, name: str, rows: list[dict], config: dict) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **config}
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")  # JSON is YAML


def test_lm_eval_scores_are_the_models_own(tmp_path, offline):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tok = train_tokenizer(iter(TEXTS), 300)
    model = randomise(leanseek.Transformer(small_config(vocab_size=tok.vocab_size)), seed=5)
    folder = tmp_path / "model"
    tok.save(folder)  # what lm-eval loads with AutoTokenizer

    @torch.no_grad()
    def loglikelihood(context: str, continuation: str) -> float:
        """lm-eval's split (the continuation's tokens are those the whole text adds to the context's), scored by
        a full forward: the sum of the continuation tokens' log-probabilities."""
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        assert whole[:len(ctx)] == ctx
        logprobs = torch.log_softmax(model(torch.tensor([whole])).float()[0], dim=-1)
        return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))

    # the gold answers are set so that the model is right on half of the questions (most likely choice) and
    # wrong on the other half (least likely): an accuracy of exactly 1/2 that lm-eval must reproduce
    expected_ll = [[loglikelihood(q, " " + c) for c in choices] for q, choices in MULTIPLE_CHOICE]
    gold = [max(range(3), key=ll.__getitem__) if i % 2 == 0 else min(range(3), key=ll.__getitem__)
            for i, ll in enumerate(expected_ll)]
    norm = [max(range(3), key=lambda j: ll[j] / len(" " + c[j])) for ll, (_, c) in zip(expected_ll, MULTIPLE_CHOICE)]

    engine = leanseek.Engine(model, tok, max_batch=4, max_len=128)
    end = tok.token_id(END_OF_TURN)

    def greedy(question: str) -> str:
        """The engine's greedy reply, cut where the server and lm-eval cut it: the end of the reply, the task's
        stop string, the tokenizer's EOS (which lm-eval adds to the stop strings)."""
        text = tok.decode(engine.generate([tok.encode(question)], max_new_tokens=MAX_GEN, temperature=0.0,
                                          stop=[end])[0])
        for cut in (END_OF_TURN, "\n", EOS):
            text = text.split(cut)[0]
        return text

    generations = [greedy(q) for q in QUESTIONS]
    targets = [g if i % 2 == 0 else "a port" for i, g in enumerate(generations)]  # half the targets are met
    assert [g == t for g, t in zip(generations, targets)] == [True, False, True, False]

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "leanseek_mc", [{"question": q, "choices": c, "answer": g}
                                      for (q, c), g in zip(MULTIPLE_CHOICE, gold)],
               {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "choices",
                "doc_to_target": "answer", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})
    write_task(tasks, "leanseek_gen", [{"question": q, "answer": t} for q, t in zip(QUESTIONS, targets)],
               {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False,
                                      "temperature": 0.0},
                "metric_list": [{"metric": "exact_match"}]})

    app = create_app(leanseek.Engine(model, tok, max_batch=4, max_len=128), tok, MODEL)
    bodies: list[dict] = []
    manager = TaskManager(include_path=str(tasks), include_defaults=False)  # indexing lm-eval's own tasks: 16 s
    with LiveServer(recording(app, bodies)) as server:
        out = simple_evaluate(
            model="local-completions",
            model_args={"model": MODEL, "base_url": f"http://127.0.0.1:{server.port}/v1/completions",
                        "tokenizer": str(folder), "tokenizer_backend": "huggingface", "max_retries": 1},
            tasks=["leanseek_mc", "leanseek_gen"], task_manager=manager, log_samples=True, bootstrap_iters=0)

    assert offline == []  # nothing tried to download
    # lm-eval's defaults: token ids, one prompt a request; scoring asks for the prompt's log-probabilities (echo)
    scoring = [b for b in bodies if b.get("echo")]
    assert len(scoring) == sum(len(c) for _, c in MULTIPLE_CHOICE) and len(bodies) == len(scoring) + len(QUESTIONS)
    for b in bodies:
        assert len(b["prompt"]) == 1 and all(isinstance(t, int) for t in b["prompt"][0])
    assert all(b["logprobs"] == 1 and b["max_tokens"] == 1 for b in scoring)
    assert all(b["stop"] == ["\n", EOS] and b["max_tokens"] == MAX_GEN for b in bodies if not b.get("echo"))
    results = out["results"]
    assert results["leanseek_mc"]["acc,none"] == pytest.approx(0.5)
    assert results["leanseek_mc"]["acc_norm,none"] == pytest.approx(sum(n == g for n, g in zip(norm, gold)) / 6)
    for sample in out["samples"]["leanseek_mc"]:
        got = [ll for ll, _greedy in sample["filtered_resps"]]
        assert got == pytest.approx(expected_ll[sample["doc_id"]], abs=1e-3)
    assert results["leanseek_gen"]["exact_match,none"] == pytest.approx(0.5)
    for sample in out["samples"]["leanseek_gen"]:
        assert sample["filtered_resps"][0] == generations[sample["doc_id"]]
