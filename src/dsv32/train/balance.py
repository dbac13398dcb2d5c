"""Auxiliary-loss-free load balancing (DeepSeek-V3): nudge each expert's routing bias toward balance.

After every optimizer step, each router's bias moves by gamma * sign(mean load - load): overloaded
experts become less attractive, starved ones more. The loads are the expert token counts of the
*training* forwards since the previous step (summed over micro-batches and, when distributed, over
ranks); evaluation and generation forwards are never fed in, so they cannot move the biases.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dsv32.model.moe import MoE


def routers_in_count_order(model: nn.Module) -> list[nn.Module]:
    """Routers in the row order of `ModelOutput.expert_counts`: main layers first, then MTP layers."""
    blocks = list(model.layers) + list(getattr(model, "mtp", []))
    return [b.mlp.gate for b in blocks if isinstance(b.mlp, MoE)]


class BiasBalancer:
    def __init__(self, model: nn.Module, gamma: float,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.routers = routers_in_count_order(model)
        self.gamma = gamma
        self.all_reduce = all_reduce
        self.pending: torch.Tensor | None = None  # [n_routers, n_experts] counts since the last step
        self.last_load: torch.Tensor | None = None

    def accumulate(self, expert_counts: torch.Tensor | None) -> None:
        """Add one training forward's counts ([rows, n_experts]; rows may omit the MTP layers)."""
        if expert_counts is None or not self.routers:
            return
        counts = expert_counts.detach().to(torch.float64)
        if self.pending is None:
            n_experts = self.routers[0].e_score_correction_bias.numel()
            self.pending = torch.zeros(len(self.routers), n_experts, dtype=torch.float64, device=counts.device)
        self.pending[: counts.shape[0]] += counts

    @torch.no_grad()
    def step(self) -> None:
        """Apply the update from the accumulated loads; call once per optimizer step."""
        if self.pending is None:
            return
        load = self.pending
        if self.all_reduce is not None:
            load = self.all_reduce(load)
        self.last_load = load.clone()
        self.pending = None
        if self.gamma == 0:
            return
        for router, layer_load in zip(self.routers, load):
            if layer_load.sum() == 0:
                continue  # this layer saw no tokens (e.g. MTP not run this step)
            direction = torch.sign(layer_load.mean() - layer_load).to(router.e_score_correction_bias)
            router.e_score_correction_bias.add_(self.gamma * direction)

    def hook(self, optimizer: torch.optim.Optimizer):
        """Run `step` right before every optimizer step (so no code path can forget it)."""
        return optimizer.register_step_pre_hook(lambda *_: self.step())
