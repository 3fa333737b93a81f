"""The `leanseek` command: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .model.config import ModelConfig, human
from .model.presets import PRESETS


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list) -> str:  # first column left-aligned, the others right-aligned
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def resolve_config(name: str) -> ModelConfig:
    """A preset name, or a folder / config.json path."""
    if name in PRESETS:
        return ModelConfig.preset(name)
    from .model.hf import read_config

    path = Path(name)
    return read_config(path.parent if path.name == "config.json" else path)


def cmd_presets(args) -> None:
    rows = []
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        pc, kv = cfg.param_counts(), cfg.kv_cache_values_per_token()
        rows.append([name, human(pc.total), human(pc.active), human(pc.mtp),
                     f"{cfg.flops_per_token(args.seq_len) / 1e9:.3g}", f"{kv['mla'] * 2 / 1024:.1f}",
                     f"{kv['mha'] * 2 / 1024:.1f}"])
    print(table(rows, ["preset", "total", "active", "MTP", f"GFLOP/token@{args.seq_len}", "KV KiB/token (MLA)",
                       "(MHA)"]))
    print("\nGFLOP/token: training (forward + backward), MTP included. KV cache in bf16: MLA caches "
          "kv_lora_rank + qk_rope_head_dim per layer; MHA would cache full keys and values for every head.")


def cmd_info(args) -> None:
    cfg = resolve_config(args.model)
    pc, kv = cfg.param_counts(), cfg.kv_cache_values_per_token()
    rows = [["model type", cfg.model_type],
            ["layers (dense + MoE)", f"{cfg.num_hidden_layers} ({cfg.first_k_dense_replace} + "
                                     f"{cfg.num_hidden_layers - cfg.first_k_dense_replace})"],
            ["hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads}"],
            ["MLA ranks (q, kv) / head dims (nope, rope, v)",
             f"{cfg.q_lora_rank}, {cfg.kv_lora_rank} / {cfg.qk_nope_head_dim}, {cfg.qk_rope_head_dim}, "
             f"{cfg.v_head_dim}"],
            ["experts (routed, shared, active)",
             f"{cfg.n_routed_experts}, {cfg.n_shared_experts}, {cfg.num_experts_per_tok}"],
            ["routing", f"{cfg.scoring_func} / {cfg.topk_method}, {cfg.topk_group} of {cfg.n_group} groups"],
            ["parameters: total", f"{pc.total:,} ({human(pc.total)})"],
            ["parameters: active per token", f"{pc.active:,} ({human(pc.active)})"],
            ["parameters: MTP modules", f"{pc.mtp:,} ({human(pc.mtp)})"],
            [f"training FLOPs per token at {args.seq_len}", f"{cfg.flops_per_token(args.seq_len):.4g}"],
            ["KV cache values per token: MLA / MHA", f"{kv['mla']:,} / {kv['mha']:,} "
                                                     f"({kv['mla'] / kv['mha']:.1%})"]]
    print(table(rows, [args.model, ""]))


def cmd_init(args) -> None:
    import torch

    from . import Transformer, save_hf

    torch.manual_seed(args.seed)
    cfg = ModelConfig.preset(args.preset)
    t0 = time.perf_counter()
    path = save_hf(Transformer(cfg), args.out, dtype=getattr(torch, args.dtype))
    print(f"wrote a randomly initialised {args.preset} model ({human(cfg.param_counts().total)} parameters) "
          f"to {path} in {time.perf_counter() - t0:.1f}s")


def cmd_check(args) -> None:
    """Load a checkpoint with leanseek, run a forward pass and, when transformers is installed, compare logits."""
    import torch

    from . import load_hf

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_hf(args.model)
    print(f"loaded {args.model}: {model.cfg.model_type}, {human(model.cfg.param_counts().total)} parameters "
          f"({time.perf_counter() - t0:.2f}s)")
    ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq_len))
    with torch.no_grad():
        t0 = time.perf_counter()
        ours = model(ids)
        dt = time.perf_counter() - t0
    print(f"forward {args.batch} x {args.seq_len}: {dt * 1e3:.1f} ms ({ids.numel() / dt:,.0f} tokens/s), "
          f"logits {tuple(ours.shape)}, finite: {bool(ours.isfinite().all())}")
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("transformers is not installed: skipped the parity check")
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    theirs = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        diff = (theirs.eval()(ids).logits - ours).abs().max().item()
    verdict = "OK" if diff < 1e-4 else "MISMATCH"
    print(f"transformers {transformers.__version__} {type(theirs).__name__}: max |logit difference| "
          f"{diff:.2e} ({verdict})")
    if verdict != "OK":
        sys.exit(1)


def cmd_data(args) -> None:
    import random

    from .data import TextTokenizer, collect, train_tokenizer, write_shards

    t0 = time.perf_counter()
    docs, stats = collect(args.source, args.field)
    chars = sum(s.chars for s in stats)
    print(f"read {len(docs):,} documents, {chars / 1e6:.1f}M characters, in {time.perf_counter() - t0:.1f}s")
    if args.tokenizer:
        tokenizer = TextTokenizer.load(args.tokenizer)
    else:
        t0 = time.perf_counter()
        sample = random.Random(0).sample(docs, len(docs))  # a shuffled sample, so every source is represented
        budget, picked = args.tokenizer_sample_mb * 1e6, []
        for doc in sample:
            picked.append(doc)
            budget -= len(doc)
            if budget <= 0:
                break
        tokenizer = train_tokenizer(iter(picked), args.vocab_size)
        print(f"trained a {tokenizer.vocab_size:,}-token byte-level BPE on {sum(map(len, picked)) / 1e6:.1f}M "
              f"characters in {time.perf_counter() - t0:.1f}s")
    tokenizer.save(args.out)
    manifest = write_shards(docs, tokenizer, args.out, stats, args.val_fraction)
    rows = [[s["name"], f"{s['documents']:,}", f"{s['chars'] / 1e6:.2f}M", f"{s['skipped']:,}"]
            for s in manifest["sources"]]
    print(table(rows, ["source", "documents", "characters", "skipped"]))
    for s in manifest["sources"]:
        for example in s["skipped_examples"]:
            print(f"  skipped: {example}")
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens "
              f"({split['bytes'] / max(split['tokens'], 1):.2f} bytes/token) in {len(split['files'])} file(s)")
    print(f"wrote {args.out}")


def cmd_cost(args) -> None:
    from .train.cost import DEEPSEEK_V3, PEAK_TFLOPS, CostEstimate

    cfg = resolve_config(args.preset)
    peak = PEAK_TFLOPS[args.device] if args.peak_tflops is None else args.peak_tflops
    est = CostEstimate.for_run(cfg, args.tokens, args.seq_len, peak, args.mfu, args.price)
    rows = [["training FLOPs per token", f"{cfg.flops_per_token(args.seq_len):.4g}"],
            ["total FLOPs", f"{est.flops:.4g}"],
            ["device peak / MFU", f"{peak:g} TFLOP/s / {args.mfu:.0%}"],
            ["device-hours", f"{est.device_hours:,.0f}"],
            ["cost", f"${est.dollars:,.0f} at ${args.price:g} per device-hour"]]
    print(table(rows, [f"{args.preset}, {args.tokens:.4g} tokens at {args.seq_len}", ""]))
    if args.preset == "deepseek-v3":
        ref = DEEPSEEK_V3
        scale = args.tokens / ref["tokens"]
        hours = ref["pretrain_gpu_hours"]
        print(f"\nDeepSeek-V3 report, Table 1: pre-training {ref['tokens']:.3g} tokens took {hours / 1e6:.3f}M H800 "
              f"GPU-hours (${hours * ref['price'] / 1e6:.3f}M); for {args.tokens:.3g} tokens that is "
              f"{hours * scale / 1e6:.3f}M. This estimate: {est.device_hours / 1e6:.3f}M "
              f"({est.device_hours / (hours * scale):.2f}x).")


def last_line(line: dict) -> str:
    """A run's final metrics line, rounded for the terminal."""
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()})


def cmd_train(args) -> None:
    from .train.loop import run

    line = run(args)
    if line and int(os.environ.get("RANK", "0")) == 0:
        print(last_line(line))
        print(f"checkpoints: {args.out}/checkpoints, newest: {args.out}/latest (a Hugging Face model folder)")


def cmd_rl(args) -> None:
    from .rl.trainer import run

    print(last_line(run(args)))
    print(f"checkpoints: {args.out}/checkpoints, newest: {args.out}/latest; per step: {args.out}/metrics.jsonl")


def cmd_distill(args) -> None:
    from .train.distill import run

    r = run(args)
    print(json.dumps(r, indent=2))
    print(f"student: {args.out}/latest; {r['traces']} kept traces in {args.out}/traces.jsonl")


def cmd_chat(args) -> None:
    import torch

    from .data.tokenizer import TextTokenizer
    from .infer.engine import Engine
    from .model.hf import load_hf
    from .serve.terminal import TerminalChat
    from .train.checkpoint import checkpoint_of

    if args.threads:
        torch.set_num_threads(args.threads)
    path = checkpoint_of(Path(args.model))
    model, tokenizer = load_hf(path), TextTokenizer.load(path)
    engine = Engine(model, tokenizer, max_batch=1, max_len=args.max_len)
    TerminalChat(engine, tokenizer, temperature=args.temperature, max_new_tokens=args.max_new_tokens).run()


def cmd_serve(args) -> None:
    import threading

    import torch
    import uvicorn

    from .data.tokenizer import TextTokenizer
    from .infer.engine import Engine
    from .model.hf import load_hf
    from .data.chat import chat_format
    from .serve import create_app
    from .train.checkpoint import checkpoint_of

    if args.threads:
        torch.set_num_threads(args.threads)
    path = checkpoint_of(Path(args.model))
    model, tokenizer = load_hf(path), TextTokenizer.load(path, strict=False)  # any DeepSeek-architecture folder
    engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len, compile=args.compile)
    name = args.name or Path(args.model).resolve().name
    app = create_app(engine, tokenizer, name, api_key=args.api_key, max_queue=args.max_queue, worker_thread=False,
                     chat_format=chat_format(path))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    server.install_signal_handlers = lambda: None  # Ctrl-C reaches the main thread, which stops both
    http = threading.Thread(target=server.run, daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            sys.exit(f"could not serve on {args.host}:{args.port} (is the port in use?)")
        time.sleep(0.05)
    print(f"serving {path} as {name!r} on http://{args.host}:{args.port} (OpenAI API at /v1)")
    try:
        app.state.worker.run()  # the engine in the main thread (see leanseek.serve.worker)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)


def cmd_eval(args) -> None:
    import torch

    from .data.tokenizer import TextTokenizer
    from .eval.tasks import evaluate
    from .infer.engine import Engine, default_device
    from .model.hf import load_hf
    from .tasks import get_task
    from .train.checkpoint import checkpoint_of

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    path = checkpoint_of(Path(args.model))
    model, tokenizer = load_hf(path, device=default_device()), TextTokenizer.load(path)
    problems = task.test_set(args.problems)
    engine = Engine(model, tokenizer, max_batch=args.batch, max_len=256 + args.max_new_tokens)
    t0 = time.perf_counter()
    result, greedy = evaluate(engine, tokenizer, task, problems, k=args.k, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    seconds = time.perf_counter() - t0
    columns = list(result["all"])
    rows = [[bucket] + [f"{v[c]:.3f}" if isinstance(v[c], float) else v[c] for c in columns]
            for bucket, v in result.items()]
    print(f"{task.name} ({task.description}): {path}")
    print(table(rows, ["bucket"] + columns))
    print("pass@1: greedy; length: greedy completion tokens; format: well-formed completions"
          + (f"; sampled at temperature {args.temperature}, {args.k} per problem" if args.k else ""))
    if args.json:
        from .atomic import write_text_atomic

        from .train.cost import forward_flops

        tokens = engine.processed_tokens
        write_text_atomic(Path(args.json), json.dumps({
            "task": task.name, "model": str(path), "k": args.k, "temperature": args.temperature,
            "metrics": result, "tokens": tokens, "flops": forward_flops(model.cfg, 256, tokens),
            "seconds": seconds}, indent=2) + "\n")
    for i in range(min(args.show, len(problems))):
        print(f"\n{problems[i].prompt} -> {tokenizer.decode(greedy[i][0].tokens)!r}")


def cmd_speedrun(args) -> None:
    from .speedrun import run

    run(args)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="leanseek", description="DeepSeek-V3-style models, trained and served cheaply.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="parameters, FLOPs and KV-cache size of every preset")
    p.add_argument("--seq-len", type=int, default=4096)
    p.set_defaults(run=cmd_presets)

    p = sub.add_parser("info", help="shape and accounting of a preset, a model folder or a config.json")
    p.add_argument("model", help="preset name, model folder or config.json")
    p.add_argument("--seq-len", type=int, default=4096)
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialised model as a Hugging Face folder")
    p.add_argument("--preset", default="tiny", choices=[n for n in PRESETS if n in ("tiny", "small")])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(run=cmd_init)

    p = sub.add_parser("check", help="load a Hugging Face folder, run it, and compare with transformers")
    p.add_argument("model", help="a DeepseekV3/V2ForCausalLM folder (config.json + safetensors)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("data", help="tokenize text sources into training shards (and train the tokenizer)")
    p.add_argument("--source", nargs="+", required=True,
                   help="'builtin', 'builtin:NAME', or paths: text/markdown files or folders, .jsonl, .parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--field", default="text", help="the JSONL field / Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--tokenizer", help="reuse the tokenizer in this folder instead of training one")
    p.add_argument("--tokenizer-sample-mb", type=float, default=20.0,
                   help="train the tokenizer on a shuffled sample of this many million characters")
    p.set_defaults(run=cmd_data)

    p = sub.add_parser("pretrain", help="train a base model on `leanseek data` shards (resumes; torchrun-ready)")
    from .train.loop import add_arguments

    add_arguments(p)
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("rl", help="GRPO with rule-based rewards on a verifiable task (resumes)")
    from .rl.trainer import add_arguments as rl_arguments

    rl_arguments(p)
    p.set_defaults(run=cmd_rl)
    p = sub.add_parser("chat", help="talk to a model in the terminal (streaming, /reset, /temperature, /think)")
    p.add_argument("model", help="a run folder or checkpoint")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-len", type=int, default=1024, help="tokens of the whole conversation")
    p.add_argument("--threads", type=int)
    p.set_defaults(run=cmd_chat)
    p = sub.add_parser("serve", help="an OpenAI-compatible server over the engine")
    p.add_argument("model", help="a run folder or checkpoint (a Hugging Face DeepseekV3/V2 folder with a tokenizer)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require Authorization: Bearer KEY")
    p.add_argument("--name", help="the model id clients use (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded at once")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per sequence, prompt and reply")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait beyond --max-batch (then 429)")
    p.add_argument("--compile", action="store_true", help="compiled decode steps (faster after a warm-up)")
    p.add_argument("--threads", type=int)
    p.set_defaults(run=cmd_serve)
    p = sub.add_parser("distill", help="rejection-sample a teacher's reasoning on a task, SFT a smaller student")
    from .train.distill import add_arguments as distill_arguments

    distill_arguments(p)
    p.set_defaults(run=cmd_distill)
    p = sub.add_parser("eval", help="pass@1, pass@k, maj@k, length and format rate on a task's held-out set")
    p.add_argument("model", help="a run folder or checkpoint")
    p.add_argument("--task", required=True)
    p.add_argument("--problems", type=int, default=500, help="held-out problems (the same first ones each time)")
    p.add_argument("--k", type=int, default=8, help="samples per problem for pass@k and maj@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="sequences decoded at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the metrics here")
    p.add_argument("--show", type=int, default=3, help="print this many greedy completions")
    p.add_argument("--threads", type=int)
    p.set_defaults(run=cmd_eval)
    p = sub.add_parser("sft", help="fine-tune a checkpoint on chats, the loss on the assistant's tokens "
                                   "(resumes; torchrun-ready)")
    add_arguments(p, "sft")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("speedrun", help="corpus -> tokenizer -> pretrain -> SFT -> GRPO -> eval -> report.md, "
                                        "each stage skipped when already complete")
    from .speedrun import add_arguments as speedrun_arguments

    speedrun_arguments(p)
    p.set_defaults(run=cmd_speedrun)

    p = sub.add_parser("cost", help="estimate the device-hours and dollars of a training run never made")
    p.add_argument("--preset", required=True, help="preset name, model folder or config.json")
    p.add_argument("--tokens", type=float, required=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--device", default="H800", choices=["H800", "H100", "H200", "A100", "B200"],
                   help="take the peak from this device's dense bf16 datasheet figure")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (overrides --device)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation achieved, 0-1")
    p.add_argument("--price", type=float, default=2.0, help="dollars per device-hour")
    p.set_defaults(run=cmd_cost)

    args = ap.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and CheckpointError are ValueErrors
        ap.exit(2, f"leanseek {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
