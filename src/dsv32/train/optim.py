"""AdamW with DeepSeek's settings and the learning-rate schedules (warmup-stable-decay, cosine)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, stacked experts, embeddings); never norm gains or biases.

    The balance bias `e_score_correction_bias` is a buffer, so no optimizer ever sees it.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device has one (CPU and CUDA do).

    On CPU the `foreach` implementation is a loop of about ten separate ops per parameter, each a full
    pass over memory; the fused kernel updates every parameter in one vectorised pass, 4-6x faster
    here (73M parameters: ~0.1 s against ~0.5 s per step on 2 cores).
    """
    groups = param_groups(model, weight_decay)
    devices = {p.device.type for group in groups for p in group["params"]}
    if devices and devices <= set(_get_fused_kernels_supported_devices()):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str = "wsd",
                  decay_fraction: float = 0.2, min_lr_ratio: float = 0.1) -> float:
    """The factor on the peak learning rate before optimizer step `step` (0-based).

    wsd: linear warm-up, constant, then a linear decay to `min_lr_ratio` over the last `decay_fraction`
    of training (DeepSeek's recipe is warm-up, long constant phase, then decay).
    cosine: linear warm-up, then cosine from 1 to `min_lr_ratio`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, int(round(total_steps * decay_fraction)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - min_lr_ratio) * progress
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps + 1) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}; choose wsd, cosine or constant")


def build_scheduler(optimizer: torch.optim.Optimizer, **schedule) -> torch.optim.lr_scheduler.LambdaLR:
    lr_multiplier(0, **schedule)  # validate the settings now, not at step 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, **schedule))
