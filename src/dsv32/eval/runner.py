"""`evaluate`: run the tasks, score every sample, write eval.json + samples.jsonl, print a table."""
from __future__ import annotations

import datetime as dt
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dsv32.eval.backends import EngineBackend, EvalError, HTTPBackend, Sample, Sampling
from dsv32.eval.tasks import Score, TaskSpec, build_task, default_ks, is_perplexity, task_metrics

RESULTS_FILE, SAMPLES_FILE = "eval.json", "samples.jsonl"


def is_url(model) -> bool:
    return isinstance(model, str) and model.startswith(("http://", "https://"))


def load_model(model, tokenizer=None):
    """(Transformer, Tokenizer | None) from a loaded model or a checkpoint directory; a tokenizer given
    as a path is loaded, else the checkpoint's own is used when it has one."""
    from dsv32.tokenizer import Tokenizer

    if isinstance(model, (str, Path)):
        import torch

        from dsv32.checkpoint import load_pretrained

        if not Path(model).is_dir():
            raise FileNotFoundError(f"no such checkpoint directory: {model}")
        if tokenizer is None and (Path(model) / "tokenizer.json").is_file():
            tokenizer = model
        model = load_pretrained(model, dtype=torch.float32)
    if isinstance(tokenizer, (str, Path)):
        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"no such tokenizer directory: {tokenizer}")
        tokenizer = Tokenizer.load(tokenizer)
    return model, tokenizer


def _thinking_default(model) -> str:
    from dsv32.train.r1 import default_thinking_mode

    return default_thinking_mode(model) if isinstance(model, (str, Path)) else "chat"


def _model_label(model) -> str:
    if isinstance(model, (str, Path)):
        return str(model)
    return f"{type(model).__name__}({getattr(getattr(model, 'config', None), 'model_type', '?')})"


# ---------------------------------------------------------------------- generative tasks
def _score_task(spec: TaskSpec, samples: list[list[Sample]], progress: bool, workers: int) -> list[list[Score]]:
    """Every sample's score; scorers that run code wait on subprocesses, so a few run at once."""
    from tqdm import tqdm

    jobs = [(spec.prompts[i], s) for i, row in enumerate(samples) for s in row]

    def score(job) -> Score:
        prompt, sample = job
        if sample.error:
            return Score(None, False, sample.error)
        return spec.score(prompt, sample.message)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        flat = list(tqdm(pool.map(score, jobs), total=len(jobs), desc=f"score {spec.name}", unit="sample",
                         disable=not progress, leave=False))
    per = len(samples[0]) if samples else 0
    return [flat[i * per:(i + 1) * per] for i in range(len(samples))]


def _format_ok(spec: TaskSpec, samples: list[list[Sample]], thinking: bool) -> list[list[bool]]:
    from dsv32.train.rewards import make_format_reward

    check = make_format_reward(thinking)
    out = []
    for prompt, row in zip(spec.prompts, samples):
        values = check([prompt.messages] * len(row), [[s.message] for s in row], completion_text=[s.text for s in row],
                       truncated=[s.finish_reason == "length" for s in row], task=[prompt.task] * len(row))
        out.append([v == 1.0 and not s.error for v, s in zip(values, row)])
    return out


def _sample_records(spec: TaskSpec, samples, scores, format_ok) -> list[dict]:
    records = []
    for i, (prompt, row, score_row, fmt_row) in enumerate(zip(spec.prompts, samples, scores, format_ok)):
        question = next((m.get("content") for m in reversed(prompt.messages) if m.get("role") == "user"), "")
        for k, (s, sc, fmt) in enumerate(zip(row, score_row, fmt_row)):
            records.append({"task": spec.name, "index": i, "sample": k, "prompt": question, "reference": prompt.answer,
                            "reasoning": s.message.get("reasoning_content"), "completion": s.message.get("content"),
                            "tool_calls": s.message.get("tool_calls") or None, "answer": sc.answer,
                            "correct": sc.correct, "format_ok": fmt, "detail": sc.detail,
                            "finish_reason": s.finish_reason, "tokens": s.tokens})
    return records


def run_generative(backend, specs: list[TaskSpec], sampling: Sampling, ks: list[int], progress: bool = False,
                   workers: int = 2) -> tuple[dict, list[dict]]:
    """All tasks' prompts sampled in one batch, then scored task by task: (results, sample records)."""
    conversations = [p.messages for spec in specs for p in spec.prompts]
    all_samples = backend.sample(conversations, sampling, progress) if conversations else []
    thinking = sampling.thinking == "thinking"
    results, records, start = {}, [], 0
    for spec in specs:
        samples = all_samples[start:start + len(spec.prompts)]
        start += len(spec.prompts)
        scores = _score_task(spec, samples, progress, workers)
        format_ok = _format_ok(spec, samples, thinking)
        results[spec.name] = task_metrics(samples, scores, format_ok, ks)
        records += _sample_records(spec, samples, scores, format_ok)
    return results, records


# ---------------------------------------------------------------------- the entry point
def evaluate(model, tokenizer=None, tasks: list[str] | str = ("perplexity", "arithmetic"), out_dir=None, *,
             n: int = 20, samples: int = 1, k: list[int] | None = None, temperature: float | None = None,
             top_p: float = 1.0, max_tokens: int = 256, thinking: str | None = None, progress: bool = False,
             seed: int = 0, split: str = "test", data="stdlib", seq_len: int = 256, ppl_tokens: int | None = None,
             task_args: dict | None = None, batch: int = 64, api_key: str | None = None,
             code_timeout: float = 5.0) -> dict:
    """Evaluate `model` on `tasks`; returns {task: {metric: value, ..., "n": count}} (eval.json's
    "results"), and writes eval.json + samples.jsonl under `out_dir` when given. See `dsv32.eval`."""
    from dsv32.eval.perplexity import DEFAULT_MAX_TOKENS, perplexity

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise EvalError("no task given")
    if n < 1 or samples < 1 or max_tokens < 1:
        raise EvalError(f"n, samples and max_tokens must be positive (got {n}, {samples}, {max_tokens})")
    ks = sorted(set(k)) if k else default_ks(samples)
    if ks[0] < 1 or ks[-1] > samples:
        raise EvalError(f"every k of pass@k must be in [1, samples={samples}], got {ks}")
    if thinking not in (None, "thinking", "chat"):
        raise EvalError(f"thinking must be 'thinking' or 'chat', got {thinking!r}")
    specs = [build_task(name, n, split, seed, task_args, code_timeout) for name in names if not is_perplexity(name)]
    if len({s.name for s in specs}) != len(specs):
        raise EvalError(f"a task is listed twice: {', '.join(names)}")
    if temperature is None:
        temperature = 0.0 if samples == 1 else 1.0  # one sample: greedy; several: sample the model's distribution
    url, label = is_url(model), _model_label(model)
    if thinking is None and not url:
        thinking = _thinking_default(model)
    sampling = Sampling(samples, temperature, top_p, max_tokens, thinking, seed)
    settings = {"n": n, "samples": samples, "k": ks, "temperature": temperature, "top_p": top_p,
                "max_tokens": max_tokens, "thinking": thinking, "seed": seed, "split": split,
                "task_args": task_args or {}, "tasks": names}
    ppl = {"data": data, "seq_len": seq_len, "max_tokens": ppl_tokens or DEFAULT_MAX_TOKENS, "progress": progress}
    with_ppl = any(map(is_perplexity, names))
    if url:
        results, records = _run_url(model, api_key, with_ppl, ppl, specs, sampling, ks, progress)
    else:
        model, tokenizer = load_model(model, tokenizer)
        if tokenizer is None:
            raise EvalError(f"{label}: no tokenizer (give one; the checkpoint has no tokenizer.json)")
        results = {"perplexity": perplexity(model, tokenizer=tokenizer, **ppl)} if with_ppl else {}
        generated, records = run_generative(EngineBackend(model, tokenizer, batch), specs, sampling, ks, progress,
                                            _workers())
        results.update(generated)
    if with_ppl:
        settings.update(data=str(data) if isinstance(data, (str, Path)) else f"{len(data)} texts", seq_len=seq_len,
                        ppl_tokens=ppl["max_tokens"])
    if out_dir is not None:
        write_results(out_dir, label, settings, results, records)
    return results


def _run_url(url: str, api_key, with_ppl: bool, ppl: dict, specs, sampling, ks, progress) -> tuple[dict, list[dict]]:
    from dsv32.eval.perplexity import perplexity_http

    backend = HTTPBackend(url, api_key=api_key)
    try:
        results = {"perplexity": perplexity_http(backend, **ppl)} if with_ppl else {}
        generated, records = run_generative(backend, specs, sampling, ks, progress, _workers())
    finally:
        backend.close()
    return {**results, **generated}, records


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def write_results(out_dir, model_label: str, settings: dict, results: dict, records: list[dict]) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_label, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "settings": settings, "results": results}
    (out / RESULTS_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    with open(out / SAMPLES_FILE, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key.startswith(("pass@", "maj@")) or key in ("format_ok", "truncated", "errors"):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_table(results: dict) -> str:
    """Tasks as rows, metrics as columns; tasks with other metrics (perplexity) get a table of their own."""
    groups: dict[tuple, list[str]] = {}
    for task, metrics in results.items():
        groups.setdefault(tuple(metrics), []).append(task)
    tables = []
    for keys, tasks in groups.items():
        rows = [["task", *keys]] + [[t, *(_cell(k, results[t][k]) for k in keys)] for t in tasks]
        widths = [max(len(r[c]) for r in rows) for c in range(len(keys) + 1)]
        tables.append("\n".join("  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in
                                           enumerate(zip(row, widths))) for row in rows))
    return "\n\n".join(tables)
