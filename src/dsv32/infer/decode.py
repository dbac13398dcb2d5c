"""The decode fast path: `Transformer.forward` over the paged cache for a few query tokens per row.

Same math as the model (which stays the reference; tests/test_infer_decode.py compares the two), with
the per-step work trimmed for decode, where a step is dominated by per-op overhead and weight reads:

- absorbed MLA only, scoring latent and rope key with one product against the cache's combined `kv`;
- DSA reads every indexer key but gathers only the `index_topk` selected latents; the top-k set is
  found with `topk` plus an exact tie rule (the same set as the model's stable sort, in position order,
  without sorting the whole context);
- routed experts computed for the experts a step actually uses (CPU `_grouped_mm` walks every expert),
  no balance loss or statistics objects, one `bincount` per MoE layer for the expert load;
- fused norms (`F.rms_norm`) and RoPE as one complex multiply; sub-modules are called through
  `.forward`, so int8-quantised layers work unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.infer.cache import PagedBatch, PagedLayer
from dsv32.model.moe import Experts, MoE, Routing


def topk_positions(scores: torch.Tensor, allowed: torch.Tensor | None, k: int) -> torch.Tensor:
    """The set `select_topk` picks (k best allowed keys, ties to the lower position), in position order.

    scores, allowed: [batch, seq, n_keys] (allowed None: every key) -> [batch, seq, k] key positions.
    """
    masked = scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))
    kth = masked.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th best score
    above = masked > kth
    tied = masked == kth
    room = k - above.sum(dim=-1, keepdim=True)  # how many of the tied keys fit, lowest positions first
    take = above | (tied & (tied.cumsum(dim=-1) <= room))
    return take.nonzero()[:, -1].view(*scores.shape[:-1], k)


class DecodePath:
    """Decode forward of `model` (a `Transformer`) over a `PagedBatch`; holds no weights of its own."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.inv_freq = torch.tensor(model.rotary.inv_freq, dtype=torch.float32)
        self.attention_factor = model.rotary.attention_factor

    # ------------------------------------------------------------------ helpers
    def _rope(self, positions: torch.Tensor):
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)  # [batch, seq, R/2]
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        return cos, sin, torch.complex(cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Interleaved-pair RoPE of x [batch, seq, heads, R] as a complex product (freqs [batch, seq, R/2])."""
        pairs = torch.view_as_complex(x.float().contiguous().view(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * freqs[:, :, None]).flatten(-2).to(x.dtype)

    @staticmethod
    def _norm(x: torch.Tensor, module) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)

    # ------------------------------------------------------------------ attention
    def _attention(self, attn, x, positions, rope, layer: PagedLayer, allowed, n_keys: int) -> torch.Tensor:
        cos, sin, freqs = rope
        batch, seq, _ = x.shape
        if hasattr(attn, "q_a_proj"):
            q_latent = self._norm(attn.q_a_proj.forward(x), attn.q_a_layernorm)
            q = attn.q_b_proj.forward(q_latent)
        else:
            q_latent, q = None, attn.q_proj.forward(x)
        q = q.view(batch, seq, attn.n_heads, attn.nope_dim + attn.rope_dim)
        q_nope, q_pe = q.split([attn.nope_dim, attn.rope_dim], dim=-1)
        latent, k_pe = attn.kv_a_proj_with_mqa.forward(x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
        latent = self._norm(latent, attn.kv_a_layernorm)
        k_pe = self._rotate(k_pe[:, :, None], freqs)[:, :, 0]
        indexer = attn.indexer
        index_keys = indexer.keys(x, cos, sin) if indexer is not None else None
        layer.write(positions, latent, k_pe, index_keys)

        w_uk, w_uv = attn._wkv_b()
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)                     # [batch, seq, heads, C]
        q_cat = torch.cat((q_abs, self._rotate(q_pe, freqs)), dim=-1)           # [batch, seq, heads, C + R]
        # one row with one query at the furthest position sees every key: no mask needed
        every = allowed if batch * seq > 1 else None
        if indexer is not None and n_keys > indexer.topk:
            scores = self._index_scores(indexer, q_latent, x, layer.read_index_keys(n_keys), cos, sin)
            selected = topk_positions(scores, every, indexer.topk)              # [batch, seq, topk]
            kv = layer.gather_kv(selected)                                      # [batch, seq, topk, C + R]
            valid = every.gather(-1, selected) if every is not None else None
            logits = torch.einsum("bshc,bskc->bshk", q_cat, kv)
            value_eq = "bshk,bskc->bshc"
        else:
            kv = layer.read_kv(n_keys)                                          # [batch, n_keys, C + R]
            valid = every
            logits = torch.einsum("bshc,btc->bsht", q_cat, kv)
            value_eq = "bsht,btc->bshc"
        logits = logits.float() * attn.softmax_scale
        if valid is not None:
            logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).to(kv.dtype)
        out_latent = torch.einsum(value_eq, probs, kv[..., : attn.kv_lora_rank])
        out = torch.einsum("bshc,hvc->bshv", out_latent, w_uv)
        return attn.o_proj.forward(out.flatten(2))

    @staticmethod
    def _index_scores(indexer, q_latent, x, keys, cos, sin) -> torch.Tensor:
        """`Indexer.scores` (I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s])) with the keys streamed row by row."""
        if indexer.simulate_fp8:
            return indexer.scores(q_latent, x, keys, cos, sin)
        batch, seq, _ = x.shape
        q = indexer.wq_b.forward(q_latent).view(batch, seq, indexer.n_heads, indexer.head_dim)
        q = indexer._rope_first(q, cos, sin).float()
        w = indexer.weights_proj.forward(x).float() * (indexer.n_heads ** -0.5) * (indexer.head_dim ** -0.5)
        dots = torch.bmm(keys.float(), q.flatten(1, 2).transpose(1, 2))          # [batch, n_keys, seq * heads]
        per_head = F.relu(dots).view(batch, -1, seq, indexer.n_heads)
        if seq == 1:  # the head-weighted sum as a matmul
            return torch.bmm(per_head.view(batch, -1, indexer.n_heads), w.view(batch, -1, 1)).view(batch, 1, -1)
        return torch.einsum("btsh,bsh->bst", per_head, w)                       # [batch, seq, n_keys]

    # ------------------------------------------------------------------ blocks
    def _block(self, block, h, positions, rope, layer, allowed, n_keys, counts: list):
        h = h + self._attention(block.self_attn, self._norm(h, block.input_layernorm), positions, rope, layer,
                                allowed, n_keys)
        x = self._norm(h, block.post_attention_layernorm)
        mlp = block.mlp
        if isinstance(mlp, MoE):
            flat = x.view(-1, x.shape[-1])
            routing = mlp.gate.forward(flat)
            experts = mlp.experts
            y = (_active_experts(experts, flat, routing) if type(experts) is Experts
                 else experts.forward(flat, routing)).view_as(x)
            if mlp.shared_experts is not None:
                y = y + mlp.shared_experts.forward(x)
            if counts is not None:
                counts.append(torch.bincount(routing.indices.flatten(), minlength=mlp.experts.n_experts))
        else:
            y = mlp.forward(x)
        return h + y

    def _setup(self, positions: torch.Tensor):
        n_keys = int(positions.max()) + 1
        allowed = torch.arange(n_keys, device=positions.device) <= positions[:, :, None]  # [batch, seq, n_keys]
        return n_keys, allowed, self._rope(positions)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedBatch, keep: int = 1):
        """-> (logits of the last `keep` positions [batch, keep, vocab], final-normed hidden [batch, seq, hidden],
        expert token counts [n_moe_layers, n_experts] or None)."""
        model = self.model
        n_keys, allowed, rope = self._setup(positions)
        h = model.embed_tokens(input_ids)
        counts: list = []
        for i, block in enumerate(model.layers):
            h = self._block(block, h, positions, rope, cache.layer(i), allowed, n_keys, counts)
        hidden = self._norm(h, model.norm)
        logits = model.lm_head.forward(hidden[:, -keep:])
        return logits, hidden, (torch.stack(counts) if counts else None)

    @torch.inference_mode()
    def mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache: PagedBatch,
            pick: torch.Tensor | None) -> torch.Tensor | None:
        """The first MTP layer on (main final-normed hidden, next token) at `positions`, writing its cache layer;
        returns the logits [batch, vocab] at index `pick` [batch] of each row (None if `pick` is None)."""
        model = self.model
        mtp = model.mtp[0]
        n_keys, allowed, rope = self._setup(positions)
        emb = model.embed_tokens(next_ids)
        h = mtp.eh_proj.forward(torch.cat((self._norm(emb, mtp.enorm), self._norm(hidden, mtp.hnorm)), dim=-1))
        h = self._block(mtp, h, positions, rope, cache.layer(self.n_layers), allowed, n_keys, None)
        if pick is None:
            return None
        h = h[torch.arange(h.shape[0], device=h.device), pick.to(h.device)]
        return model.lm_head.forward(self._norm(h, mtp.shared_head.norm))

def _active_experts(experts: Experts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """`Experts.forward` for a handful of tokens: one SwiGLU per expert that has tokens, none for the rest.

    Once a step has more token copies than there are experts (batch 8, top-4 of 16), most experts have
    a few rows each, and small-M matmuls cost about as much per call as the weight they read: then
    every expert runs in one batched matmul over a zero-padded block (three calls per layer instead of
    three per active expert; measured at batch 8: 15 ms vs 24 ms for five layers of 16 experts here).
    """
    tokens, top_k = routing.indices.shape
    if tokens * top_k > experts.n_experts:
        return _padded_experts(experts, x, routing)
    flat_expert = routing.indices.flatten()
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // top_k
    chosen, counts = torch.unique_consecutive(flat_expert[order], return_counts=True)
    xs = x[token_of]
    pieces, start = [], 0
    for e, n in zip(chosen.tolist(), counts.tolist()):
        chunk = xs[start:start + n]
        h = F.silu(F.linear(chunk, experts.gate_proj[e])) * F.linear(chunk, experts.up_proj[e])
        pieces.append(F.linear(h, experts.down_proj[e]))
        start += n
    out = torch.cat(pieces) * routing.weights.flatten()[order, None].to(x.dtype)
    y = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of, out.float()).to(x.dtype)


def _padded_experts(experts: Experts, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Every expert's SwiGLU as one batched matmul over a block [experts, capacity, hidden] in which expert
    e's token copies fill its first counts[e] rows and zeros the rest."""
    tokens, top_k = routing.indices.shape
    flat_expert = routing.indices.flatten()
    order = torch.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    counts = torch.bincount(flat_expert, minlength=experts.n_experts)
    capacity = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = sorted_expert * capacity + torch.arange(order.numel(), device=x.device) - starts[sorted_expert]
    token_of = order // top_k
    block = x.new_zeros(experts.n_experts * capacity, x.shape[-1])
    block[slot] = x[token_of]
    block = block.view(experts.n_experts, capacity, -1)                        # [experts, capacity, hidden]
    h = F.silu(torch.bmm(block, experts.gate_proj.transpose(1, 2))) * torch.bmm(block, experts.up_proj.transpose(1, 2))
    out = torch.bmm(h, experts.down_proj.transpose(1, 2)).flatten(0, 1)[slot]  # [copies, hidden], sorted
    out = out * routing.weights.flatten()[order, None].to(x.dtype)
    y = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of, out.float()).to(x.dtype)


@torch.no_grad()
def transpose_wide_weights(model) -> int:
    """Store the weight of every wide `nn.Linear` (out_features > in_features) transposed in memory, in place.

    Values, shapes and results are unchanged (the parameter becomes a transposed view of a contiguous
    [in, out] tensor), but a one-token matmul then streams the weight along its rows: on CPU the output
    head of a small model runs about twice as fast. `kv_b_proj` is skipped (absorbed attention views it
    per head). Returns the number of layers changed. Checkpoints saved afterwards are unaffected.
    """
    changed = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.out_features > module.in_features \
                and not name.endswith("kv_b_proj") and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()
            changed += 1
    return changed
