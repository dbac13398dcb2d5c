"""Cross-entropy of the output head without materialising the [tokens, vocab] logits.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100, reduction="sum")`
(`linear_cross_entropy_reference`), but walks the tokens in chunks: each chunk's logits are made,
turned into the loss and into their gradient (softmax - one-hot) while still in cache, and only
the gradient is kept, in the matmul dtype. The weight and hidden gradients are then two large
matmuls in the backward. The plain path writes and re-reads the fp32 logits five or six times
(logits, log-softmax, the NLL gradient, the log-softmax gradient, the casts); with a 32K vocabulary
that is ~0.25 GB per pass for 2K tokens.

Under autocast the matmuls run in the autocast dtype and the softmax in fp32, with the same
rounding points as the plain path under autocast (bf16 logits, fp32 loss, bf16 logit gradients).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
        grad_logits = torch.empty(h.shape[0], w.shape[0], dtype=dtype, device=h.device) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                if needs_grad and dtype == torch.float32:
                    logits = torch.mm(h[rows], w.T, out=grad_logits[rows])    # [chunk, vocab], becomes its gradient
                else:
                    logits = (h[rows] @ w.T).float()
                target = labels[rows]
                valid = (target != ignore_index)[:, None]
                target = target.masked_fill(~valid[:, 0], 0)[:, None]
                log_probs = torch.log_softmax(logits, dim=-1)
                total -= (log_probs.gather(1, target) * valid).sum()
                if needs_grad:
                    probs = torch.exp(log_probs, out=logits)                   # softmax, into the logits' memory
                    probs.scatter_add_(1, target, -valid.to(probs.dtype))      # minus the one-hot target
                    if not bool(valid.all()):
                        probs.mul_(valid)                                      # ignored tokens: no gradient
                    if probs.data_ptr() != grad_logits[rows].data_ptr():
                        grad_logits[rows] = probs
        ctx.save_for_backward(grad_logits, h, w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_logits, h, w = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden_dtype).mul_(grad_total)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ h).to(weight_dtype).mul_(grad_total)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of the logits `hidden @ weight.T` against `labels`.

    hidden: [..., dim]; weight: [vocab, dim]; labels: [...] (ignore_index = no target). chunk_rows:
    tokens per chunk (default: about 4M logits, 16 MB in fp32, which stays in a large L2/L3).
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
