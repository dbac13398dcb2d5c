"""Seeded generators of verifiable tasks, each with a checker.

    from dsv32.data.tasks import generate, check
    for task in generate("arithmetic", "train", 100, seed=0):
        task.messages()          # reference conversation for SFT
        check(task, response)    # reward / evaluation

Kinds: arithmetic (worked multi-digit + - *), word_problem (templated), tool_use (real tools in
`tools.py`), python (functions checked by unit tests in a subprocess). Splits train / validation /
test are a fixed partition of each kind's problem space by prompt hash, so they never overlap.
"""
from __future__ import annotations

from collections.abc import Iterator

from dsv32.data.tasks import arithmetic, python_funcs, tools, word_problems
from dsv32.data.tasks.common import TASK_SPLITS, Task, extract_answer

KINDS = {
    arithmetic.KIND: arithmetic,
    word_problems.KIND: word_problems,
    tools.KIND: tools,
    python_funcs.KIND: python_funcs,
}


def _module(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r} (choose from {', '.join(KINDS)})")
    return KINDS[kind]


def generate(kind: str, split: str, n: int, seed: int = 0) -> Iterator[Task]:
    """`n` distinct tasks of `kind` from `split`; the same arguments always give the same tasks."""
    return _module(kind).generate(split, n, seed)


def check(task: Task, response: str) -> bool:
    """Grade a model's response (its final answer text; code for python tasks)."""
    return _module(task.kind).check(task, response)


__all__ = ["KINDS", "TASK_SPLITS", "Task", "check", "extract_answer", "generate"]
