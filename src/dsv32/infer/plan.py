"""`dsv32 plan`: what one rank of an N-GPU deployment holds, from the config alone.

    dsv32 plan --model v3.2-671b --gpus 8 --gpu-mem 141GiB --dtype fp8 --context 32768 --batch 16

The per-rank weights are counted on the model as `parallelize` lays it out (built on the meta
device, nothing allocated), so the planner and the loader cannot disagree; each tensor is counted
in the dtype the checkpoint stores it in: with `--dtype fp8` the release's FP8 projection weights
(1 byte per element plus an F32 scale per 128x128 block) and BF16 elsewhere, with `--dtype bf16`
everything BF16 (norms F32 for V3.2, as the release keeps them). The latent KV cache is the same on
every rank (MLA's cache is shared by all heads, so tensor parallelism does not split it); the KV
budget is `gpu_mem x mem_util - weights`, where `mem_util` (default 0.9) leaves room for
activations and workspace.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import torch

from dsv32.cli import CLIError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
PARTS = ("embedding + head", "attention", "indexer", "dense FFN", "shared experts", "routed experts", "router",
         "norms", "MTP layer")


def parse_size(text: str) -> int:
    """'141GiB', '80GB', '1.5TiB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].lower() not in _UNITS:
        raise CLIError(f"cannot read the size {text!r}; write e.g. 141GiB, 80GB or 1.5TiB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def _part(key: str) -> str:
    """Which part of the model a full-model key belongs to (for the breakdown)."""
    if key.startswith("mtp."):
        return "MTP layer"
    if key.startswith(("embed_tokens", "lm_head")):
        return "embedding + head"
    if ".self_attn.indexer." in key:
        return "indexer"
    if "norm" in key.rsplit(".", 2)[-2]:
        return "norms"
    if ".self_attn." in key:
        return "attention"
    if ".mlp.experts." in key:
        return "routed experts"
    if ".mlp.shared_experts." in key:
        return "shared experts"
    if ".mlp.gate." in key:
        return "router"
    return "dense FFN" if ".mlp." in key else "norms"


def rank_weight_bytes(cfg, gpus: int, fp8: bool, rank: int = 0, placement=None) -> tuple[dict[str, int], int]:
    """Bytes of rank `rank`'s weights by part, and how many of them every rank holds whole (replicated)."""
    from dsv32.checkpoint import stored_nbytes
    from dsv32.infer.parallel import ParallelContext, parallelize
    from dsv32.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    slices = parallelize(model, ParallelContext(rank=rank, world_size=gpus), placement)
    parts = dict.fromkeys(PARTS, 0)
    replicated = 0
    for key, tensor in model.state_dict().items():
        source = slices[key].key if key in slices else key
        n = stored_nbytes(cfg, source, tuple(tensor.shape), fp8=fp8)
        parts[_part(source)] += n
        replicated += n if key not in slices else 0
    return parts, replicated


@dataclass
class Plan:
    model: str
    gpus: int
    gpu_mem: int
    mem_util: float
    dtype: str
    weight_bytes: int              # per rank
    replicated_bytes: int          # of which every rank holds a whole copy
    weight_parts: dict
    kv_bytes_per_token: int        # per rank (= the whole latent cache of a token)
    kv_budget: int                 # bytes left for the cache per rank
    kv_capacity_tokens: int
    context: int | None
    batch: int
    fits_weights: bool
    fits: bool


def make_plan(cfg, name: str, gpus: int, gpu_mem: int, dtype: str = "fp8", context: int | None = None,
              batch: int = 1, mem_util: float = 0.9, speculative: bool = False) -> Plan:
    if dtype not in ("fp8", "bf16"):
        raise CLIError(f"--dtype must be fp8 or bf16, got {dtype!r}")
    if gpus < 1 or gpu_mem <= 0 or not 0 < mem_util <= 1 or batch < 1 or (context is not None and context < 1):
        raise CLIError("--gpus, --gpu-mem, --batch and --context must be positive, --mem-util in (0, 1]")
    try:
        parts, replicated = rank_weight_bytes(cfg, gpus, fp8=dtype == "fp8")
    except ValueError as exc:
        raise CLIError(f"{name} cannot be split over {gpus} ranks: {exc}") from None
    weights = sum(parts.values())
    kv_per_token = cfg.kv_cache_bytes_per_token(torch.bfloat16, include_mtp=speculative)
    budget = int(gpu_mem * mem_util) - weights
    capacity = max(0, budget) // kv_per_token
    wanted = (context or 0) * batch
    return Plan(model=name, gpus=gpus, gpu_mem=gpu_mem, mem_util=mem_util, dtype=dtype, weight_bytes=weights,
                replicated_bytes=replicated, weight_parts=parts, kv_bytes_per_token=kv_per_token, kv_budget=budget,
                kv_capacity_tokens=capacity, context=context, batch=batch, fits_weights=budget > 0,
                fits=budget > 0 and capacity >= max(wanted, 1))


def _gb(n: int) -> str:
    return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"


def format_plan(p: Plan) -> str:
    lines = [f"{p.model} on {p.gpus} GPU(s) of {_gb(p.gpu_mem)}: {p.dtype} weights, bf16 latent cache, "
             f"{p.gpus}-way tensor/expert/vocabulary parallel",
             f"weights per rank      {_gb(p.weight_bytes)}  (replicated on every rank: {_gb(p.replicated_bytes)})"]
    lines += [f"  {part:<20}{_gb(n)}" for part, n in p.weight_parts.items() if n]
    lines.append(f"usable per rank       {_gb(int(p.gpu_mem * p.mem_util))}  (gpu memory x mem_util {p.mem_util})")
    lines.append(f"KV cache per token    {p.kv_bytes_per_token:,} bytes on every rank (latent + rope key"
                 f"{' + indexer key' if p.weight_parts['indexer'] else ''} per layer)")
    if not p.fits_weights:
        lines.append(f"does NOT fit: the weights alone exceed the usable memory by {_gb(-p.kv_budget)}")
        return "\n".join(lines)
    lines.append(f"KV cache capacity     {p.kv_capacity_tokens:,} tokens per rank ({_gb(p.kv_budget)})")
    if p.context:
        need = p.context * p.batch
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"context {p.context:,} x batch {p.batch}: {need:,} tokens -> {verdict} "
                     f"({p.kv_capacity_tokens // p.context:,} sequences of {p.context:,} tokens fit)")
    else:
        lines.append("fits (pass --context and --batch to check a workload)")
    return "\n".join(lines)


def cmd_plan(args) -> int:
    import os

    from dsv32.config import ModelConfig

    cfg = ModelConfig.from_pretrained(args.model) if os.path.isdir(args.model) else ModelConfig.preset(args.model)
    if args.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    plan = make_plan(cfg, args.model, args.gpus, parse_size(args.gpu_mem), args.dtype, args.context, args.batch,
                     args.mem_util, args.speculative)
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    if args.expert_load:
        from dsv32.infer.eplb import balanced_placement, placement_report, read_expert_load

        load = read_expert_load(args.expert_load, cfg)
        placement = balanced_placement(load, args.gpus, args.redundant_experts)
        print(placement_report(load, placement, args.gpus))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU weights and KV-cache capacity of a multi-GPU deployment (no weights loaded)",
                       description="Per-rank weight bytes, KV-cache capacity and whether a workload fits, for "
                                   "tensor/expert/vocabulary-parallel inference over --gpus ranks; from the config only.")
    p.add_argument("--model", required=True, metavar="DIR_OR_PRESET", help="checkpoint directory or preset name")
    p.add_argument("--gpus", type=int, required=True, help="ranks (one GPU each)")
    p.add_argument("--gpu-mem", required=True, metavar="SIZE", help="memory per GPU, e.g. 141GiB or 80GB")
    p.add_argument("--dtype", default="fp8", help="weights as stored: fp8 (the release) or bf16 (default fp8)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence to check")
    p.add_argument("--batch", type=int, default=1, help="sequences of --context tokens held at once (default 1)")
    p.add_argument("--mem-util", type=float, default=0.9,
                   help="share of GPU memory for weights + KV cache; the rest is left for activations (default 0.9)")
    p.add_argument("--speculative", action="store_true", help="the MTP layer's cache too (MTP speculative decoding)")
    p.add_argument("--no-mtp", action="store_true", help="a checkpoint without the MTP layer")
    p.add_argument("--expert-load", metavar="FILE",
                   help="recorded expert load (engine stats JSON or a saved /metrics page): report the balanced placement")
    p.add_argument("--redundant-experts", type=int, default=0, help="extra expert copies per MoE layer for the placement")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
