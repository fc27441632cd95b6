"""The calculator tool: arithmetic expressions parsed with `ast` and computed node by node, never
run as code (no `eval`), with bounds on what they may cost."""

from __future__ import annotations

import ast
import math
import operator
import re

from .base import Tool, ToolError

MAX_EXPRESSION_CHARS = 200
# Results past this magnitude (and powers that would make them) are refused before they are built.
MAX_MAGNITUDE = 1e15
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_SIGNS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
# What people and models write for the four operations, as Python spells them.
_SPELLINGS = str.maketrans({"×": "*", "÷": "/", "−": "-", "^": "**", "$": None})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def calculate(expression: str) -> str:
    """The value of ``expression`` (numbers, + - * / // % ** or ^, parentheses, unary signs; "×",
    "÷", "$" and thousands separators accepted), as an integer when it is one, else to 10
    significant digits. Anything else is a `ToolError` naming what is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    text = _THOUSANDS.sub("", expression.translate(_SPELLINGS)).strip()
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    value = _value(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _SIGNS:
        return _SIGNS[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and right > 0 and abs(left) > 1 and \
                abs(right) * math.log10(abs(left)) > math.log10(MAX_MAGNITUDE):
            raise ToolError("result too large")
        try:
            value = _OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        if isinstance(value, complex):
            raise ToolError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise ToolError("result too large")
        return value
    raise ToolError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


CALCULATOR = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression: numbers, + - * / and parentheses.",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "description": "The expression, e.g. 37 + 45"}},
                "required": ["expression"]},
    function=calculate,
)
