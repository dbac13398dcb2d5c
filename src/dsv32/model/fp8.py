"""FP8 (e4m3) helpers: the released checkpoint's 128x128 block-scaled weights and the runtime
per-token activation quantisation the official kernels use (simulated here in plain PyTorch).
"""
from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
WEIGHT_BLOCK = 128


def _blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                      block: int = WEIGHT_BLOCK) -> torch.Tensor:
    """W[i, j] = W_fp8[i, j] * scale_inv[i // block, j // block] ("scale_inv" is a multiplier).

    Edges that are not a multiple of the block (e.g. the 576 rows of kv_a_proj_with_mqa) use the
    ceil-div block, as in the release.
    """
    rows, cols = weight.shape
    expected = (_blocks(rows, block), _blocks(cols, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a {rows}x{cols} weight")
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


def quantize_weight(weight: torch.Tensor, block: int = WEIGHT_BLOCK, pow2_scale: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantise [out, in] to (fp8 weight, fp32 scale_inv [ceil(out/block), ceil(in/block)]).

    Partial edge blocks are zero-padded before the block max is taken, as DeepSeek describes.
    """
    rows, cols = weight.shape
    br, bc = _blocks(rows, block), _blocks(cols, block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(br, block, bc, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [br, bc]
    scale = amax / FP8_MAX
    if pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(br * block, bc * block)
    return q[:rows, :cols].to(FP8_DTYPE).contiguous(), scale.to(torch.float32)


def quantize_blockwise_fp8(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantisation over blocks of the last dim, with power-of-two (ue8m0) scales.

    Returns (x_fp8 [..., D], scale [..., D/block]) with x ~= x_fp8 * scale per block.
    """
    d = x.shape[-1]
    if d % block:
        raise ValueError(f"last dim {d} is not a multiple of the quantisation block {block}")
    tiles = x.float().unflatten(-1, (d // block, block))
    amax = tiles.abs().amax(-1).clamp_min(1e-4)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).flatten(-2)
    return q, scale


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard matrix (Sylvester construction); n must be a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim by the orthonormal Hadamard matrix (dot products are preserved)."""
    h = hadamard_matrix(x.shape[-1], device=x.device)
    return (x.float() @ h).to(x.dtype)
