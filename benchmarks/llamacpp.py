"""leanseek's engine against llama.cpp on the same weights, side by side in one run: a checkpoint is exported with
`leanseek export --gguf` (f32 and q8_0), greedy outputs are compared, then both decode and prefill are timed.

    pip install llama-cpp-python   # dev-only: builds llama.cpp from source (minutes)
    .venv/bin/python benchmarks/llamacpp.py [--model runs/speedrun-cpu/rl] [--threads 2] [--new-tokens 128]

Printed, with the CPU model and thread count: greedy agreement with llama.cpp f32 on chat prompts (tokens equal
before the first difference, of those leanseek wrote up to its end of turn) and tokenization parity on their text;
then tokens/s for batch-1 decode (a 32-token prompt, --new-tokens tokens, the prefill excluded), prefill of a
400-token prompt, and aggregate decode at 16 concurrent sequences. llama.cpp runs through llama-cpp-python's
`Llama` (its generate loop, greedy), which decodes one sequence at a time: its 16-sequence figure is its
single-stream one, labelled. leanseek runs eagerly and compiled (Engine(compile=True), what `leanseek serve` and
`chat` use on a CPU; compiled in an untimed warm-up). The engines take turns, five rounds, and each figure is an
engine's best round.

What an AVX2-only machine would see, measured on an AVX-512 one: llama.cpp built without AVX-512, and PyTorch's
kernels and inductor's generated code held to AVX2 by ATEN_CPU_CAPABILITY (the first line printed names both):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        .venv/bin/pip install --no-cache-dir --no-deps --target /tmp/llama-avx2 llama-cpp-python
    ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=/tmp/llama-avx2 .venv/bin/python benchmarks/llamacpp.py
"""

import argparse
import random
import tempfile
from pathlib import Path

import torch
from harness import best_of, cpu_model

import leanseek
from leanseek.data import TextTokenizer, load_split
from leanseek.data.chat import encode_chat
from leanseek.data.tokenizer import END_OF_TURN
from leanseek.train.checkpoint import checkpoint_of
from leanseek.train.gguf import write_gguf

REPEATS = 5  # each figure the best of this many runs
PROMPTS = ["Hello! Who are you?", "What does 'harbor' mean?", "What is 37 + 48?", "Tell me about Python lists."]


class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def generate(self, prompt: list[int], n: int, stop: int | None = None) -> list[int]:
        self.llm.reset()
        out = []
        for token in self.llm.generate(prompt, temp=0.0, reset=True):
            if token == stop:
                break
            out.append(token)
            if len(out) == n:
                break
        return out

    def prefill(self, prompt: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(prompt)


def llama_isa() -> str:
    """The vector instructions the installed llama.cpp was built to use, from its system info line."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    flags = [k.strip() for k, _, v in (p.partition("=") for p in info.split("|")) if v.strip() == "1"]
    return "+".join(f for f in flags if f.startswith("AVX")) or "no AVX"


def split_parity(llm, tok: TextTokenizer, data: Path) -> tuple[int, int, int]:
    """Each document of the validation split (a <|bos|> and its tokens), decoded to text and tokenized again by
    llama.cpp: how many come out as the very tokens leanseek wrote, of how many, and the split's tokens."""
    tokens = load_split(data, "val")[0][:].tolist()
    starts = [i for i, t in enumerate(tokens) if t == tok.bos_id] + [len(tokens)]
    docs = [tokens[a + 1:b] for a, b in zip(starts, starts[1:])]
    same = sum(llm.tokenize(tok.decode(doc).encode(), add_bos=False, special=False) == doc for doc in docs)
    return same, len(docs), len(tokens)


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/speedrun-cpu/rl", help="a run folder or checkpoint (./run.sh's final "
                                                                    "model by default)")
    ap.add_argument("--data", help="a `leanseek data` folder whose validation split llama.cpp must tokenize as "
                                   "leanseek did (default: the run's own, beside --model, if there)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="time leanseek's eager engine only")
    args = ap.parse_args()
    import llama_cpp

    source = checkpoint_of(Path(args.model))
    torch.set_num_threads(args.threads)
    tok = TextTokenizer.load(source)
    model = leanseek.load_hf(source)
    end = tok.token_id(END_OF_TURN)
    rng = random.Random(0)
    short = [rng.randrange(300, tok.vocab_size) for _ in range(32)]
    long = [rng.randrange(300, tok.vocab_size) for _ in range(400)]
    n_ctx = 512
    # no prefix reuse: llama.cpp is reset before each run, so both compute every prompt in full
    engines = {"eager": leanseek.Engine(model, tok, max_batch=16, max_len=n_ctx, prefix_cache=False)}
    if not args.no_compile:
        engines["compiled"] = leanseek.Engine(model, tok, max_batch=16, max_len=n_ctx, compile=True,
                                              prefix_cache=False)

    with tempfile.TemporaryDirectory() as tmp:
        peers = {}
        for outtype in ("f32", "q8_0"):
            path = Path(tmp) / f"model-{outtype}.gguf"
            written = write_gguf(model, tok, path, outtype)
            peers[f"llama.cpp {outtype}"] = LlamaCpp(path, args.threads, n_ctx)
            print(f"# exported {source} as {outtype}: {written['bytes'] / 2**20:.1f} MiB", flush=True)
        print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
              f"llama-cpp-python {llama_cpp.__version__} ({llama_isa()}); {model.cfg.param_counts()}")

        f32 = peers["llama.cpp f32"]
        same_tokens = all(f32.llm.tokenize(p.encode(), add_bos=False, special=False) == tok.encode(p)
                          for p in PROMPTS)
        print(f"tokenization of the prompts' text: {'identical' if same_tokens else 'DIFFERS'}")
        data = Path(args.data) if args.data else Path(args.model).parent / "data"
        if (data / "manifest.json").is_file():
            same, docs, n_tokens = split_parity(f32.llm, tok, data)
            print(f"tokenization of {data}'s validation split ({n_tokens:,} tokens): {same:,} of {docs:,} "
                  "documents identical")
        for question in PROMPTS:
            ids = encode_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)[0]
            ours = engines["eager"].generate([ids], max_new_tokens=64, stop=[end])[0]
            ours = ours[:-1] if ours and ours[-1] == end else ours
            theirs = f32.generate(ids, 64, stop=end)
            print(f"greedy agreement {agreement(ours, theirs):>3}/{len(ours):<3} {question!r}")

        def ours_decode(engine, prompts, n):
            outs = engine.generate(prompts, max_new_tokens=n)
            assert all(len(o) == n for o in outs)

        n = args.new_tokens
        # name -> (decode 1 token, decode n tokens, prefill, 16 sequences or None), each a callable to time
        runs = {}
        for name, engine in engines.items():
            engine.warm_up(progress=False)
            runs[f"leanseek {name}"] = (lambda e=engine: ours_decode(e, [short], 1),
                                        lambda e=engine: ours_decode(e, [short], n),
                                        lambda e=engine: e.generate([long], max_new_tokens=1),
                                        lambda e=engine: ours_decode(e, [short] * 16, n))
        for name, peer in peers.items():
            runs[name] = (lambda p=peer: p.generate(short, 1), lambda p=peer: p.generate(short, n),
                          lambda p=peer: p.prefill(long), None)
        for fn in (fn for fns in runs.values() for fn in fns if fn is not None):  # warm-up
            fn()
        # the engines take turns, each repeat timing every one of them: a slow spell of this shared machine
        # falls on all of them rather than on whichever ran then
        times = {name: [[] for _ in fns] for name, fns in runs.items()}
        for _ in range(REPEATS):
            for name, fns in runs.items():
                for i, fn in enumerate(fns):
                    if fn is not None:
                        times[name][i].append(best_of(fn, 1))
        rows = {}
        for name, (first, whole, prefill, sixteen) in times.items():
            decode = (n - 1) / (min(whole) - min(first))
            rows[name] = (decode, 400 / min(prefill), 16 * n / min(sixteen) if sixteen else decode,
                          "" if sixteen else " (one stream)")
    reference = rows["llama.cpp f32"]
    print("\n| engine | batch-1 decode tok/s | prefill 400 tokens, tok/s | 16 sequences, tok/s |")
    print("|---|---|---|---|")
    for name, (decode, prefill, aggregate, note) in rows.items():
        print(f"| {name} | {decode:,.0f} ({decode / reference[0]:.2f}x) | {prefill:,.0f} "
              f"({prefill / reference[1]:.2f}x) | {aggregate:,.0f}{note} |")
    print(f"\nratios against llama.cpp f32; each figure the best of {REPEATS} runs")


if __name__ == "__main__":
    main()
