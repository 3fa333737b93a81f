"""Dequantising DeepSeek's released weight formats on load.

- FP8 (V3, V3.2, V4's non-expert linears): float8 e4m3 values in 128 x 128 blocks, each block with one scale: a
  float32 inverse scale `<name>_scale_inv` (V3), or an 8-bit power of two `<module>.scale` (V4's UE8M0 format:
  float8_e8m0fnu, the byte e meaning 2^(e - 127)).
- FP4 (V4's routed experts): two e2m1 values per byte (int8 [out, in/2]), the low nibble the even element and the
  high nibble the odd one; e2m1 is a sign bit (bit 3) over the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (bits 0-2);
  one UE8M0 scale per 32 consecutive inputs of a row ([out, in/32]).
"""

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_fp4(weight: torch.Tensor) -> bool:
    """Packed FP4 weights are stored as int8 (safetensors has no 4-bit type)."""
    return weight.dtype == torch.int8


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [..., n/2] of packed e2m1 pairs -> their float32 values [..., n]."""
    table = torch.tensor(E2M1, device=packed.device)
    byte = packed.view(torch.uint8).long()
    return torch.stack([table[byte & 0xF], table[byte >> 4]], dim=-1).flatten(-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """A quantised 2-D weight and its scales -> float32. FP4 (int8 storage): each scale covers in / scale columns
    of one row; FP8: each covers a `block` (rows, columns), the last ones cut at the edges."""
    scale = scale.float()
    if is_fp4(weight):
        values = unpack_fp4(weight)
        return values * scale.repeat_interleave(values.shape[-1] // scale.shape[-1], dim=-1)
    rows, cols = weight.shape
    scale = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale
