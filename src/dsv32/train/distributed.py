"""Scale-out for training: process setup, expert parallelism (EP), FSDP2, and the collectives the loop needs.

Everything here is applied to the plain `Transformer` from outside and is a no-op in a single process,
so the training loop reads the same with `python` and with `torchrun --nproc_per_node N`.

Layout of N = dp_mod_ep x ep ranks (`build_mesh`):

    mesh "world" [dp_mod_ep, ep]    2-D DeviceMesh over all ranks
    mesh "dp"    = flatten(world)   every rank is data parallel for the dense parameters
    mesh "ep"    = world["ep"]      routed experts are split over this dim; tokens move by all-to-all
    mesh "dp_mod_ep"                ranks that hold the *same* expert slice (data parallel for experts)

Parameter placement:
- dense parameters (attention, norms, router, shared experts, embeddings, head): FSDP2 over "dp", i.e.
  sharded over all ranks;
- routed experts: EP first (each rank keeps E/ep experts as a DTensor `Shard(0)` on "ep"), then FSDP2
  over "dp_mod_ep" only. A rank's expert gradient is already the sum over *all* tokens of the EP group
  (the all-to-all brought them to it), so the only reduction left is over the replicas of its slice,
  which is exactly "dp_mod_ep". With ep == world (the tests) that dim has size 1 and FSDP's collectives
  on it are trivial; we still apply it so that one code path covers every layout.

Gradient reduction is a SUM, not FSDP's default mean: the loop normalises the loss by the *global*
number of target tokens (`all_reduce_sum` of the local counts), so summing per-rank gradients gives
exactly the single-process gradient of the same global batch, for any split of it.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dsv32.model.moe import Experts, MoE, Routing, _grouped_matmul

# ====================================================================== process setup


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK, or run alone without them.

    `device`: "cpu" or "cuda" to force one; by default CUDA when present. The backend follows the
    device: nccl on CUDA, gloo on CPU. Calling it again when already initialised returns the same info.
    """
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `python`: one process, no group
        dev = torch.device("cuda", torch.cuda.current_device()) if want_cuda else torch.device("cpu")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if want_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if want_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, is_main=rank == 0)


def destroy(sync: bool = True) -> None:
    """Tear the process groups down; `sync` first waits for every rank (use it on the success path).

    Leaving a gloo group alive to interpreter exit can abort the process (SIGABRT from a worker
    thread still holding tensors), and destroying it while a peer is still mid-collective can fail
    that peer: so the ranks leave together, then destroy explicitly.
    """
    if dist.is_initialized():
        try:
            if sync:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `tensor` in place over all ranks (or `group`) and return it; identity in one process.

    Use for the global count of target tokens (the loss denominator) and the expert token counts
    (the balance-bias update must see the global load). With nccl the tensor must be on the GPU.
    """
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


# ====================================================================== meshes


@dataclass
class ParallelMesh:
    """The device meshes of one job; see the module docstring for what each dim means."""

    world: DeviceMesh        # [dp_mod_ep, ep]
    dp: DeviceMesh           # all ranks, flattened: FSDP for dense parameters
    ep: DeviceMesh           # expert parallel group of this rank
    dp_mod_ep: DeviceMesh    # ranks holding the same experts: FSDP for expert parameters

    @property
    def ep_size(self) -> int:
        return self.ep.size()


def build_mesh(info: DistInfo, ep_size: int = 1) -> ParallelMesh | None:
    """Meshes for `info.world_size` ranks with `ep_size`-way expert parallelism; None in one process.

    Consecutive ranks form an EP group (ranks 0..ep-1, then ep..2ep-1, ...), so with several ranks per
    node the heavy all-to-all stays inside a node.
    """
    if not info.distributed:
        return None
    if ep_size < 1 or info.world_size % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide world_size={info.world_size}")
    world = init_device_mesh(info.device.type, (info.world_size // ep_size, ep_size),
                             mesh_dim_names=("dp_mod_ep", "ep"))
    dp = world._flatten("dp")  # no public spelling yet in torch 2.13; torchtitan uses the same call
    return ParallelMesh(world=world, dp=dp, ep=world["ep"], dp_mod_ep=world["dp_mod_ep"])


# ====================================================================== expert parallelism


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all over dim 0: rows [in_splits[r]] go to rank r, [out_splits[r]] come back.

    Its backward is the reverse all-to-all, so gradients of received tokens flow back to the rank
    that sent them. (`torch.distributed.nn.functional.all_to_all_single` does the same but is
    deprecated in torch 2.13 in favour of this functional collective.)
    """
    out = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out


class ExpertParallelExperts(nn.Module):
    """Drop-in replacement for `Experts` holding only this rank's slice of the routed experts.

    Parameters are DTensors `Shard(0)` on the EP mesh: locally [E/ep, ...], globally [E, ...], so
    state dicts and DCP checkpoints see the full expert tensors and reshard between world sizes.
    `n_experts` stays the global count (the MoE's expert-count statistics index global experts).
    """

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh):
        super().__init__()
        self.n_experts = experts.n_experts
        self.ep_mesh = ep_mesh
        self.ep_size, self.ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
        if self.n_experts % self.ep_size:
            raise ValueError(f"{self.n_experts} experts cannot be split evenly over {self.ep_size} EP ranks")
        self.n_local = self.n_experts // self.ep_size
        lo = self.ep_rank * self.n_local
        for name in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(experts, name)
            # clone: a view would keep the full [E, ...] storage alive and defeat the 1/ep memory
            local = full.detach()[lo:lo + self.n_local].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(dt, requires_grad=full.requires_grad))

    def _local(self, name: str) -> torch.Tensor:
        return getattr(self, name).to_local()   # [n_local, ...]; its gradient flows back to the DTensor

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [tokens, hidden] -> [tokens, hidden]: dispatch copies to owners, compute, combine back."""
        tokens, top_k = routing.indices.shape
        group = self.ep_mesh.get_group()
        flat_expert = routing.indices.flatten()                        # [tokens * top_k] global ids
        order = torch.argsort(flat_expert, stable=True)                # sorted by expert = by owner rank
        token_of = order // top_k
        send_counts = torch.bincount(flat_expert, minlength=self.n_experts).view(self.ep_size, self.n_local)
        # recv_counts[s, l]: copies that rank s sends to our local expert l (equal-split all-to-all)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()

        x_recv = _all_to_all(x[token_of], recv_splits, send_splits, group)   # [recv, hidden] by source, then expert
        y_recv = self._compute_local(x_recv, recv_counts)                      # same row order
        y = _all_to_all(y_recv, send_splits, recv_splits, group)              # [tokens * top_k, hidden], `order`
        y = y * routing.weights.flatten()[order, None].to(y.dtype)
        # combine the top-k contributions in fp32, as `Experts.forward` does
        out = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_of, y.float()).to(x.dtype)

    def _compute_local(self, x_recv: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each received row with its local expert. recv_counts: [ep_size, n_local]."""
        gate, up, down = self._local("gate_proj"), self._local("up_proj"), self._local("down_proj")
        # rows arrive grouped by source rank; regroup them by local expert for the grouped matmul
        local_expert = torch.arange(self.n_local, device=x_recv.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_expert, recv_counts.flatten())     # [recv]
        perm = torch.argsort(row_expert, stable=True)
        offsets = torch.cumsum(recv_counts.sum(0), 0).to(torch.int32)                # [n_local]
        xs = x_recv[perm]
        h = F.silu(_grouped_matmul(xs, gate.transpose(1, 2), offsets))
        h = h * _grouped_matmul(xs, up.transpose(1, 2), offsets)
        y = _grouped_matmul(h, down.transpose(1, 2), offsets)                         # [recv, hidden]
        if y.shape[0] == 0:
            # nothing routed here: keep the weights in the graph so they still get a (zero) gradient;
            # otherwise this rank would skip the FSDP gradient reduction the others wait in
            y = y + 0.0 * (gate.sum() + up.sum() + down.sum())
        return y[torch.argsort(perm)]                                                 # back to arrival order


def _as_ep_mesh(mesh: ParallelMesh | DeviceMesh | None) -> DeviceMesh | None:
    if isinstance(mesh, ParallelMesh):
        return mesh.ep
    return mesh


def apply_expert_parallel(model: nn.Module, mesh: ParallelMesh | DeviceMesh | None) -> nn.Module:
    """Split the routed experts of every `MoE` in `model` over the EP mesh (in place; returns model).

    Routing (the gate and its balance bias) stays replicated and shared experts stay local; only the
    `experts` module is swapped for an `ExpertParallelExperts` holding 1/ep of the weights (copied
    from the full ones, so apply it to an initialised or loaded model). No-op for a missing or
    single-rank mesh. The routers' balance biases must stay identical on all ranks: update them
    from all-reduced expert counts (`all_reduce_sum`).
    """
    ep_mesh = _as_ep_mesh(mesh)
    if ep_mesh is None or ep_mesh.size() == 1:
        return model
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, Experts):
            if module.use_loop_reference:
                raise ValueError("the MoE loop reference has no expert-parallel form; turn it off first")
            module.experts = ExpertParallelExperts(module.experts, ep_mesh)
    return model


# ====================================================================== FSDP2


def apply_fsdp(
    model: nn.Module,
    mesh: ParallelMesh | DeviceMesh | None,
    *,
    reshard_after_forward: bool = True,
    mp_policy=None,
) -> nn.Module:
    """FSDP2 (`fully_shard`) per decoder block and MTP layer, then the root (in place; returns model).

    `mesh`: a ParallelMesh (dense params over "dp", expert params over "dp_mod_ep") or a 1-D
    DeviceMesh over all ranks (no EP). Gradients are summed over ranks (see the module docstring).
    `mp_policy`: an optional `torch.distributed.fsdp.MixedPrecisionPolicy` (e.g. bf16 params, fp32
    reduce). No-op in one process.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        return model
    if isinstance(mesh, ParallelMesh):
        dp_mesh, expert_mesh = mesh.dp, mesh.dp_mod_ep
    else:
        dp_mesh, expert_mesh = mesh, None
    if dp_mesh.size() == 1:
        return model
    kw = dict(mp_policy=mp_policy or MixedPrecisionPolicy())

    blocks = list(getattr(model, "layers", [])) + list(getattr(model, "mtp", []))
    for block in blocks:
        for module in block.modules():
            if isinstance(module, ExpertParallelExperts):
                if expert_mesh is None:
                    raise ValueError("expert-parallel model: pass the ParallelMesh so experts shard over dp_mod_ep")
                # experts first: fully_shard on the block then skips these already-managed params
                fully_shard(module, mesh=expert_mesh, reshard_after_forward=reshard_after_forward, **kw)
        shared_head = getattr(block, "shared_head", None)
        if shared_head is not None:
            # Transformer.forward calls mtp.shared_head.norm *after* the MTP layer returns, when the
            # layer's parameters are resharded again: give that norm its own unit so it gathers itself
            fully_shard(shared_head.norm, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward, **kw)
    # root: embeddings, final norm, head (and everything not in a block); kept gathered after forward
    # because backward starts with it
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=False, **kw)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor") and hasattr(module, "_get_fsdp_state"):
            # SUM: the loss is already divided by the global count. Forcing plain-SUM collectives
            # also keeps FSDP off ReduceOp.AVG / PREMUL_SUM, which gloo rejects ("Cannot use
            # ReduceOp.PREMUL_SUM with Gloo"); with factor 1 there is no pre/post division left.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def default_ep_size(model: nn.Module, world: int) -> int:
    """gcd(world, routed experts): the widest EP that divides both (1 for a dense model)."""
    n_experts = [m.experts.n_experts for m in model.modules() if isinstance(m, MoE)]
    return math.gcd(world, n_experts[0]) if n_experts else 1


def parallelize(model: nn.Module, info: DistInfo, ep_size: int | None = None, **fsdp_kw) -> nn.Module:
    """The usual recipe: build the meshes, apply EP, then FSDP2 (in place; returns model).

    `ep_size` defaults to `default_ep_size`. The meshes are kept as `model.parallel_mesh` (None alone).
    """
    mesh = build_mesh(info, default_ep_size(model, info.world_size) if ep_size is None else ep_size)
    if mesh is not None:
        apply_expert_parallel(model, mesh)
        apply_fsdp(model, mesh, **fsdp_kw)
    model.parallel_mesh = mesh
    return model


# ====================================================================== gradient clipping


def _grad_norm_of(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of a list of gradients that share one mesh (or are all plain), as a plain fp32 scalar.

    For DTensors the local norms are combined by DTensor itself (`full_tensor` reduces over exactly
    the mesh dims the tensor is sharded on and not over replicated ones), so each element is counted
    once: FSDP shards, and expert slices spread over the EP dim alike.
    """
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    return total.float()


def clip_grad_norm(model_or_params, max_norm: float) -> torch.Tensor:
    """Clip gradients to a global 2-norm of `max_norm`; returns the norm before clipping (plain tensor).

    Same contract as `torch.nn.utils.clip_grad_norm_`, and it is what that function computes for the
    FSDP-only case. Why our own: with EP the expert gradients are DTensors on another mesh
    ([dp_mod_ep, ep]) than the dense ones ([dp]), and torch's version stacks all per-parameter norms
    into one DTensor, which cannot mix meshes. Here each mesh's gradients are reduced on their own
    mesh and the squared norms added. The result is identical on every rank (non-finite included, so
    every rank takes the same skip decision).
    """
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else ("plain", g.device)
        groups.setdefault(key, []).append(g)
    if not groups:
        return torch.zeros(())
    sq = [_grad_norm_of(gs).to("cpu") ** 2 for gs in groups.values()]
    total = torch.stack(sq).sum().sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for gs in groups.values():
            torch._foreach_mul_(gs, coef)
    return total


clip_grad_norm_ = clip_grad_norm  # the torch spelling


def gradient_norm(model: nn.Module) -> float:
    """The global gradient 2-norm without clipping (for logging)."""
    return float(clip_grad_norm(model, math.inf))


def full_model_copy(model: nn.Module) -> nn.Module | None:
    """A plain single-device copy of a parallelised model on the main rank (None elsewhere).

    One process: the model itself. Otherwise every rank joins the gather of the full state dict
    (FSDP shards and EP slices alike), and the main rank loads it into a fresh plain `Transformer`.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dsv32.model.transformer import Transformer

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    with torch.device("meta"):
        plain = Transformer(model.config)
    plain.to_empty(device="cpu")
    plain.load_state_dict(state)
    return plain
