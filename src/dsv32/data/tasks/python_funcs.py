"""Small Python function tasks with unit tests, checked by running the candidate in a subprocess.

Each template has parameters (a constant, a function name) so there are many distinct tasks; the
tests are input/expected pairs computed by the template's own reference function in this process.
The checker runs the candidate with the tests in a separate interpreter with a time and memory
limit. That contains accidents (infinite loops, huge allocations), it is not a security sandbox.
"""
from __future__ import annotations

import json
import random
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

from dsv32.data.tasks.common import Task, generate_split

KIND = "python"
TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Template:
    name: str  # base function name; a variant suffix is added
    describe: Callable[[str, int], str]  # (function name, k) -> task statement
    source: Callable[[str, int], str]  # (function name, k) -> reference implementation
    reference: Callable[[int], Callable]  # k -> the function itself, to compute expected outputs
    inputs: Callable[[random.Random, int], tuple]  # (rng, k) -> one argument tuple
    k_range: tuple[int, int]


def _ints(rng: random.Random, n: int = 8) -> list[int]:
    return [rng.randint(-50, 50) for _ in range(rng.randint(0, n))]


def _word_list(rng: random.Random) -> list[str]:
    words = ("alpha", "beta", "gamma", "delta", "pi", "omega", "mu", "sigma", "tau", "zeta", "io", "kappa",
             "epsilon", "lambda", "omicron", "upsilon")
    return [rng.choice(words) for _ in range(rng.randint(0, 6))]


TEMPLATES = (
    Template(
        "sum_multiples",
        lambda f, k: f"Write a Python function `{f}(numbers)` that returns the sum of the integers in the list `numbers` that are divisible by {k}.",
        lambda f, k: f"def {f}(numbers):\n    return sum(n for n in numbers if n % {k} == 0)\n",
        lambda k: lambda numbers: sum(n for n in numbers if n % k == 0),
        lambda rng, k: (_ints(rng),), (2, 9)),
    Template(
        "count_above",
        lambda f, k: f"Write a Python function `{f}(numbers)` that returns how many values in the list `numbers` are greater than {k}.",
        lambda f, k: f"def {f}(numbers):\n    return sum(1 for n in numbers if n > {k})\n",
        lambda k: lambda numbers: sum(1 for n in numbers if n > k),
        lambda rng, k: (_ints(rng),), (-20, 20)),
    Template(
        "add_to_each",
        lambda f, k: f"Write a Python function `{f}(numbers)` that returns a new list with {k} added to every element of `numbers`.",
        lambda f, k: f"def {f}(numbers):\n    return [n + {k} for n in numbers]\n",
        lambda k: lambda numbers: [n + k for n in numbers],
        lambda rng, k: (_ints(rng),), (1, 99)),
    Template(
        "clamp",
        lambda f, k: f"Write a Python function `{f}(x)` that returns `x` limited to the range from -{k} to {k} inclusive.",
        lambda f, k: f"def {f}(x):\n    return max(-{k}, min({k}, x))\n",
        lambda k: lambda x: max(-k, min(k, x)),
        lambda rng, k: (rng.randint(-100, 100),), (1, 60)),
    Template(
        "repeat_words",
        lambda f, k: f"Write a Python function `{f}(words)` that joins the strings in `words` with spaces, each word written {k} times in a row.",
        lambda f, k: f"def {f}(words):\n    return ' '.join(w for w in words for _ in range({k}))\n",
        lambda k: lambda words: " ".join(w for w in words for _ in range(k)),
        lambda rng, k: (_word_list(rng),), (1, 4)),
    Template(
        "long_words",
        lambda f, k: f"Write a Python function `{f}(words)` that returns the words in `words` longer than {k} characters, in their original order.",
        lambda f, k: f"def {f}(words):\n    return [w for w in words if len(w) > {k}]\n",
        lambda k: lambda words: [w for w in words if len(w) > k],
        lambda rng, k: (_word_list(rng),), (1, 5)),
    Template(
        "nth_multiple_sum",
        lambda f, k: f"Write a Python function `{f}(n)` that returns the sum {k} + {2 * k} + ... + n*{k} (0 when n is 0).",
        lambda f, k: f"def {f}(n):\n    return {k} * n * (n + 1) // 2\n",
        lambda k: lambda n: k * n * (n + 1) // 2,
        lambda rng, k: (rng.randint(0, 200),), (1, 12)),
    Template(
        "fizz",
        lambda f, k: f"Write a Python function `{f}(n)` that returns 'fizz' if `n` is divisible by {k}, otherwise the number as a string.",
        lambda f, k: f"def {f}(n):\n    return 'fizz' if n % {k} == 0 else str(n)\n",
        lambda k: lambda n: "fizz" if n % k == 0 else str(n),
        lambda rng, k: (rng.randint(-20, 20) * k if rng.random() < 0.4 else rng.randint(-100, 100),), (2, 13)),
)
_SUFFIXES = ("", "_v2", "_fn", "_impl", "_of", "_calc")


def make_task(rng: random.Random, n_tests: int = 6) -> Task:
    template = rng.choice(TEMPLATES)
    k = rng.randint(*template.k_range)
    name = template.name + rng.choice(_SUFFIXES)
    reference = template.reference(k)
    tests: list[dict] = []
    for _ in range(n_tests * 5):  # distinct inputs, and not all with the same expected output
        args = template.inputs(rng, k)
        case = {"args": list(args), "expected": reference(*args)}
        if case in tests:
            continue
        if len(tests) == n_tests - 1 and all(t["expected"] == case["expected"] for t in tests):
            continue  # a constant function would pass; the last test must tell them apart
        tests.append(case)
        if len(tests) == n_tests:
            break
    solution = template.source(name, k)
    prompt = template.describe(name, k) + " Reply with the code in a ```python block."
    return Task(kind=KIND, split="", prompt=prompt, answer=solution, solution=f"```python\n{solution}```",
                meta={"function": name, "tests": tests, "template": template.name, "k": k})


def generate(split: str, n: int, seed: int = 0):
    return generate_split(KIND, make_task, split, n, seed)


_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced code block, or the whole response when there is none."""
    blocks = _CODE_BLOCK.findall(response or "")
    return blocks[-1] if blocks else (response or "")


# The harness gets the tests and a one-time token on stdin, so a candidate cannot pass by printing
# "passed" and exiting; results are compared as JSON, so an object that "equals" anything fails.
_HARNESS = """
import json, sys
def main():
    request = json.loads(sys.stdin.read())
    namespace = {"__name__": "candidate"}
    exec(compile(CODE, "<candidate>", "exec"), namespace)
    function = namespace[NAME]
    for case in request["tests"]:
        if json.dumps(function(*case["args"])) != json.dumps(case["expected"]):
            sys.exit(3)
    sys.stdout.write(request["token"])
main()
"""


def _limit_resources() -> None:  # runs in the child before exec
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_CPU, (int(TIMEOUT_S), int(TIMEOUT_S) + 1))
    except (ImportError, ValueError, OSError):
        pass


def run_tests(code: str, function: str, tests: list[dict], timeout: float = TIMEOUT_S) -> bool:
    """True iff `code` defines `function` and it passes every test."""
    program = f"CODE = {code!r}\nNAME = {function!r}\n" + _HARNESS
    token = secrets.token_hex(16)
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", program], input=json.dumps({"tests": tests, "token": token}),
            capture_output=True, text=True, timeout=timeout,
            preexec_fn=_limit_resources if sys.platform != "win32" else None,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0 and result.stdout.endswith(token)


def check(task: Task, response: str) -> bool:
    return run_tests(extract_code(response), task.meta["function"], task.meta["tests"])
