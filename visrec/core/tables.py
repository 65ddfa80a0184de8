"""Fixed-width text tables, as the CLI prints them."""

from __future__ import annotations

from typing import Any, Sequence


def format_table(rows: Sequence[Sequence[Any]], widths: Sequence[int] | None = None,
                 rule: bool = False) -> str:
    """`rows` (the header first, if any) as left-aligned columns two spaces apart, trailing blanks
    stripped.

    widths: each column's width; a longer cell widens its own row only (as an f-string's `:<w`
    does). By default each column is as wide as its widest cell, so every row lines up.
    rule: a line of dashes under the header.
    """
    if widths is None:
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))] if rows else []
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if rule and lines:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
