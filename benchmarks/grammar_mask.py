"""The per-token cost of constrained decoding, llguidance against xgrammar side by side in one run, next to the
engine's own decode step for the tiny model.

    .venv/bin/python -m pip install -e '.[bench]'      # xgrammar, the peer (it pulls triton; not a test dependency)
    .venv/bin/python benchmarks/grammar_mask.py [--vocabs 4096,32768] [--batches 1,16] [--threads 2]

For each vocabulary (a leanseek byte-level BPE tokenizer trained here on the standard library's source) and batch
size, B matchers of one JSON-schema grammar (nested objects, an array of objects, enums, bounded numbers and
strings) replay B schema-valid documents, compact as both libraries are set to generate them, token by token. A
step is what the engine does per token: the allowed-token mask of every matcher (computed in parallel), applied
to a [B, V] logits tensor (-inf where disallowed), then each matcher advanced by its document's next token. The
mean step time is set against the eager engine's decode step for the tiny preset (random weights, that vocabulary)
at that batch, and the engine is timed once more with every request constrained (llguidance, through
leanseek.infer.constrain) to show the overhead in place. Grammar compilation (once per schema) is timed apart.
"""

import argparse
import json
import os
import random
import sysconfig
import time
from pathlib import Path

import torch
from harness import best_of, cpu_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
        "orders": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "additionalProperties": False, "required": ["id", "total", "paid"],
            "properties": {"id": {"type": "integer"}, "total": {"type": "number"}, "paid": {"type": "boolean"}}}},
    },
    "required": ["name", "age", "role", "address", "orders"],
    "additionalProperties": False,
}
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial Paris Tokyo Lima".split()


def document(rng: random.Random) -> str:
    doc = {"name": " ".join(rng.sample(WORDS, 3)), "age": rng.randrange(151),
           "role": rng.choice(["admin", "user", "guest"]),
           "address": {"city": rng.choice(WORDS), "zip": f"{rng.randrange(100000):05d}"},
           "orders": [{"id": rng.randrange(10**6), "total": round(rng.uniform(0, 500), 2), "paid": rng.random() < 0.5}
                      for _ in range(rng.randrange(1, 6))]}
    return json.dumps(doc, separators=(",", ":"))


def corpus(chars: int = 12_000_000) -> list[str]:
    """The standard library's source, up to `chars` characters: text any Python has."""
    root, texts, n = Path(sysconfig.get_paths()["stdlib"]), [], 0
    for f in sorted(root.rglob("*.py")):
        if "test" in f.parts or "site-packages" in f.parts:
            continue
        texts.append(f.read_text(encoding="utf-8", errors="ignore"))
        n += len(texts[-1])
        if n > chars:
            break
    return texts


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, schema):
        from leanseek.infer.constrain import Grammar, _vocabulary
        start = time.perf_counter()
        _vocabulary(tokenizer)
        self.setup_s = time.perf_counter() - start
        start = time.perf_counter()
        self.grammar = Grammar(tokenizer, f"start: %json {json.dumps(schema)}\n")
        self.compile_s = time.perf_counter() - start
        self.grammar = Grammar.json(tokenizer, schema)  # as the engine gets it (compact JSON)

    def replay(self, docs: list[list[int]], logits: torch.Tensor) -> int:
        from leanseek.infer.constrain import mask_logits
        matchers = [self.grammar.matcher() for _ in docs]
        rows = list(range(len(docs)))
        steps = min(map(len, docs))
        for i in range(steps):
            masked = mask_logits(logits, rows, matchers)
            for m, d in zip(matchers, docs):
                m.advance(d[i])
        assert torch.isfinite(masked).any(-1).all()
        return steps


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, schema, threads: int):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
        self.xgr = xgr
        start = time.perf_counter()
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tk, eos_token="<|eos|>")
        compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tokenizer.vocab_size),
                                       max_threads=threads)
        self.setup_s = time.perf_counter() - start
        start = time.perf_counter()
        self.compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        self.compile_s = time.perf_counter() - start
        self.batch = xgr.BatchGrammarMatcher(threads)

    def replay(self, docs: list[list[int]], logits: torch.Tensor) -> int:
        xgr = self.xgr
        matchers = [xgr.GrammarMatcher(self.compiled) for _ in docs]
        bitmask = xgr.allocate_token_bitmask(len(docs), logits.shape[-1])
        steps = min(map(len, docs))
        for i in range(steps):
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
            masked = logits.clone()
            xgr.apply_token_bitmask_inplace(masked, bitmask, backend="cpu")
            assert all(self.batch.batch_accept_token(matchers, [d[i] for d in docs]))
        assert torch.isfinite(masked).any(-1).all()
        return steps


def engine_steps(model, tokenizer, batch: int, constraint, steps: int = 24,
                 repeats: int = 5) -> tuple[float, float]:
    """Seconds per decode step of the eager engine with `batch` running requests, without and with every request
    under `constraint`: the best of `repeats` runs of each, alternated so that both see the same machine."""
    from leanseek import Engine

    def run(constraint):
        engine = Engine(model, tokenizer, max_batch=batch, max_len=16 + steps + 8)
        for b in range(batch):
            engine.submit([1 + b] * 16, max_new_tokens=steps + 4, constraint=constraint)
        engine.step()  # prefill and the first token
        start = time.perf_counter()
        for _ in range(steps):
            assert len(engine.step()) == batch  # every request still running
        return (time.perf_counter() - start) / steps

    times = [(run(None), run(constraint)) for _ in range(repeats)]
    return min(t for t, _ in times), min(t for _, t in times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="4096,32768")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import leanseek
    from leanseek.data.tokenizer import train_tokenizer
    from leanseek.infer.constrain import Grammar

    texts = corpus()
    batches = [int(b) for b in args.batches.split(",")]
    cpu = f"{cpu_model()}, {args.threads} threads"
    print(f"CPU: {cpu} (of {os.cpu_count()} logical cores); torch {torch.__version__}")
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        tokenizer = train_tokenizer(iter(texts), vocab)
        model = leanseek.Transformer(leanseek.ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
        libraries = [Llguidance(tokenizer, SCHEMA), Xgrammar(tokenizer, SCHEMA, args.threads)]
        for lib in libraries:
            print(f"vocab {tokenizer.vocab_size}: {lib.name} reads the tokenizer in {lib.setup_s * 1e3:.0f} ms, "
                  f"compiles the schema in {lib.compile_s * 1e3:.1f} ms")
        rng = random.Random(vocab)
        docs = [tokenizer.encode(document(rng)) for _ in range(max(batches))]
        # a document ends its grammar; shorter ones would end before the others, so all are cut to the shortest
        # (every prefix of a valid document is a valid prefix)
        for batch in batches:
            # an array too long to end within the steps timed
            step, constrained = engine_steps(model, tokenizer, batch,
                                             Grammar.json(tokenizer, {"type": "array", "minItems": 99}))
            logits = torch.randn(batch, tokenizer.vocab_size)
            for lib in libraries:
                lib.replay(docs[:batch], logits)  # warm-up
                n = min(len(d) for d in docs[:batch])
                per = best_of(lambda: lib.replay(docs[:batch], logits)) / n
                rows.append((tokenizer.vocab_size, batch, lib.name, per, step))
            rows.append((tokenizer.vocab_size, batch, "engine, constrained", constrained - step, step))
    print(f"\n{'vocab':>6} {'batch':>5}  {'':20} {'per token':>10} {'decode step':>12} {'ratio':>7}  CPU")
    for vocab, batch, name, per, step in rows:
        print(f"{vocab:>6} {batch:>5}  {name:20} {per * 1e3:8.3f}ms {step * 1e3:10.2f}ms {per / step:7.1%}  {cpu}")
    print("\nper token: mask + apply + advance for the whole batch; 'engine, constrained': the engine's decode step "
          "with every request under a JSON grammar, less the unconstrained step")


if __name__ == "__main__":
    main()
