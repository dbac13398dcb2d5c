"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Routing as released (`noaux_tc`): sigmoid affinities; the balance bias `e_score_correction_bias` is
added for *selection only*; experts are chosen inside the `topk_group` best groups (a group's score
is the sum of its two best biased affinities; other groups are masked with -inf); the chosen
experts' unbiased affinities are normalised and scaled by `routed_scaling_factor`.

Routed experts are stacked weights [experts, ...] and computed all at once: token copies are sorted
by expert, then either laid out in a zero-padded [experts, capacity, hidden] block for batched
matmuls (CPU in bf16/fp16, when padding adds at most half) or fed to grouped matmuls. Gate and up projections
run as one matmul. `Experts.forward_loop` is the plain reference both are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.config import ModelConfig
from dsv32.model.layers import MLP


@dataclass
class Routing:
    weights: torch.Tensor   # [tokens, top_k] combine weights (unbiased, normalised, scaled)
    indices: torch.Tensor   # [tokens, top_k] chosen experts
    scores: torch.Tensor    # [tokens, n_experts] affinities before the bias (for the balance loss)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        # moved by the aux-loss-free balancing rule, never by gradients
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, forced_indices: torch.Tensor | None = None) -> Routing:
        """x: [tokens, hidden]. `forced_indices` replays a recorded routing (RL "keep routing")."""
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32, as the release does, also under autocast
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        indices = forced_indices if forced_indices is not None else self._select(scores)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(weights * self.scale, indices, scores)

    @torch.no_grad()
    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        choice = scores + self.e_score_correction_bias.float() if self.topk_method == "noaux_tc" else scores
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [tokens, n_group]
            else:
                group_scores = grouped.amax(dim=-1)  # V2's group-limited greedy
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        return choice.topk(self.top_k, dim=-1).indices


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (grouped_mm's backward needs one)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _GatherRows(torch.autograd.Function):
    """out = x[index], where every row of x is taken exactly `fan_out` times (a permutation for 1).

    `inverse[j]` is the output row holding the j-th copy (copies of row r are j = r*fan_out ...
    r*fan_out + fan_out-1), so the backward is a gather and a sum over each row's copies: no
    scatter-add of `x[index]`'s own backward, which runs serially on CPU. Output rows that are no
    one's copy (padding) are listed in `zero_rows` and set to zero; their gradient is ignored.
    """

    @staticmethod
    def forward(ctx, x, index, inverse, fan_out: int, zero_rows=None):
        ctx.save_for_backward(inverse)
        ctx.fan_out = fan_out
        out = x.index_select(0, index)
        return out if zero_rows is None else out.index_fill_(0, zero_rows, 0)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.fan_out == 1:
            return grad.index_select(0, inverse), None, None, None, None
        # each row's copies gathered and summed in one pass, with no [copies, hidden] intermediate:
        # 2.7x faster than index_select + sum at 2048 x 4 copies of 512 (1.6 vs 4.3 ms, fp32, 2 threads)
        bags = inverse.view(-1, ctx.fan_out)                                   # [rows, fan_out]
        return F.embedding_bag(bags, grad.contiguous(), mode="sum").to(grad.dtype), None, None, None, None


def _grouped_matmul(x: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row block g of x (rows offsets[g-1]:offsets[g]) times weight_t[g]; x [rows, in], weight_t [G, in, out]."""
    if hasattr(torch, "_grouped_mm") and x.dtype == weight_t.dtype:
        try:
            return _ContiguousGrad.apply(torch._grouped_mm(x, weight_t, offs=offsets))
        except (RuntimeError, NotImplementedError):
            pass  # dtype/alignment this build's kernel does not take: fall through to per-group matmuls
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    pieces = [chunk @ weight_t[g] for g, chunk in enumerate(x.split(sizes)) if chunk.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight_t.shape[-1])


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a linear layer computes in here: the autocast dtype inside autocast (grouped_mm is not on
    autocast's list, so without this the experts would stay fp32 under bf16 autocast), else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return torch.get_autocast_dtype(device)
    return x.dtype


# on CPU, `_grouped_mm` is one matmul per expert (48 per MoE layer forward and backward with gate+up
# fused), and each is a parallel region. In bf16 one batched matmul over a padded block is faster
# (A/B, fwd+bwd+AdamW step: 4% on the transformers-peer shape, 18% on tiny), and on a shared 2-core
# box, where every region waits for both threads to be scheduled, grouped_mm was 4-5x slower. Padding
# costs its share of extra FLOPs, so it is used while the block is at most this much over-full.
MAX_PADDING = 1.5
# In fp32 on an idle machine the per-expert matmuls run as fast as the padded block and skip the padding:
# grouped was 3% faster on the peer shape and 12% on tiny (same A/B), so only these dtypes pad.
PADDED_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class PaddingBuckets:
    """How `Experts._padded` lays out the sorted token copies: `blocks` of (experts, capacity), expert e's
    rows starting at `first_slot[e]`, `n_slots` rows in all."""
    blocks: list[tuple[torch.Tensor, int]]
    first_slot: torch.Tensor
    n_slots: int


def padding_buckets(counts: torch.Tensor) -> PaddingBuckets:
    """One block padded to the busiest expert's count, or two when that saves at least a tenth of the rows.

    Routing is uneven (an untrained router sends some experts ~1.5x the mean), and one block pads every
    expert to the busiest one. Two blocks (the busiest experts, then the rest padded to the next-busiest
    count) cost two more matmuls and save the padding that the split removes.
    """
    n_experts = counts.numel()
    sorted_counts, by_load = counts.cpu().sort(descending=True, stable=True)
    one_block = n_experts * int(sorted_counts[0])
    split_cost = torch.arange(1, n_experts) * sorted_counts[0] + torch.arange(n_experts - 1, 0, -1) * sorted_counts[1:]
    split = int(split_cost.argmin()) + 1 if n_experts > 1 else n_experts
    if n_experts == 1 or int(split_cost[split - 1]) > 0.9 * one_block:
        blocks = [(torch.arange(n_experts), int(sorted_counts[0]))]
    else:
        blocks = [(by_load[:split], int(sorted_counts[0])), (by_load[split:], int(sorted_counts[split]))]
    capacity = torch.cat([torch.full((len(e),), c) for e, c in blocks])      # per expert, in block order
    first_slot = torch.empty(n_experts, dtype=torch.long)
    first_slot[torch.cat([e for e, _ in blocks])] = torch.cumsum(capacity, 0) - capacity
    return PaddingBuckets(blocks, first_slot, int(capacity.sum()))


class Experts(nn.Module):
    """`n_experts` SwiGLU experts held as stacked weights."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """All experts at once on the token copies sorted by expert, then a weighted sum per token."""
        tokens, top_k = routing.indices.shape
        flat_expert = routing.indices.flatten()              # [tokens * top_k]; copy j is of token j // top_k
        order = torch.argsort(flat_expert, stable=True)      # sorted row i holds copy order[i]
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        dtype = _compute_dtype(x)
        gate_up = torch.cat((self.gate_proj, self.up_proj), dim=1).to(dtype)   # [experts, 2 * inter, dim]
        down = self.down_proj.to(dtype)
        buckets = padding_buckets(counts) if x.device.type == "cpu" and dtype in PADDED_DTYPES else None
        if buckets is not None and buckets.n_slots <= MAX_PADDING * flat_expert.numel():
            out = self._padded(x.to(dtype), order, counts, buckets, gate_up, down, top_k)
        else:
            out = self._grouped(x.to(dtype), order, counts, gate_up, down, top_k)
        out = out * routing.weights.flatten()[:, None].to(out.dtype)   # [tokens * top_k, hidden], copy order
        # accumulate the top-k contributions in fp32, as the official code does
        return out.view(tokens, top_k, -1).sum(1, dtype=torch.float32).to(x.dtype)

    @staticmethod
    def _swiglu(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _grouped(self, x, order, counts, gate_up, down, top_k):
        """Grouped matmuls over the sorted copies; returns [copies, hidden] in copy order."""
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)   # copy j sits in sorted row inverse[j]
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        xs = _GatherRows.apply(x, order // top_k, inverse, top_k)          # [copies, hidden], sorted
        h = self._swiglu(_grouped_matmul(xs, gate_up.transpose(1, 2), offsets))
        out = _grouped_matmul(h, down.transpose(1, 2), offsets)
        return _GatherRows.apply(out, inverse, order, 1)

    def _padded(self, x, order, counts, buckets: PaddingBuckets, gate_up, down, top_k):
        """Batched matmuls over padded blocks: each bucket of experts is an [experts, capacity, hidden] block,
        expert e's copies in its first counts[e] rows.

        Padding rows are zero, so whatever gradient reaches them meets zero activations and adds
        nothing to the weight gradients.
        """
        device = order.device
        expert = torch.repeat_interleave(torch.arange(self.n_experts, device=device), counts)   # of sorted row i
        starts = torch.cumsum(counts, 0) - counts
        slot = buckets.first_slot.to(device)[expert] + torch.arange(order.numel(), device=device) - starts[expert]
        slot_of_copy = torch.empty_like(slot)
        slot_of_copy[order] = slot
        copy_in_slot = torch.zeros(buckets.n_slots, dtype=order.dtype, device=device)  # padding: copy 0's (ignored) gradient
        copy_in_slot[slot] = order
        filled = torch.zeros(buckets.n_slots, dtype=torch.bool, device=device)
        filled[slot] = True
        xp = _GatherRows.apply(x, copy_in_slot // top_k, slot_of_copy, top_k, (~filled).nonzero().flatten())
        outs, row = [], 0
        for experts, capacity in buckets.blocks:
            if capacity == 0:
                continue
            n_rows = len(experts) * capacity
            block = xp[row:row + n_rows].view(len(experts), capacity, x.shape[-1])  # [experts, capacity, hidden]
            w_in, w_out = (gate_up, down) if len(experts) == self.n_experts else \
                (gate_up[experts.to(device)], down[experts.to(device)])
            h = self._swiglu(torch.bmm(block, w_in.transpose(1, 2)))
            outs.append(torch.bmm(h, w_out.transpose(1, 2)).flatten(0, 1))       # [experts * capacity, hidden]
            row += n_rows
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return _GatherRows.apply(out, slot_of_copy, copy_in_slot, 1)

    def forward_loop(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Reference: a plain loop over experts (tests only; not for hot paths)."""
        y = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
        for e in range(self.n_experts):
            token_idx, slot = torch.where(routing.indices == e)
            if token_idx.numel() == 0:
                continue
            xe = x[token_idx]
            he = F.silu(xe @ self.gate_proj[e].T) * (xe @ self.up_proj[e].T)
            ye = (he @ self.down_proj[e].T) * routing.weights[token_idx, slot, None].to(x.dtype)
            y.index_add_(0, token_idx, ye.float())
        return y.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.alpha = cfg.num_experts_per_tok, cfg.aux_loss_alpha
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared) if cfg.n_shared_experts else None
        self.use_loop_reference = False

    def forward(self, x: torch.Tensor, forced_indices: torch.Tensor | None = None):
        """x: [batch, seq, hidden] -> (output, MoEStats)."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        if forced_indices is not None:
            forced_indices = forced_indices.reshape(batch * seq, self.top_k)
        routing = self.gate(flat, forced_indices)
        routed = (self.experts.forward_loop if self.use_loop_reference else self.experts)(flat, routing)
        y = routed.view(batch, seq, dim)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        counts = torch.bincount(routing.indices.flatten(), minlength=self.experts.n_experts)
        aux = sequence_balance_loss(routing, batch, seq, self.top_k, self.alpha) if self.alpha > 0 else None
        return y, MoEStats(counts=counts, aux_loss=aux, indices=routing.indices.view(batch, seq, -1))


@dataclass
class MoEStats:
    counts: torch.Tensor            # [n_experts] tokens routed to each expert in this forward
    aux_loss: torch.Tensor | None   # the sequence-wise balance loss (alpha already applied)
    indices: torch.Tensor           # [batch, seq, top_k] chosen experts (recorded for keep-routing)


def sequence_balance_loss(routing: Routing, batch: int, seq: int, top_k: int, alpha: float) -> torch.Tensor:
    """L = alpha * sum_i f_i P_i per sequence, averaged over the batch (DeepSeek-V3's complementary loss).

    f_i = N_r / (K_r T) * (number of tokens that chose expert i); P_i = mean over tokens of the
    affinities normalised to sum to 1 per token.
    """
    n_experts = routing.scores.shape[-1]
    chosen = torch.zeros(batch * seq, n_experts, device=routing.scores.device)
    chosen.scatter_(1, routing.indices, 1.0)
    f = chosen.view(batch, seq, n_experts).sum(1) * (n_experts / (top_k * seq))    # [batch, n_experts]
    normalised = routing.scores / routing.scores.sum(-1, keepdim=True)
    p = normalised.view(batch, seq, n_experts).mean(1)                              # [batch, n_experts]
    return alpha * (f * p).sum(-1).mean()
