"""How fast a model learns to copy from its context (an induction head: find the earlier occurrence of the current
token, predict what followed it), for leanseek's `tiny` preset beside two peers of the same width, depth and heads:
transformers' LlamaForCausalLM and a plain PyTorch transformer (nn.TransformerEncoder, learned absolute positions),
each at a chosen initialisation, trained side by side on the same batches. Using a looked-up definition is this
skill, and the `cpu` speedrun's model does not have it (README, "Built-in tools").

    .venv/bin/python benchmarks/induction.py [--steps 2200] [--threads 2] [--runs tiny:0.02 plain:torch ...]

A run is MODEL:INIT[,EMBED]: MODEL is tiny, llama or plain; INIT the standard deviation of every matrix's normal
initialisation (`initializer_range`; 0.02 is DeepSeek-V3's and Llama's) or `torch` for PyTorch's own layer
initialisation (plain only); EMBED, if given, the embedding's standard deviation instead of INIT.

Each sequence is 64 random tokens in which a span of 6 to 20 tokens appears twice, at a random distance; the loss
and the accuracy are on the second occurrence (after its first token), so only copying by content helps: a fixed
offset does not (a task with the repeat at a fixed distance is learned through position alone, which does not
transfer to text). Printed: the copy accuracy every 100 steps, and the first step at which each run reaches 50%.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from harness import cpu_model
from torch import nn

from leanseek.model import ModelConfig, Transformer

VOCAB, LENGTH, BATCH = 4096, 64, 16
RUNS = ["tiny:0.02", "plain:torch", "plain:0.02", "llama:0.04,1"]


class Plain(nn.Module):
    """A pre-norm causal transformer with learned absolute positions (PyTorch's own layers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(LENGTH, cfg.hidden_size)
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, 2 * cfg.intermediate_size, 0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=False)
        for m in self.layers.modules():  # the encoder's layers are copies of one: give each its own draw
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()
            elif isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x):
        h = self.embed(x) + self.position(torch.arange(x.size(1)))
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1))
        return self.head(self.layers(h, mask=mask, is_causal=True))


class Llama(nn.Module):
    """transformers' Llama with tiny's width, depth and heads (RoPE, RMSNorm, SwiGLU, no biases), untied."""

    def __init__(self, cfg: ModelConfig, std: float):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
            initializer_range=std, tie_word_embeddings=False))

    def forward(self, x):
        return self.model(x).logits


def build(run: str, cfg: ModelConfig) -> nn.Module:
    name, _, init = run.partition(":")
    std, _, embed = init.partition(",")
    if name == "plain":
        model = Plain(cfg)
        if std != "torch":
            for param, p in model.named_parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=float(std))
                elif param.endswith("bias"):
                    nn.init.zeros_(p)
        embedding = model.embed.weight
    elif name == "llama":
        model = Llama(cfg, float(std))
        embedding = model.model.model.embed_tokens.weight
    elif name == "tiny":
        model = Transformer(ModelConfig.preset("tiny", vocab_size=VOCAB, initializer_range=float(std)))
        embedding = model.embed_tokens.weight
    else:
        raise SystemExit(f"--runs: unknown model {name!r} in {run!r} (tiny, llama or plain)")
    if embed:
        nn.init.normal_(embedding, std=float(embed))
    return model


def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(20, VOCAB - 96, (BATCH, LENGTH), generator=gen)
    y = torch.full((BATCH, LENGTH), -100)
    for row in range(BATCH):
        span = int(torch.randint(6, 21, (), generator=gen))
        again = span + int(torch.randint(0, LENGTH + 1 - 2 * span, (), generator=gen))
        x[row, again:again + span] = x[row, :span]
        y[row, again:again + span - 1] = x[row, again + 1:again + span]  # predicted at the position before
    return x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", nargs="+", default=RUNS, help="MODEL:INIT[,EMBED] (module docstring)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB)
    models = {}
    for run in args.runs:
        torch.manual_seed(0)
        models[run] = build(run, cfg)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; copy accuracy on the "
          f"second occurrence, AdamW lr {args.lr}, batch {BATCH} x {LENGTH}")
    optimizers = {run: torch.optim.AdamW(m.parameters(), lr=args.lr) for run, m in models.items()}
    reached = dict.fromkeys(models)
    gen, start = torch.Generator().manual_seed(0), time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(gen)
        accuracy = {}
        for run, model in models.items():
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
            optimizers[run].zero_grad()
            loss.backward()
            optimizers[run].step()
            accuracy[run] = (logits.argmax(-1)[y != -100] == y[y != -100]).float().mean().item()
            if reached[run] is None and accuracy[run] >= 0.5:
                reached[run] = step
        if step % 100 == 0:
            print(f"step {step:5d}  " + "  ".join(f"{r} {a:6.1%}" for r, a in accuracy.items()) +
                  f"  ({time.time() - start:.0f} s)", flush=True)
    for run, step in reached.items():
        print(f"{run:>14}: 50% copy accuracy at step {step}" if step else f"{run:>14}: not 50% in {args.steps} steps")


if __name__ == "__main__":
    main()
