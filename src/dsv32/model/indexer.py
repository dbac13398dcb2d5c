"""DeepSeek Sparse Attention: the lightning indexer and its top-k token selection.

I[t, s] = sum_h w[t, h] * ReLU(q[t, h] . k[s]), with q from the MLA query latent, one key head k shared
by all indexer heads, and per-head weights w from the hidden state. Each query keeps the `index_topk`
highest-scoring causal keys, and all MLA heads attend only to those (DSA runs on MLA's MQA form).
The plain fp32 formula is the reference; `simulate_fp8` reproduces the official deployment numerics
(Walsh-Hadamard rotation, then per-token FP8 e4m3 quantisation with power-of-two scales).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.fp8 import hadamard_rotate, quantize_blockwise_fp8
from dsv32.model.layers import Linear
from dsv32.model.rope import apply_rope_half


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.topk = cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.simulate_fp8 = False

    def _rope_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # the indexer's layout is [rope | nope] (MLA's is the reverse) and its RoPE is half-split
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope_half(rot, cos, sin), rest), dim=-1)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, hidden] -> the cached indexer keys [batch, seq, index_head_dim]."""
        k = self.k_norm(self.wk(x))
        return self._rope_first(k.unsqueeze(2), cos, sin).squeeze(2)

    def scores(self, q_latent: torch.Tensor, x: torch.Tensor, keys: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Index scores I [batch, seq, n_keys] in fp32, before any masking."""
        batch, seq, _ = x.shape
        q = self.wq_b(q_latent).view(batch, seq, self.n_heads, self.head_dim)
        q = self._rope_first(q, cos, sin)
        # the positive constants set the temperature of softmax(I) for the KL training loss
        w = self.weights_proj(x).float() * (self.n_heads ** -0.5) * (self.head_dim ** -0.5)  # [batch, seq, heads]
        if self.simulate_fp8:
            return _fp8_index_scores(q, keys, w)
        per_head = F.relu(torch.einsum("bshd,btd->bsht", q.float(), keys.float()))  # [batch, seq, heads, keys]
        return torch.einsum("bsht,bsh->bst", per_head, w)


def _fp8_index_scores(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The official kernel's numerics: Hadamard, FP8 per-token quantisation (ue8m0 scales), fp32 accumulate."""
    q_fp8, q_scale = quantize_blockwise_fp8(hadamard_rotate(q.to(torch.bfloat16)), block=q.shape[-1])
    k_fp8, k_scale = quantize_blockwise_fp8(hadamard_rotate(keys.to(torch.bfloat16)), block=keys.shape[-1])
    dots = torch.einsum("bshd,btd->bsht", q_fp8.float(), k_fp8.float())       # integer-grid products, exact in fp32
    weighted = F.relu(dots) * (w * q_scale.squeeze(-1))[..., None]           # [batch, seq, heads, keys]
    return weighted.sum(2) * k_scale.squeeze(-1)[:, None, :]


def select_topk(index_scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k key indices per query among the allowed (causal) keys: [batch, seq, min(k, n_keys)].

    ReLU makes exact ties (often at 0) common in an untrained indexer; a stable sort breaks them by
    position, so prefill and token-by-token decode select the same keys.
    """
    masked = index_scores.masked_fill(~allowed, float("-inf"))
    order = masked.sort(dim=-1, descending=True, stable=True).indices
    return order[..., : min(k, masked.shape[-1])]


def indexer_kl_loss(index_scores: torch.Tensor, attn_target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p || softmax(I)) restricted to `allowed` keys.

    `attn_target` is the main attention summed over heads [batch, seq, keys] (detached); it is
    L1-normalised over the allowed set, which is the causal set in the dense warm-up and the
    selected top-k set in sparse training.
    """
    p = attn_target.detach().masked_fill(~allowed, 0.0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
    log_q = torch.log_softmax(index_scores.masked_fill(~allowed, float("-inf")), dim=-1)
    log_q = log_q.masked_fill(~allowed, 0.0)
    kl = (p * (torch.log(p.clamp_min(1e-12)) - log_q)).masked_fill(p == 0, 0.0).sum(-1)
    return kl.mean()
