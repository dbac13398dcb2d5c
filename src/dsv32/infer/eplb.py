"""Expert-load-aware placement of routed experts on ranks (the idea of DeepSeek's EPLB).

With expert parallelism a rank's work in a MoE layer is the number of token copies routed to the
experts it holds, so a few hot experts on one rank make every other rank wait. From recorded load
(tokens per expert and layer: the engine's `expert_load` serving counters, exported by `dsv32 serve`
at /metrics) this module:

1. replicates: gives `redundant` extra copies per layer, one at a time, to the expert with the most
   tokens per copy (a replicated expert's tokens are split evenly over its copies);
2. packs: places the copies, heaviest first, each on the least-loaded rank that still has a free
   slot (preferring ranks that do not hold that expert yet), so every rank gets (E + redundant) / N slots.

The result, an `ExpertPlacement`, is what `parallelize` loads with; `rank_loads` gives the expected
tokens per rank of any placement, and `placement_report` the max/mean before and after.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    slots: torch.Tensor  # [n_moe_layers, ranks, slots_per_rank] the global expert held by each slot

    @property
    def ranks(self) -> int:
        return self.slots.shape[1]

    def replicas(self, n_experts: int) -> torch.Tensor:
        """Copies of each expert per layer: [n_moe_layers, n_experts]."""
        flat = self.slots.flatten(1)
        return torch.zeros(flat.shape[0], n_experts, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))


def contiguous_placement(n_layers: int, n_experts: int, ranks: int) -> ExpertPlacement:
    """The default: rank r holds experts [r E/N, (r+1) E/N) in every layer."""
    if n_experts % ranks:
        raise ValueError(f"{n_experts} experts do not split evenly over {ranks} ranks")
    return ExpertPlacement(torch.arange(n_experts).view(1, ranks, -1).repeat(n_layers, 1, 1))


def replicate(load: torch.Tensor, redundant: int) -> torch.Tensor:
    """Copies per expert [layers, experts]: one each, plus `redundant` given greedily to the most loaded per copy."""
    replicas = torch.ones_like(load, dtype=torch.long)
    rows = torch.arange(load.shape[0])
    for _ in range(redundant):
        hottest = (load / replicas).argmax(-1)          # [layers]
        replicas[rows, hottest] += 1
    return replicas


def balanced_placement(load: torch.Tensor, ranks: int, redundant: int = 0) -> ExpertPlacement:
    """Place every layer's experts (plus `redundant` copies of hot ones) on `ranks` ranks, balancing load.

    load: [n_moe_layers, n_experts] recorded tokens per expert. Deterministic for a given load.
    """
    load = torch.as_tensor(load, dtype=torch.float64)
    if load.dim() != 2:
        raise ValueError(f"expert load must be [moe_layers, experts], got shape {tuple(load.shape)}")
    n_layers, n_experts = load.shape
    if ranks < 1 or (n_experts + redundant) % ranks:
        raise ValueError(f"{n_experts} experts + {redundant} redundant copies do not split evenly over {ranks} ranks")
    if redundant < 0 or redundant > n_experts * (ranks - 1):
        raise ValueError(f"redundant copies must be in [0, {n_experts * (ranks - 1)}], got {redundant}")
    per_rank = (n_experts + redundant) // ranks
    replicas = replicate(load, redundant)
    # every copy as an item [layers, copies]; heaviest first (ties: lower expert id first)
    items = torch.stack([torch.repeat_interleave(torch.arange(n_experts), r) for r in replicas])
    weight = load.gather(1, items) / replicas.gather(1, items)
    order = torch.sort(weight, dim=-1, descending=True, stable=True).indices
    items, weight = items.gather(1, order), weight.gather(1, order)

    rows = torch.arange(n_layers)
    rank_load = torch.zeros(n_layers, ranks, dtype=torch.float64)
    fill = torch.zeros(n_layers, ranks, dtype=torch.long)
    holds = torch.zeros(n_layers, ranks, n_experts, dtype=torch.bool)
    slots = torch.full((n_layers, ranks, per_rank), -1, dtype=torch.long)
    total = float(load.sum()) + 1.0
    for i in range(items.shape[1]):                     # one copy per layer at a time, all layers together
        expert = items[:, i]                            # [layers]
        cost = rank_load + total * holds[rows, :, expert]   # a second copy on the same rank helps nobody
        cost = cost.masked_fill(fill >= per_rank, float("inf"))
        rank = cost.argmin(-1)                          # [layers]
        slots[rows, rank, fill[rows, rank]] = expert
        fill[rows, rank] += 1
        rank_load[rows, rank] += weight[:, i]
        holds[rows, rank, expert] = True
    return ExpertPlacement(slots)


def rank_loads(placement: ExpertPlacement, load: torch.Tensor) -> torch.Tensor:
    """Expected tokens per rank [layers, ranks] under `placement`, a replicated expert's split evenly."""
    load = torch.as_tensor(load, dtype=torch.float64)
    flat = placement.slots.flatten(1)                                     # [layers, ranks * slots]
    replicas = placement.replicas(load.shape[1]).to(torch.float64)
    per_slot = load.gather(1, flat) / replicas.gather(1, flat)
    return per_slot.view(placement.slots.shape).sum(-1)


def imbalance(placement: ExpertPlacement, load: torch.Tensor) -> torch.Tensor:
    """max / mean rank load per layer [layers] (1.0 = perfectly balanced)."""
    per_rank = rank_loads(placement, load)
    return per_rank.max(-1).values / per_rank.mean(-1).clamp_min(1e-12)


def placement_report(load: torch.Tensor, placement: ExpertPlacement, ranks: int) -> str:
    n_layers, n_experts = load.shape
    before = imbalance(contiguous_placement(n_layers, n_experts, ranks), load)
    after = imbalance(placement, load)
    redundant = placement.slots.shape[1] * placement.slots.shape[2] - n_experts
    return (f"expert placement over {ranks} ranks ({redundant} redundant copies per layer, "
            f"{int(load.sum())} recorded tokens): max/mean rank load {before.mean():.3f} -> {after.mean():.3f} "
            f"(mean of {n_layers} MoE layers; worst layer {before.max():.3f} -> {after.max():.3f})")


_METRIC = re.compile(r'expert_tokens_total\{([^}]*)\}\s+([0-9.eE+-]+)')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def read_expert_load(path: str | Path, cfg=None) -> torch.Tensor:
    """Recorded load [moe_layers, experts] from a JSON file (`Engine.stats()`, its "expert_load" part, or
    its "tokens_per_expert" list) or a saved /metrics page of `dsv32 serve` (Prometheus text)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        load = _from_prometheus(text, path)
    else:
        if isinstance(data, dict):
            data = data.get("expert_load", data)
            data = data.get("tokens_per_expert", data) if isinstance(data, dict) else data
        load = torch.tensor(data, dtype=torch.float64)
    if load.dim() != 2 or load.numel() == 0:
        raise ValueError(f"{path}: no [moe_layers, experts] expert load found")
    if (load < 0).any():
        raise ValueError(f"{path}: negative expert load")
    if cfg is not None:
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        if tuple(load.shape) != (n_moe, cfg.n_routed_experts):
            raise ValueError(f"{path}: expert load has shape {tuple(load.shape)}, the model has "
                             f"{n_moe} MoE layers x {cfg.n_routed_experts} experts")
    return load


def _from_prometheus(text: str, path) -> torch.Tensor:
    entries = []
    for labels, value in _METRIC.findall(text):
        named = dict(_LABEL.findall(labels))
        if "layer" in named and "expert" in named:
            entries.append((int(named["layer"]), int(named["expert"]), float(value)))
    if not entries:
        raise ValueError(f"{path}: neither JSON nor a /metrics page with expert_tokens_total")
    layers = sorted({layer for layer, _, _ in entries})
    row = {layer: i for i, layer in enumerate(layers)}
    load = torch.zeros(len(layers), max(e for _, e, _ in entries) + 1, dtype=torch.float64)
    for layer, expert, value in entries:
        load[row[layer], expert] = value
    return load
