"""Exact tools of the corpus backend, computed rather than retrieved: `calculate` (arithmetic through
the AST, nothing else is evaluated) and `compare` (two dates or two numbers, read by `comparable`).
Each raises ValueError with a message meant for the model."""

from __future__ import annotations

import ast
import math
import operator
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> float:
    """Arithmetic only (numbers, + - * / // % **, parentheses); ValueError otherwise."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 64 or abs(a) > 1e6):
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError("only numbers and + - * / // % ** ( ) are allowed")

    try:
        value = ev(ast.parse(expression.replace(",", ""), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError, RecursionError, TypeError) as e:
        raise ValueError(f"cannot evaluate: {type(e).__name__}") from None
    if not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    return float(value)


_MONTHS = {m: i + 1 for i, m in enumerate(
    "january february march april may june july august september october november december".split())}
_MONTHS.update({m[:3]: i for m, i in list(_MONTHS.items())})


def comparable(value: str) -> tuple:
    """A date ('2 November 1932', 'July 23, 1968', '1974') as (year, month, day), else a number."""
    v = re.sub(r"(?<=\d),(?=\d{3}\b)", "", value.strip().lower()).replace(",", " ")  # 1,200 -> 1200
    year = re.search(r"\b(\d{3,4})\b", v)
    month = next((n for w, n in _MONTHS.items() if re.search(rf"\b{w}\b", v)), None)
    if year and month:
        day = re.search(r"\b(\d{1,2})\b", v.replace(year.group(1), " "))
        return (int(year.group(1)), month, int(day.group(1)) if day else 0)
    num = re.search(r"-?\d+(?:\.\d+)?", v)
    if num:
        return (float(num.group(0)),)
    raise ValueError(f"cannot read a number or a date from {value!r}")


def compare(a: str, b: str, relation: str) -> bool:
    x, y = comparable(a), comparable(b)
    if len(x) != len(y):
        raise ValueError("compare two dates or two numbers, not one of each")
    return {"earlier": x < y, "less": x < y, "later": x > y, "greater": x > y, "equal": x == y}[relation]
