"""Rotary position embedding with DeepSeek's interleaved pairs, and YaRN context extension.

RoPE only touches the decoupled dimensions: the last qk_rope_head_dim of each query head and the single shared
key k^R (V3 report Eqs. 3 and 8). DeepSeek checkpoints pair dimensions (2i, 2i+1), GPT-J style; pairing (i, i+d/2)
instead would silently scramble real weights.
"""

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_mscale


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [qk_rope_head_dim/2], YaRN-blended when rope_scaling is set (V3 report section 4.3)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:  # the dimension whose wavelength fits `rotations` times
        return dim * math.log(rs["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rs["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    # high-frequency dims (ramp 0) keep their frequency; low-frequency dims are interpolated by the factor
    return inv_freq / rs["factor"] * ramp + inv_freq * (1 - ramp)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's temperature t = mscale^2 on the whole logit (not only the rope part)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling is not None:
        scale *= yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]) ** 2
    return scale


class Rotary(nn.Module):
    """Produces the rotations e^{i p theta_j} [..., T, dr/2] (complex64) for given positions p."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # computed on the CPU, then moved to the ambient default device (a torch.device(...) context, meta included)
        self.register_buffer("inv_freq", yarn_inv_freq(cfg).to(torch.empty(0).device), persistent=False)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the buffer, e.g. after the model was built on the meta device."""
        self.inv_freq = yarn_inv_freq(self.cfg).to(device)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        if torch.compiler.is_compiling():  # inductor generates no code for complex numbers: (cos, sin) pairs
            return torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(-2)
        return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x_2i, x_2i+1) of x [..., dr] as complex numbers x_2i + i x_2i+1 by
    `rotation` (complex, broadcastable to [..., dr/2]; under torch.compile real (cos, sin) pairs [..., dr]). In
    float32, cast back, as DeepSeek's reference code does."""
    x32 = x.float()
    if torch.compiler.is_compiling():  # the same product in reals, rotation as (cos, sin) pairs (Rotary)
        a, b = x32.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = rotation.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).to(x.dtype)
    if x32.stride(-1) != 1 or x32.storage_offset() % 2 or any(st % 2 for st in x32.stride()[:-1]):
        x32 = x32.contiguous()  # view_as_complex needs pairs laid out as (real, imag)
    out = torch.view_as_real(torch.view_as_complex(x32.unflatten(-1, (-1, 2))) * rotation).flatten(-2)
    return out.to(x.dtype)


def apply_rope_halves(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """RoPE over the pairs (x_i, x_i+d/2) instead (the GPT-NeoX / Llama layout), as DeepSeek-V3.2's indexer
    rotates its keys and queries: the same rotation applied to the halves interleaved, then laid out again."""
    half = x.shape[-1] // 2
    paired = x.unflatten(-1, (2, half)).transpose(-1, -2).flatten(-2)
    return apply_rope(paired, rotation).unflatten(-1, (half, 2)).transpose(-1, -2).flatten(-2)
