"""MTP speculative decoding: the accept/resample rule and the acceptance counters.

The model's MTP layer drafts one token; the next main forward verifies it and scores the token after
it in the same pass. With target distribution p and draft distribution q (both after the request's
own penalties, temperature, top-k/top-p/min-p), the draft d ~ q is kept with probability
min(1, p(d) / q(d)); otherwise a replacement is drawn from norm(max(p - q, 0)). The emitted token is
then distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023). Greedy decoding keeps d iff
it equals argmax p, so greedy output is identical to plain decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def verify_draft(draft: int, target: torch.Tensor | None, draft_probs: torch.Tensor | None,
                 generator: torch.Generator, greedy_token: int | None = None) -> tuple[bool, int]:
    """Decide on one drafted token; returns (accepted, token), token == draft when accepted.

    Greedy: pass `greedy_token` (argmax of the target) and leave the distributions None.
    Sampling: `target` p and `draft_probs` q are probability rows [vocab].
    """
    if greedy_token is not None:
        return greedy_token == draft, greedy_token
    if target is None or draft_probs is None:
        raise ValueError("verify_draft needs the target and draft distributions when not greedy")
    p_d, q_d = float(target[draft]), float(draft_probs[draft])
    u = float(torch.rand((), generator=generator))
    if q_d > 0 and u < min(1.0, p_d / q_d):
        return True, draft
    residual = (target - draft_probs).clamp_min(0)
    total = float(residual.sum())
    dist = residual / total if total > 0 else target  # p == q everywhere: any draw from p is exact
    return False, int(torch.multinomial(dist, 1, generator=generator))


@dataclass
class SpeculativeStats:
    drafted: int = 0    # draft tokens checked by a verification forward
    accepted: int = 0   # of those, kept
    steps: int = 0      # verification forwards (row-steps)
    emitted: int = 0    # tokens emitted by those row-steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": round(self.acceptance_rate, 4),
                "tokens_per_step": round(self.tokens_per_step, 4)}
