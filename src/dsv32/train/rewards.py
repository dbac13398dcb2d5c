"""Verifiable rewards for GRPO, in TRL's reward-function signature.

Every reward function is called once per rollout batch, with keyword arguments as TRL calls them:

    reward(prompts=..., completions=..., completion_ids=..., ..., **dataset_columns) -> list[float | None]

so `def reward(prompts, completions, **kwargs)` and `def reward(completions, **kwargs)` both work. Per
completion (lists aligned with `completions`):
  prompts          the prompt messages (a list of OpenAI-style dicts), as TRL passes conversational prompts
  completions      [{"role": "assistant", "content", "reasoning_content", "tool_calls"}] (TRL's
                   conversational form; `content` is the answer part, reasoning is separate)
  completion_ids   the generated token ids (the stop token included when the completion ended)
  completion_text  the raw decoded completion (special tokens kept)
  truncated        True when generation stopped at max_completion_length
  task             the `dsv32.data.tasks.Task` (generated tasks) or the JSONL row (a dict)
  answer           the reference answer text
  and every extra column of a JSONL task file, plus `trainer_state={"step": ...}` (one dict).
`None` means "not applicable" (TRL's convention): it counts as 0 in the weighted sum and is left out
of that function's logged mean.

Built-ins (names usable in `--rewards`): accuracy (the task's checker: exact numeric answer, the
python unit tests in a subprocess with time/memory limits, no network and no child processes, or a
tool call that yields the right result), format
(a finished completion with closed reasoning and the shape the task asks for), tool_call (a
well-formed call of a declared tool with JSON-object arguments), length (DAPO's soft overlong
punishment), steps (a process reward: the share of the arithmetic equations written in the reply that
are true, each re-computed with the calculator tool; it never sees the reference answer). A user function is named `module:function` or `path/to/file.py:function`.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

from dsv32.tokenizer import THINK_END

RewardFn = Callable[..., list]
BUILTIN_REWARDS = ("accuracy", "format", "tool_call", "length", "steps")


def _content(completion) -> str:
    """The answer text of one completion (TRL conversational list, a message dict, or a plain string)."""
    if isinstance(completion, str):
        return completion
    message = completion[-1] if isinstance(completion, list) else completion
    return (message or {}).get("content") or ""


def _message(completion) -> dict:
    if isinstance(completion, list):
        return completion[-1] if completion else {}
    return completion if isinstance(completion, dict) else {"content": completion}


def _kind(task) -> str | None:
    return getattr(task, "kind", None) if task is not None and not isinstance(task, dict) else None


# ---------------------------------------------------------------------- code, sandboxed
# Installed in the child before the candidate runs. Audit hooks cannot be removed once added (PEP 578),
# so candidate code cannot open sockets, start processes or load C code through ctypes: "no network"
# on top of the time / memory limits of the data module's runner.
_DENY_PREFIX = """
import sys
def _dsv32_deny(event, args):
    if event.startswith(("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                         "os.fork", "os.forkpty", "ctypes.", "urllib.", "http.", "ftplib.", "smtplib.")):
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_dsv32_deny)
del _dsv32_deny
"""


def run_sandboxed(source: str, stdin: str, token: str, timeout: float | None = None) -> str:
    """Run `source` in a separate interpreter with the data module's time and memory limits
    (dsv32.data.tasks.python_funcs), no network and no child processes. Returns "passed" when it exits
    cleanly having written `token` last (the token comes on stdin, so a candidate cannot fake it),
    "timeout", "blocked" (it tried something the sandbox forbids) or "failed"."""
    import subprocess
    import sys

    from dsv32.data.tasks import python_funcs

    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _DENY_PREFIX + source], input=stdin,
            capture_output=True, text=True, timeout=timeout or python_funcs.TIMEOUT_S,
            preexec_fn=python_funcs._limit_resources if sys.platform != "win32" else None,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    if result.returncode == 0 and result.stdout.endswith(token):
        return "passed"
    return "blocked" if "PermissionError: sandbox: " in result.stderr else "failed"


def run_code_tests(code: str, function: str, tests: list[dict], timeout: float | None = None) -> bool:
    """True iff `code` defines `function` and passes every test, in the sandbox of `run_sandboxed`."""
    import secrets

    from dsv32.data.tasks import python_funcs

    source = f"CODE = {code!r}\nNAME = {function!r}\n" + python_funcs._HARNESS
    token = secrets.token_hex(16)
    return run_sandboxed(source, json.dumps({"tests": tests, "token": token}), token, timeout) == "passed"


# ---------------------------------------------------------------------- accuracy
def check_answer(task, answer: str | None, text: str) -> bool:
    """Grade `text` against a generated Task (its own checker) or a JSONL row's `answer`."""
    from dsv32.data.tasks import check
    from dsv32.data.tasks.common import extract_answer, numbers_match

    if _kind(task) == "python":
        from dsv32.data.tasks.python_funcs import extract_code

        return run_code_tests(extract_code(text), task.meta["function"], task.meta["tests"])
    if task is not None and not isinstance(task, dict):
        return bool(check(task, text))
    if answer is None:
        raise ValueError("the accuracy reward needs an 'answer' for every JSONL task")
    got = extract_answer(text)
    if got is None:
        return False
    if numbers_match(answer, answer):  # a numeric reference answer: compare as numbers
        return numbers_match(got, answer)
    return got.strip().strip("'\"").strip() == str(answer).strip()


def accuracy_reward(prompts, completions, task=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the task's verifier accepts the completion, else 0.0.

    Numeric tasks: the text after the last "Answer:" in the content equals the reference number.
    Python tasks: the content's last code block passes every unit test in a time- and memory-limited
    subprocess that can open no socket and start no process (`run_code_tests`). Tool tasks: a tool call whose real result is the task's answer, or the right final answer.
    """
    from dsv32.data.tasks.tools import check_tool_calls

    tasks = task or [None] * len(completions)
    answers = answer or [None] * len(completions)
    rewards = []
    for completion, t, a in zip(completions, tasks, answers):
        message = _message(completion)
        text = message.get("content") or ""
        if _kind(t) == "tool_use":
            ok = check_tool_calls(t, message.get("tool_calls")) or check_answer(t, a, text)
        else:
            ok = check_answer(t, a, text)
        rewards.append(1.0 if ok else 0.0)
    return rewards


# ---------------------------------------------------------------------- format
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n.*?```", re.DOTALL)
_ANSWER_LINE = re.compile(r"^\s*Answer:\s*\S", re.MULTILINE)


def make_format_reward(thinking: bool) -> RewardFn:
    def format_reward(prompts, completions, completion_text=None, truncated=None, task=None, **kwargs) -> list[float]:
        """1.0 for a completion that finished (not cut at the length limit), closed its reasoning with
        </think> (thinking mode), and has the shape the task asks for: an "Answer:" line, a python code
        block (code tasks), or a tool call (tool tasks)."""
        texts = completion_text or [_content(c) for c in completions]
        cut = truncated or [False] * len(completions)
        tasks = task or [None] * len(completions)
        out = []
        for completion, text, was_cut, t in zip(completions, texts, cut, tasks):
            message = _message(completion)
            content = message.get("content") or ""
            ok = not was_cut and (not thinking or THINK_END in text)
            kind = _kind(t)
            if kind == "python":
                ok = ok and bool(_CODE_BLOCK.search(content))
            elif kind == "tool_use":
                ok = ok and bool(message.get("tool_calls") or _ANSWER_LINE.search(content))
            else:
                ok = ok and bool(_ANSWER_LINE.search(content))
            out.append(1.0 if ok else 0.0)
        return out

    return format_reward


# ---------------------------------------------------------------------- worked steps
_EQUATION = re.compile(r"(-?\d+(?:\.\d+)?(?:\s*[-+*/]\s*-?\d+(?:\.\d+)?)+)\s*=\s*(-?\d+(?:\.\d+)?)")


def equation_score(text: str) -> tuple[int, int]:
    """(correct, total) over the arithmetic equations written in `text`; connective words of the worked
    solutions ("carry", "borrow", "(tens)") are dropped first so "2 + 4 + carry 0 = 6" is checked."""
    from dsv32.data.tasks.tools import ToolError, calculator

    cleaned = re.sub(r"\((?:[a-z-]+|10\^\d+)\)", " ", text)
    cleaned = re.sub(r"\b(carry|borrow)\b", " ", cleaned)
    correct = total = 0
    for lhs, rhs in _EQUATION.findall(cleaned):
        total += 1
        try:
            value = calculator(lhs)
        except ToolError:
            continue
        try:
            correct += math.isclose(float(value), float(rhs), rel_tol=0, abs_tol=1e-6)
        except ValueError:
            pass
    return correct, total



def steps_reward(prompts, completions, **kwargs) -> list[float]:
    """The share of the equations written in the reasoning and reply that are true ("7 + 5 + carry 0 =
    12", "47 * 3 = 141"): a dense signal where the final answer alone is rarely right yet. A reply with
    no equation scores 0. Writing extra true equations earns nothing once each worked line is right, and
    the accuracy reward still decides which replies win; weight it below accuracy."""
    out = []
    for completion in completions:
        message = _message(completion)
        correct, total = equation_score((message.get("reasoning_content") or "") + "\n" + (message.get("content") or ""))
        out.append(correct / total if total else 0.0)
    return out


# ---------------------------------------------------------------------- tool calls
def tool_call_reward(prompts, completions, task=None, **kwargs) -> list[float | None]:
    """For prompts that declare tools: 1.0 when every tool call names a declared tool and carries a
    JSON object of arguments with the schema's required keys, 0.0 for a malformed or missing call.
    None (not applicable) for prompts without tools."""
    out: list[float | None] = []
    for prompt, completion in zip(prompts, completions):
        declared = {}
        for m in prompt if isinstance(prompt, list) else []:
            for schema in m.get("tools") or []:
                fn = schema.get("function", schema)
                declared[fn.get("name")] = fn.get("parameters", {}).get("required", [])
        if not declared:
            out.append(None)
            continue
        calls = _message(completion).get("tool_calls") or []
        ok = bool(calls)
        for call in calls:
            fn = call.get("function", call)
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except (json.JSONDecodeError, TypeError):
                ok = False
                break
            name = fn.get("name")
            if name not in declared or not isinstance(args, dict) or any(k not in args for k in declared[name]):
                ok = False
                break
        out.append(1.0 if ok else 0.0)
    return out


# ---------------------------------------------------------------------- length
def make_length_reward(max_completion_length: int, buffer: int) -> RewardFn:
    """DAPO's soft overlong punishment: 0 up to `max - buffer` tokens, then a linear ramp down to -1
    at `max` (a completion cut at the limit gets -1)."""
    if buffer < 1 or buffer > max_completion_length:
        raise ValueError(f"the overlong buffer must be in [1, max_completion_length={max_completion_length}], got {buffer}")
    start = max_completion_length - buffer

    def length_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("the length reward needs completion_ids")
        out = []
        for ids in completion_ids:
            n = len(ids)
            out.append(0.0 if n <= start else max(-1.0, (start - n) / buffer))
        return out

    return length_reward


# ---------------------------------------------------------------------- resolving names
def load_reward(spec: str) -> RewardFn:
    """A user reward function from `module:function` or `path/to/file.py:function`."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ValueError(f"reward {spec!r}: give a built-in ({', '.join(BUILTIN_REWARDS)}) or module:function / file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: no such file {target}")
        module_spec = importlib.util.spec_from_file_location(f"dsv32_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"reward {spec!r}: cannot import {target} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no function {name!r}")
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "completions" not in params or not takes_any:
        raise ValueError(f"reward {spec!r}: the signature must be (prompts, completions, **kwargs) "
                         "(it is called with keyword arguments, as TRL calls reward functions)")
    return fn


def reward_name(spec: str) -> str:
    return spec.rpartition(":")[2] if ":" in spec else spec


def build_rewards(specs: list[str], *, thinking: bool, max_completion_length: int, overlong_buffer: int
                  ) -> list[tuple[str, RewardFn]]:
    """(name, function) for each spec: a built-in name or a user `module:function`."""
    out = []
    for spec in specs:
        if spec == "accuracy":
            fn = accuracy_reward
        elif spec == "format":
            fn = make_format_reward(thinking)
        elif spec == "tool_call":
            fn = tool_call_reward
        elif spec == "length":
            fn = make_length_reward(max_completion_length, overlong_buffer)
        elif spec == "steps":
            fn = steps_reward
        else:
            fn = load_reward(spec)
        out.append((reward_name(spec), fn))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be distinct, got {names}")
    return out


def compute_rewards(functions: list[tuple[str, RewardFn]], weights: list[float], prompts: list, completions: list,
                    **kwargs) -> tuple[list[float], dict[str, list[float]]]:
    """Call every function; returns (weighted totals, {name: per-completion values with None as nan}).

    The total is sum_i w_i r_i with None counted as 0 (TRL's nansum)."""
    n = len(completions)
    per_fn: dict[str, list[float]] = {}
    for name, fn in functions:
        values = fn(prompts=prompts, completions=completions, **kwargs)  # by keyword, as TRL calls them
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ValueError(f"reward {name!r} returned {type(values).__name__} of length "
                             f"{len(values) if hasattr(values, '__len__') else '?'}; expected a list of {n} floats")
        clean = []
        for v in values:
            if v is None:
                clean.append(math.nan)
            elif isinstance(v, (int, float)):
                clean.append(float(v))
            else:
                raise ValueError(f"reward {name!r} returned {v!r}; rewards must be numbers or None")
        per_fn[name] = clean
    totals = []
    for i in range(n):
        total = 0.0
        for (name, _), w in zip(functions, weights):
            v = per_fn[name][i]
            if not math.isnan(v):
                total += w * v
        totals.append(total)
    return totals, per_fn
