"""Rotary position embedding with DeepSeek's interleaved pairs, and YaRN context extension.

RoPE only touches the decoupled dimensions: the last qk_rope_head_dim of each query head and the single shared
key k^R (V3 report Eqs. 3 and 8). DeepSeek checkpoints pair dimensions (2i, 2i+1), GPT-J style; pairing (i, i+d/2)
instead would silently scramble real weights.
"""

import math

import torch
from torch import nn

from .config import ModelConfig, yarn_mscale


def rope_setting(cfg: ModelConfig, kind: str = "main") -> tuple[float, dict | None]:
    """(base, YaRN settings) of a RoPE. DeepSeek-V4 has two: "main" for its sliding-window layers (rope_theta, never
    YaRN-scaled) and "compress" for the layers with compressed branches (compress_rope_theta, rope_scaling)."""
    if kind == "compress":
        return cfg.compress_rope_theta, cfg.rope_scaling
    return cfg.rope_theta, None if cfg.v4 else cfg.rope_scaling


def yarn_inv_freq(cfg: ModelConfig, kind: str = "main") -> torch.Tensor:
    """Inverse frequencies [qk_rope_head_dim/2], YaRN-blended when rope_scaling is set (V3 report section 4.3)."""
    dim = cfg.qk_rope_head_dim
    base, rs = rope_setting(cfg, kind)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
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
    """1/sqrt(qk_head_dim), times YaRN's temperature t = mscale^2 on the whole logit (not only the rope part).
    DeepSeek-V4: 1/sqrt(head_dim), with no YaRN temperature (its reference code applies none)."""
    if cfg.v4:
        return cfg.head_dim ** -0.5
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling is not None:
        scale *= yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]) ** 2
    return scale


class Rotary(nn.Module):
    """Produces the rotations e^{i p theta_j} [..., T, dr/2] (complex64) for given positions p. kind: see
    rope_setting."""

    def __init__(self, cfg: ModelConfig, kind: str = "main"):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        # computed on the CPU, then moved to the ambient default device (a torch.device(...) context, meta included)
        self.register_buffer("inv_freq", yarn_inv_freq(cfg, kind).to(torch.empty(0).device), persistent=False)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Recompute the buffer, e.g. after the model was built on the meta device."""
        self.inv_freq = yarn_inv_freq(self.cfg, self.kind).to(device)

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
    if not rotation.is_complex():  # the same product in reals, rotation as (cos, sin) pairs (Rotary, compiled)
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


def inverse(rotation: torch.Tensor) -> torch.Tensor:
    """The opposite rotation (position -p), in either form Rotary produces."""
    if rotation.is_complex():
        return rotation.conj()
    cos, sin = rotation.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos, -sin], dim=-1).flatten(-2)


def rope_tail(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """RoPE on the trailing dims of x [..., D] (as many as `rotation` rotates), the rest unchanged: DeepSeek-V4
    lays each head out as [no position | position] (interleaved pairs, as V3)."""
    dr = 2 * rotation.shape[-1] if rotation.is_complex() else rotation.shape[-1]
    return torch.cat([x[..., :-dr], apply_rope(x[..., -dr:], rotation)], dim=-1)
