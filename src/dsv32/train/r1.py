"""The R1-style reasoning recipe (`dsv32 train r1`): SFT on reasoning traces in thinking mode, then GRPO.

Stages, each skipped when its output already exists (re-running continues where it stopped):
  1. traces: the task generators' worked solutions rewritten as thinking-mode turns — the steps become
     `reasoning_content`, the final "Answer: N" line the content (tool-use references already carry
     reasoning; code tasks get a short plan as reasoning) — tokenised in thinking mode. A fraction
     `direct_fraction` of the arithmetic and word-problem traces answers without working instead (a
     one-line reasoning, then the answer), as R1's and V3.2's SFT mix reasoning with non-reasoning data:
     the SFT model is then undecided whether to work a problem out, and GRPO has to discover from the
     reward that working it out pays (DeepSeek-R1's "learning to think", in miniature);
  2. sft: the shared training loop on those traces (from --init, or a fresh --preset model);
  3. grpo: GRPO from the SFT export on the same task family's training split;
  4. eval: greedy held-out accuracy (test split) of the SFT and GRPO models, and the GRPO model's
     accuracy against the number of samples (majority vote, best-of-K); report.json + PNGs.
A model this recipe exports records `thinking_default: true` in its lineage.json, which
`default_thinking_mode` reads (the chat and serve paths use it to start in thinking mode).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path


DIRECT_REASONING = "I can answer this directly."  # the reasoning of a trace that skips the working


def reasoning_messages(task, direct: bool = False) -> list[dict]:
    """The reference conversation of a generated task in thinking-mode form; `direct`: the same answer
    without the working (arithmetic and word problems only; other kinds keep their reasoning)."""
    prompt = task.prompt_messages()
    if task.kind == "tool_use":
        return task.messages()  # its reference turns already carry reasoning
    if task.kind == "python":
        tests = task.meta["tests"][:2]
        examples = "; ".join(f"{task.meta['function']}({', '.join(json.dumps(a) for a in t['args'])}) -> {json.dumps(t['expected'])}"
                             for t in tests)
        reasoning = f"I need to define {task.meta['function']}. It should give: {examples}."
        return prompt + [{"role": "assistant", "reasoning_content": reasoning, "content": task.solution}]
    lines = task.solution.strip().splitlines()
    if len(lines) < 2 or not lines[-1].startswith("Answer:"):
        raise ValueError(f"task {task.prompt!r}: expected worked steps ending in an 'Answer:' line")
    reasoning = DIRECT_REASONING if direct else "\n".join(lines[:-1])
    return prompt + [{"role": "assistant", "reasoning_content": reasoning, "content": lines[-1]}]


def check_direct_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"direct_fraction={fraction} must be in [0, 1]")


def direct_choices(n: int, fraction: float, seed: int) -> list[bool]:
    """Which of n traces skip the working: exactly round(n * fraction) of them, at seeded positions."""
    check_direct_fraction(fraction)
    k = round(n * fraction)
    picked = set(random.Random(f"{seed}:direct").sample(range(n), k))
    return [i in picked for i in range(n)]


def write_traces(task_spec: str, n: int, path: str | Path, seed: int = 0, task_args: dict | None = None,
                 direct_fraction: float = 0.0) -> int:
    """Write `n` thinking-mode conversations (train split) as JSONL `{"messages": ...}`; returns the count.
    `direct_fraction` of them answer without the working (see the module docstring)."""
    from dsv32.train.rollout import load_prompts

    prompts = load_prompts(task_spec, "train", n, seed, task_args)
    direct = direct_choices(len(prompts), direct_fraction, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for p, skip in zip(prompts, direct):
            if isinstance(p.task, dict):
                raise ValueError("the r1 recipe builds its traces from the task generators; a .jsonl task has no worked solutions")
            f.write(json.dumps({"messages": reasoning_messages(p.task, skip)}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(prompts)


def default_thinking_mode(model_dir: str | Path) -> str:
    """"thinking" for a model trained to reason (its lineage says so), else "chat"."""
    lineage = Path(model_dir) / "lineage.json"
    if lineage.exists():
        try:
            if json.loads(lineage.read_text(encoding="utf-8")).get("thinking_default"):
                return "thinking"
        except (json.JSONDecodeError, AttributeError):
            pass
    return "chat"


def _mark_thinking(model_dir: Path) -> None:
    lineage = model_dir / "lineage.json"
    record = json.loads(lineage.read_text(encoding="utf-8")) if lineage.exists() else {}
    record["thinking_default"] = True
    tmp = lineage.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, lineage)


def evaluate_model(model_dir: str | Path, prompts, *, thinking_mode: str, max_tokens: int, samples: int = 1,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch: int = 32):
    """Held-out accuracy of a checkpoint with the engine (greedy when temperature is 0)."""
    import torch

    from dsv32.checkpoint import load_pretrained
    from dsv32.infer.engine import Engine
    from dsv32.tokenizer import Tokenizer
    from dsv32.train.ttc import evaluate_prompts

    tokenizer = Tokenizer.load(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float32)
    engine = Engine(model, max_batch=batch, max_seq_len=min(model.config.max_position_embeddings, 1024 + max_tokens))
    return evaluate_prompts(engine, tokenizer, prompts, thinking_mode=thinking_mode, max_tokens=max_tokens,
                            samples=samples, temperature=temperature, top_p=top_p, seed=seed), engine, tokenizer


@dataclasses.dataclass
class R1Config:
    out: str = "runs/r1"
    init: str = ""                  # start from this checkpoint (else a fresh --preset model)
    preset: str = "tiny"
    tokenizer: str = ""             # default: the --init directory
    task: str = "arithmetic"
    task_args: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    sft_examples: int = 4000
    direct_fraction: float = 0.0    # traces that answer without working (0: pure reasoning traces)
    sft: dict = dataclasses.field(default_factory=dict)    # TrainConfig overrides for the SFT stage
    grpo: dict = dataclasses.field(default_factory=dict)   # GRPOConfig overrides for the GRPO stage
    eval_prompts: int = 200         # held-out (test split) problems for the final comparison
    samples: list = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])  # the test-time scaling curve's k
    sample_temperature: float = 1.0
    progress: bool = True


SFT_DEFAULTS = {"lr": 2e-3, "steps": 400, "warmup_steps": 20, "schedule": "cosine", "seq_len": 256, "batch_size": 16,
                "eval_every": 100, "ckpt_every": 100, "mtp_lambda": 0.3}
# No length term by default: a soft overlong ramp that overlaps the length of correct worked solutions
# teaches the model to skip steps (measured: held-out accuracy 27% -> 2% in 20 steps on tiny with the
# ramp starting at 72 tokens while subtractions with borrows need ~75). Add it with --grpo-set rewards=...
# lr 3e-5 with 16 x 8 rollouts. Measured on tiny: 2e-4 collapsed training accuracy to 0 within 20 steps, and
# 1e-4 / 5e-5 cost held-out greedy accuracy about 10 points in 10 steps. At 3e-5, from an SFT model that
# answered directly (--direct-fraction 0.6 on top of 350 pure-trace steps), 40 steps took held-out greedy
# accuracy from 5.5% to 39.5% (README, "What GRPO achieves on tiny"); from pure traces it holds it (33.5 -> 34.5%).
GRPO_DEFAULTS = {"steps": 40, "prompts_per_step": 16, "num_generations": 8, "lr": 3e-5, "warmup_steps": 2,
                 "max_completion_length": 256,
                 "eval_every": 5, "eval_prompts": 64, "ckpt_every": 5, "epsilon_high": 0.28,
                 "rewards": ["accuracy", "format"], "reward_weights": [1.0, 0.2]}


def run_r1(cfg: R1Config) -> dict:
    from dsv32.data.prepare import prepare
    from dsv32.data.shards import MANIFEST
    from dsv32.train.config import TrainConfig
    from dsv32.train.grpo import GRPOConfig, GRPOTrainer
    from dsv32.train.loop import Trainer
    from dsv32.train.rollout import load_prompts
    from dsv32.train.ttc import plot_curve, scaling_curve

    check_direct_fraction(cfg.direct_fraction)  # before anything is written
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = cfg.tokenizer or cfg.init
    if not tok_dir or not (Path(tok_dir) / "tokenizer.json").exists():
        raise ValueError("the r1 recipe needs a tokenizer: give --tokenizer DIR (or an --init checkpoint that has one)")
    if cfg.init and not Path(cfg.init).is_dir():
        raise ValueError(f"no such checkpoint directory: {cfg.init}")

    # 1. reasoning traces, tokenised in thinking mode
    data_dir = out / "sft_data"
    if not (data_dir / MANIFEST).exists():
        write_traces(cfg.task, cfg.sft_examples, out / "traces.jsonl", cfg.seed, cfg.task_args, cfg.direct_fraction)
        prepare([str(out / "traces.jsonl")], tok_dir, data_dir, validation_fraction=0.02, thinking="thinking",
                show_progress=cfg.progress)

    # 2. SFT
    sft_final = out / "sft" / "final"
    if not (sft_final / "config.json").exists():
        sft = TrainConfig(**{**SFT_DEFAULTS, **cfg.sft, "stage": "sft", "out": str(out / "sft"), "data": str(data_dir),
                             "tokenizer": tok_dir, "init": cfg.init, "preset": cfg.preset, "seed": cfg.seed,
                             "progress": cfg.progress})
        trainer = Trainer(sft)
        trainer.run(resume=trainer_has_checkpoint(out / "sft"))
        _mark_thinking(sft_final)

    # 3. GRPO
    grpo_final = out / "grpo" / "final"
    grpo_cfg = GRPOConfig(**{**GRPO_DEFAULTS, **cfg.grpo, "out": str(out / "grpo"), "init": str(sft_final),
                             "task": cfg.task, "task_args": cfg.task_args, "thinking": True, "seed": cfg.seed,
                             "progress": cfg.progress})
    if not (grpo_final / "config.json").exists():
        GRPOTrainer(grpo_cfg).run(resume=trainer_has_checkpoint(out / "grpo"))

    # 4. held-out comparison and the test-time scaling curve
    test = load_prompts(cfg.task, "test", cfg.eval_prompts, cfg.seed, cfg.task_args)[: cfg.eval_prompts]
    max_tokens = grpo_cfg.max_completion_length
    sft_eval, _, _ = evaluate_model(sft_final, test, thinking_mode="thinking", max_tokens=max_tokens)
    grpo_eval, engine, tokenizer = evaluate_model(grpo_final, test, thinking_mode="thinking", max_tokens=max_tokens)
    report = {"task": cfg.task, "task_args": cfg.task_args, "test_problems": len(test),
              "sft_accuracy": sft_eval["accuracy"], "grpo_accuracy": grpo_eval["accuracy"],
              "sft_format_ok": sft_eval["format_ok"], "grpo_format_ok": grpo_eval["format_ok"]}
    ks = sorted({int(k) for k in cfg.samples})
    if ks and max(ks) > 1:
        from dsv32.train.ttc import evaluate_prompts

        sampled = evaluate_prompts(engine, tokenizer, test, thinking_mode="thinking", max_tokens=max_tokens,
                                   samples=max(ks), temperature=cfg.sample_temperature, seed=cfg.seed)
        curve = scaling_curve(sampled["per_prompt"], ks)
        report["scaling"] = {str(k): v for k, v in curve.items()}
        plot_curve(curve, out / "accuracy_vs_samples.png", title=f"GRPO model, {len(test)} held-out {cfg.task} problems")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _plot_comparison(report, out / "sft_vs_grpo.png")
    return report


def trainer_has_checkpoint(run_dir: Path) -> bool:
    from dsv32.train.state import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints") is not None


def _plot_comparison(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv32.train.metrics import _save

    fig, ax = plt.subplots(figsize=(4.5, 4))
    values = [100 * report["sft_accuracy"], 100 * report["grpo_accuracy"]]
    ax.bar(["SFT", "SFT + GRPO"], values, color=["#999999", "#3b75af"])
    for i, v in enumerate(values):
        ax.text(i, v + 1, f"{v:.1f}%", ha="center")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"held-out accuracy, greedy ({report['test_problems']} problems)")
    ax.set_title(report["task"], fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
