"""Scale-out inference: one engine over N processes (torchrun), tensor + expert + vocabulary parallel.

    torchrun --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29500 \\
        -m dsv32.cli serve --model DIR          # or generate

Layout of rank r of N (the official DeepSeek inference code's, applied to the plain `Transformer`
from outside by swapping modules, as torchtitan does; the model code knows nothing of ranks):

- attention: heads split, H/N per rank. `q_b_proj` (or `q_proj`) and `kv_b_proj` keep their heads'
  rows (column parallel), `o_proj` their heads' columns (row parallel: partial sums, one all-reduce).
  The latent projections, their norms and the DSA indexer are small and replicated, so every rank
  holds the full latent KV cache of its batch (MLA's cache is shared by all heads).
- dense FFN: gate/up split by intermediate rows, down by columns, one all-reduce.
- MoE: the router is replicated (every rank routes every token identically); routed experts are
  expert parallel: each rank owns E/N experts (or the slots an `ExpertPlacement` gives it, with copies
  of hot experts) and computes only the token copies routed to them. The shared experts are split
  like a dense FFN. Routed and shared partial outputs are summed and combined across ranks by ONE
  all-reduce: after the attention all-reduce every rank holds every token, so dispatch needs no
  transfer and the combine is the all-reduce.
- embedding: vocabulary rows split (ids outside a rank's range give zeros; all-reduce); output head:
  vocabulary rows split, logits all-gathered.

Scheduling: rank 0 runs the real `Engine` (`DriverEngine`): requests, batching, cache blocks and
sampling live there. Before each forward it broadcasts what the forward needs (token ids, positions,
block tables) on a gloo control group, and the other ranks (`follow`) run the same forward on their
own identical cache. So every rank runs the same batch each step, and only rank 0 decides anything.

`parallel_engine()` in `dsv32.infer.launch` is the entry point for commands (generate, serve, eval).
"""
from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from dsv32.checkpoint import TensorSlice
from dsv32.infer.engine import Engine
from dsv32.model.layers import MLP
from dsv32.model.mla import MLA
from dsv32.model.moe import Experts, MoE, Routing

# how long followers may wait for rank 0's next step: an idle server sends nothing for hours
CONTROL_TIMEOUT = datetime.timedelta(days=30)


# ====================================================================== process setup
@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the job. `group` carries the model's collectives, `control` (gloo)
    the driver's step messages. Without process groups (the planner) modules can be built, not run."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None
    control: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """This process's rank under torchrun (0 when run alone), readable before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def init_parallel(device: str | None = None, timeout_s: float = 600.0) -> ParallelContext:
    """Join the torchrun job (RANK / WORLD_SIZE / LOCAL_RANK), or return a one-process context.

    Backend: nccl on CUDA (one GPU per local rank), gloo on CPU; the control group is always gloo.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        return ParallelContext(device=torch.device("cuda") if cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if cuda else None)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelContext(rank=rank, world_size=world, device=dev, group=dist.group.WORLD, control=control)


def shutdown(sync: bool = True) -> None:
    """Leave together (barrier), then destroy the process groups: a gloo group left alive to
    interpreter exit can abort the process."""
    if dist.is_initialized():
        try:
            if sync:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _all_reduce(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", ctx.group))


def _all_gather_last(x: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """Concatenate every rank's x along the last dim."""
    return funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), x.dim() - 1, ctx.group))


# ====================================================================== parallel modules
class RowParallelLinear(nn.Linear):
    """A linear layer holding a range of input columns: partial products summed over ranks (one
    all-reduce); the bias, replicated, is added once after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext):
        super().__init__(in_features, out_features, bias=bias)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _all_reduce(F.linear(x, self.weight), self.ctx)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """The embedding rows [start, start + rows) of the vocabulary; other ids look up zeros; summed over ranks."""

    def __init__(self, rows: int, dim: int, start: int, ctx: ParallelContext):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.start, self.rows, self.ctx = start, rows, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)    # [batch, seq, hidden]
        return _all_reduce(h.masked_fill(outside[..., None], 0), self.ctx)


class VocabParallelHead(nn.Module):
    """Output head rows for a vocabulary range; each rank's logits are gathered along the vocabulary."""

    def __init__(self, rows: int, dim: int, ctx: ParallelContext):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_gather_last(F.linear(x, self.weight), self.ctx)   # [..., vocab]


class ParallelExperts(nn.Module):
    """This rank's routed experts (expert parallel) plus its slice of the shared experts.

    Takes the place of `MoE.experts` (with `MoE.shared_experts` set to None, since this module now
    computes them), so `MoE.forward` and the decode fast path call it unchanged: forward(x, routing)
    gets every token and the full routing, and returns the complete MoE output (routed + shared),
    combined over ranks by one all-reduce.

    `slot_of[e, k]`: the local slot holding replica k of global expert e (-1: another rank holds it).
    An expert held by several slots in the job (EPLB copies of a hot expert) splits its token copies
    among them: the copy of token t goes to replica t % n_replicas[e], a fixed rule every rank
    evaluates identically.
    """

    def __init__(self, n_experts: int, slot_of: torch.Tensor, n_replicas: torch.Tensor, dim: int, inter_dim: int,
                 shared_inter_dim: int, ctx: ParallelContext):
        super().__init__()
        self.n_experts = n_experts                    # global: routing and expert counts use it
        n_slots = int((slot_of >= 0).sum())
        self.local = Experts(n_slots, dim, inter_dim)
        self.shared = MLP(dim, shared_inter_dim) if shared_inter_dim else None
        self.ctx = ctx
        # plain tensors, not buffers: the placement is not a weight and must survive `to_empty`
        self.slot_of = slot_of.to(ctx.device)         # [n_experts, max replicas] local slot, -1 = another rank
        self.n_replicas = n_replicas.to(ctx.device)   # [n_experts]

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        tokens, top_k = routing.indices.shape
        token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)   # [tokens * top_k]
        expert = routing.indices.flatten()
        slot = self.slot_of[expert, token_of % self.n_replicas[expert]]             # local slot or -1
        mine = (slot >= 0).nonzero().flatten()                                      # the copies computed here
        y = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        if mine.numel():
            local_routing = Routing(weights=routing.weights.flatten()[mine, None], indices=slot[mine, None],
                                    scores=routing.scores)
            out = self.local(x[token_of[mine]], local_routing)                     # [copies here, hidden], weighted
            y.index_add_(0, token_of[mine], out.float())
        if self.shared is not None:
            y += self.shared(x).float()
        # summed in fp32 across ranks, as the single-process experts accumulate their top-k in fp32
        return _all_reduce(y, self.ctx).to(x.dtype)

    forward_loop = forward  # `MoE.use_loop_reference` has no separate path here


# ====================================================================== applying the layout
def _split(total: int, ctx: ParallelContext, what: str) -> tuple[int, int]:
    if total % ctx.world_size:
        raise ValueError(f"{what} ({total}) is not divisible by the {ctx.world_size} ranks")
    size = total // ctx.world_size
    return ctx.rank * size, (ctx.rank + 1) * size


def _column(linear: nn.Linear, start: int, stop: int, key: str, slices: dict) -> nn.Linear:
    """Keep output rows [start, stop) of `linear` (no communication: the output stays split)."""
    new = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None, device="meta")
    slices[f"{key}.weight"] = TensorSlice(f"{key}.weight", 0, start, stop)
    if linear.bias is not None:
        slices[f"{key}.bias"] = TensorSlice(f"{key}.bias", 0, start, stop)
    return new


def _row(linear: nn.Linear, start: int, stop: int, key: str, slices: dict, ctx: ParallelContext) -> nn.Linear:
    """Keep input columns [start, stop) of `linear`; the output is all-reduced."""
    with torch.device("meta"):
        new = RowParallelLinear(stop - start, linear.out_features, linear.bias is not None, ctx)
    slices[f"{key}.weight"] = TensorSlice(f"{key}.weight", 1, start, stop)
    return new


def _shard_attention(attn: MLA, prefix: str, ctx: ParallelContext, slices: dict) -> None:
    h0, h1 = _split(attn.n_heads, ctx, "num_attention_heads")
    qk, kv = attn.nope_dim + attn.rope_dim, attn.nope_dim + attn.v_dim
    q_name = "q_b_proj" if hasattr(attn, "q_b_proj") else "q_proj"
    setattr(attn, q_name, _column(getattr(attn, q_name), h0 * qk, h1 * qk, f"{prefix}.{q_name}", slices))
    attn.kv_b_proj = _column(attn.kv_b_proj, h0 * kv, h1 * kv, f"{prefix}.kv_b_proj", slices)
    attn.o_proj = _row(attn.o_proj, h0 * attn.v_dim, h1 * attn.v_dim, f"{prefix}.o_proj", slices, ctx)
    attn.n_heads = h1 - h0


def _shard_mlp(mlp: MLP, prefix: str, ctx: ParallelContext, slices: dict, what: str) -> None:
    start, stop = _split(mlp.gate_proj.out_features, ctx, what)
    mlp.gate_proj = _column(mlp.gate_proj, start, stop, f"{prefix}.gate_proj", slices)
    mlp.up_proj = _column(mlp.up_proj, start, stop, f"{prefix}.up_proj", slices)
    mlp.down_proj = _row(mlp.down_proj, start, stop, f"{prefix}.down_proj", slices, ctx)


def _placement_tables(slots: torch.Tensor, rank: int, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From `slots` [ranks, slots_per_rank] (the global expert in each slot of every rank): this rank's
    slot_of [n_experts, max replicas] (-1 where another rank holds that replica) and n_replicas [n_experts]."""
    flat = slots.flatten()
    n_replicas = torch.bincount(flat, minlength=n_experts)
    if int(n_replicas.min()) == 0:
        raise ValueError(f"the expert placement leaves expert {int(n_replicas.argmin())} on no rank")
    # the k-th slot (in rank order) that holds expert e is e's replica k
    order = torch.argsort(flat, stable=True)                                    # slots grouped by expert
    first = torch.cumsum(n_replicas, 0) - n_replicas                            # where each group starts
    replica = torch.empty_like(flat)
    replica[order] = torch.arange(flat.numel()) - first[flat[order]]
    replica = replica.view_as(slots)                                            # [ranks, slots_per_rank]
    slot_of = torch.full((n_experts, int(n_replicas.max())), -1, dtype=torch.long)
    slot_of[slots[rank], replica[rank]] = torch.arange(slots.shape[1])
    return slot_of, n_replicas


def _shard_moe(moe: MoE, prefix: str, ctx: ParallelContext, slots: torch.Tensor, slices: dict) -> None:
    """`slots` [ranks, slots_per_rank]: the global expert in each slot of every rank."""
    n_experts = moe.experts.n_experts
    slot_of, n_replicas = _placement_tables(slots, ctx.rank, n_experts)
    shared = moe.shared_experts
    shared_inter = 0
    if shared is not None:
        start, stop = _split(shared.gate_proj.out_features, ctx, "shared expert intermediate size")
        shared_inter = stop - start
    inter, dim = moe.experts.gate_proj.shape[1], moe.experts.gate_proj.shape[2]
    with torch.device("meta"):
        experts = ParallelExperts(n_experts, slot_of, n_replicas, dim, inter, shared_inter, ctx)
    local = tuple(slots[ctx.rank].tolist())
    for proj in ("gate_proj", "up_proj", "down_proj"):
        slices[f"{prefix}.experts.local.{proj}"] = TensorSlice(f"{prefix}.experts.{proj}", experts=local)
    if shared is not None:
        src = f"{prefix}.shared_experts"
        slices[f"{prefix}.experts.shared.gate_proj.weight"] = TensorSlice(f"{src}.gate_proj.weight", 0, start, stop)
        slices[f"{prefix}.experts.shared.up_proj.weight"] = TensorSlice(f"{src}.up_proj.weight", 0, start, stop)
        slices[f"{prefix}.experts.shared.down_proj.weight"] = TensorSlice(f"{src}.down_proj.weight", 1, start, stop)
    moe.experts, moe.shared_experts = experts, None


def contiguous_slots(n_experts: int, ctx: ParallelContext) -> torch.Tensor:
    """The default placement: rank r owns experts [r E/N, (r+1) E/N) -> [ranks, E/N]."""
    _split(n_experts, ctx, "n_routed_experts")
    return torch.arange(n_experts).view(ctx.world_size, -1)


def parallelize(model, ctx: ParallelContext, placement=None) -> dict[str, TensorSlice]:
    """Turn a full meta-device `Transformer` into rank `ctx.rank`'s part, in place.

    `placement`: an `ExpertPlacement` (dsv32.infer.eplb) for the main model's MoE layers, in layer
    order; default (and always for the MTP layers): contiguous. Returns where each local tensor comes
    from in the full checkpoint, for `checkpoint.load_sharded`.
    """
    cfg = model.config
    if model.embed_tokens.weight.device.type != "meta":
        raise ValueError("parallelize works on a meta-device model (see checkpoint.load_sharded)")
    slices: dict[str, TensorSlice] = {}
    v0, v1 = _split(cfg.vocab_size, ctx, "vocab_size")
    with torch.device("meta"):
        model.embed_tokens = VocabParallelEmbedding(v1 - v0, cfg.hidden_size, v0, ctx)
        model.lm_head = VocabParallelHead(v1 - v0, cfg.hidden_size, ctx)
    slices["embed_tokens.weight"] = TensorSlice("embed_tokens.weight", 0, v0, v1)
    slices["lm_head.weight"] = TensorSlice("embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
                                           0, v0, v1)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight

    blocks = [(f"layers.{i}", b) for i, b in enumerate(model.layers)] + [(f"mtp.{k}", b) for k, b in enumerate(model.mtp)]
    moe_index = 0
    for prefix, block in blocks:
        _shard_attention(block.self_attn, f"{prefix}.self_attn", ctx, slices)
        if isinstance(block.mlp, MoE):
            main = prefix.startswith("layers.")
            if placement is not None and main:
                slots = placement.slots[moe_index]
                if slots.shape[0] != ctx.world_size:
                    raise ValueError(f"the expert placement is for {slots.shape[0]} ranks, this job has {ctx.world_size}")
            else:
                slots = contiguous_slots(cfg.n_routed_experts, ctx)
            moe_index += main
            _shard_moe(block.mlp, f"{prefix}.mlp", ctx, slots, slices)
        else:
            _shard_mlp(block.mlp, f"{prefix}.mlp", ctx, slices, "intermediate_size")
    if placement is not None and placement.slots.shape[0] != moe_index:
        raise ValueError(f"the expert placement covers {placement.slots.shape[0]} MoE layers, the model has {moe_index}")
    return slices


# ====================================================================== rank 0 drives, the others follow
_FORWARD, _MTP, _STOP = "forward", "mtp", "stop"


def _send(ctx: ParallelContext, message: tuple) -> None:
    dist.broadcast_object_list([message], src=0, group=ctx.control)


def _receive(ctx: ParallelContext) -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0, group=ctx.control)
    return box[0]


class DriverEngine(Engine):
    """The `Engine` of rank 0: before each forward it tells the other ranks what to run.

    Requests, scheduling, the block pool and sampling stay here; the followers hold only the model
    shards and an identical paged cache, addressed by the block tables sent with each forward.
    `close()` releases them (call it once, when done: after it no forward can run).
    """

    def __init__(self, model, ctx: ParallelContext, **engine_kwargs):
        super().__init__(model, **engine_kwargs)
        self.ctx = ctx
        self.closed = False

    def _run(self, rows, ids, positions, keep, decode):
        _send(self.ctx, (_FORWARD, ids, positions, [r.blocks for r in rows], keep, decode))
        return super()._run(rows, ids, positions, keep, decode)

    def _mtp(self, batch, hidden, next_ids, positions, pick, decode=False):
        _send(self.ctx, (_MTP, next_ids, positions, pick, decode))
        return super()._mtp(batch, hidden, next_ids, positions, pick, decode)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _send(self.ctx, (_STOP,))


def follow(engine: Engine, ctx: ParallelContext) -> int:
    """Run rank 0's forwards on this rank's shard until it says stop; returns how many ran.

    `engine` is this rank's plain Engine, built with the driver's settings (same cache geometry);
    its scheduler is never used. SIGINT/SIGTERM are ignored meanwhile: the driver gets them too
    (torchrun forwards them to every rank) and shuts the job down in order.
    """
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    n, batch, hidden = 0, None, None
    device = engine.device
    try:
        with torch.inference_mode():
            while True:
                message = _receive(ctx)
                kind = message[0]
                if kind == _STOP:
                    return n
                if kind == _FORWARD:
                    _, ids, positions, tables, keep, decode = message
                    batch = engine.cache.batch(tables)
                    ids, positions = ids.to(device), positions.to(device)
                    if decode:
                        _, hidden, _ = engine._decode_forward(ids, positions, batch, keep)
                    else:
                        hidden = engine.model(ids, positions=positions, cache=batch, logits_to_keep=keep).hidden_states
                    n += 1
                elif kind == _MTP:
                    _, next_ids, positions, pick, decode = message
                    engine._mtp(batch, hidden[:, : next_ids.shape[1]], next_ids, positions, pick, decode)
                else:
                    raise RuntimeError(f"unknown step message {kind!r} from rank 0")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
