"""The Markdown tables the measuring verbs (``bench``, ``specdec``) print."""

from __future__ import annotations

from collections.abc import Collection


def markdown_table(header: list[str], rows: list[list[str]],
                   text_columns: Collection[int] = ()) -> str:
    """A Markdown table of formatted cells: the columns at ``text_columns`` left-aligned, the
    others (numbers) right-aligned."""
    rule = "|" + "|".join("---" if i in text_columns else "---:"
                          for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], rule, *lines[1:]])
