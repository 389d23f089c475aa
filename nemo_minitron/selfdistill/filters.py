"""Which teacher rewrites are kept. A rejected rewrite leaves the example's original answer in
place, so the data set keeps its size.

Rules, in the order they are checked (the first that fails names the rejection):
- ``too_long``: the rewrite prompt plus ``max_new_tokens`` does not fit the teacher's
  ``seq_length``, so nothing was generated;
- ``truncated``: generation hit ``max_new_tokens`` before the stop token;
- ``empty``: nothing but whitespace;
- ``mentions_reference``: a phrase of ``REFERENCE_PHRASES`` (case-insensitive) that is not
  already in the instruction or the reference answer itself;
- ``verifier``: the task verifier returned false: ``math`` (the last number equals the
  reference's last number), ``code`` (parses as Python and defines every top-level function and
  class name the reference defines) or a user ``module:function`` called as
  ``fn(instruction, reference, rewrite) -> bool``.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from nemo_minitron.config import ConfigError
from nemo_minitron.utils.imports import load_callable

Verifier = Callable[[str, str, str], bool]

REASONS = ("too_long", "truncated", "empty", "mentions_reference", "verifier")
"""Rejection reasons, in the order they are checked."""

REFERENCE_PHRASES = (
    "reference answer", "reference response", "reference solution", "reference code",
    "the reference", "provided reference", "given reference", "original answer",
    "original response", "your response", "the provided answer", "the given answer",
    "the answer provided", "as a guide",
)
"""Phrases that give away that the rewrite was written from a reference."""

_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def mentions_reference(rewrite: str, instruction: str = "", reference: str = "") -> bool:
    """A phrase of ``REFERENCE_PHRASES`` in ``rewrite`` that the task itself does not use."""
    low, task = rewrite.lower(), (instruction + "\n" + reference).lower()
    return any(p in low and p not in task for p in REFERENCE_PHRASES)


def last_number(text: str) -> Decimal | None:
    """The last number of ``text`` (thousands separators allowed), None without one."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def math_verifier(instruction: str, reference: str, rewrite: str) -> bool:
    """The rewrite's last number equals the reference's last number (3.50 == 3.5)."""
    want = last_number(reference)
    return want is not None and last_number(rewrite) == want


def code_of(text: str) -> str:
    """The contents of the Markdown code fences of ``text``, or the whole text without any."""
    blocks = _FENCE.findall(text)
    return textwrap.dedent("\n".join(blocks) if blocks else text)


def defined_names(source: str) -> set[str] | None:
    """Top-level function and class names of Python ``source`` (parsed, never run); None when
    it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    return {n.name for n in tree.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def code_verifier(instruction: str, reference: str, rewrite: str) -> bool:
    """The rewrite parses as Python and defines every top-level function/class name the
    reference defines (a reference that defines none, or does not parse, verifies nothing)."""
    want = defined_names(code_of(reference))
    have = defined_names(code_of(rewrite))
    return bool(want) and have is not None and want <= have


BUILTIN_VERIFIERS: dict[str, Verifier] = {"math": math_verifier, "code": code_verifier}


def load_verifier(spec: str | None) -> Verifier | None:
    """``math``, ``code`` or ``module:function`` (one-line error when it does not import)."""
    if spec is None:
        return None
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    if ":" not in spec:
        raise ConfigError(f"verifier={spec!r} must be one of {', '.join(BUILTIN_VERIFIERS)} "
                          "or module:function")
    return load_callable(spec, "verifier")


def rejection(rewrite: str, *, truncated: bool, instruction: str, reference: str,
              verifier: Verifier | None) -> str | None:
    """The first failed rule of a generated rewrite (see the module docstring), or None."""
    if truncated:
        return "truncated"
    if not rewrite.strip():
        return "empty"
    if mentions_reference(rewrite, instruction, reference):
        return "mentions_reference"
    if verifier is not None and not verifier(instruction, reference, rewrite):
        return "verifier"
    return None
