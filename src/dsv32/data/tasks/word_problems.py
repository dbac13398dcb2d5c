"""Templated word problems with one- and two-step integer solutions.

Each template draws its numbers so the answer is a whole, non-negative number, and writes a short
worked solution (the equation for each step) ending in "Answer: N".
"""
from __future__ import annotations

import random
from collections.abc import Callable

from dsv32.data.tasks.common import Task, extract_answer, generate_split, numbers_match

KIND = "word_problem"
NAMES = ("Ada", "Ben", "Chen", "Dara", "Emil", "Fatima", "Goro", "Hana", "Ivan", "Juno", "Kofi", "Lena", "Mateo", "Nia")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells", "cards", "coins")
CONTAINERS = ("box", "bag", "jar", "crate", "basket")

# Each template: rng -> (question, steps, answer)
Template = Callable[[random.Random], tuple[str, list[str], int]]


def _gain(rng: random.Random):
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 500), rng.randint(2, 500)
    question = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
    return question, [f"{name} starts with {a} and gets {b}: {a} + {b} = {a + b}."], a + b


def _spend(rng: random.Random):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(20, 999)
    b = rng.randint(1, a)
    question = f"{name} had {a} dollars and spent {b} dollars on {item}. How many dollars does {name} have left?"
    return question, [f"{a} - {b} = {a - b}."], a - b


def _containers(rng: random.Random):
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    question = f"A {box} holds {a} {item}. How many {item} are in {b} full {box}{'es' if box.endswith('x') else 's'}?"
    return question, [f"{b} groups of {a}: {b} * {a} = {a * b}."], a * b


def _share(rng: random.Random):
    item = rng.choice(ITEMS)
    friends, each = rng.randint(2, 12), rng.randint(2, 50)
    total = friends * each
    question = f"{total} {item} are shared equally among {friends} friends. How many {item} does each friend get?"
    return question, [f"{total} / {friends} = {each}."], each


def _buy_and_give(rng: random.Random):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per = rng.randint(2, 20), rng.randint(2, 25)
    given = rng.randint(1, packs * per)
    question = f"{name} buys {packs} packs of {per} {item} and gives away {given} of them. How many {item} are left?"
    steps = [f"Bought: {packs} * {per} = {packs * per}.", f"Left: {packs * per} - {given} = {packs * per - given}."]
    return question, steps, packs * per - given


def _save(rng: random.Random):
    name = rng.choice(NAMES)
    weekly, weeks, start = rng.randint(2, 50), rng.randint(2, 30), rng.randint(0, 200)
    question = (f"{name} has {start} dollars saved and saves {weekly} dollars every week. "
                f"How many dollars will {name} have after {weeks} weeks?")
    steps = [f"Saved over {weeks} weeks: {weeks} * {weekly} = {weeks * weekly}.",
             f"Total: {start} + {weeks * weekly} = {start + weeks * weekly}."]
    return question, steps, start + weeks * weekly


def _rows(rng: random.Random):
    rows, per, missing = rng.randint(2, 30), rng.randint(2, 30), rng.randint(0, 9)
    missing = min(missing, rows * per)
    question = f"A hall has {rows} rows of {per} chairs, and {missing} chairs are broken. How many chairs can be used?"
    steps = [f"All chairs: {rows} * {per} = {rows * per}.", f"Usable: {rows * per} - {missing} = {rows * per - missing}."]
    return question, steps, rows * per - missing


TEMPLATES: tuple[Template, ...] = (_gain, _spend, _containers, _share, _buy_and_give, _save, _rows)


def make_task(rng: random.Random) -> Task:
    template = rng.choice(TEMPLATES)
    question, steps, answer = template(rng)
    solution = "\n".join([*steps, f"Answer: {answer}"])
    return Task(kind=KIND, split="", prompt=question, answer=str(answer), solution=solution,
                meta={"template": template.__name__.lstrip("_")})


def generate(split: str, n: int, seed: int = 0):
    return generate_split(KIND, make_task, split, n, seed)


def check(task: Task, response: str) -> bool:
    return numbers_match(extract_answer(response), task.answer)
