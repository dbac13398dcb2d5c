"""Test-time compute scaling: K samples per problem, majority vote (self-consistency) and best-of-K with a
verifier, and accuracy as a function of K (`dsv32 ttc`).

Per problem the model is sampled K times (each request with its own seed). For every k in the curve:
  majority@k  the most frequent final answer among k samples (ties: the answer seen first) is graded;
  best_of@k   the sample a verifier scores highest is graded; the verifier never sees the reference answer:
                steps   - re-checks every arithmetic equation written in the reasoning and answer
                          ("2 + 4 + carry 0 = 6", "47 * 3 = 141") with the calculator tool; fraction
                          correct, ties broken by the mean token log-prob (numeric tasks);
                tests   - runs half of the task's unit tests (the "visible" ones; code tasks);
                logprob - the model's own mean token log-prob (any task);
  pass@k      whether any of k samples is right (unbiased estimator from all K; an upper bound for both).
Values at k < K average over the K // k disjoint groups of k samples, so every sample is used.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

from dsv32.train.rewards import accuracy_reward, equation_score, make_format_reward

VERIFIERS = ("auto", "steps", "tests", "logprob")


# ---------------------------------------------------------------------- answers and votes
def final_answer(message: dict, task) -> str | None:
    """The normalised final answer of a parsed completion: a number in canonical form, the answer text,
    a tool call's real result (tool tasks), or the code (code tasks)."""
    from dsv32.data.tasks.common import as_number, extract_answer

    kind = getattr(task, "kind", None) if not isinstance(task, dict) else None
    content = message.get("content") or ""
    if kind == "python":
        from dsv32.data.tasks.python_funcs import extract_code

        code = extract_code(content).strip()
        return code or None
    if kind == "tool_use" and message.get("tool_calls"):
        from dsv32.data.tasks.tools import run_tool

        fn = message["tool_calls"][0].get("function", {})
        return run_tool(fn.get("name", ""), fn.get("arguments") or "{}")
    answer = extract_answer(content)
    if answer is None:
        return None
    number = as_number(answer)
    if number is not None:
        return format(number.normalize(), "f")
    return answer.strip().strip("'\"").strip() or None


def majority_vote(answers: list[str | None]) -> int | None:
    """Index of a sample holding the most frequent non-empty answer (ties: the earliest answer), or None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for i, a in enumerate(answers):
        if a is not None and counts[a] == best:
            return i
    return None


def verifier_score(verifier: str, sample: dict, task) -> tuple:
    """A sortable score of one sample (higher is better); never looks at the reference answer."""
    logprob = sample["mean_logprob"]
    if verifier == "logprob":
        return (logprob,)
    if verifier == "tests":
        from dsv32.data.tasks.python_funcs import extract_code, run_tests

        tests = task.meta["tests"]
        visible = tests[: max(1, len(tests) // 2)]
        code = extract_code(sample["message"].get("content") or "")
        return (float(run_tests(code, task.meta["function"], visible)), logprob)
    if verifier == "steps":
        message = sample["message"]
        text = (message.get("reasoning_content") or "") + "\n" + (message.get("content") or "")
        correct, total = equation_score(text)
        has_answer = sample["answer"] is not None
        return (float(has_answer), correct / total if total else 0.0, logprob)
    raise ValueError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")


def resolve_verifier(verifier: str, task) -> str:
    if verifier != "auto":
        return verifier
    kind = getattr(task, "kind", None) if not isinstance(task, dict) else None
    if kind == "python":
        return "tests"
    if kind in ("arithmetic", "word_problem") or (isinstance(task, dict) and task.get("answer") is not None):
        return "steps"
    return "logprob"


# ---------------------------------------------------------------------- sampling and grading
def evaluate_prompts(engine, tokenizer, prompts, *, thinking_mode: str = "thinking", max_tokens: int = 256,
                     samples: int = 1, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                     seed: int = 0, verifier: str = "auto") -> dict:
    """Sample every prompt `samples` times and grade each sample with the task's checker.

    Returns {"accuracy": mean correctness of the first sample (with temperature 0: greedy accuracy),
    "format_ok": share of first samples with a well-formed finished answer, "per_prompt": [...]}."""
    from dsv32.chat import parse_completion, tokenize_messages
    from dsv32.infer.sampling import SamplingParams

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r}; choose one of {', '.join(VERIFIERS)}")
    ids, params = [], []
    for i, p in enumerate(prompts):
        p_ids = tokenize_messages(p.messages, tokenizer, thinking_mode=thinking_mode)
        for k in range(samples):
            ids.append(p_ids)
            params.append(SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                         seed=random.Random(f"ttc:{seed}:{i}:{k}").getrandbits(63),
                                         stop_token_ids=[tokenizer.eos_id], logprobs=0))
    engine.reset_prefix_cache()
    done = engine.complete(ids, params) if ids else []
    fmt = make_format_reward(thinking_mode == "thinking")
    per_prompt = []
    for i, p in enumerate(prompts):
        outs = done[i * samples:(i + 1) * samples]
        texts = [tokenizer.decode(o.token_ids, skip_special=False) for o in outs]
        messages = [parse_completion(t, thinking_mode) for t in texts]
        completions = [[{"role": "assistant", **m}] for m in messages]
        kwargs = {"task": [p.task] * len(outs), "answer": [p.answer] * len(outs)}
        correct = accuracy_reward([p.messages] * len(outs), completions, **kwargs)
        form = fmt([p.messages] * len(outs), completions, completion_text=texts,
                   truncated=[o.finish_reason == "length" for o in outs], **kwargs)
        entries = []
        for o, m, c, f in zip(outs, messages, correct, form):
            lps = [lp.logprob for lp in o.logprobs or []]
            entries.append({"message": m, "answer": final_answer(m, p.task), "correct": bool(c), "format_ok": bool(f),
                            "mean_logprob": sum(lps) / len(lps) if lps else -math.inf, "tokens": len(o.token_ids)})
        per_prompt.append({"task": p.task, "samples": entries, "verifier": resolve_verifier(verifier, p.task)})
    n = max(len(per_prompt), 1)
    return {"accuracy": sum(pp["samples"][0]["correct"] for pp in per_prompt) / n,
            "format_ok": sum(pp["samples"][0]["format_ok"] for pp in per_prompt) / n,
            "per_prompt": per_prompt}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def scaling_curve(per_prompt: list[dict], ks: list[int]) -> dict[int, dict[str, float]]:
    """{k: {"majority", "best_of", "pass_at_k", "mean"}} accuracies over the problems."""
    curve = {}
    for k in ks:
        totals = {"majority": 0.0, "best_of": 0.0, "pass_at_k": 0.0, "mean": 0.0}
        for pp in per_prompt:
            samples = pp["samples"]
            n = len(samples)
            if k > n:
                raise ValueError(f"k={k} is more than the {n} samples drawn")
            chunks = [samples[j * k:(j + 1) * k] for j in range(n // k)]
            maj = best = 0.0
            for chunk in chunks:
                i = majority_vote([s["answer"] for s in chunk])
                maj += float(i is not None and chunk[i]["correct"])
                scores = [verifier_score(pp["verifier"], s, pp["task"]) for s in chunk]
                best += float(chunk[max(range(len(chunk)), key=lambda j: scores[j])]["correct"])
            c = sum(s["correct"] for s in samples)
            totals["majority"] += maj / len(chunks)
            totals["best_of"] += best / len(chunks)
            totals["pass_at_k"] += pass_at_k(n, c, k)
            totals["mean"] += c / n
        curve[k] = {key: value / max(len(per_prompt), 1) for key, value in totals.items()}
    return curve


def plot_curve(curve: dict[int, dict[str, float]], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsv32.train.metrics import _save

    ks = sorted(curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("pass_at_k", "pass@k (oracle upper bound)", "k--"), ("best_of", "best-of-k (verifier)", "o-"),
                              ("majority", "majority vote", "s-"), ("mean", "single sample", ":")):
        ax.plot(ks, [100 * curve[k][key] for k in ks], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("samples per problem (k)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def sample_and_vote(engine, tokenizer, messages: list[dict], samples: int, params, thinking_mode: str = "thinking",
                    task=None, verifier: str = "steps") -> dict:
    """For `dsv32 generate --samples K`: sample K replies to one conversation; return the majority
    answer (self-consistency) with its votes, the best-of-K reply by `verifier` (steps | logprob | tests:
    it never sees a reference answer), and every parsed reply. The answer of a free-form prompt is its
    "Answer:" text, else the whole content."""
    import dataclasses

    from dsv32.chat import parse_completion, tokenize_messages

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    ids = tokenize_messages(messages, tokenizer, thinking_mode=thinking_mode)
    base = params.seed if params.seed is not None else 0
    plist = [dataclasses.replace(params, seed=random.Random(f"vote:{base}:{k}").getrandbits(63), logprobs=0)
             for k in range(samples)]
    done = engine.complete([ids] * samples, plist)
    replies = [parse_completion(tokenizer.decode(o.token_ids, skip_special=False), thinking_mode) for o in done]
    answers = [final_answer(r, task) or ((r.get("content") or "").strip() or None) for r in replies]
    entries = []
    for o, r, a in zip(done, replies, answers):
        lps = [lp.logprob for lp in o.logprobs or []]
        entries.append({"message": r, "answer": a, "mean_logprob": sum(lps) / len(lps) if lps else -math.inf})
    i = majority_vote(answers)
    best = max(range(samples), key=lambda j: verifier_score(verifier, entries[j], task))
    votes = Counter(a for a in answers if a is not None)
    return {"answer": answers[i] if i is not None else None, "reply": replies[i] if i is not None else None,
            "votes": dict(votes.most_common()), "replies": replies,
            "best_answer": answers[best], "best_reply": replies[best], "verifier": verifier}


def run_scaling(engine, tokenizer, prompts, *, ks: list[int], out_dir: str | Path, thinking_mode: str, max_tokens: int,
                temperature: float, top_p: float, top_k: int, seed: int, verifier: str, label: str = "") -> dict:
    """Sample max(ks) times per prompt, compute the curve, and write scaling.json + accuracy_vs_samples.png."""
    result = evaluate_prompts(engine, tokenizer, prompts, thinking_mode=thinking_mode, max_tokens=max_tokens,
                              samples=max(ks), temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              verifier=verifier)
    curve = scaling_curve(result["per_prompt"], ks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"problems": len(prompts), "samples": max(ks), "temperature": temperature, "top_p": top_p,
               "verifier": verifier, "curve": {str(k): v for k, v in curve.items()}}
    (out / "scaling.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot_curve(curve, out / "accuracy_vs_samples.png", title=label)
    return summary
