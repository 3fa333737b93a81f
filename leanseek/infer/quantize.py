"""Quantised weights for inference on a CPU (`--quantize int8|int4`), each mode chosen by measurement on a 2-core
AVX2 machine (benchmarks/quantize.py prints the figures):

- int8: weights int8 per output channel, and each token's activations int8 with a scale of their own (so a token's
  result does not depend on what else is in the batch), multiplied by torch._int_mm with int32 sums and rescaled.
  A quarter of float32's memory; a matrix-vector product about 6x faster than float32 here, where PyTorch's
  weight-only int8 kernel (_weight_int8pack_mm) measured 2x slower than float32.
- int4: weights only, in groups of 32 along the input, each with a scale and an offset (as llama.cpp's q4_1),
  through PyTorch's _weight_int4pack_mm_for_cpu: an eighth of float32's memory, but on AVX2 that kernel is slower
  than float32 (it is a memory mode, not a speed mode).

The routers, kv_b_proj (the absorbed attention reads its weight as W^UK and W^UV), norms and embeddings stay
float; the output head is int8 in both modes (llama.cpp's q4 types keep it above 4 bits too), as is any matrix
whose shape the int4 kernel cannot take (inputs in whole groups of 32, outputs in multiples of 16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, Routing, _expert_rows, sort_by_expert

MODES = ("int8", "int4")
GROUP = 32  # int4: input positions sharing a scale and offset


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> int8 [M, K] and each row's scale [M, 1] (symmetric: x ~ q * scale)."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
    return (x / scale).round_().to(torch.int8), scale


def quantize_matrix(w: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] (out x in) -> (the quantised weight, its parameters): int8 [N, K] and scales [N]; or
    int4 packed as the CPU kernel wants [N, K/2] and per group (scale, offset) [K/GROUP, N, 2]."""
    w = w.detach().float()
    if mode == "int8":
        q, scale = quantize_rows(w)
        return q, scale.squeeze(-1)
    N, K = w.shape
    groups = w.view(N, K // GROUP, GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-12) / 15
    q = ((groups - low) / scale).round_().clamp_(0, 15).view(N, K).to(torch.int32)
    # the kernel computes w = (q - 8) * scale + zero, so zero is the value of the middle level 8
    zero = low + 8 * scale
    params = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/GROUP, N, 2]
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), params


def matmul(x: torch.Tensor, q: torch.Tensor, params: torch.Tensor, mode: str,
           rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [M, K] (float) @ the quantised weight's transpose -> [M, N] in x's dtype. rows: x already through
    quantize_rows (int8 mode; several weights applied to one input quantise it once)."""
    if mode == "int4":
        return torch._weight_int4pack_mm_for_cpu(x.contiguous(), q, GROUP, params.to(x.dtype))
    xq, xs = rows if rows is not None else quantize_rows(x)
    return (torch._int_mm(xq, q.t()).to(x.dtype) * xs.to(x.dtype)) * params.to(x.dtype)


def quantizable(w: torch.Tensor, mode: str) -> bool:
    """int4's kernel needs whole groups along the input and outputs in multiples of 16."""
    return mode == "int8" or (w.shape[-1] % GROUP == 0 and w.shape[-2] % 16 == 0)


class QuantLinear(nn.Module):
    """nn.Linear without bias, with quantised weights (see the module docstring)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, linear.in_features, linear.out_features
        q, params = quantize_matrix(linear.weight, mode)
        self.register_buffer("qweight", q)
        self.register_buffer("qparams", params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x.reshape(-1, self.in_features), self.qweight, self.qparams, self.mode)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


class QuantExperts(nn.Module):
    """Experts with quantised weights: each expert that has tokens runs its two quantised products (the grouped
    path of Experts, without autograd); int8 quantises the tokens once for every expert's gate/up product."""

    def __init__(self, experts: Experts, mode: str):
        super().__init__()
        self.mode = mode
        self.n_experts, _, self.inter = experts.down_proj.shape
        for name in ("gate_up_proj", "down_proj"):
            parts = [quantize_matrix(w, mode) for w in getattr(experts, name)]
            self.register_buffer(f"{name}_q", torch.stack([q for q, _ in parts]))
            self.register_buffer(f"{name}_params", torch.stack([p for _, p in parts]))

    def inference_path(self, n: int, device_type: str | None = None) -> str:
        return "grouped"  # data-dependent shapes: the engine runs quantised models eagerly

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        Ie, mode = self.inter, self.mode
        token, weights, counts = sort_by_expert(routing, self.n_experts)
        weights = weights.to(x.dtype)
        rows = quantize_rows(x) if mode == "int8" else None
        out = torch.zeros_like(x)
        for e, span in _expert_rows(counts):
            te = token[span]
            picked = None if rows is None else (rows[0].index_select(0, te), rows[1].index_select(0, te))
            h = matmul(x.index_select(0, te), self.gate_up_proj_q[e], self.gate_up_proj_params[e], mode, picked)
            act = F.silu(h[:, :Ie]).mul_(h[:, Ie:]).mul_(weights[span, None])
            out.index_add_(0, te, matmul(act, self.down_proj_q[e], self.down_proj_params[e], mode))
        return out


def check_mode(mode: str, device: torch.device | str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantize: {mode!r} is not one of {', '.join(MODES)}")
    if torch.device(device).type != "cpu":
        raise ValueError("quantize: the int8/int4 kernels used are PyTorch's CPU ones; load the model on the CPU")


def check_model(cfg) -> None:
    if cfg.v4:
        raise ValueError("quantize: DeepSeek-V4 models are not quantised yet (their grouped output projection and "
                         "compressors read weights directly)")


def _quantized(model: nn.Module, child: nn.Module, name: str, mode: str) -> nn.Module | None:
    """The quantised replacement of a model's submodule `child` (its attribute name `name`), or None to keep it."""
    if isinstance(child, Experts):
        whole = quantizable(child.gate_up_proj, mode) and quantizable(child.down_proj, mode)
        return QuantExperts(child, mode if whole else "int8")
    if isinstance(child, nn.Linear) and name != "kv_b_proj" and child.bias is None:
        if child is model.lm_head and child.weight is model.embed_tokens.weight:
            return None  # tied to the embeddings, which stay float
        head = child is model.lm_head
        return QuantLinear(child, mode if quantizable(child.weight, mode) and not head else "int8")
    return None


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace the model's linears and experts by quantised ones, in place (weights move to the CPU kernels'
    layouts; the float ones are freed). Returns the model."""
    check_mode(mode, next(model.parameters()).device)
    check_model(model.cfg)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (new := _quantized(model, child, name, mode)) is not None:
                setattr(module, name, new)
    return model.eval()


def quantize_loaded(model: nn.Module, key: str, mode: str) -> None:
    """While a model loads tensor by tensor (load_hf(quantize=...)): quantise the module that owns state key
    `key` once all its tensors are in, so that the float weights of no more than one module are held at once."""
    path, _, _ = key.rpartition(".")
    parent_path, _, name = path.rpartition(".")
    child = model.get_submodule(path)
    if any(t.is_meta for t in child.parameters()):
        return
    if (new := _quantized(model, child, name, mode)) is not None:
        setattr(model.get_submodule(parent_path), name, new)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules())
