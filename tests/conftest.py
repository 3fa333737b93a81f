import itertools
import os
import random
import socket
import tempfile
import threading
import time
import warnings

# torch.compile's cache: a fixed folder of the temporary directory (reused by later runs), not the user's cache; set
# before leanseek is imported, which sets its own default
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "leanseek-tests-torch-compile"))

import pytest  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402

import leanseek  # noqa: E402
from leanseek.infer.engine import Output  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def small_config(**overrides) -> leanseek.ModelConfig:
    """The spec's smallest valid V3 shape (dv != dn, dr != dn, so shape mix-ups fail loudly)."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                  num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                  max_position_embeddings=256, routed_scaling_factor=2.5)
    fields.update(overrides)
    return leanseek.ModelConfig(**fields)


def randomise(model: leanseek.Transformer, seed: int = 0, bias_low: float = 0.0) -> leanseek.Transformer:
    """Random weights everywhere, including the norms (initialised to 1) and the routing bias (initialised to 0),
    so that norm and bias bugs cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for r in model.routers():
            if r.e_score_correction_bias is None:
                continue
            r.e_score_correction_bias.copy_(torch.rand(r.e_score_correction_bias.shape, generator=g) * 0.5
                                            + bias_low)
    return model.eval()


def yarn(factor=4.0, original=32, mscale=1.0):
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale, "mscale_all_dim": mscale}


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def rng():
    return random.Random(0)


class ScriptedEngine:
    """The engine's interface, with canned replies; `pending` and `cancel` behave as the engine's do."""

    def __init__(self, replies: list[list[int]], delay: float = 0.02):
        self.replies, self.delay, self.max_batch = replies, delay, 4
        self.running: dict[int, tuple[list[int], int]] = {}
        self._ids, self._calls = itertools.count(), itertools.count()
        self.prompts: list[list[int]] = []
        self.cancelled = 0

    def submit(self, prompt, **params) -> int:
        self.prompts.append(prompt)
        rid = next(self._ids)
        self.running[rid] = (self.replies[next(self._calls) % len(self.replies)], 0)
        return rid

    def cancel(self, rid: int) -> bool:
        found = self.running.pop(rid, None) is not None
        self.cancelled += found
        return found

    @property
    def pending(self) -> int:
        return len(self.running)

    def cache_usage(self) -> float:
        return len(self.running) / self.max_batch

    def step(self) -> list[Output]:
        time.sleep(self.delay)
        outs = []
        for rid, (reply, i) in list(self.running.items()):
            done = i + 1 == len(reply)
            outs.append(Output(rid, [reply[i]], done))
            if done:
                del self.running[rid]
            else:
                self.running[rid] = (reply, i + 1)
        return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An ASGI app under uvicorn in a thread, on a free loopback port. config: makes the uvicorn.Config from the
    port (default: the app, quiet)."""

    def __init__(self, app, config=None):
        self.app, self.port = app, free_port()
        config = config or (lambda port: uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.server = uvicorn.Server(config(self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def alternating_drafter(truth: dict, vocab_size: int):
    """A stand-in for MTP (a hook run on each running request): its draft is right at every other step, the next
    token of truth[prompt] (the reference output), and wrong at the others."""
    calls = [0]

    def draft(r):
        if r.draft is not None:
            calls[0] += 1
            right = truth[tuple(r.prompt)][len(r.output)]
            r.draft = right if calls[0] % 2 else (right + 1) % vocab_size

    return draft


def tokenizer_pair(texts: list[str], folder, vocab_size: int = 400):
    """A leanseek tokenizer trained on texts and saved in folder, and transformers' AutoTokenizer of that folder."""
    from transformers import AutoTokenizer

    from leanseek.data import TextTokenizer, train_tokenizer

    train_tokenizer(iter(texts), vocab_size).save(folder)
    return TextTokenizer.load(folder), AutoTokenizer.from_pretrained(folder)


def ids_of(encoded) -> list[int]:
    """The ids of what apply_chat_template returned (a list, or a BatchEncoding in newer transformers)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def chat_session(engine, tok, lines: list[str], **kw):
    """`leanseek chat` (TerminalChat) typed `lines` into, then Ctrl-D: the chat and what it printed."""
    import io

    from leanseek.serve.terminal import TerminalChat

    out = io.StringIO()
    chat = TerminalChat(engine, tok, temperature=0, out=out, color=False, **kw)
    feed = iter(lines)

    def read(_prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    chat.run(read)
    return chat, out.getvalue()


def leanseek_layout(tok, theirs, messages, tools=None, add=False):
    """leanseek's chat layout written out by hand, the text encoded by transformers (theirs) with special-token
    matching off: (ids, assistant mask). An independent check of ChatFormat.encode and encode_chat."""
    import json

    from leanseek.data.tokenizer import (ASSISTANT, BOS, END_OF_TURN, END_THINK, SYSTEM, THINK, TOOL, TOOL_ARGS,
                                         TOOL_CALL, TOOLS, USER)

    c = tok.token_id
    ids, mask = [], []

    def put(tokens, learned=False):
        ids.extend(tokens)
        mask.extend([learned] * len(tokens))

    def text(s):
        return theirs.encode(s, add_special_tokens=False, split_special_tokens=True)

    put([c(BOS)])
    skip = None
    if tools:
        system = ""
        if messages and messages[0]["role"] == "system":
            system, skip = messages[0]["content"], 0
        put([c(SYSTEM), *text(system), c(TOOLS),
             *text(json.dumps(tools, ensure_ascii=False, separators=(",", ":"))), c(END_OF_TURN)])
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        if i == skip:
            continue
        if m["role"] == "assistant":
            reasoning = m.get("reasoning_content") or "" if i > last_user else ""
            body = [c(THINK), *text(reasoning), c(END_THINK), *text(m["content"])]
            for call in m.get("tool_calls", []):
                body += [c(TOOL_CALL), *text(call["function"]["name"]), c(TOOL_ARGS),
                         *text(call["function"]["arguments"])]
            put([c(ASSISTANT)])
            put([*body, c(END_OF_TURN)], learned=True)
        else:
            role = {"system": SYSTEM, "user": USER, "tool": TOOL}[m["role"]]
            put([c(role), *text(m["content"]), c(END_OF_TURN)])
    if add:
        put([c(ASSISTANT)])
    return ids, mask


def served_model(texts: list[str], max_position_embeddings: int):
    """What the API tests serve: a 300-token tokenizer trained on texts and a random small model for it."""
    from leanseek.data import train_tokenizer

    tok = train_tokenizer(iter(texts), 300)
    torch.manual_seed(0)
    config = small_config(vocab_size=tok.vocab_size, max_position_embeddings=max_position_embeddings)
    return randomise(leanseek.Transformer(config), seed=3), tok
