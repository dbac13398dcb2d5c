"""Training-step throughput and MFU: dsv32 vs transformers' DeepseekV3ForCausalLM on the same weights.

One step = forward + loss + backward + AdamW step, on the same config, batch and weights, single
process with `--threads` intra-op threads (2 by default), at two precisions: fp32, and bf16 autocast
(`torch.autocast("cpu", dtype=torch.bfloat16)` around forward and loss; fp32 master weights,
gradients and optimizer state in both models).

- dsv32: `Transformer` in train mode with `labels=` (the head's cross-entropy without the extra
  passes over the logits, `dsv32.model.loss`), mean over targets, and the trainer's optimizer
  (`dsv32.train.optim.build_optimizer`: fused AdamW, beta 0.9/0.95, weight decay 0.1 on matrices only).
- transformers: `DeepseekV3ForCausalLM.from_pretrained(dir, dtype=torch.float32)` of the directory
  our model was saved to, experts `grouped_mm` (its CPU default; `--hf-experts eager` also works), SDPA
  attention, its own loss (`labels=`), and the optimizer its `Trainer` uses by default with torch >= 2.8
  (`adamw_torch_fused`: `torch.optim.AdamW(fused=True)`) with the same hyper-parameters.

Both models get the same balance-loss setting (none: transformers has no sequence-wise balance loss)
and no MTP (transformers builds no MTP module). Before timing, the losses of both models on the
batch are compared (fp32: must agree to 1e-4) together with the global gradient norm. Then, per
precision, warm-up steps and `--repeats` timed steps per model, interleaved with alternating order;
medians are reported (this class of machine shows +-15-20% run-to-run noise: compare the ratios).

MFU = achieved training FLOP/s / the measured matmul peak of the path's dtype
(`dsv32.train.metrics.measure_matmul_peak`, square 1024 matmul, same thread count; measured after
every repeat and the median taken, so that it sees the same machine load as the steps), with
`training_flops_per_token(cfg, seq)` (3x the forward matmul + causal-attention FLOPs). The JSON "mfu"
is that of our faster precision.

Usage: OMP_NUM_THREADS=2 .venv/bin/python bench/train.py [--config peer|tiny] [--batch 8 --seq 256]
       [--repeats 5] [--quick] [--profile fp32|bf16]
The last line printed is one JSON object: {"bench": "train", "ratio_vs_hf": R_fp32, "ratio_vs_hf_bf16": R_bf16, "mfu": M, ...}
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16")
PEAK_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bench_config(name: str):
    """`peer`: the transformers-peer shape (73M params); `tiny`: the tiny preset as a deepseek_v3 model."""
    from dsv32 import ModelConfig

    common = dict(model_type="deepseek_v3", num_nextn_predict_layers=0, aux_loss_alpha=0.0, torch_dtype="float32")
    if name == "tiny":
        return ModelConfig.preset("tiny").replace(**common).validate()
    if name == "peer":
        return ModelConfig(
            vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
            num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
            max_position_embeddings=4096, rope_scaling=None, **common,
        ).validate()
    raise SystemExit(f"train.py: error: unknown --config {name!r}; choose peer or tiny")


class Step:
    """One model + loss + optimizer; `__call__` runs one full training step and returns the loss."""

    def __init__(self, name, model, loss_fn, optimizer):
        self.name, self.model, self.loss_fn, self.optimizer = name, model, loss_fn, optimizer

    def loss_and_backward(self, ids, precision: str) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = self.loss_fn(self.model, ids)
        loss.backward()
        return loss

    def __call__(self, ids, precision: str) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_and_backward(ids, precision)
        self.optimizer.step()
        return float(loss.detach())


def ours_loss(model, ids):
    labels = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)  # next token; the last has none
    return model(ids, labels=labels).loss_sum / (ids.shape[0] * (ids.shape[1] - 1))


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def grad_norm(model) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_step(step: Step, ids, precision: str, rows: int = 30) -> None:
    from torch.profiler import ProfilerActivity, profile

    step(ids, precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = timed(lambda: step(ids, precision))
    print(f"\n== {step.name} {precision}: one step {t * 1000:.0f} ms (under the profiler) ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="peer", help="peer (73M, the transformers-peer shape) or tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--hf-experts", default="grouped_mm", choices=("grouped_mm", "eager"))
    parser.add_argument("--quick", action="store_true", help="tiny config, batch 4x128, 3 repeats, 1 warm-up")
    parser.add_argument("--profile", choices=PRECISIONS, help="print a torch.profiler table of one step of each model")
    parser.add_argument("--profile-only", action="store_true", help="with --profile: skip the timed comparison")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="apply dsv32.train.allocator.retain_freed_memory (what `dsv32 train` runs with) to this "
                             "process, so that neither model pays page faults for its large temporaries")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.batch, args.seq, args.repeats, args.warmup = "tiny", 4, 128, 3, 1
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions or any(p not in PRECISIONS for p in precisions):
        raise SystemExit(f"train.py: error: --precisions takes a comma-separated subset of {','.join(PRECISIONS)}")

    load_start = os.getloadavg()[0]
    import transformers
    from transformers import DeepseekV3ForCausalLM

    from dsv32 import save_pretrained
    from dsv32.cli_model import build_random_model
    from dsv32.train.metrics import measure_matmul_peak, training_flops_per_token
    from dsv32.train.optim import build_optimizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.retain_freed_memory:
        from dsv32.train.allocator import retain_freed_memory

        if not retain_freed_memory():
            raise SystemExit("train.py: error: --retain-freed-memory needs glibc (Linux)")

    cfg = bench_config(args.config)
    ours = build_random_model(cfg, seed=args.seed).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp, dtype=torch.float32)
        hf, info = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32, output_loading_info=True,
                                                         experts_implementation=args.hf_experts)
    if info["missing_keys"] or info["mismatched_keys"] or info["unexpected_keys"]:
        raise SystemExit(f"train.py: error: transformers did not load every weight: {info}")
    hf.train()
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    steps = {
        "dsv32": Step("dsv32", ours, ours_loss, build_optimizer(ours, **opt_kwargs)),
        "HF": Step("HF", hf, hf_loss, torch.optim.AdamW(hf.parameters(), fused=True, **opt_kwargs)),
    }
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed + 1))
    tokens = args.batch * args.seq
    print(f"config {args.config}: {cfg.num_params() / 1e6:.1f}M params ({cfg.num_active_params() / 1e6:.1f}M active), "
          f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; HF attn={hf.config._attn_implementation}, "
          f"experts={hf.config._experts_implementation}")

    # numerics: the same loss and gradient norm on the same batch, before any optimizer step
    checks = {}
    for precision in precisions:
        got = {}
        for name, step in steps.items():
            step.optimizer.zero_grad(set_to_none=True)
            loss = float(step.loss_and_backward(ids, precision).detach())
            got[name] = (loss, grad_norm(step.model))
            step.optimizer.zero_grad(set_to_none=True)
        (l_ours, g_ours), (l_hf, g_hf) = got["dsv32"], got["HF"]
        checks[precision] = {"loss_dsv32": l_ours, "loss_hf": l_hf, "loss_abs_diff": abs(l_ours - l_hf),
                             "grad_norm_rel_diff": abs(g_ours - g_hf) / max(g_hf, 1e-30)}
        print(f"{precision}: loss dsv32 {l_ours:.6f}  HF {l_hf:.6f}  |diff| {abs(l_ours - l_hf):.2e}; "
              f"grad norm dsv32 {g_ours:.6f}  HF {g_hf:.6f}  rel diff {checks[precision]['grad_norm_rel_diff']:.2e}")
    if "fp32" in checks and checks["fp32"]["loss_abs_diff"] > 1e-4:
        print("train.py: error: fp32 losses differ by more than 1e-4", file=sys.stderr)
        return 1

    if args.profile:
        for step in steps.values():
            profile_step(step, ids, args.profile)
        if args.profile_only:
            return 0

    flops_per_token = training_flops_per_token(cfg, args.seq)
    results = {}
    for precision in precisions:
        for _ in range(args.warmup):
            for step in steps.values():
                step(ids, precision)
        times = {name: [] for name in steps}
        peak_samples = []
        order = list(steps)
        for r in range(args.repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                times[name].append(timed(lambda: steps[name](ids, precision)))
            # the MFU denominator, measured between the steps so that it sees the same machine load
            peak_samples.append(measure_matmul_peak(PEAK_DTYPE[precision], seconds=0.25, cached=False))
        med = {name: statistics.median(t) for name, t in times.items()}
        peak = statistics.median(peak_samples)
        results[precision] = {
            "dsv32_tok_s": round(tokens / med["dsv32"], 1), "hf_tok_s": round(tokens / med["HF"], 1),
            "ratio": round(med["HF"] / med["dsv32"], 3),
            "dsv32_s": round(med["dsv32"], 3), "hf_s": round(med["HF"], 3),
            "dsv32_mfu": round(tokens / med["dsv32"] * flops_per_token / peak, 3),
            "hf_mfu": round(tokens / med["HF"] * flops_per_token / peak, 3),
            "peak_gflops": round(peak / 1e9, 1),
            "step_s": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        }

    header = (f"{'precision':>9}  {'dsv32 tok/s':>11}  {'HF tok/s':>8}  {'ratio':>5}  {'dsv32 s':>7}  {'HF s':>6}  "
              f"{'dsv32 MFU':>9}  {'HF MFU':>6}  {'peak GFLOP/s':>12}  {'|dloss|':>8}")
    print(header)
    print("-" * len(header))
    for precision, r in results.items():
        print(f"{precision:>9}  {r['dsv32_tok_s']:>11,.0f}  {r['hf_tok_s']:>8,.0f}  {r['ratio']:>5.2f}  {r['dsv32_s']:>7.3f}  "
              f"{r['hf_s']:>6.3f}  {r['dsv32_mfu']:>9.1%}  {r['hf_mfu']:>6.1%}  {r['peak_gflops']:>12.1f}  "
              f"{checks[precision]['loss_abs_diff']:>8.1e}")
    best = max(results, key=lambda p: results[p]["dsv32_tok_s"])
    print(f"median of {args.repeats} interleaved steps per model and precision; ratio = dsv32 tokens/s / HF tokens/s; "
          f"{flops_per_token / 1e6:.1f} MFLOP per trained token; fastest dsv32 path: {best}; "
          f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(json.dumps({
        "bench": "train",
        "ratio_vs_hf": results.get("fp32", {}).get("ratio"),
        "ratio_vs_hf_bf16": results.get("bf16", {}).get("ratio"),
        "mfu": results[best]["dsv32_mfu"], "mfu_precision": best,
        "config": args.config, "batch": args.batch, "seq": args.seq, "params_m": round(cfg.num_params() / 1e6, 1),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "hf_experts": hf.config._experts_implementation,
        "retain_freed_memory": args.retain_freed_memory,
        "train_flops_per_token": flops_per_token, "load_avg_1min": [load_start, os.getloadavg()[0]],
        "torch": torch.__version__, "transformers": transformers.__version__,
        "results": results, "numerics": checks,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
