"""Weight-only int8 for CPU decoding: symmetric per-output-channel scales, activations stay floating point.

A decode step reads every active weight once per token, so on CPU its speed is set by memory
bandwidth; int8 weights are a quarter of fp32. `quantize_int8(model)` swaps, in place:

- every `nn.Linear` (attention projections, dense/shared MLPs, the output head, the MTP projection)
  for an `Int8Linear`;
- the stacked routed experts for `Int8Experts` (one scale per expert and output channel).

Kept in floating point: embeddings (a lookup reads one row), norms, the router (its fp32 scores pick
the experts), `kv_b_proj` (the absorbed attention reads its matrix directly) and the DSA indexer
(small, and its scores pick the attended tokens).

The matmul uses PyTorch's `_weight_int8pack_mm` CPU kernel with bf16 activations (its fp32 variant
is not vectorised, and the bf16 rounding of the activations adds less error than the int8 weights);
the per-channel scale is applied afterwards in fp32. Without that kernel (or off
CPU) the weight is dequantised per call, which is correct but not faster.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv32.model.moe import Experts, Routing

_KEEP_FLOAT = ("kv_b_proj", "indexer.")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (int8 [..., out, in], fp32 scales [..., out]) with w ~= q * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


_HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, ones: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ (q * scale)^T -> [..., out] (fp32 for fp32 x). `ones`: bf16 ones [out] for the kernel."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if _HAS_KERNEL and x.device.type == "cpu":
        if ones is None:
            ones = torch.ones(q.shape[0], dtype=torch.bfloat16)
        # bf16 activations into the int8 kernel (unit scales), then the fp32 per-channel scale
        y = torch.mul(torch._weight_int8pack_mm(flat.to(torch.bfloat16), q, ones), scale)
    else:
        y = F.linear(flat.float(), q.float() * scale[:, None])
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*shape[:-1], q.shape[0])


def one_token_combine(outs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One token's expert outputs [top_k, hidden] weighted by its routing weights [1, top_k] and summed in
    fp32 (as `Experts.forward` accumulates) -> [1, hidden]."""
    weighted = outs * weights[0, :, None].to(outs.dtype)
    return weighted.sum(0, keepdim=True, dtype=torch.float32).to(outs.dtype)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("ones", torch.ones(q.shape[0], dtype=torch.bfloat16, device=q.device), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.qweight, self.scale, self.ones)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Experts(nn.Module):
    """Routed experts with int8 weights; the same grouping as `Experts.forward`, one matmul per active expert."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.n_experts = experts.n_experts
        # gate and up stacked per expert, so that one kernel call computes both
        gate_up = torch.cat((experts.gate_proj.detach(), experts.up_proj.detach()), dim=1)  # [experts, 2 * inter, dim]
        for name, weight in (("gate_up", gate_up), ("down", experts.down_proj)):
            q, scale = quantize_per_channel(weight)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale)
            self.register_buffer(f"{name}_ones", torch.ones(q.shape[1], dtype=torch.bfloat16, device=q.device),
                                 persistent=False)

    def _mm(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e],
                           getattr(self, f"{name}_ones"))

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._mm("gate_up", e, x).chunk(2, dim=-1)
        return self._mm("down", e, F.silu(gate) * up)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        tokens, top_k = routing.indices.shape
        if tokens == 1:  # decoding one token: its experts in turn, no sorting
            outs = torch.cat([self._expert(e, x) for e in routing.indices[0].tolist()])      # [top_k, hidden]
            return one_token_combine(outs, routing.weights)
        flat_expert = routing.indices.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // top_k
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()
        xs = x[token_of]
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self._expert(e, xs[start:start + n]))
                start += n
        out = torch.cat(pieces) * routing.weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros(tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return y.index_add_(0, token_of, out.float()).to(x.dtype)


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's linear layers and routed experts by int8 versions, in place; returns the model."""
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(k in full for k in _KEEP_FLOAT):
                targets.append((module, child_name, Int8Linear))
            elif isinstance(child, Experts):
                targets.append((module, child_name, Int8Experts))
    for parent, child_name, cls in targets:
        setattr(parent, child_name, cls(getattr(parent, child_name)))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what a decode step streams, plus the embedding table)."""
    tensors = list(model.parameters()) + list(model.buffers())
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: list[int] | torch.Tensor, window: int = 256) -> float:
    """exp(mean next-token NLL) over `token_ids`, scored in consecutive non-overlapping windows."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None, :-1]).logits[0].float()
        nll += float(F.cross_entropy(logits, chunk[1:], reduction="sum"))
        count += chunk.numel() - 1
    return math.exp(nll / count)
