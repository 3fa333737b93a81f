"""Quantised inference at DeepSeek-V2-Lite's size against llama.cpp on the same weights.

A model of DeepSeek-V2-Lite's shape (hidden 2048, 16 heads, 64 routed experts of 1408 and 2 shared, a 102,400-token
vocabulary; --layers of its 27 decoder layers) with random weights is written in bf16, a decoder layer per
safetensors shard, as its release is. Then each engine loads it in a fresh process and decodes: leanseek with
`load_hf(quantize="int8"|"int4")` (each module quantised as it is read: no float32 copy of the model is ever held),
and llama.cpp (through llama-cpp-python) from q8_0 and q4_0 GGUF files that `leanseek export --gguf` writes a layer
at a time. Printed, with the CPU model and thread count: resident memory after decoding (anonymous and
file-backed: llama.cpp maps its file) and its peak while loading, load time, batch-1 decode tok/s (a 32-token
prompt, --new-tokens tokens, the prefill excluded, best of 3), and the figures projected to V2-Lite's 27 layers.

    pip install llama-cpp-python gguf   # dev-only
    .venv/bin/python benchmarks/quantize_scale.py [--layers 27] [--work /tmp/v2lite] [--threads 2]

Disk: about 1.2 GB per layer for the bf16 folder, 0.6 GB (q8_0) and 0.35 GB (q4_0) per layer for the GGUF files;
--keep leaves them in --work.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import best_of, cpu_model
from safetensors.torch import save_file

import leanseek
from leanseek.data import collect, train_tokenizer
from leanseek.model.hf import INDEX, _tensor_plan

MODES = ("leanseek int8", "leanseek int4", "llama.cpp q8_0", "llama.cpp q4_0")


def write_random_model(folder: Path, layers: int) -> leanseek.ModelConfig:
    """V2-Lite's shape with `layers` decoder layers and no MTP, random bf16 weights (std 0.02; norms 1), a shard
    per decoder layer, generated and written one shard at a time."""
    cfg = leanseek.ModelConfig.preset("deepseek-v2-lite").replace(num_hidden_layers=layers,
                                                                  num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = leanseek.Transformer(cfg)
    state = model.state_dict()
    groups: dict[str, list] = {}
    for entry in _tensor_plan(model):
        key = entry[0]
        groups.setdefault(key.split(".")[1] if key.startswith("layers.") else "top", []).append(entry)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for file, (group, entries) in zip(files, groups.items()):
        tensors = {}
        for key, names, split, _ in entries:
            if key.endswith("norm.weight"):
                t = torch.ones(state[key].shape)
            else:
                t = torch.randn(state[key].shape, generator=generator).mul_(0.02)
            for name, part in zip(names, split(t)):
                tensors[name] = part.to(torch.bfloat16).contiguous()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * 2 for t in tensors.values())
        print(f"# wrote {file} ({group})", flush=True)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({**cfg.to_hf(), "torch_dtype": "bfloat16"}, indent=2))
    docs, _ = collect(["builtin:python-topics"])
    train_tokenizer(iter(docs), 4096).save(folder)  # GGUF carries a tokenizer; ids past it are unused tokens
    return cfg


def measure(mode: str, path: Path, threads: int, new_tokens: int) -> dict:
    """In this (fresh) process: load, decode, and the process's peak resident memory."""
    torch.set_num_threads(threads)
    rng = random.Random(0)
    prompt = [rng.randrange(300, 4096) for _ in range(32)]
    t0 = time.perf_counter()
    if mode.startswith("leanseek"):
        model = leanseek.load_hf(path, quantize=mode.split()[1])
        engine = leanseek.Engine(model, max_batch=1, max_len=256)

        def decode(n):
            assert len(engine.generate([prompt], max_new_tokens=n)[0]) == n
    else:
        from llamacpp import LlamaCpp

        llm = LlamaCpp(path, threads, 256)

        def decode(n):
            assert len(llm.generate(prompt, n)) == n
    load = time.perf_counter() - t0
    decode(4)  # warm-up
    first, whole = best_of(lambda: decode(1), 3), best_of(lambda: decode(new_tokens), 3)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
    return {"load_s": load, "decode_tok_s": (new_tokens - 1) / (whole - first), "resident": kib["VmRSS"],
            "anonymous": kib["RssAnon"], "file_backed": kib["RssFile"], "peak": kib["VmHWM"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=27, help="decoder layers (V2-Lite has 27)")
    ap.add_argument("--work", default="/tmp/v2lite", help="folder for the model and the GGUF files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="leave the model and GGUF files in --work")
    ap.add_argument("--measure", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), args.threads, args.new_tokens)))
        return
    work = Path(args.work)
    folder = work / "hf"
    t0 = time.perf_counter()
    cfg = write_random_model(folder, args.layers)
    print(f"# wrote {folder}: {cfg.param_counts()} in {time.perf_counter() - t0:.0f} s", flush=True)
    paths = {"leanseek int8": folder, "leanseek int4": folder}
    for outtype in ("q8_0", "q4_0"):
        paths[f"llama.cpp {outtype}"] = work / f"model-{outtype}.gguf"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "leanseek", "export", str(folder), "--gguf",
                        str(paths[f"llama.cpp {outtype}"]), "--outtype", outtype], check=True)
        print(f"# exported in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
          f"llama-cpp-python {__import__('llama_cpp').__version__}; DeepSeek-V2-Lite's shape with {args.layers} of "
          f"its 27 decoder layers, random weights")
    rows = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--new-tokens",
                              str(args.new_tokens), "--measure", mode, str(paths[mode])],
                             check=True, capture_output=True, text=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# {mode}: {rows[mode]}", flush=True)
    files = {mode: sum(f.stat().st_size for f in Path(p).glob("*.safetensors")) if Path(p).is_dir()
             else Path(p).stat().st_size for mode, p in paths.items()}
    scale = 27 / args.layers
    print("\n| engine | file (GiB) | resident after decoding, GiB (anonymous + file-backed) | peak while loading (GiB) | "
          "load (s) | batch-1 decode tok/s | projected to 27 layers: resident GiB, tok/s |\n|---|---|---|---|---|---|---|")
    reference = rows["llama.cpp q8_0"]["decode_tok_s"]
    gib = 2**30
    for mode, r in rows.items():
        print(f"| {mode} | {files[mode] / gib:.1f} | {r['resident'] / gib:.2f} ({r['anonymous'] / gib:.2f} + "
              f"{r['file_backed'] / gib:.2f}) | {r['peak'] / gib:.2f} | {r['load_s']:.0f} | {r['decode_tok_s']:.2f} "
              f"({r['decode_tok_s'] / reference:.2f}x q8_0) | {r['resident'] * scale / gib:.1f}, "
              f"{r['decode_tok_s'] / scale:.2f} |")
    print("\nleanseek's file is the bf16 folder it quantises while loading (its peak counts the pages of the shards "
          "being read); llama.cpp maps its file (file-backed pages). Projections scale resident memory and time per "
          "token linearly in the decoder layers (the embedding and head do not grow: they slightly overstate)")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
