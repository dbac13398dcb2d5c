"""The decode fast path: `Transformer.forward` over the paged cache for a few query tokens per row.

Same math as the model (which stays the reference; tests/test_infer_decode.py compares the two), with
the per-step work trimmed for decode, where a step is dominated by per-op overhead and weight reads:

- absorbed MLA only, scoring latent and rope key with one product against the cache's combined `kv`;
- DSA reads every indexer key but gathers only the `index_topk` selected latents; the top-k set is
  found with `topk` plus an exact tie rule (the same set as the model's stable sort, in position order,
  without sorting the whole context);
- routed experts computed for the experts a step actually uses (CPU `_grouped_mm` walks every expert),
  no balance loss or statistics objects, one `bincount` per MoE layer for the expert load;
- a linear layer on a few rows runs as a batched matmul over row blocks of its [out, in] weight
  (`_linear`): on the CPUs measured here that streams the weight 2-3x faster than the one-row
  GEMV/GEMM of `F.linear` (a [256 -> 512] layer: 26 us vs 60-80 us; the 32000 x 512 output head:
  2.4-2.9 ms vs 4.3-8.8 ms), with an expert's gate and up projections in one call once
  `pair_expert_weights` has stored them side by side;
- fused norms (`F.rms_norm`) and RoPE as one complex multiply; other module types (int8-quantised
  layers) are called through `.forward`, so they work unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.infer.cache import PagedBatch, PagedLayer
from dsv32.infer.quant import Int8Experts, Int8Linear, one_token_combine
from dsv32.model.layers import Linear, matmul_nt
from dsv32.model.moe import Experts, MoE, Routing


# Up to SMALL_ROWS rows, linear layers run as `_weight_linear`'s chunked bmm. Two to eight chunks
# measured alike here at one row (two to three times a single GEMV); four also suits up to eight rows.
SMALL_ROWS = 8
LINEAR_CHUNKS = 4
# From LONG_KEYS keys on, one row's attention runs in the [keys, queries] layout (`_attend_many_keys`).
LONG_KEYS = 8192
KEY_BLOCKS = 4
PLAIN_LINEARS = (torch.nn.Linear, Linear)  # read through their weight; any other module type through .forward
SAMPLE_STRIDE = 8  # one score in 8 bounds the k-th best from below (`_one_row_topk`)


def _weight_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x [rows, in] and weight [out, in]; for a few rows as a batched matmul over
    LINEAR_CHUNKS row blocks of a contiguous weight, which CPU kernels stream 2-3x faster than one GEMV."""
    rows = x.shape[0]
    out_f, in_f = weight.shape
    if rows > SMALL_ROWS or out_f % LINEAR_CHUNKS or not weight.is_contiguous():
        return matmul_nt(x, weight)
    blocks = weight.view(LINEAR_CHUNKS, out_f // LINEAR_CHUNKS, in_f)
    y = torch.bmm(blocks, x.t().expand(LINEAR_CHUNKS, in_f, rows))          # [chunks, out / chunks, rows]
    return y.flatten(0, 1).t()                                              # [rows, out]


def _linear(module, x: torch.Tensor) -> torch.Tensor:
    """`module.forward(x)`; a plain `nn.Linear` goes through `_weight_linear`. Inside the compiled one-token
    steps a one-row float or int8 linear is a reduction over the weight's rows, which the compiler fuses
    (with the int8 dequantisation): 4-7% faster there than the chunked bmm or the int8 kernel."""
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and type(module) in (*PLAIN_LINEARS, Int8Linear):
        if type(module) is Int8Linear:
            y = _int8_rows(module.qweight, module.scale, x[..., None, :])
        else:
            y = (module.weight * x[..., None, :]).sum(-1)
        return y if module.bias is None else y + module.bias
    if type(module) not in PLAIN_LINEARS:
        return module.forward(x)
    y = _weight_linear(x.reshape(-1, x.shape[-1]), module.weight)
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """`MLP.forward` with its three projections through `_linear`."""
    return _linear(mlp.down_proj, F.silu(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))


def topk_positions(scores: torch.Tensor, allowed: torch.Tensor | None, k: int) -> torch.Tensor:
    """The set `select_topk` picks (k best allowed keys, ties to the lower position), in position order.

    scores, allowed: [batch, seq, n_keys] (allowed None: every key) -> [batch, seq, k] key positions.
    """
    masked = scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))
    if masked.shape[:-1].numel() == 1 and masked.shape[-1] >= SAMPLE_STRIDE * k:
        found = _one_row_topk(masked.view(-1), k)
        if found is not None:
            return found.view(*scores.shape[:-1], k)
    # the k-th best score (kthvalue: 3-6x faster than topk on CPU for 32K scores)
    kth = masked.kthvalue(masked.shape[-1] - k + 1, dim=-1, keepdim=True).values
    take = masked >= kth
    if int(take.sum()) == k * kth.numel():  # no ties at the k-th score: the set is complete
        return take.nonzero()[:, -1].view(*scores.shape[:-1], k)
    above = masked > kth
    tied = masked == kth
    room = k - above.sum(dim=-1, keepdim=True)  # how many of the tied keys fit, lowest positions first
    take = above | (tied & (tied.cumsum(dim=-1) <= room))
    return take.nonzero()[:, -1].view(*scores.shape[:-1], k)


def _one_row_topk(row: torch.Tensor, k: int) -> torch.Tensor | None:
    """Positions of the k best of one row of scores [n] in position order, or None where the fast route
    cannot decide (ties at the k-th score, or too few candidates): the caller then takes the full route.

    A strided sample bounds the k-th score from below; the exact k-th is then found among the few
    candidates above the bound. At 32K scores: ~0.1 ms against ~0.35 ms for the full route.
    """
    sample = row[::SAMPLE_STRIDE]
    expected = k // SAMPLE_STRIDE  # the sample's share of the k best
    rank = min(sample.numel(), expected + 4 * int(expected ** 0.5) + 4)  # a margin of ~4 standard deviations
    bound = sample.kthvalue(sample.numel() - rank + 1).values
    candidates = (row >= bound).nonzero().view(-1)                         # [~1.25 k] positions, in order
    if candidates.numel() < k:
        return None
    values = row.index_select(0, candidates)
    kth = values.kthvalue(candidates.numel() - k + 1).values
    take = values >= kth
    if int(take.sum()) != k:
        return None
    return candidates[take]


class DecodePath:
    """Decode forward of `model` (a `Transformer`) over a `PagedBatch`; holds no weights of its own.

    A block runs as three regions of tensor code around the two parts that depend on the step's data
    (the attention over the cache and the routed experts): `_pre_attention`, `_post_attention` and
    `_finish`; `_final_norm` (norm and output head) is a fourth.

    With `compile=True`, a step of one token (one request decoding) runs the compiled one-token steps
    (`_one_token`): each layer is one compiled call covering its attention, its MLP or experts and the
    next layer's projections, with the cache write (and for DSA the index scoring and top-k selection)
    eager between calls. The routed experts are reductions over their indexed weights
    (`_gathered_experts`) and the output head a reduction over its rows: compiled, these stream the
    weights at close to the memory's rate. Other steps stay eager: compiling the per-block regions
    measured 0.93x eager at batch 8 and 1.03-1.06x at batch 1.
    """

    def __init__(self, model, compile: bool = False):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.inv_freq = torch.tensor(model.rotary.inv_freq, dtype=torch.float32)
        self.attention_factor = model.rotary.attention_factor
        # each variant its own function, so that each call checks the guards of one graph only
        steps = (_first_projections, _layer_step, _dense_layer_step, _last_layer_step, _head_as_reduction)
        self._one_token_steps = None
        if compile and _fusable(model):
            import torch._dynamo as dynamo

            # graphs per variant: context length dynamic or (DSA) the top-k selected; shared by the layers
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self._one_token_steps = tuple(torch.compile(fn, dynamic=False) for fn in steps)

    # ------------------------------------------------------------------ helpers
    def _rope(self, positions: torch.Tensor):
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)  # [batch, seq, R/2]
        cos, sin = angles.cos() * self.attention_factor, angles.sin() * self.attention_factor
        return cos, sin, torch.complex(cos, sin)

    # ------------------------------------------------------------------ attention
    def _attend(self, attn, q_cat, x, q_latent, latent, k_pe, positions, rope, layer: PagedLayer, allowed,
                n_keys: int) -> torch.Tensor:
        """Cache write and attention over the cache -> out_latent [heads, batch*seq, C]."""
        cos, sin, _ = rope
        batch, seq, heads, _ = q_cat.shape
        indexer = attn.indexer
        index_keys = indexer.keys(x, cos, sin) if indexer is not None else None
        layer.write(positions, latent, k_pe, index_keys)
        # one row with one query at the furthest position sees every key: no mask needed
        every = allowed if batch * seq > 1 else None
        if indexer is not None and n_keys > indexer.topk:
            selected, kv = self._selected_kv(indexer, q_latent, x, layer, n_keys, cos, sin, every)
            kv = kv.flatten(0, 1)                                               # [batch*seq, topk, C + R]
            valid = every.gather(-1, selected).flatten(0, 1)[:, None] if every is not None else None
            queries = q_cat.view(batch * seq, heads, -1)                        # one query row per (b, s)
        else:
            kv = layer.read_kv(n_keys)                                          # [batch, n_keys, C + R]
            valid = every.repeat_interleave(heads, dim=1) if every is not None else None
            queries = q_cat.view(batch, seq * heads, -1)
        out_latent = _attend_keys(attn, queries, kv, valid)                     # [rows, queries, C]
        return out_latent.reshape(batch * seq, heads, -1).transpose(0, 1)       # [heads, batch*seq, C]

    def _selected_kv(self, indexer, q_latent, x, layer: PagedLayer, n_keys: int, cos, sin, allowed):
        """DSA's choice for each query: (positions [batch, seq, topk], their latents [batch, seq, topk, C + R])."""
        scores = self._index_scores(indexer, q_latent, x, layer.read_index_keys(n_keys), cos, sin)
        selected = topk_positions(scores, allowed, indexer.topk)
        return selected, layer.gather_kv(selected)

    @staticmethod
    def _index_scores(indexer, q_latent, x, keys, cos, sin) -> torch.Tensor:
        """`Indexer.scores` (I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s])) with the keys streamed row by row."""
        if indexer.simulate_fp8:
            return indexer.scores(q_latent, x, keys, cos, sin)
        batch, seq, _ = x.shape
        q = _linear(indexer.wq_b, q_latent).view(batch, seq, indexer.n_heads, indexer.head_dim)
        q = indexer._rope_first(q, cos, sin).float()
        w = _linear(indexer.weights_proj, x).float() * (indexer.n_heads ** -0.5) * (indexer.head_dim ** -0.5)
        queries = q.flatten(1, 2)                                               # [batch, seq * heads, D]
        if batch == 1:
            # keys times a few query rows as `F.linear` with the queries as a contiguous [out, in] weight:
            # 2.2x the rate of the [n_keys, D] @ [D, heads] matmul on CPU (32K keys: 0.64 vs 1.4 ms)
            dots = F.linear(keys[0].float(), queries[0].contiguous())[None]     # [1, n_keys, seq * heads]
        else:
            dots = torch.bmm(keys.float(), queries.transpose(1, 2))             # [batch, n_keys, seq * heads]
        per_head = dots.clamp_min_(0).view(batch, -1, seq, indexer.n_heads)      # ReLU in place: dots is fresh
        if seq == 1:  # the head-weighted sum as a matmul
            return torch.bmm(per_head.view(batch, -1, indexer.n_heads), w.view(batch, -1, 1)).view(batch, 1, -1)
        return torch.einsum("btsh,bsh->bst", per_head, w)                       # [batch, seq, n_keys]

    # ------------------------------------------------------------------ blocks
    def _block(self, block, h, positions, rope, layer, allowed, n_keys, counts: list):
        attn = block.self_attn
        x, q_latent, q_cat, latent, k_pe = _pre_attention(block, h, rope[2])
        out_latent = self._attend(attn, q_cat, x, q_latent, latent, k_pe, positions, rope, layer, allowed, n_keys)
        h, x, weights, indices = _post_attention(block, h, out_latent)
        mlp = block.mlp
        if not isinstance(mlp, MoE):
            return h
        flat = x.view(-1, x.shape[-1])
        experts = mlp.experts
        routing = Routing(weights, indices, None)
        routed = (_active_experts(experts, flat, routing) if type(experts) is Experts
                  else experts.forward(flat, routing)).view_as(x)
        if counts is not None:
            counts.append(torch.bincount(indices.flatten(), minlength=experts.n_experts))
        return _finish(mlp, h, x, routed)

    def _setup(self, positions: torch.Tensor):
        n_keys = int(positions.max()) + 1
        allowed = torch.arange(n_keys, device=positions.device) <= positions[:, :, None]  # [batch, seq, n_keys]
        return n_keys, allowed, self._rope(positions)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedBatch, keep: int = 1):
        """-> (logits of the last `keep` positions [batch, keep, vocab], final-normed hidden [batch, seq, hidden],
        expert token counts [n_moe_layers, n_experts] or None)."""
        model = self.model
        if self._one_token_steps is not None and input_ids.numel() == 1 and int(positions.max()) >= 1:
            return self._one_token(input_ids, positions, cache, keep)
        n_keys, allowed, rope = self._setup(positions)
        h = model.embed_tokens(input_ids)
        counts: list = []
        for i, block in enumerate(model.layers):
            h = self._block(block, h, positions, rope, cache.layer(i), allowed, n_keys, counts)
        hidden, logits = _final_norm(model.norm, model.lm_head, h, keep)
        return logits, hidden, (torch.stack(counts) if counts else None)

    def _one_token(self, input_ids, positions, cache: PagedBatch, keep: int):
        """`forward` for one token through the compiled one-token steps: per layer one compiled call (this
        layer's attention and MLP, then the next layer's projections) and, between calls, the cache write
        and the keys to attend: the cached ones (the context length is the graphs' one dynamic size) or,
        with DSA past `index_topk` keys, the selected ones. No graph mutates the cache."""
        import torch._dynamo as dynamo

        first, step, dense_step, last_step, head = self._one_token_steps
        model = self.model
        n_keys = int(positions.max()) + 1
        cos, sin, freqs = self._rope(positions)
        layers = list(model.layers)
        h = model.embed_tokens(input_ids)
        x, q_latent, q_cat, latent, k_pe, index_key = first(layers[0], h, cos, sin, freqs)
        counts: list = []
        for i, block in enumerate(layers):
            layer = cache.layer(i)
            layer.write(positions, latent, k_pe, index_key)
            indexer = block.self_attn.indexer
            if indexer is not None and n_keys > indexer.topk:
                kv = self._selected_kv(indexer, q_latent, x, layer, n_keys, cos, sin, None)[1][:, 0]  # [1, topk, C + R]
            else:
                kv = layer.read_kv(n_keys)                                      # [1, n_keys, C + R]
                dynamo.mark_dynamic(kv, 1)
            if i + 1 == len(layers):
                h, indices = last_step(block, h, q_cat, kv)
            else:
                layer_step = step if isinstance(block.mlp, MoE) else dense_step
                h, indices, x, q_latent, q_cat, latent, k_pe, index_key = layer_step(
                    block, layers[i + 1], h, q_cat, kv, cos, sin, freqs)
            if indices is not None:
                counts.append(torch.bincount(indices.flatten(), minlength=block.mlp.experts.n_experts))
        hidden, logits = head(model.norm, model.lm_head, h)
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
        h = _linear(mtp.eh_proj, torch.cat((_norm(emb, mtp.enorm), _norm(hidden, mtp.hnorm)), dim=-1))
        h = self._block(mtp, h, positions, rope, cache.layer(self.n_layers), allowed, n_keys, None)
        if pick is None:
            return None
        h = h[torch.arange(h.shape[0], device=h.device), pick.to(h.device)]
        return _linear(model.lm_head, _norm(h, mtp.shared_head.norm))

# ---------------------------------------------------------------------- the regions (see DecodePath)
def _norm(x: torch.Tensor, module) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE of x [batch, seq, heads, R] as a complex product (freqs [batch, seq, R/2])."""
    pairs = torch.view_as_complex(x.float().contiguous().view(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[:, :, None]).flatten(-2).to(x.dtype)


def _pre_attention(block, h: torch.Tensor, freqs: torch.Tensor):
    """Norm, projections and RoPE -> (x, q_latent, q_cat [batch, seq, heads, C + R], latent, k_pe):
    the absorbed query scores latent and rope key with one product against the cache's combined kv."""
    attn = block.self_attn
    x = _norm(h, block.input_layernorm)
    batch, seq, _ = x.shape
    if hasattr(attn, "q_a_proj"):
        q_latent = _norm(_linear(attn.q_a_proj, x), attn.q_a_layernorm)
        q = _linear(attn.q_b_proj, q_latent)
    else:
        q_latent, q = None, _linear(attn.q_proj, x)
    heads = attn.n_heads
    q_nope, q_pe = q.view(batch, seq, heads, attn.nope_dim + attn.rope_dim).split([attn.nope_dim, attn.rope_dim], -1)
    latent, k_pe = _linear(attn.kv_a_proj_with_mqa, x).split([attn.kv_lora_rank, attn.rope_dim], dim=-1)
    latent = _norm(latent, attn.kv_a_layernorm)
    k_pe = _rotate(k_pe[:, :, None], freqs)[:, :, 0]
    w_uk, _ = attn._wkv_b()
    # absorbed queries: per head, nope query times W_UK as one batched matmul over heads
    q_abs = torch.bmm(q_nope.reshape(batch * seq, heads, -1).transpose(0, 1), w_uk)  # [heads, batch*seq, C]
    q_abs = q_abs.transpose(0, 1).reshape(batch, seq, heads, -1)
    q_cat = torch.cat((q_abs, _rotate(q_pe, freqs)), dim=-1)                  # [batch, seq, heads, C + R]
    return x, q_latent, q_cat, latent, k_pe


def _attend_keys(attn, queries: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Absorbed attention of queries [rows, q, C + R] over kv [rows, keys, C + R] (valid: [rows, q or 1, keys]
    or None) -> out_latent [rows, q, C]."""
    if queries.shape[0] == 1 and valid is None and kv.shape[1] >= LONG_KEYS and not torch.compiler.is_compiling():
        return _attend_many_keys(attn, queries[0], kv[0])[None]
    if queries.shape[0] == 1:  # mm of the queries against the keys' transpose: ~1.7x bmm's rate here
        logits = torch.mm(queries[0], kv[0].t())[None]
    else:
        logits = torch.bmm(queries, kv.transpose(1, 2))
    logits = logits.float() * attn.softmax_scale                                # [rows, q, keys]
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(kv.dtype)
    return torch.bmm(probs, kv[..., : attn.kv_lora_rank])


def _attend_many_keys(attn, queries: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """`_attend_keys` of one row over many keys, in the [keys, queries] layout: queries [q, C + R], kv
    [keys, C + R] (all valid) -> [q, C].

    The keys times the queries as `F.linear`'s weight stream the keys ~2.2x faster than queries @ keys.T,
    and the value product runs as a bmm over KEY_BLOCKS blocks of keys. One row of 8 queries over 32K
    cold keys of 160: 5.7-6.6 ms against 7.6-9.9 ms; below LONG_KEYS keys the plain layout is faster.
    """
    logits = F.linear(kv, queries).float().mul_(attn.softmax_scale)            # [keys, q]
    probs = logits.sub_(logits.amax(dim=0)).exp_()                              # the softmax's numerators
    denominators = probs.sum(dim=0)                                             # [q]
    probs = probs.to(kv.dtype)
    latent = kv[:, : attn.kv_lora_rank]                                         # [keys, C]
    n_keys = kv.shape[0]
    split = n_keys - n_keys % KEY_BLOCKS
    blocks = probs[:split].view(KEY_BLOCKS, split // KEY_BLOCKS, -1).transpose(1, 2)    # [blocks, q, keys / blocks]
    out = torch.bmm(blocks, latent[:split].view(KEY_BLOCKS, split // KEY_BLOCKS, -1)).sum(0, dtype=torch.float32)
    if split < n_keys:
        out += (probs[split:].t() @ latent[split:]).float()
    return (out / denominators[:, None]).to(kv.dtype)                          # [q, C]


def _post_attention(block, h: torch.Tensor, out_latent: torch.Tensor):
    """Value up-projection, output projection, residual, norm and routing -> (h, x, weights, indices);
    for a dense block the MLP too (x, weights and indices None)."""
    attn = block.self_attn
    batch, seq, _ = h.shape
    _, w_uv = attn._wkv_b()
    out = torch.bmm(out_latent, w_uv.transpose(1, 2)).transpose(0, 1)        # [batch*seq, heads, v]
    h = h + _linear(attn.o_proj, out.reshape(batch, seq, -1))
    x = _norm(h, block.post_attention_layernorm)
    mlp = block.mlp
    if not isinstance(mlp, MoE):
        return h + _mlp(mlp, x), None, None, None
    routing = mlp.gate.forward(x.view(-1, x.shape[-1]))
    return h, x, routing.weights, routing.indices


def _finish(mlp, h: torch.Tensor, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """Residual plus routed and shared experts."""
    y = routed if mlp.shared_experts is None else routed + _mlp(mlp.shared_experts, x)
    return h + y


def _final_norm(norm, lm_head, h: torch.Tensor, keep: int):
    hidden = _norm(h, norm)
    return hidden, _linear(lm_head, hidden[:, -keep:])


def _fusable(model) -> bool:
    """Whether the one-token steps apply: float or int8 routed experts and output head."""
    return type(model.lm_head) in (*PLAIN_LINEARS, Int8Linear) and all(
        not isinstance(block.mlp, MoE) or type(block.mlp.experts) in (Experts, Int8Experts) for block in model.layers)


def _projections(block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor):
    """`_pre_attention` plus the DSA indexer key of the token -> (x, q_latent, q_cat, latent, k_pe, index_key)."""
    x, q_latent, q_cat, latent, k_pe = _pre_attention(block, h, freqs)
    indexer = block.self_attn.indexer
    return x, q_latent, q_cat, latent, k_pe, (indexer.keys(x, cos, sin) if indexer is not None else None)


def _first_projections(block, h, cos, sin, freqs):
    """The first layer's `_projections` for `_one_token` (a function of its own: one graph)."""
    return _projections(block, h, cos, sin, freqs)


def _block_after_write(block, h: torch.Tensor, q_cat: torch.Tensor, kv: torch.Tensor):
    """One token through `block` after its cache write: attention over kv [1, n_keys, C + R], output
    projection, MLP or routed experts -> (h, expert indices or None)."""
    attn = block.self_attn
    out_latent = _attend_keys(attn, q_cat.view(1, attn.n_heads, -1), kv, None).transpose(0, 1)  # [heads, 1, C]
    h, x, weights, indices = _post_attention(block, h, out_latent)
    if weights is not None:
        routed = _gathered_experts(block.mlp.experts, x.view(1, -1), weights, indices).view_as(x)
        h = _finish(block.mlp, h, x, routed)
    return h, indices


def _layer_step(block, following, h, q_cat, kv, cos, sin, freqs):
    """`_block_after_write` for an MoE block, then `following`'s `_projections`
    -> (h, expert indices, x, q_latent, q_cat, latent, k_pe, index_key)."""
    h, indices = _block_after_write(block, h, q_cat, kv)
    return (h, indices) + _projections(following, h, cos, sin, freqs)


def _dense_layer_step(block, following, h, q_cat, kv, cos, sin, freqs):
    """`_layer_step` for a dense block (the same code; a function of its own keeps one graph per function)."""
    return _layer_step(block, following, h, q_cat, kv, cos, sin, freqs)


def _last_layer_step(block, h: torch.Tensor, q_cat: torch.Tensor, kv: torch.Tensor):
    return _block_after_write(block, h, q_cat, kv)


def _head_as_reduction(norm, lm_head, h: torch.Tensor):
    """`_final_norm` for one token, the logits written as a reduction over the output head's rows: compiled,
    one fused kernel that streams the head at about the memory's rate (36 GB/s here, against 20-28 GB/s
    for the chunked bmm; eager would materialise the product). An int8 head is dequantised inside it."""
    hidden = _norm(h, norm)
    row = hidden[:, -1:, None, :]                                              # [1, 1, 1, hidden]
    if type(lm_head) is Int8Linear:
        logits = _int8_rows(lm_head.qweight, lm_head.scale, row)
        return hidden, (logits if lm_head.bias is None else logits + lm_head.bias)
    return hidden, (lm_head.weight * row).sum(-1)                              # [1, 1, vocab]


def _int8_rows(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rows q [..., out, in] (int8, scales [..., out]) times x [..., 1, in] as a reduction in fp32 (the
    eager `quant.int8_matmul` kernel takes bf16 activations and rounds its product to bf16)."""
    return (q.float() * x).sum(-1) * scale


def _gathered_experts(experts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One token's chosen experts as reductions over their indexed weights (x [1, hidden]). Compiled, the
    indexing (and for int8 the dequantisation) fuses into the reduction loops: each chosen weight is
    read once and nothing is copied (eager would materialise the gathered weights: use
    `_active_experts` there)."""
    idx, xv = indices[0], x[0]
    if type(experts) is Int8Experts:
        gate, up = _int8_rows(experts.gate_up_q[idx], experts.gate_up_scale[idx], xv).chunk(2, dim=-1)
        out = _int8_rows(experts.down_q[idx], experts.down_scale[idx], (F.silu(gate) * up)[:, None, :])
    else:
        gate = (experts.gate_proj[idx] * xv).sum(-1)                           # [top_k, inter]
        up = (experts.up_proj[idx] * xv).sum(-1)
        out = (experts.down_proj[idx] * (F.silu(gate) * up)[:, None, :]).sum(-1)  # [top_k, hidden]
    return one_token_combine(out, weights).to(x.dtype)


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
    pairs = _gate_up_pairs(experts)
    if tokens == 1:  # no sorting: each chosen expert on the one token, then the weighted sum in fp32
        outs = torch.cat([_expert(experts, pairs, x, e) for e in routing.indices[0].tolist()])  # [top_k, hidden]
        return one_token_combine(outs, routing.weights)
    flat_expert = routing.indices.flatten()
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // top_k
    chosen, counts = torch.unique_consecutive(flat_expert[order], return_counts=True)
    xs = x[token_of]
    pieces, start = [], 0
    for e, n in zip(chosen.tolist(), counts.tolist()):
        pieces.append(_expert(experts, pairs, xs[start:start + n], e))
        start += n
    out = torch.cat(pieces) * routing.weights.flatten()[order, None].to(x.dtype)
    y = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of, out.float()).to(x.dtype)


def _expert(experts: Experts, pairs: torch.Tensor | None, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's SwiGLU on a few rows x [rows, hidden]; gate and up in one batched matmul when they are
    adjacent in memory (`pair_expert_weights`)."""
    if pairs is not None and x.shape[0] <= SMALL_ROWS:
        rows, dim = x.shape
        gate, up = torch.bmm(pairs[e], x.t().expand(2, dim, rows))             # [2, inter, rows]
        h = (F.silu(gate) * up).t()                                           # [rows, inter]
    else:
        h = F.silu(_weight_linear(x, experts.gate_proj[e])) * _weight_linear(x, experts.up_proj[e])
    return _weight_linear(h, experts.down_proj[e])


def _gate_up_pairs(experts: Experts) -> torch.Tensor | None:
    """The [experts, 2, inter, hidden] tensor that `experts.gate_proj` and `up_proj` are views of, if they still are."""
    pairs = getattr(experts, "_gate_up_pairs", None)
    if pairs is None or experts.gate_proj.data_ptr() != pairs.data_ptr() \
            or experts.up_proj.data_ptr() != pairs[:, 1].data_ptr():
        return None
    return pairs


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
    pairs = _gate_up_pairs(experts)
    if pairs is None:
        h = F.silu(torch.bmm(block, experts.gate_proj.transpose(1, 2))) * torch.bmm(block, experts.up_proj.transpose(1, 2))
    else:
        # the weights as the left operand and the few rows as a transposed right one, gate and up in one
        # call: 1.3-2x the rate of block @ weight.T at 2-4 rows per expert (batch 8 decode: 6-9% per step)
        n, _, inter, hidden = pairs.shape
        gate_up = torch.bmm(pairs.view(n, 2 * inter, hidden), block.transpose(1, 2))  # [experts, 2 * inter, capacity]
        gate, up = gate_up.view(n, 2, inter, capacity).unbind(1)
        h = (F.silu(gate) * up).transpose(1, 2).contiguous()                   # [experts, capacity, inter]
    out = torch.bmm(experts.down_proj, h.transpose(1, 2)).transpose(1, 2)      # [experts, capacity, hidden]
    out = out.flatten(0, 1)[slot]                                              # [copies, hidden], sorted
    out = out * routing.weights.flatten()[order, None].to(x.dtype)
    y = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    return y.index_add_(0, token_of, out.float()).to(x.dtype)


@torch.no_grad()
def pair_expert_weights(model) -> int:
    """Store every routed expert's gate and up projections next to each other in memory, in place.

    Values, shapes and results are unchanged (`gate_proj` and `up_proj` become views of one
    [experts, 2, inter, hidden] tensor), but a decode step then runs an expert's gate and up
    projections as one batched matmul. Checkpoints saved afterwards are unaffected. Returns the number
    of expert stacks changed.
    """
    changed = 0
    for module in model.modules():
        if type(module) is Experts and _gate_up_pairs(module) is None:
            pairs = torch.stack((module.gate_proj.data, module.up_proj.data), dim=1).contiguous()
            module.gate_proj.data, module.up_proj.data = pairs[:, 0], pairs[:, 1]
            module._gate_up_pairs = pairs
            changed += 1
    return changed
