"""Shared parts of the verifiable task generators: the Task record, splits, answer extraction."""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from dsv32.data.corpus import hash_fraction

# Tasks are partitioned by a hash of their prompt: a prompt belongs to exactly one split, so held-out
# splits never overlap training whatever seeds or counts are used.
TASK_SPLITS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


@dataclass
class Task:
    """A problem with a checkable answer.

    `messages()` is the reference conversation (for SFT); `prompt_messages()` what a model is given
    (for RL and evaluation); `check(response)` grades a model's response.
    """

    kind: str
    split: str
    prompt: str
    answer: str  # canonical final answer (the text after "Answer:")
    solution: str  # the worked reference response, ending in "Answer: ..." (or code for python tasks)
    meta: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    tools: list[dict] | None = None
    reference_messages: list[dict] | None = None  # the assistant side, when richer than `solution`

    @property
    def key(self) -> str:
        return f"{self.kind}\n{self.prompt}"

    def prompt_messages(self) -> list[dict]:
        messages: list[dict] = []
        if self.system is not None or self.tools:
            system: dict[str, Any] = {"role": "system", "content": self.system or ""}
            if self.tools:
                system["tools"] = self.tools
            messages.append(system)
        messages.append({"role": "user", "content": self.prompt})
        return messages

    def messages(self) -> list[dict]:
        answer = self.reference_messages or [{"role": "assistant", "content": self.solution}]
        return self.prompt_messages() + [dict(m) for m in answer]

    def check(self, response: str) -> bool:
        from dsv32.data.tasks import check

        return check(self, response)

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "split": self.split, "prompt": self.prompt, "answer": self.answer,
            "solution": self.solution, "meta": self.meta, "messages": self.messages(),
        }


def split_of_key(key: str) -> str:
    point = hash_fraction(key)
    for name, (low, high) in TASK_SPLITS.items():
        if low <= point < high:
            return name
    return "test"


def generate_split(kind: str, make: Callable[[random.Random], Task], split: str, n: int, seed: int = 0,
                   max_tries_per_task: int = 1000) -> Iterator[Task]:
    """`n` distinct tasks of `split`, drawn deterministically from `make(rng)`."""
    if split not in TASK_SPLITS:
        raise ValueError(f"split must be one of {', '.join(TASK_SPLITS)}, got {split!r}")
    rng = random.Random(f"{kind}:{seed}")
    seen: set[str] = set()
    tries = 0
    while len(seen) < n:
        task = make(rng)
        tries += 1
        if tries > max_tries_per_task * max(n, 1):
            raise ValueError(f"{kind}: could only make {len(seen)} distinct {split} tasks of the {n} asked")
        if task.key in seen or split_of_key(task.key) != split:
            continue
        seen.add(task.key)
        task.split = split
        yield task


_ANSWER = re.compile(r"Answer:\s*(.+?)\s*$", re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The text after the last "Answer:" in `text` (trailing period removed), or None."""
    matches = _ANSWER.findall(text or "")
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def as_number(text: str | None) -> Decimal | None:
    if text is None:
        return None
    cleaned = text.replace(",", "").replace(" ", "").replace("$", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def numbers_match(got: str | None, want: str, tolerance: str = "0") -> bool:
    a, b = as_number(got), as_number(want)
    return a is not None and b is not None and abs(a - b) <= Decimal(tolerance)
