"""GRPO with DeepSeek-V3.2's four stabilisers, on rollouts from our own engine (`dsv32 train grpo`).

One step:
  1. P prompts (a pure function of the seed and the step number, so a resumed run sees the same ones),
     each sampled G times by the in-process engine (thinking mode by default), sampling log-probs kept;
  2. rewards from the weighted reward functions (TRL signature, see rewards.py), group-relative
     advantages (`scale_rewards` group | batch | none);
  3. one teacher-forced forward with the rollout weights: pi_old, the expert routing of every MoE layer
     (Keep Routing) and the top-k/top-p keep set of every sampled token (Keep Sampling Mask), plus the
     frozen reference's log-probs when beta > 0 (beta = 0 loads no reference); with num_iterations 1
     that forward is the training forward itself;
  4. `num_iterations` optimizer updates on the batch, each over micro-batches whose losses are
     normalised by the whole batch's counts: clipped ratio (epsilon / epsilon_high), loss_type grpo |
     dr_grpo | dapo, k3 KL (times the ratio: the unbiased estimate), off-policy sequence masking (delta),
     truncated-completion masking.

Stabiliser flags: `unbiased_kl`, `off_policy_delta` (None: off), `keep_routing`, `keep_sampling_mask`.
Note on the logged loss: with beta = 0 and one iteration the ratio is 1 and advantages are mean-zero
per group, so the loss *value* is ~0 while its gradient is not; watch reward, accuracy and KL instead.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv32.train.grpo_objective import (LOSS_TYPES, SCALE_REWARDS, aggregate, group_advantages, loss_mask,
                                        off_policy_sequence_mask, per_token_loss, token_logprobs)
from dsv32.train.metrics import MetricsLog, read_metrics
from dsv32.train.optim import build_optimizer, build_scheduler
from dsv32.train.rewards import BUILTIN_REWARDS, build_rewards, compute_rewards
from dsv32.train.rollout import (MicroBatch, OldPolicy, Prompt, completion_logits, generate, load_prompts,
                                 make_micro_batch, old_policy_from_logits, sampling_params,
                                 score_old_policy)
from dsv32.train.state import ResumableTrainer

DEFAULT_REWARDS = {"tool_use": ["accuracy", "tool_call", "format", "length"]}
FALLBACK_REWARDS = ["accuracy", "format", "length"]
DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.2, "tool_call": 0.2, "length": 0.5}


@dataclass
class GRPOConfig:
    out: str = "runs/grpo"                  # the run directory
    init: str = ""                          # the policy to start from (HF-layout checkpoint; usually SFT)
    tokenizer: str = ""                     # default: the --init directory
    task: str = "arithmetic"                # arithmetic | wordproblems | tools | code | a,b mixture | FILE.jsonl
    task_args: dict = field(default_factory=dict)  # generator options, e.g. {"max_digits": 3} (arithmetic)
    train_prompts: int = 2000               # size of the training prompt pool (train split)
    eval_task: str = ""                     # held-out prompts (default: the task's validation split)
    eval_split: str = "validation"
    eval_prompts: int = 64
    eval_every: int = 10                    # greedy held-out accuracy every N steps (and before step 1)
    seed: int = 0
    steps: int = 50                         # rollout batches
    prompts_per_step: int = 8
    num_generations: int = 8                # G, completions per prompt (>= 2)
    micro_batch_size: int = 16              # completions per forward/backward
    max_completion_length: int = 256
    max_prompt_length: int = 512
    thinking: bool = True                   # thinking mode (the prompt ends in <think>)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    rewards: list = field(default_factory=list)         # built-ins or module:function; default per task
    reward_weights: list = field(default_factory=list)  # default: accuracy 1, format 0.2, tool_call 0.2, length 0.5
    overlong_buffer: int = 0                # length-reward ramp width (0: max/4); start it above the longest right answer
    scale_rewards: str = "group"            # group | batch | none
    loss_type: str = "dapo"                 # grpo | dr_grpo | dapo
    epsilon: float = 0.2
    epsilon_high: float | None = None       # None: = epsilon (DAPO's clip-higher uses 0.28)
    num_iterations: int = 1                 # optimizer updates per rollout batch (mu)
    beta: float = 0.0                       # KL weight to the frozen reference (0: no reference loaded)
    mask_truncated_completions: bool = False
    unbiased_kl: bool = True                # V3.2 (1): k3 weighted by pi_theta / pi_old
    off_policy_delta: float | None = None   # V3.2 (2): drop A<0 sequences with mean log(pi_old/pi_theta) > delta
    keep_routing: bool = True               # V3.2 (3): replay the rollout's expert choices in training
    keep_sampling_mask: bool = True         # V3.2 (4): apply the sampler's top-k/top-p set to pi_theta
    lr: float = 1e-5
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"              # constant | cosine | wsd (over steps * num_iterations updates)
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    device: str = "auto"
    log_completions: int = 2                # completions per step written to completions.jsonl
    log_policy_shift: bool = True           # one more forward per step to log policy_kl = KL(pi_old || pi_new)
    ckpt_every: int = 10
    keep_last: int = 2
    plot: bool = True
    progress: bool = True
    stop_after: int | None = None           # end this process after this step (tests, time-boxed runs)

    @property
    def thinking_mode(self) -> str:
        return "thinking" if self.thinking else "chat"

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> "GRPOConfig":
        problems = []
        if not self.init:
            problems.append("no policy: give --init CKPT (an SFT checkpoint)")
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type={self.loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            problems.append(f"scale_rewards={self.scale_rewards!r} must be one of {', '.join(SCALE_REWARDS)}")
        if self.num_generations < 2:
            problems.append(f"num_generations={self.num_generations} must be >= 2 (advantages are relative to the group)")
        for name in ("steps", "prompts_per_step", "micro_batch_size", "max_completion_length", "max_prompt_length",
                     "num_iterations", "train_prompts", "eval_prompts", "eval_every", "ckpt_every", "keep_last"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.epsilon < 1 or self.eps_high <= 0:
            problems.append(f"epsilon={self.epsilon} must be in (0, 1) and epsilon_high={self.epsilon_high} > 0")
        if self.beta < 0:
            problems.append(f"beta={self.beta} must be >= 0")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be positive")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0 for sampling rollouts")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or not 0 <= self.min_p <= 1:
            problems.append("top_p must be in (0, 1], top_k >= 0, min_p in [0, 1]")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards or self.default_rewards()):
            problems.append(f"{len(self.reward_weights)} reward_weights for {len(self.rewards or self.default_rewards())} rewards")
        if self.off_policy_delta is not None and self.off_policy_delta < 0:
            problems.append(f"off_policy_delta={self.off_policy_delta} must be >= 0")
        if problems:
            raise ValueError("invalid GRPO config: " + "; ".join(problems))
        return self

    def default_rewards(self) -> list[str]:
        from dsv32.train.rollout import TASK_ALIASES

        kinds = {TASK_ALIASES.get(t.strip()) for t in self.task.split(",")}
        return list(DEFAULT_REWARDS["tool_use"] if "tool_use" in kinds else FALLBACK_REWARDS)

    def reward_specs(self) -> tuple[list[str], list[float]]:
        specs = list(self.rewards) or self.default_rewards()
        weights = [float(w) for w in self.reward_weights] or [DEFAULT_WEIGHTS.get(s, 1.0) for s in specs]
        return specs, weights

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "GRPOConfig":
        from dsv32.train.config import read_settings_file

        return cls(**{**read_settings_file(cls, path, "GRPO"), **overrides})


def _stats(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    mean = sum(clean) / len(clean)
    std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1)) if len(clean) > 1 else 0.0
    return mean, std


class GRPOTrainer(ResumableTrainer):
    fuse_old_policy = True  # with num_iterations 1, take pi_old from the training forward (tests turn it off)

    def __init__(self, cfg: GRPOConfig):
        from dsv32.checkpoint import load_pretrained
        from dsv32.infer.engine import Engine
        from dsv32.tokenizer import Tokenizer
        from dsv32.train.loop import resolve_device

        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        self.run_dir = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        if not Path(cfg.init).is_dir():
            raise ValueError(f"no such checkpoint directory: {cfg.init}")
        tok_dir = cfg.tokenizer or cfg.init
        if not (Path(tok_dir) / "tokenizer.json").exists():
            raise ValueError(f"no tokenizer.json in {tok_dir}: give --tokenizer DIR")
        self.tokenizer = Tokenizer.load(tok_dir)
        self.tokenizer_dir = tok_dir
        self.model = load_pretrained(cfg.init, dtype=torch.float32, device=self.device)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model only {self.model.config.vocab_size}")
        self.model.train()
        # the frozen reference exists only when the KL term is on (TRL's beta=0 convention)
        self.ref_model = None
        if cfg.beta > 0:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        specs, self.reward_weights = cfg.reward_specs()
        self.reward_fns = build_rewards(specs, thinking=cfg.thinking, max_completion_length=cfg.max_completion_length,
                                        overlong_buffer=cfg.overlong_buffer or max(1, cfg.max_completion_length // 4))
        self.train_prompts = load_prompts(cfg.task, "train", cfg.train_prompts, cfg.seed, cfg.task_args)
        eval_spec = cfg.eval_task or cfg.task
        self.eval_prompts = load_prompts(eval_spec, cfg.eval_split, cfg.eval_prompts, cfg.seed, cfg.task_args)
        self.eval_prompts = self.eval_prompts[:cfg.eval_prompts]
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        total_updates = cfg.steps * cfg.num_iterations
        self.scheduler = build_scheduler(self.optimizer, total_steps=total_updates, warmup_steps=cfg.warmup_steps,
                                         schedule=cfg.schedule, decay_fraction=cfg.decay_fraction,
                                         min_lr_ratio=cfg.min_lr_ratio)
        n = cfg.prompts_per_step * cfg.num_generations
        self.engine = Engine(self.model, max_batch=max(n, 1), max_seq_len=cfg.max_prompt_length + cfg.max_completion_length + 1,
                             seed=cfg.seed)
        self.model.train()  # the engine switched it to eval mode (the model has no train/eval differences)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # only once every setting has been checked
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.step = 0

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        from dsv32.chat import tokenize_messages

        ids = tokenize_messages(prompt.messages, self.tokenizer, thinking_mode=self.cfg.thinking_mode)
        if len(ids) > self.cfg.max_prompt_length:
            raise ValueError(f"a prompt has {len(ids)} tokens, over max_prompt_length={self.cfg.max_prompt_length}")
        return ids

    def prompts_for_step(self, step: int) -> list[Prompt]:
        """The prompts of (1-based) step `step`: successive slices of a seeded permutation per epoch."""
        pool = self.train_prompts
        per_step = self.cfg.prompts_per_step
        picked = []
        for k in range((step - 1) * per_step, step * per_step):
            epoch, offset = divmod(k, len(pool))
            order = list(range(len(pool)))
            random.Random(f"{self.cfg.seed}:epoch{epoch}").shuffle(order)
            picked.append(pool[order[offset]])
        return picked

    # ------------------------------------------------------------------ rollouts and rewards
    def rollout(self, prompts: list[Prompt], step: int):
        cfg = self.cfg
        G = cfg.num_generations
        ids = [self.encode_prompt(p) for p in prompts]
        all_ids, params, groups = [], [], []
        for i, p_ids in enumerate(ids):
            for g in range(G):
                seed = random.Random(f"{cfg.seed}:{step}:{i}:{g}").getrandbits(63)
                all_ids.append(p_ids)
                params.append(sampling_params(cfg, seed, cfg.max_completion_length, self.tokenizer.eos_id))
                groups.append(i)
        self.model.eval()
        try:
            rollouts = generate(self.engine, all_ids, params, self.tokenizer, cfg.thinking_mode, groups)
        finally:
            self.model.train()
        return rollouts

    def score(self, prompts: list[Prompt], rollouts) -> tuple[list[float], dict[str, list[float]]]:
        per = [prompts[r.prompt_index] for r in rollouts]
        kwargs = {
            "completion_ids": [r.completion_ids for r in rollouts],
            "completion_text": [r.text for r in rollouts],
            "truncated": [r.truncated for r in rollouts],
            "task": [p.task for p in per],
            "answer": [p.answer for p in per],
            "trainer_state": {"step": self.step},
        }
        for key in sorted({k for p in per for k in p.columns}):
            if key not in kwargs:
                kwargs[key] = [p.columns.get(key) for p in per]
        completions = [[{"role": "assistant", "content": r.message.get("content") or "",
                         "reasoning_content": r.message.get("reasoning_content") or "",
                         "tool_calls": r.message.get("tool_calls")}] for r in rollouts]
        return compute_rewards(self.reward_fns, self.reward_weights, [p.messages for p in per], completions, **kwargs)

    # ------------------------------------------------------------------ one step
    def _micro_batches(self, rollouts) -> list[MicroBatch]:
        n, size = len(rollouts), self.cfg.micro_batch_size
        pad = self.tokenizer.eos_id
        return [make_micro_batch(rollouts, list(range(i, min(i + size, n))), pad) for i in range(0, n, size)]

    @torch.no_grad()
    def _reference_logps(self, mb: MicroBatch, keep: torch.Tensor | None) -> torch.Tensor:
        logits, _ = completion_logits(self.ref_model, mb, device=self.device)
        logps, _ = token_logprobs(logits, mb.targets.to(self.device), self.cfg.temperature, keep, with_entropy=False)
        return logps

    def train_step(self) -> dict:
        cfg = self.cfg
        step = self.step + 1
        t0 = time.perf_counter()
        prompts = self.prompts_for_step(step)
        rollouts = self.rollout(prompts, step)
        t_rollout = time.perf_counter() - t0
        rewards, per_fn = self.score(prompts, rollouts)
        t_reward = time.perf_counter() - t0 - t_rollout
        advantages, zero_std = group_advantages(torch.tensor(rewards, dtype=torch.float32), cfg.num_generations,
                                                cfg.scale_rewards)

        micro = self._micro_batches(rollouts)
        # With one update per batch the training forward runs with the rollout weights, so pi_old, the
        # keep sets and the routing are that forward's own detached outputs (TRL does the same): one
        # scoring forward fewer. With several updates pi_old must be fixed before the first one.
        on_policy = cfg.num_iterations == 1 and self.fuse_old_policy
        old: list[OldPolicy | None] = [None] * len(micro)
        refs: list[torch.Tensor | None] = [None] * len(micro)
        if not on_policy:
            self.model.eval()
            for j, mb in enumerate(micro):
                old[j] = score_old_policy(self.model, mb, cfg, device=self.device)
                refs[j] = self._reference_logps(mb, old[j].keep) if self.ref_model is not None else None
            self.model.train()

        # loss masks and the batch's global counts (every micro-batch is normalised by these)
        masks = [loss_mask(mb.present, torch.tensor([rollouts[i].truncated for i in mb.rows]),
                           cfg.mask_truncated_completions).to(self.device) for mb in micro]
        n_sequences = float(len(rollouts))
        n_tokens = float(sum(m.sum() for m in masks))

        sums = {k: 0.0 for k in ("loss", "kl", "entropy", "low", "high", "tokens", "masked_seqs", "ratio_sum")}
        ratio_min, ratio_max = math.inf, -math.inf
        grad_norm = 0.0
        lr = self.optimizer.param_groups[0]["lr"]
        for it in range(cfg.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for j, (mb, mask) in enumerate(zip(micro, masks)):
                adv = advantages[mb.rows].to(self.device)
                if on_policy:
                    logits, routing = completion_logits(self.model, mb, device=self.device)
                    old[j] = old_policy_from_logits(logits, mb, cfg, routing)
                    if self.ref_model is not None:
                        refs[j] = self._reference_logps(mb, old[j].keep)
                else:
                    logits, _ = completion_logits(self.model, mb, forced_routing=old[j].routing, device=self.device)
                o, ref = old[j], refs[j]
                logps, entropy = token_logprobs(logits, mb.targets.to(self.device), cfg.temperature, o.keep)
                seq_mask = None
                if cfg.off_policy_delta is not None:
                    seq_mask = off_policy_sequence_mask(adv, logps, o.logps, mask, cfg.off_policy_delta)
                loss_tok, parts = per_token_loss(logps, o.logps, adv, epsilon_low=cfg.epsilon, epsilon_high=cfg.eps_high,
                                                 ref_logps=ref, beta=cfg.beta, unbiased_kl=cfg.unbiased_kl,
                                                 sequence_mask=seq_mask)
                loss = aggregate(loss_tok, mask, cfg.loss_type, n_sequences=n_sequences, n_tokens=n_tokens,
                                 max_completion_length=cfg.max_completion_length)
                loss.backward()
                sums["loss"] += float(loss.detach())
                sums["tokens"] += float(mask.sum())
                sums["entropy"] += float((entropy.detach() * mask).sum())
                sums["low"] += float((parts["low_clipped"].float() * mask).sum())
                sums["high"] += float((parts["high_clipped"].float() * mask).sum())
                sums["ratio_sum"] += float((parts["ratio"] * mask).sum())
                if parts["kl"] is not None:
                    sums["kl"] += float((parts["kl"] * mask).sum())
                if seq_mask is not None:
                    sums["masked_seqs"] += float((1 - seq_mask).sum())
                active = parts["ratio"][mask.bool()]
                if active.numel():
                    ratio_min, ratio_max = min(ratio_min, float(active.min())), max(ratio_max, float(active.max()))
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            self.optimizer.step()
            self.scheduler.step()
        self.step = step
        elapsed = time.perf_counter() - t0
        return self._record(rollouts, rewards, per_fn, zero_std, old, micro, sums, ratio_min, ratio_max, grad_norm, lr,
                            elapsed, t_rollout, t_reward)

    def _record(self, rollouts, rewards, per_fn, zero_std, old, micro, sums, ratio_min, ratio_max, grad_norm, lr,
                elapsed, t_rollout, t_reward) -> dict:
        cfg = self.cfg
        iters = cfg.num_iterations
        tokens = max(sums["tokens"], 1.0)
        lengths = [len(r.completion_ids) for r in rollouts]
        finished = [len(r.completion_ids) for r in rollouts if not r.truncated]
        reward_mean, reward_std = _stats(rewards)
        record = {"step": self.step, "reward": reward_mean, "reward_std": reward_std,
                  "frac_reward_zero_std": float(zero_std.float().mean())}
        for name, values in per_fn.items():
            mean, std = _stats(values)
            record[f"rewards/{name}/mean"], record[f"rewards/{name}/std"] = mean, std
        record.update({
            "completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": min(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": sum(r.truncated for r in rollouts) / len(rollouts),
            "completions/mean_terminated_length": sum(finished) / len(finished) if finished else 0.0,
            "loss": sums["loss"] / iters, "entropy": sums["entropy"] / tokens,
            "clip_ratio/low_mean": sums["low"] / tokens, "clip_ratio/high_mean": sums["high"] / tokens,
            "clip_ratio/region_mean": (sums["low"] + sums["high"]) / tokens,
            "ratio/mean": sums["ratio_sum"] / tokens,
            "ratio/min": ratio_min if ratio_min != math.inf else 1.0, "ratio/max": ratio_max if ratio_max != -math.inf else 1.0,
            "grad_norm": grad_norm, "learning_rate": lr, "num_tokens": sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts),
        })
        if cfg.beta > 0:
            record["kl"] = sums["kl"] / tokens  # to the frozen reference, as in the loss
        if cfg.log_policy_shift:
            # how far this step's updates moved the policy: KL(pi_old || pi_new) by k3 on the batch
            record["policy_kl"] = self._policy_shift(micro, old)
        if cfg.off_policy_delta is not None:
            record["off_policy_masked_frac"] = sums["masked_seqs"] / (iters * len(rollouts))
        # sampling (engine) vs training (teacher-forced, rollout weights) log-probs of the same tokens
        diffs = torch.cat([((o.raw_logps.cpu() - mb.engine_logprobs) * mb.present)[mb.present.bool()] for o, mb in zip(old, micro)])
        record["sampling/logp_diff_mean"] = float(diffs.abs().mean()) if diffs.numel() else 0.0
        record["sampling/logp_diff_max"] = float(diffs.abs().max()) if diffs.numel() else 0.0
        record["sampling/keep_set_widened"] = sum(o.forced_in for o in old)
        generated = sum(lengths)
        record["tokens_per_s"] = record["num_tokens"] * (1 + iters) / max(elapsed - t_rollout, 1e-9)
        record["rollout_tokens_per_s"] = generated / max(t_rollout, 1e-9)
        record["time/rollout_s"], record["time/reward_s"], record["time/step_s"] = t_rollout, t_reward, elapsed
        if cfg.log_completions:
            with open(self.run_dir / "completions.jsonl", "a", encoding="utf-8") as f:
                for r, rw in list(zip(rollouts, rewards))[: cfg.log_completions]:
                    f.write(json.dumps({"step": self.step, "reward": rw, "truncated": r.truncated,
                                        "completion": r.text}, ensure_ascii=False) + "\n")
        return record

    @torch.no_grad()
    def _policy_shift(self, micro, old) -> float:
        """Mean k3 KL(pi_old || pi_theta) over the batch's tokens after this step's updates (cheap proxy
        for drift when no reference model is loaded): uses the same keep sets and routing."""
        total, count = 0.0, 0.0
        self.model.eval()
        for mb, o in zip(micro, old):
            logits, _ = completion_logits(self.model, mb, forced_routing=o.routing, device=self.device)
            logps, _ = token_logprobs(logits, mb.targets.to(self.device), self.cfg.temperature, o.keep, with_entropy=False)
            present = mb.present.to(self.device)
            kl = torch.exp(logps - o.logps) - (logps - o.logps) - 1  # k3 with pi_old as the sampler
            total += float((kl * present).sum())
            count += float(present.sum())
        self.model.train()
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        from dsv32.train.ttc import evaluate_prompts

        self.model.eval()
        try:
            result = evaluate_prompts(self.engine, self.tokenizer, self.eval_prompts, thinking_mode=self.cfg.thinking_mode,
                                      max_tokens=self.cfg.max_completion_length, samples=1, temperature=0.0)
        finally:
            self.model.train()
        return {"val_accuracy": result["accuracy"], "val_format": result["format_ok"]}

    # ------------------------------------------------------------------ checkpoints (state.ResumableTrainer)
    def _extra_state(self) -> dict:
        return {"rng_cpu": torch.get_rng_state(), "grpo_config": dataclasses.asdict(self.cfg)}

    def _restore_extra(self, extra: dict) -> None:
        torch.set_rng_state(extra["rng_cpu"])
        completions = self.run_dir / "completions.jsonl"   # drop the samples of steps after the checkpoint
        if completions.exists():
            kept = [line for line in completions.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.step]
            completions.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False) -> dict:
        cfg = self.cfg
        if resume and not self.resume():
            print(f"no checkpoint in {self.run_dir / 'checkpoints'}: starting from step 0")
        _write_json(self.run_dir / "config.json", {"grpo": dataclasses.asdict(cfg), "model": self.model.config.to_dict()})
        if self.step == 0:
            self.metrics.write({"step": 0, **self.evaluate()})
        return self.run_steps("grpo", ("reward", "val_accuracy"))

    def finish(self) -> Path:
        from dsv32.checkpoint import save_pretrained

        export = self.run_dir / "final"
        save_pretrained(self.model, export, dtype=torch.float32, tokenizer_dir=self.tokenizer_dir)
        parent_file = Path(self.cfg.init) / "lineage.json"
        parent = json.loads(parent_file.read_text()) if parent_file.exists() else {"path": str(Path(self.cfg.init).resolve())}
        specs, weights = self.cfg.reward_specs()
        _write_json(export / "lineage.json", {
            "stage": "grpo", "run_dir": str(self.run_dir.resolve()), "steps": self.step, "task": self.cfg.task,
            "rewards": dict(zip(specs, weights)), "thinking_default": self.cfg.thinking,
            "tokenizer_fingerprint": self.tokenizer.fingerprint, "init": str(Path(self.cfg.init).resolve()),
            "parent": parent, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if self.cfg.plot:
            plot_grpo(self.run_dir)
        return export


# ---------------------------------------------------------------------- plots
def plot_grpo(run_dir: str | os.PathLike) -> list[Path]:
    """rewards.png (reward per function, held-out accuracy), and dynamics.png (KL, entropy, clip
    fractions, completion lengths, zero-variance groups, sampling-vs-training log-prob gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv32.train.metrics import _save

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "reward" in r]
    if not train:
        return []
    steps = [r["step"] for r in train]
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(steps, [r["reward"] for r in train], label="total reward")
    for key in sorted(k for k in train[-1] if k.startswith("rewards/") and k.endswith("/mean")):
        axes[0].plot(steps, [r.get(key, math.nan) for r in train], label=key.split("/")[1], alpha=0.8)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("reward (rollouts)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    val = [r for r in records if "val_accuracy" in r]
    if val:
        axes[1].plot([r["step"] for r in val], [100 * r["val_accuracy"] for r in val], "o-", label="held-out accuracy (greedy)")
        axes[1].set_ylim(0, 100)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("%")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "rewards.png"))
    plt.close(fig)

    panels = [("kl", "KL to reference (beta > 0)"), ("policy_kl", "KL(pi_old || pi_new) per step"), ("entropy", "entropy"),
              ("clip_ratio/low_mean", "clip low"), ("clip_ratio/high_mean", "clip high"),
              ("completions/mean_length", "mean completion length"), ("frac_reward_zero_std", "zero-std groups"),
              ("sampling/logp_diff_max", "|engine - trainer| log-prob (max)"), ("tokens_per_s", "train tokens/s"),
              ("grad_norm", "grad norm")]
    fig, axes = plt.subplots(2, 5, figsize=(17, 6))
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(steps, [r.get(key, math.nan) for r in train])
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, run_dir / "dynamics.png"))
    plt.close(fig)
    return written


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["BUILTIN_REWARDS", "GRPOConfig", "GRPOTrainer", "plot_grpo"]
