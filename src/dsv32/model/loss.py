"""Cross-entropy of the output head with the fewest passes over the [tokens, vocab] logits.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100, reduction="sum")`
(`linear_cross_entropy_reference`). The logits come from one large matmul (chunked matmuls re-read
the whole head weight per chunk, which costs more than it saves); then, chunk by chunk while the
chunk is in cache, the loss is taken and the logits are overwritten by their own gradient
(softmax - one-hot), in the matmul dtype. The backward is the two matmuls of the head, scaled on
their small outputs. The plain path instead makes about nine passes over the logits (fp32 copy,
log-softmax, NLL gradient fill, log-softmax backward, casts) and keeps three such buffers alive.

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, with the rounding
points of the plain path under autocast (bf16 logits, fp32 loss, gradient rounded once to bf16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv32.model.layers import matmul_nt

IGNORE_INDEX = -100


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_rows: int):
        dtype = _matmul_dtype(hidden)
        h, w = hidden.to(dtype), weight.to(dtype)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            logits = matmul_nt(h, w)  # [tokens, vocab]: one large matmul; the buffer then becomes the logits' gradient
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                target = labels[rows]
                valid = (target != ignore_index)[:, None]
                target = target.masked_fill(~valid[:, 0], 0)[:, None]
                log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)
                picked = log_probs.gather(1, target)                            # log p(target)
                total -= (picked * valid).sum()
                if needs_grad:
                    # d loss / d logits = softmax - one-hot, rounded once to the matmul dtype
                    grad = torch.exp(log_probs, out=logits[rows])
                    # put_ at flat positions: scatter_ into a bf16 chunk takes ~2 ms here, put_ ~10 us
                    at_target = torch.arange(grad.shape[0], device=grad.device)[:, None] * grad.shape[1] + target
                    grad.put_(at_target.view(-1), (picked.exp() - 1).to(dtype).view(-1))
                    if not bool(valid.all()):
                        grad.mul_(valid)                                        # ignored tokens: no gradient
        grad_logits = logits if needs_grad else None
        ctx.save_for_backward(grad_logits, h, w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_logits, h, w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = matmul_nt(grad_logits, w.t()).to(hidden_dtype).mul_(grad_total)    # grad_logits @ w
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ h).to(weight_dtype).mul_(grad_total)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of the logits `hidden @ weight.T` against `labels`.

    hidden: [..., dim]; weight: [vocab, dim]; labels: [...] (ignore_index = no target). chunk_rows:
    tokens per softmax chunk (default: about 4M logits, 16 MB in fp32, which stays in a large L2/L3).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden states")
    chunk_rows = chunk_rows or max(1, (1 << 22) // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_rows)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
