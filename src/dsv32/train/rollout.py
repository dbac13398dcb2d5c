"""Prompts, rollouts from our own engine, and the teacher-forced scoring forward GRPO trains with.

Rollouts: every prompt is rendered with the V3.2 chat template (thinking mode by default: the prompt
ends in `<think>`) and sampled G times by `dsv32.infer.Engine` in this process, each request with its
own seed; the engine returns the sampled tokens and their log-probs (log-softmax of the raw logits).

Scoring: `score_forward` runs the model teacher-forced over prompt + completion (right-padded rows;
causal attention makes the padding invisible) and applies the head only at the completion
positions. Run once with the rollout weights it gives pi_old, the expert choices of every MoE layer
(Keep Routing) and the top-k/top-p keep set of every sampled position (Keep Sampling Mask). The
engine itself does not expose its routing or truncation sets, so they are recomputed here: with the
same weights over the same tokens this forward makes the same choices as the engine's cached decode
up to floating-point differences between the two attention paths (absorbed with a cache vs
expanded); `sampling/logp_diff_*` in the metrics measures that difference on every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv32.infer.sampling import SamplingParams
from dsv32.train.grpo_objective import sampling_keep_mask, token_logprobs

# the issue's task names and the data generators' kinds
TASK_ALIASES = {"arithmetic": "arithmetic", "wordproblems": "word_problem", "word_problems": "word_problem",
                "word_problem": "word_problem", "tools": "tool_use", "tool_use": "tool_use", "code": "python",
                "python": "python"}


@dataclass
class Prompt:
    messages: list[dict]                # what the model is given (system/tools + user)
    task: object                        # a dsv32.data.tasks.Task, or the JSONL row (dict)
    answer: str | None = None
    columns: dict = field(default_factory=dict)  # extra JSONL columns, passed to reward functions


def _jsonl_prompts(path: Path) -> list[Prompt]:
    from dsv32.data.corpus import jsonl_objects

    prompts = []
    for where, row in jsonl_objects(path, "a JSON object with 'prompt' or 'messages'"):
        if isinstance(row.get("prompt"), str) and row["prompt"]:
            messages = [{"role": "user", "content": row["prompt"]}]
            if row.get("system") is not None or row.get("tools"):
                system = {"role": "system", "content": row.get("system") or ""}
                if row.get("tools"):
                    system["tools"] = row["tools"]
                messages.insert(0, system)
        elif isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
            if not all(isinstance(m, dict) and "role" in m for m in messages):
                raise ValueError(f"{where}: every message needs a 'role'")
            if messages[-1]["role"] not in ("user", "tool"):
                raise ValueError(f"{where}: the prompt messages must end with a user (or tool) turn")
        else:
            raise ValueError(f"{where}: expected a non-empty 'prompt' string or 'messages' list")
        answer = row.get("answer")
        columns = {k: v for k, v in row.items() if k not in ("prompt", "messages", "system", "tools", "answer")}
        prompts.append(Prompt(messages, row, None if answer is None else str(answer), columns))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_prompts(spec: str, split: str, n: int, seed: int = 0, task_args: dict | None = None) -> list[Prompt]:
    """Prompts for `spec`: a task name (arithmetic, wordproblems, tools, code, or a generator kind), several
    joined by commas (an even mixture, interleaved), or a .jsonl file (every row; `split` is ignored)."""
    if spec.endswith(".jsonl"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"no such task file: {spec}")
        return _jsonl_prompts(path)
    from dsv32.data.tasks import KINDS

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("no task given")
    kinds = []
    for name in names:
        if name not in TASK_ALIASES:
            raise ValueError(f"unknown task {name!r}: choose arithmetic, wordproblems, tools, code (or a .jsonl file)")
        kinds.append(TASK_ALIASES[name])
    per_kind = [n // len(kinds) + (1 if i < n % len(kinds) else 0) for i in range(len(kinds))]
    lists = []
    for kind, count in zip(kinds, per_kind):
        args = dict(task_args or {}) if kind == "arithmetic" else {}
        try:
            tasks = list(KINDS[kind].generate(split, count, seed, **args))
        except TypeError as exc:
            raise ValueError(f"task {kind}: bad task_args {task_args} ({exc})") from None
        lists.append([Prompt(t.prompt_messages(), t, t.answer) for t in tasks])
    mixed = []
    for i in range(max(map(len, lists))):
        mixed += [lst[i] for lst in lists if i < len(lst)]
    return mixed


# ---------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    prompt_index: int                   # which prompt of the step (its group)
    prompt_ids: list[int]
    completion_ids: list[int]           # the stop token included when the completion ended by itself
    engine_logprobs: list[float]        # the engine's log-prob of each sampled token (raw logits)
    truncated: bool                     # cut at max_completion_length
    text: str = ""                      # decoded, special tokens kept
    message: dict = field(default_factory=dict)  # parsed: content, reasoning_content, tool_calls


def sampling_params(cfg, seed: int, max_tokens: int, eos_id: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          min_p=cfg.min_p, seed=seed, stop_token_ids=[eos_id], logprobs=0)


def generate(engine, prompt_ids: list[list[int]], params: list[SamplingParams], tokenizer, thinking_mode: str,
             groups: list[int]) -> list[Rollout]:
    """Run every request to completion on the engine (continuous batching) and parse the completions."""
    from dsv32.chat import parse_completion

    engine.reset_prefix_cache()  # cached prompt latents were computed with the previous weights
    rollouts = []
    for prompt, sp, group, done in zip(prompt_ids, params, groups, engine.complete(prompt_ids, params)):
        text = tokenizer.decode(done.token_ids, skip_special=False)
        rollouts.append(Rollout(
            prompt_index=group, prompt_ids=list(prompt), completion_ids=list(done.token_ids),
            engine_logprobs=[lp.logprob for lp in done.logprobs or []],
            truncated=done.finish_reason == "length", text=text, message=parse_completion(text, thinking_mode)))
    return rollouts


# ---------------------------------------------------------------------- the scoring forward
@dataclass
class MicroBatch:
    rows: list[int]                     # indices into the step's rollouts
    input_ids: torch.Tensor             # [b, L] prompt + completion, right-padded
    positions: torch.Tensor             # [b, T] where the hidden state predicting completion token t sits
    targets: torch.Tensor               # [b, T] completion tokens (padding: 0)
    present: torch.Tensor               # [b, T] 1.0 where row has a completion token t
    engine_logprobs: torch.Tensor       # [b, T]


def make_micro_batch(rollouts: list[Rollout], rows: list[int], pad_id: int) -> MicroBatch:
    seqs = [rollouts[i].prompt_ids + rollouts[i].completion_ids for i in rows]
    L = max(len(s) for s in seqs)
    T = max(1, max(len(rollouts[i].completion_ids) for i in rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.zeros(len(rows), T, dtype=torch.long)
    present = torch.zeros(len(rows), T)
    engine_lp = torch.zeros(len(rows), T)
    for j, (i, seq) in enumerate(zip(rows, seqs)):
        r = rollouts[i]
        ids[j, :len(seq)] = torch.tensor(seq)
        p, c = len(r.prompt_ids), len(r.completion_ids)
        positions[j] = torch.arange(p - 1, p - 1 + T).clamp(max=L - 1)
        if c:
            targets[j, :c] = torch.tensor(r.completion_ids)
            present[j, :c] = 1.0
        if r.engine_logprobs:
            engine_lp[j, :len(r.engine_logprobs)] = torch.tensor(r.engine_logprobs)
    return MicroBatch(list(rows), ids, positions, targets, present, engine_lp)


def completion_logits(model, mb: MicroBatch, forced_routing: list[torch.Tensor] | None = None, device=None):
    """Logits [b, T, V] at the completion positions, and the expert choices [b, L, top_k] per MoE layer."""
    device = device or mb.input_ids.device
    out = model(mb.input_ids.to(device), logits_to_keep=1, forced_routing=forced_routing)
    hidden = out.hidden_states                                        # [b, L, hidden]
    index = mb.positions.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    logits = model.lm_head(hidden.gather(1, index))                   # [b, T, V]
    return logits, out.expert_indices


@dataclass
class OldPolicy:
    """What the rollout policy said about one micro-batch (no gradients)."""

    logps: torch.Tensor                 # [b, T] log pi_old(token) of the training distribution
    raw_logps: torch.Tensor             # [b, T] at temperature 1 without truncation (what the engine reports)
    routing: list[torch.Tensor] | None  # per MoE layer [b, L, top_k]
    keep: torch.Tensor | None           # [b, T, V] the sampler's keep set (None: no truncation)
    forced_in: int = 0                  # sampled tokens the recomputed keep set had to be widened for


@torch.no_grad()
def score_old_policy(model, mb: MicroBatch, cfg, device=None) -> OldPolicy:
    logits, routing = completion_logits(model, mb, device=device)
    return old_policy_from_logits(logits, mb, cfg, routing)


@torch.no_grad()
def old_policy_from_logits(logits: torch.Tensor, mb: MicroBatch, cfg, routing: list[torch.Tensor] | None) -> OldPolicy:
    """pi_old, the keep sets and the routing from logits [b, T, V] computed with the rollout weights."""
    logits = logits.detach()
    targets = mb.targets.to(logits.device)
    keep = sampling_keep_mask(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)
    forced_in = 0
    if keep is not None:
        # the sampled token was in the sampler's set by construction; a recomputation that disagrees
        # at the boundary (floating point) is widened to include it
        present = mb.present.to(logits.device).bool()
        chosen = keep.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        forced_in = int((~chosen & present).sum())
        keep = keep.scatter(-1, targets.unsqueeze(-1), True)
    raw, _ = token_logprobs(logits, targets, 1.0, None, with_entropy=False)
    use_keep = keep if cfg.keep_sampling_mask else None
    logps, _ = token_logprobs(logits, targets, cfg.temperature, use_keep, with_entropy=False)
    kept_routing = [r.detach() for r in routing] if cfg.keep_routing and routing is not None else None
    return OldPolicy(logps=logps, raw_logps=raw, routing=kept_routing, keep=use_keep, forced_in=forced_in)
