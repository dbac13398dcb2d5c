"""The GRPO objective as plain tensor functions (reference §8.4-§8.5), each small enough to check by hand.

Shapes: B completions, T completion positions (right-padded), V vocabulary. `mask` [B, T] is 1.0 on
the completion tokens that count in the loss (0 on padding, and on every token of a truncated
completion when truncated-completion masking is on).

    advantages  = group_advantages(rewards, G, scale)                 # (r - mean_group) / (std + 1e-4)
    per_token   = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) * M_i + beta * KL
    loss        = aggregate(per_token, mask, loss_type, ...)          # grpo | dr_grpo | dapo

with rho = pi_theta / pi_old per token, KL the k3 estimator against the frozen reference (times rho
for DeepSeek-V3.2's unbiased estimate), and M_i DeepSeek-V3.2's off-policy sequence mask.
"""
from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)


# ---------------------------------------------------------------------- advantages
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages for rewards [N] laid out as N/G consecutive groups of G completions.

    scale: "group" divides by each group's std, "batch" by the std of the whole batch, "none" only
    centres (Dr. GRPO). Stds are sample stds (Bessel-corrected, as TRL's). Returns (advantages [N],
    zero_std [N/G] bool: groups whose rewards are all equal, which carry no signal)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    if group_size < 2:
        raise ValueError(f"group-relative advantages need at least 2 completions per prompt, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double()
    grouped = r.view(-1, group_size)
    mean = grouped.mean(1, keepdim=True)
    group_std = grouped.std(1, keepdim=True)
    adv = grouped - mean
    if scale == "group":
        adv = adv / (group_std + STD_EPS)
    elif scale == "batch":
        adv = adv / ((r.std() if r.numel() > 1 else r.new_zeros(())) + STD_EPS)
    zero_std = torch.isclose(group_std[:, 0], torch.zeros_like(group_std[:, 0]))
    return adv.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32), zero_std


# ---------------------------------------------------------------------- the sampling distribution
def sampling_keep_mask(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       min_p: float = 0.0) -> torch.Tensor | None:
    """Which tokens the sampler could draw [..., V] (bool), batched; None when nothing is truncated.

    The same rule as `dsv32.infer.sampling.probabilities`: temperature, then top-k (ties with the k-th
    value kept), then top-p (the smallest set of most likely tokens whose mass reaches top_p), then
    min-p (probability >= min_p * the largest)."""
    if not (top_k > 0 or top_p < 1.0 or min_p > 0.0):
        return None
    scaled = logits.float() / temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        keep = scaled >= kth
        scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        keep = keep & ~drop
        probs = probs.masked_fill(drop, 0.0)
    if min_p > 0.0:
        keep = keep & ~(probs < min_p * probs.amax(-1, keepdim=True))
    return keep


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   keep: torch.Tensor | None = None, with_entropy: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) and the entropy of pi at each position, pi = softmax(logits / temperature)
    restricted to `keep` [..., V] and renormalised (Keep Sampling Mask), in fp32."""
    scaled = logits.float() / temperature
    if keep is not None:
        scaled = scaled.masked_fill(~keep, float("-inf"))
    logp = torch.log_softmax(scaled, dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        p = logp.exp()
        entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    return chosen, entropy


def loss_mask(present: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """[B, T] 1.0 on the completion tokens that count: `present` ones, minus every token of a completion
    cut at the length limit when `mask_truncated` (its reward judges an answer it never finished)."""
    mask = present.float()
    if mask_truncated:
        mask = mask * (~truncated.bool()).float().unsqueeze(-1)
    return mask


# ---------------------------------------------------------------------- the four V3.2 pieces that are math
def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_theta || pi_ref) per token: pi_ref/pi_theta - log(pi_ref/pi_theta) - 1."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def off_policy_sequence_mask(advantages: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor,
                             mask: torch.Tensor, delta: float) -> torch.Tensor:
    """DeepSeek-V3.2's M_i [B]: 0 for a sequence with a negative advantage whose mean log-ratio
    (1/|o_i|) sum_t log(pi_sampling / pi_theta) exceeds delta, else 1. No gradient flows through it."""
    log_ratio = (sampling_logps - logps.detach()) * mask
    mean = log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)
    keep = (advantages >= 0) | (mean <= delta)
    return keep.to(logps.dtype)


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
                   epsilon_low: float, epsilon_high: float, ref_logps: torch.Tensor | None = None,
                   beta: float = 0.0, unbiased_kl: bool = False, sequence_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (negated, to minimise) plus beta * KL, per token [B, T].

    Returns (loss [B, T], parts) with parts: ratio, kl (or None), low/high-clipped booleans."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    if sequence_mask is not None:
        loss = loss * sequence_mask.unsqueeze(-1)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        if unbiased_kl:
            kl = kl * ratio  # V3.2: importance-weight k3 by pi_theta / pi_old (samples come from pi_old)
        loss = loss + beta * kl
    parts = {"ratio": ratio.detach(), "kl": None if kl is None else kl.detach(),
             "low_clipped": (ratio < 1 - epsilon_low) & (adv < 0), "high_clipped": (ratio > 1 + epsilon_high) & (adv > 0)}
    return loss, parts


def aggregate(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, *, n_sequences: float, n_tokens: float,
              max_completion_length: int) -> torch.Tensor:
    """This micro-batch's share of the batch loss, normalised by the batch's global counts, so summing
    the micro-batches (gradient accumulation) gives exactly the loss of the whole batch.

    grpo:    mean over sequences of (sum_t loss / |o_i|)                  (DeepSeekMath, per-sequence mean)
    dr_grpo: sum of all token losses / (n_sequences * max_completion_length)   (Dr. GRPO, no length bias)
    dapo:    sum of all token losses / n_tokens of the whole batch        (token-level, DAPO)"""
    if loss_type == "grpo":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(n_sequences, 1.0)
    if loss_type == "dr_grpo":
        return (loss * mask).sum() / (max(n_sequences, 1.0) * max_completion_length)
    if loss_type == "dapo":
        return (loss * mask).sum() / max(n_tokens, 1.0)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
