"""Multi-digit arithmetic with worked, column-by-column solutions.

The worked solution spells out what a person does on paper (digits right to left with carries and
borrows; long multiplication as partial products), so a small model can learn the algorithm
rather than memorise results. Digits are tokenized one by one (see dsv32.tokenizer).
"""
from __future__ import annotations

import random

from dsv32.data.tasks.common import Task, extract_answer, generate_split, numbers_match

KIND = "arithmetic"
OPERATIONS = ("+", "-", "*")


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # least significant first


def _place(i: int) -> str:
    names = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions")
    return names[i] if i < len(names) else f"10^{i}"


def worked_addition(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        total = x + y + carry
        steps.append(f"{_place(i)}: {x} + {y} + carry {carry} = {total}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        steps.append(f"final carry: write {carry}")
    return steps


def worked_subtraction(a: int, b: int) -> list[str]:
    """a - b; when a < b compute b - a and negate."""
    if a < b:
        return [f"{a} < {b}, so compute {b} - {a} and make it negative"] + worked_subtraction(b, a)
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        top = x - borrow
        if top < y:
            steps.append(f"{_place(i)}: {x} - borrow {borrow} = {top} < {y}, borrow 10: {top + 10} - {y} = {top + 10 - y}")
            borrow = 1
        else:
            steps.append(f"{_place(i)}: {x} - borrow {borrow} - {y} = {top - y}")
            borrow = 0
    return steps


def worked_multiplication(a: int, b: int) -> list[str]:
    steps, partials = [], []
    for i, digit in enumerate(_digits(b)):
        partial = a * digit * 10**i
        partials.append(partial)
        steps.append(f"{a} * {digit} ({_place(i)}) = {a * digit}, shifted: {partial}")
    if len(partials) > 1:
        steps.append("sum of partial products: " + " + ".join(map(str, partials)) + f" = {sum(partials)}")
    return steps


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _number(rng: random.Random, digits: int) -> int:
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def make_task(rng: random.Random, min_digits: int = 2, max_digits: int = 5) -> Task:
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits} and {max_digits}")
    op = rng.choice(OPERATIONS)
    top = max_digits if op != "*" else max(min_digits, max_digits - 1)  # products grow fast
    a = _number(rng, rng.randint(min_digits, top))
    b = _number(rng, rng.randint(min_digits, top))
    result = solve(a, op, b)
    worker = {"+": worked_addition, "-": worked_subtraction, "*": worked_multiplication}[op]
    solution = "\n".join([f"Compute {a} {op} {b}.", *worker(a, b), f"Answer: {result}"])
    return Task(kind=KIND, split="", prompt=f"What is {a} {op} {b}?", answer=str(result), solution=solution,
                meta={"a": a, "op": op, "b": b})


def generate(split: str, n: int, seed: int = 0, min_digits: int = 2, max_digits: int = 5):
    return generate_split(KIND, lambda rng: make_task(rng, min_digits, max_digits), split, n, seed)


def check(task: Task, response: str) -> bool:
    return numbers_match(extract_answer(response), str(solve(task.meta["a"], task.meta["op"], task.meta["b"])))
