"""GRPO step throughput: engine rollouts vs the teacher-forced training passes, and the engine/trainer
log-prob gap, on a checkpoint (default: a fresh random `tiny` model with a small tokenizer).

    OMP_NUM_THREADS=2 .venv/bin/python bench/grpo.py [--init CKPT] [--steps 3] [--prompts 8] [--generations 8]

Prints one JSON line: per-step seconds split into rollout (engine) and training (old-policy scoring,
backward pass, policy-shift forward), generated tokens/s, trained tokens/s, and the largest
|engine - trainer| log-prob difference over every sampled token.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def fresh_checkpoint(root: Path, preset: str) -> Path:
    from dsv32 import ModelConfig, Transformer
    from dsv32.checkpoint import save_pretrained
    from dsv32.data.tasks import arithmetic
    from dsv32.tokenizer import train_tokenizer

    texts = [t.solution + "\n" + t.prompt for t in arithmetic.generate("train", 400, 0, min_digits=1, max_digits=2)]
    tok = train_tokenizer(texts, 512, show_progress=False)
    tok.save(root / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(vocab_size=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_pretrained(Transformer(cfg), root / "init", tokenizer_dir=root / "tok")
    return root / "init"


def main() -> None:
    from dsv32.train.grpo import GRPOConfig, GRPOTrainer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", help="checkpoint (default: a random --preset model)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(args.init) if args.init else fresh_checkpoint(Path(tmp), args.preset)
        cfg = GRPOConfig(out=os.path.join(tmp, "run"), init=str(init), task="arithmetic",
                         task_args={"min_digits": 1, "max_digits": 2}, steps=args.steps, prompts_per_step=args.prompts,
                         num_generations=args.generations, max_completion_length=args.max_completion_length,
                         micro_batch_size=16, train_prompts=200, eval_prompts=1, top_p=0.95, lr=1e-4,
                         progress=False, plot=False)
        trainer = GRPOTrainer(cfg)
        records = []
        for _ in range(args.steps):
            records.append(trainer.train_step())
    rollout_s = sum(r["time/rollout_s"] for r in records)
    step_s = sum(r["time/step_s"] for r in records)
    generated = sum(r["rollout_tokens_per_s"] * r["time/rollout_s"] for r in records)
    trained = sum(r["num_tokens"] for r in records)
    print(json.dumps({
        "bench": "grpo", "model": args.init or args.preset, "steps": args.steps,
        "rollouts_per_step": args.prompts * args.generations, "max_completion_length": args.max_completion_length,
        "step_s": round(step_s / args.steps, 2), "rollout_s": round(rollout_s / args.steps, 2),
        "train_s": round((step_s - rollout_s) / args.steps, 2),
        "generated_tokens_per_s": round(generated / rollout_s, 1),
        "trained_tokens_per_s": round(trained / (step_s - rollout_s), 1),
        "max_engine_trainer_logp_diff": max(r["sampling/logp_diff_max"] for r in records),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
