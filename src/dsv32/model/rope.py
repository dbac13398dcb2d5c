"""Rotary position embedding with YaRN, in the two layouts DeepSeek uses.

MLA rotates interleaved pairs (x0, x1), (x2, x3), ... (the official layout); the V3.2 indexer rotates
the half-split pairs (x_i, x_{i+d/2}) — mixing the two up was a real bug in the first V3.2-Exp code.
Frequencies follow transformers' `_compute_yarn_parameters` (which equals the official
`precompute_freqs_cis` for the released configs): a linear blend between interpolated and
extrapolated frequencies over the correction range [floor(low), ceil(high)].
"""
from __future__ import annotations

import math

import torch
from torch import nn

from dsv32.config import ModelConfig, yarn_mscale


def rope_frequencies(cfg: ModelConfig) -> tuple[list[float], float]:
    """Inverse frequencies for the qk_rope_head_dim rotary dims and the cos/sin scale ("attention factor")."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    inv_freq = [1.0 / base ** (2 * i / dim) for i in range(dim // 2)]
    if cfg.rope_type != "yarn":
        return inv_freq, 1.0
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    original_len = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    blended = []
    for i, f in enumerate(inv_freq):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep f (extrapolate), 1: f / factor
        blended.append(f / factor * ramp + f * (1.0 - ramp))
    return blended, attention_factor


class RotaryEmbedding(nn.Module):
    """Maps absolute positions to (cos, sin); holds no tensors, so it builds on the meta device for free."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32, device=positions.device)
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [batch, seq, rope_dim/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, rope_dim] with pairs (x0, x1), (x2, x3)...; cos/sin: [batch, seq, rope_dim/2].

    Each pair is one complex number x0 + i x1 multiplied by cos + i sin (as the official code does):
    one kernel forward and backward instead of the six of `apply_rope_interleaved_reference`.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-2]) or pairs.stride(-1) != 1:
        pairs = pairs.contiguous()  # view_as_complex needs whole complex numbers in memory
    rotated = torch.view_as_complex(pairs) * torch.complex(cos, sin).unsqueeze(-2)
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def apply_rope_interleaved_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation written out pair by pair (the reference `apply_rope_interleaved` is tested against)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, seq, heads, rope_dim] with pairs (x_i, x_{i+rope_dim/2})."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
