"""Multi-head Latent Attention (MLA) with DeepSeek Sparse Attention folded in.

Queries go through an optional low-rank latent (q-LoRA); keys and values are compressed into one
`kv_lora_rank` latent per token plus a single decoupled RoPE key shared by all heads. Two paths give
the same result:

- expanded (training / prefill): the latent is up-projected by `kv_b_proj` into per-head keys and
  values and ordinary attention runs over them;
- absorbed (decode over the latent cache): `W_UK` is folded into the query and `W_UV` applied after
  attention, so attention runs directly over the cached latents (MQA with a 576-wide key).

With DSA (V3.2) the indexer picks `index_topk` keys per query; every head attends only to those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.cache import LayerCache
from dsv32.model.indexer import Indexer, indexer_kl_loss, select_topk
from dsv32.model.layers import Linear, RMSNorm
from dsv32.model.rope import apply_rope_interleaved


@dataclass
class AttentionContext:
    """What every layer of one forward shares."""

    cos: torch.Tensor                  # [batch, seq, rope_dim/2]
    sin: torch.Tensor
    positions: torch.Tensor            # [batch, seq] absolute positions of the query tokens
    allowed: torch.Tensor | None       # [batch, seq, n_keys] True where a query may attend; None = plain causal
    impl: str = "expanded"             # "expanded" | "absorbed"
    indexer_loss: str | None = None    # None | "dense" | "sparse"


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_dim = cfg.qk_head_dim
        bias = cfg.attention_bias
        if cfg.use_q_lora:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = Linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=bias)
        self.indexer = Indexer(cfg) if cfg.use_dsa else None
        self.last_indexer_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ projections
    def _queries(self, x: torch.Tensor, ctx: AttentionContext):
        batch, seq, _ = x.shape
        if hasattr(self, "q_a_proj"):
            q_latent = self.q_a_layernorm(self.q_a_proj(x))  # [batch, seq, q_lora_rank]
            q = self.q_b_proj(q_latent)
        else:
            q_latent, q = None, self.q_proj(x)
        q = q.view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # MLA layout: [nope | rope]
        return q_latent, q_nope, apply_rope_interleaved(q_pe, ctx.cos, ctx.sin)

    def _latents(self, x: torch.Tensor, ctx: AttentionContext):
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)                                           # [batch, seq, kv_lora_rank]
        k_pe = apply_rope_interleaved(k_pe.unsqueeze(2), ctx.cos, ctx.sin).squeeze(2)  # [batch, seq, rope_dim]
        return latent, k_pe

    def _wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]  # W_UK [heads, nope, C], W_UV [heads, v, C]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: LayerCache | None = None) -> torch.Tensor:
        q_latent, q_nope, q_pe = self._queries(x, ctx)
        latent, k_pe = self._latents(x, ctx)
        index_keys = None
        if self.indexer is not None:
            # the indexer trains only through its own KL loss: its inputs are detached
            index_keys = self.indexer.keys(x.detach(), ctx.cos, ctx.sin)
        absorbed = ctx.impl == "absorbed" and ctx.indexer_loss is None
        if cache is not None:
            cache.write(ctx.positions, latent, k_pe, index_keys)
            n_keys = ctx.allowed.shape[-1]  # the furthest query position + 1
            index_keys = cache.read_index_keys(n_keys) if self.indexer is not None else None
        else:
            n_keys = latent.shape[1]

        allowed = ctx.allowed if ctx.allowed is not None else _causal(x.shape[1], x.device)
        selected, index_scores = None, None
        if self.indexer is not None:
            sparse = n_keys > self.indexer.topk and ctx.indexer_loss != "dense"
            if sparse or ctx.indexer_loss:
                index_scores = self.indexer.scores(q_latent.detach(), x.detach(), index_keys, ctx.cos, ctx.sin)
            if sparse:
                selected = select_topk(index_scores, allowed.expand(x.shape[0], -1, -1), self.indexer.topk)

        gathered = None
        if cache is not None:
            # read only what attention uses: with DSA on the absorbed path, just the selected entries
            if absorbed and selected is not None:
                gathered = cache.gather(selected)
            else:
                latent, k_pe = cache.read(n_keys)
        if absorbed:
            out = self._absorbed(q_nope, q_pe, latent, k_pe, allowed, selected, gathered)
        else:
            out, attn_target = self._expanded(q_nope, q_pe, latent, k_pe, ctx.allowed, selected,
                                              need_probs=ctx.indexer_loss is not None)
            if ctx.indexer_loss is not None:
                scope = allowed.expand_as(index_scores)
                if selected is not None:
                    scope = scope & _selection_mask(selected, scope.shape[-1])
                self.last_indexer_loss = indexer_kl_loss(index_scores, attn_target, scope)
        return self.o_proj(out.flatten(2))

    def _expanded(self, q_nope, q_pe, latent, k_pe, allowed, selected, need_probs: bool):
        """Up-project the latents to per-head keys/values and attend; returns [batch, seq, heads, v_dim]."""
        batch, n_keys, _ = latent.shape
        kv = self.kv_b_proj(latent).view(batch, n_keys, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(-1, -1, self.n_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, heads, seq|keys, dim]
        mask = allowed
        if selected is not None:
            base = allowed if allowed is not None else _causal(q.shape[2], q.device)
            mask = base & _selection_mask(selected, n_keys)
        if need_probs:
            mask = mask if mask is not None else _causal(q.shape[2], q.device)
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
            probs = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), dim=-1)
            out = torch.matmul(probs.to(v.dtype), v)
            return out.transpose(1, 2), probs.sum(1)  # target: attention summed over heads [batch, seq, keys]
        return _sdpa(q, k, v, mask, self.softmax_scale).transpose(1, 2), None

    def _absorbed(self, q_nope, q_pe, latent, k_pe, allowed, selected, gathered=None):
        """Attention directly over the cached latents; with DSA only the selected entries are read.

        `gathered`: the selected (latent, rope key) entries [batch, seq, k, ...] when the cache already
        fetched them (then `latent` and `k_pe` are not used).
        """
        w_uk, w_uv = self._wkv_b()
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # [batch, seq, heads, kv_lora_rank]
        batch, seq = q_abs.shape[:2]
        allowed = allowed.expand(batch, seq, -1)
        if selected is None:
            scores = torch.einsum("bshc,btc->bsht", q_abs, latent) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
            valid, values = allowed, latent
            probs = _masked_softmax(scores * self.softmax_scale, valid[:, :, None, :])
            out_latent = torch.einsum("bsht,btc->bshc", probs.to(latent.dtype), values)
        else:
            if gathered is None:
                rows = torch.arange(batch, device=selected.device)[:, None, None]
                gathered = latent[rows, selected], k_pe[rows, selected]
            sel_latent, sel_pe = gathered                                       # [batch, seq, topk, C|R]
            valid = allowed.gather(-1, selected)                                # [batch, seq, topk]
            scores = torch.einsum("bshc,bskc->bshk", q_abs, sel_latent) + torch.einsum("bshr,bskr->bshk", q_pe, sel_pe)
            probs = _masked_softmax(scores * self.softmax_scale, valid[:, :, None, :])
            out_latent = torch.einsum("bshk,bskc->bshc", probs.to(sel_latent.dtype), sel_latent)
        return torch.einsum("bshc,hvc->bshv", out_latent, w_uv)  # [batch, seq, heads, v_dim]


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of q, k [batch, heads, seq|keys, qk_dim] over v [batch, heads, keys, v_dim]; mask None = causal.

    On CPU a v narrower than q/k is zero-padded to their head dim: torch's fused (flash) CPU kernel
    needs equal head dims and otherwise falls back to the math path, which materialises every score
    and the causal mask (about 2x slower forward + backward here). The padded output columns are
    zeros and are sliced off. In bf16 on CPU, short sequences take `_small_attention` instead.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and \
            q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_ATTENTION_SCORES:
        return _small_attention(q, k, v, mask, scale)
    v_dim = v.shape[-1]
    if q.device.type == "cpu" and v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None],
                                         is_causal=mask is None, scale=scale)
    return out[..., :v_dim]


SMALL_ATTENTION_SCORES = 1 << 25   # score entries (batch x heads x queries x keys): 64 MB in bf16


def _small_attention(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention as two batched matmuls around a softmax, every score materialised (bf16 CPU only).

    torch's CPU flash kernel runs bf16 at about fp32 speed; for the short sequences of CPU training
    (256 tokens, 8 heads) the plain form takes about 40% of its forward + backward time. The rounding
    is that of eager attention under autocast: scaled scores accumulated in fp32 and rounded once to
    bf16, the softmax computed in fp32 and rounded once to bf16.
    """
    batch, heads, seq, qk_dim = q.shape
    n_keys = k.shape[2]
    allowed = mask if mask is not None else _causal(seq, q.device)                 # [batch|1, seq, keys]
    bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    bias = bias[:, None].expand(batch, heads, seq, n_keys).reshape(batch * heads, seq, n_keys)
    scores = torch.baddbmm(bias, q.reshape(-1, seq, qk_dim), k.reshape(-1, n_keys, qk_dim).transpose(1, 2),
                           alpha=scale)                                          # [batch * heads, seq, keys]
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(-1, n_keys, v.shape[-1]))
    return out.view(batch, heads, seq, -1)


def _masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.float().masked_fill(~valid, float("-inf")), dim=-1)


def _causal(seq: int, device) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None]  # [1, seq, seq]


def _selection_mask(selected: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Top-k indices [batch, seq, k] -> boolean [batch, seq, n_keys], True at the selected keys."""
    mask = torch.zeros(*selected.shape[:-1], n_keys, dtype=torch.bool, device=selected.device)
    return mask.scatter_(-1, selected, True)
