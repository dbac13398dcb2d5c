"""Run metrics: one JSON line per step, the machine's measured matmul peak (for MFU), and PNG plots."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from dsv32.model.layers import matmul_nt


class MetricsLog:
    """Appends one JSON object per line to `metrics.jsonl`; flushed every write so a crash loses nothing."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines from steps after the checkpoint so the log has each step once."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 1024,
                        seconds: float = 0.3, cached: bool = True) -> float:
    """Achieved FLOP/s of a square matmul on this machine: the denominator of MFU.

    The faster of `a @ b` and the model's own `matmul_nt` (which takes oneDNN for fp32 on CPU, where
    `a @ b` takes MKL), so that MFU is never measured against a slower kernel than the model uses.
    The first result per (dtype, device) is cached; `cached=False` measures again (a benchmark on a
    shared machine re-measures next to its timed runs, so both see the same load).
    """
    key = (str(dtype), device)
    if cached and key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    peak = max(_flops_per_second(lambda: a @ b, size, seconds / 2, device),
               _flops_per_second(lambda: matmul_nt(a, b), size, seconds / 2, device))
    _PEAK_CACHE[key] = peak
    return peak


def _flops_per_second(matmul, size: int, seconds: float, device: str) -> float:
    for _ in range(2):
        matmul()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul()
        n += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size ** 3 * n / (time.perf_counter() - start)


def training_flops_per_token(cfg, seq_len: int, include_mtp: bool = False) -> float:
    """Matmul FLOPs of one trained token in a causal sequence of `seq_len`: forward + backward = 3x forward.

    Forward: 2 per weight of every matmul the token goes through — attention projections (and the DSA
    indexer's), the router, the top-k routed plus the shared experts or the dense MLP, and the output
    head (also when tied to the embedding: the lookup is free, the head is not) — plus attention
    itself: 2 * heads * (qk_head_dim + v_head_dim) per attended key (DSA: at most index_topk keys;
    its indexer scores all of them), over the average causal context (seq_len + 1) / 2. Norm gains,
    biases and the balance bias are not matmul weights. `include_mtp` adds the MTP layers (each a
    full block, its eh_proj and another pass through the head).
    """
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank:
        q_proj = d * cfg.q_lora_rank + cfg.q_lora_rank * heads * cfg.qk_head_dim
    else:
        q_proj = d * heads * cfg.qk_head_dim
    kv_proj = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn_weights = q_proj + kv_proj + heads * cfg.v_head_dim * d
    cap = min(cfg.index_topk, seq_len) if cfg.use_dsa else seq_len  # keys a query attends to at most
    mean_keys = (cap * (cap + 1) / 2 + (seq_len - cap) * cap) / seq_len  # mean over positions of min(pos + 1, cap)
    attn_core = 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim) * mean_keys
    if cfg.use_dsa:
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        attn_weights += cfg.q_lora_rank * hi * di + d * di + d * hi
        attn_core += 2 * hi * di * (seq_len + 1) / 2

    def block(layer_idx: int) -> float:
        if cfg.is_moe_layer(layer_idx):
            experts = cfg.num_experts_per_tok + cfg.n_shared_experts
            ffn = cfg.n_routed_experts * d + experts * 3 * d * cfg.moe_intermediate_size
        else:
            ffn = 3 * d * cfg.intermediate_size
        return 2 * (attn_weights + ffn) + attn_core

    head = 2 * cfg.vocab_size * d
    forward = sum(block(i) for i in range(cfg.num_hidden_layers)) + head
    if include_mtp:
        for k in range(cfg.num_nextn_predict_layers):
            forward += 2 * 2 * d * d + block(cfg.num_hidden_layers + k) + head
    return 3.0 * forward


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Loss curves and a per-layer expert-load heatmap over time, as PNGs in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    if not train:
        return []
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train]
    for key, label in (("lm_loss", "LM loss"), ("mtp_loss", "MTP loss"), ("indexer_loss", "indexer KL")):
        values = [r.get(key) for r in train]
        if any(v is not None for v in values):
            ax.plot(steps, [math.nan if v is None else v for v in values], label=label)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "loss.png"))
    plt.close(fig)

    loads = [r["expert_load"] for r in train if r.get("expert_load")]
    if loads:
        layers = len(loads[0])
        fig, axes = plt.subplots(layers, 1, figsize=(7, 1.6 * layers + 0.6), squeeze=False)
        for i in range(layers):
            grid = torch.tensor([step_load[i] for step_load in loads], dtype=torch.float32)
            grid = grid / grid.mean(-1, keepdim=True).clamp_min(1e-9)  # load relative to the mean
            im = axes[i, 0].imshow(grid.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=2)
            axes[i, 0].set_ylabel(f"MoE {i}\nexpert")
        axes[-1, 0].set_xlabel("logged step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / mean")
        written.append(_save(fig, run_dir / "expert_load.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
