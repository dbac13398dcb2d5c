"""Small deterministic tools with real implementations, and tool-use conversations built on them.

The tools run for real (no canned results), so the same code serves data generation, the RL loop
(execute the model's call, feed back the result) and the checker.
"""
from __future__ import annotations

import ast
import datetime as dt
import json
import operator
import random
from decimal import Decimal

from dsv32.data.tasks.common import Task, extract_answer, generate_split, numbers_match

KIND = "tool_use"
SYSTEM_PROMPT = "You are a helpful assistant. Use the tools when they help, then give the final answer as 'Answer: ...'."


class ToolError(ValueError):
    """A tool call the tool cannot run (unknown tool, bad arguments); its text is the tool result."""


# ---------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
            raise ToolError("exponent too large")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ToolError("only numbers and + - * / // % ** ( ) are allowed")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly as Python would, without running arbitrary code."""
    if not isinstance(expression, str) or len(expression) > 200:
        raise ToolError("expression must be a string of at most 200 characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        value = round(value, 6)
        if value.is_integer():
            value = int(value)
    return str(value)


# ---------------------------------------------------------------- unit conversion

_LINEAR_UNITS = {  # unit -> (dimension, size in base units)
    "mm": ("length", Decimal("0.001")), "cm": ("length", Decimal("0.01")), "m": ("length", Decimal(1)),
    "km": ("length", Decimal(1000)), "in": ("length", Decimal("0.0254")), "ft": ("length", Decimal("0.3048")),
    "mi": ("length", Decimal("1609.344")),
    "g": ("mass", Decimal("0.001")), "kg": ("mass", Decimal(1)), "lb": ("mass", Decimal("0.45359237")),
    "oz": ("mass", Decimal("0.028349523125")),
}
_TEMPERATURE = ("C", "F", "K")


def _to_celsius(value: Decimal, unit: str) -> Decimal:
    return {"C": value, "F": (value - 32) * 5 / 9, "K": value - Decimal("273.15")}[unit]


def _from_celsius(value: Decimal, unit: str) -> Decimal:
    return {"C": value, "F": value * 9 / 5 + 32, "K": value + Decimal("273.15")}[unit]


def convert_units(value: float, from_unit: str, to_unit: str) -> str:
    """Convert length, mass or temperature; the result is rounded to 2 decimals."""
    try:
        amount = Decimal(str(value))
    except Exception:
        raise ToolError("value must be a number") from None
    if from_unit in _TEMPERATURE and to_unit in _TEMPERATURE:
        result = _from_celsius(_to_celsius(amount, from_unit), to_unit)
    elif from_unit in _LINEAR_UNITS and to_unit in _LINEAR_UNITS:
        (dim_a, size_a), (dim_b, size_b) = _LINEAR_UNITS[from_unit], _LINEAR_UNITS[to_unit]
        if dim_a != dim_b:
            raise ToolError(f"cannot convert {dim_a} ({from_unit}) to {dim_b} ({to_unit})")
        result = amount * size_a / size_b
    else:
        raise ToolError(f"unknown or incompatible units {from_unit!r} -> {to_unit!r}")
    text = f"{result.quantize(Decimal('0.01')):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


# ---------------------------------------------------------------- calendar and text

def day_of_week(date: str) -> str:
    """The English weekday name of an ISO date (YYYY-MM-DD)."""
    try:
        return dt.date.fromisoformat(date).strftime("%A")
    except (TypeError, ValueError):
        raise ToolError(f"date must be YYYY-MM-DD, got {date!r}") from None


def days_between(start: str, end: str) -> str:
    """Days from `start` to `end` (ISO dates); negative when `end` is earlier."""
    try:
        return str((dt.date.fromisoformat(end) - dt.date.fromisoformat(start)).days)
    except (TypeError, ValueError):
        raise ToolError("dates must be YYYY-MM-DD") from None


def reverse_text(text: str) -> str:
    if not isinstance(text, str):
        raise ToolError("text must be a string")
    return text[::-1]


def _schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required}}}


TOOL_SCHEMAS = {
    "calculator": _schema("calculator", "Evaluate an arithmetic expression (+ - * / // % ** and parentheses)",
                          {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}}, ["expression"]),
    "convert_units": _schema("convert_units", "Convert a length, mass or temperature between units",
                             {"value": {"type": "number"},
                              "from_unit": {"type": "string", "description": "mm cm m km in ft mi g kg lb oz C F K"},
                              "to_unit": {"type": "string"}}, ["value", "from_unit", "to_unit"]),
    "day_of_week": _schema("day_of_week", "The weekday of a date",
                           {"date": {"type": "string", "description": "YYYY-MM-DD"}}, ["date"]),
    "days_between": _schema("days_between", "Number of days from one date to another",
                            {"start": {"type": "string", "description": "YYYY-MM-DD"},
                             "end": {"type": "string", "description": "YYYY-MM-DD"}}, ["start", "end"]),
    "reverse_text": _schema("reverse_text", "Reverse a piece of text character by character",
                            {"text": {"type": "string"}}, ["text"]),
}
TOOL_FUNCTIONS = {"calculator": calculator, "convert_units": convert_units, "day_of_week": day_of_week,
                  "days_between": days_between, "reverse_text": reverse_text}


def run_tool(name: str, arguments: str | dict) -> str:
    """Execute a tool call; a bad call returns an error text (what the model would be shown)."""
    try:
        if name not in TOOL_FUNCTIONS:
            raise ToolError(f"unknown tool {name!r}")
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        if not isinstance(args, dict):
            raise ToolError("arguments must be a JSON object")
        return TOOL_FUNCTIONS[name](**args)
    except (ToolError, json.JSONDecodeError, TypeError) as exc:
        return f"error: {exc}"


# ---------------------------------------------------------------- conversations

_WORDS = ("tokenizer", "stream", "lattice", "gradient", "harbor", "quartz", "meadow", "pixel", "sparrow", "vector")


def _calculator_question(rng: random.Random):
    a, b, c = rng.randint(10, 9999), rng.randint(2, 999), rng.randint(2, 99)
    expression = rng.choice([f"{a} * {b} + {c}", f"({a} + {b}) * {c}", f"{a} * {b} - {c}", f"{a} + {b} * {c}"])
    return f"Use the calculator: what is {expression}?", "calculator", {"expression": expression}


def _convert_question(rng: random.Random):
    pairs = [("km", "mi"), ("mi", "km"), ("kg", "lb"), ("lb", "kg"), ("C", "F"), ("F", "C"), ("ft", "m"), ("cm", "in")]
    source, target = rng.choice(pairs)
    value = rng.randint(1, 500)
    return f"Convert {value} {source} to {target}.", "convert_units", {"value": value, "from_unit": source, "to_unit": target}


def _weekday_question(rng: random.Random):
    date = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 20000))
    return f"What day of the week was {date.isoformat()}?", "day_of_week", {"date": date.isoformat()}


def _days_question(rng: random.Random):
    start = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 9000))
    end = start + dt.timedelta(days=rng.randint(1, 1500))
    return (f"How many days are there from {start.isoformat()} to {end.isoformat()}?", "days_between",
            {"start": start.isoformat(), "end": end.isoformat()})


def _reverse_question(rng: random.Random):
    text = " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
    return f"Reverse the text '{text}' character by character.", "reverse_text", {"text": text}


QUESTIONS = (_calculator_question, _convert_question, _weekday_question, _days_question, _reverse_question)


def make_task(rng: random.Random) -> Task:
    question, tool, arguments = rng.choice(QUESTIONS)(rng)
    result = run_tool(tool, arguments)
    call = {"type": "function", "function": {"name": tool, "arguments": json.dumps(arguments, ensure_ascii=False)}}
    reference = [
        {"role": "assistant", "content": "", "reasoning_content": f"I will call {tool}.", "tool_calls": [call]},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": f"The {tool.replace('_', ' ')} tool returned {result}.\nAnswer: {result}",
         "reasoning_content": f"The tool returned {result}."},
    ]
    return Task(kind=KIND, split="", prompt=question, answer=result, solution=reference[-1]["content"],
                meta={"tool": tool, "arguments": arguments}, system=SYSTEM_PROMPT,
                tools=[TOOL_SCHEMAS[name] for name in TOOL_SCHEMAS], reference_messages=reference)


def generate(split: str, n: int, seed: int = 0):
    return generate_split(KIND, make_task, split, n, seed)


def check(task: Task, response: str) -> bool:
    """The final answer must equal what the tool really returns (numbers compared numerically)."""
    got, want = extract_answer(response), run_tool(task.meta["tool"], task.meta["arguments"])
    if got is None:
        return False
    if numbers_match(want, want):
        return numbers_match(got, want, tolerance="0.01")
    return got.strip().strip("'\"") == want


def check_tool_calls(task: Task, tool_calls: list[dict] | None) -> bool:
    """Whether running the model's tool calls yields the result the task needs."""
    for call in tool_calls or []:
        function = call.get("function", call)
        if run_tool(function.get("name", ""), function.get("arguments") or "{}") == task.answer:
            return True
    return False
