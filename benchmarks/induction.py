"""How fast a model learns to copy from its context (an induction head: find the earlier occurrence of the current
token, predict what followed it), leanseek's `tiny` preset against a plain PyTorch transformer of the same width,
depth and heads, trained side by side on the same batches. Using a looked-up definition is this skill, and the
`cpu` speedrun's model does not have it (README, "Built-in tools").

    .venv/bin/python benchmarks/induction.py [--steps 1500] [--threads 2]

Each sequence is 64 random tokens in which a span of 6 to 20 tokens appears twice, at a random distance; the loss
and the accuracy are on the second occurrence (after its first token), so only copying by content helps: a fixed
offset does not (a task with the repeat at a fixed distance is learned through position alone, which does not
transfer to text). Printed: the copy accuracy every 100 steps, and the first step at which each model reaches 50%.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from grammar_mask import cpu_model
from torch import nn

from leanseek.model import ModelConfig, Transformer

VOCAB, LENGTH, BATCH = 4096, 64, 16


class Plain(nn.Module):
    """A pre-norm causal transformer with learned absolute positions (PyTorch's own layers)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(LENGTH, cfg.hidden_size)
        layer = nn.TransformerEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, 2 * cfg.intermediate_size, 0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.num_hidden_layers, enable_nested_tensor=False)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x):
        h = self.embed(x) + self.position(torch.arange(x.size(1)))
        mask = nn.Transformer.generate_square_subsequent_mask(x.size(1))
        return self.head(self.layers(h, mask=mask, is_causal=True))


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
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.preset("tiny", vocab_size=VOCAB)
    torch.manual_seed(0)
    models = {"leanseek tiny": Transformer(cfg), "plain PyTorch": Plain(cfg)}
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; copy accuracy on the "
          f"second occurrence, AdamW lr {args.lr}, batch {BATCH} x {LENGTH}")
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=args.lr) for name, m in models.items()}
    reached = dict.fromkeys(models)
    gen, start = torch.Generator().manual_seed(0), time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(gen)
        accuracy = {}
        for name, model in models.items():
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)
            optimizers[name].zero_grad()
            loss.backward()
            optimizers[name].step()
            accuracy[name] = (logits.argmax(-1)[y != -100] == y[y != -100]).float().mean().item()
            if reached[name] is None and accuracy[name] >= 0.5:
                reached[name] = step
        if step % 100 == 0:
            print(f"step {step:5d}  " + "  ".join(f"{n}: {a:6.1%}" for n, a in accuracy.items()) +
                  f"  ({time.time() - start:.0f} s)", flush=True)
    for name, step in reached.items():
        print(f"{name}: 50% copy accuracy at step {step}" if step else f"{name}: not 50% in {args.steps} steps")
    ours, theirs = reached["leanseek tiny"], reached["plain PyTorch"]
    if ours and theirs:
        print(f"steps to learn copying, leanseek tiny / plain PyTorch: {ours / theirs:.2f}x")
    elif theirs:
        print(f"steps to learn copying, leanseek tiny / plain PyTorch: > {args.steps / theirs:.2f}x")


if __name__ == "__main__":
    main()
