"""Box-drawn tables in EasyTier's look: one space of padding, a rule between every row, no wrapping."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


def display_width(text: str) -> int:
    """Terminal columns: wide East Asian characters take two, combining marks none."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The table as lines joined by newlines (no trailing newline). Cells are taken as they are."""
    widths = [display_width(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} columns")
        widths = [max(w, display_width(c)) for w, c in zip(widths, row, strict=True)]

    def rule(left: str, mid: str, right: str) -> str:
        return left + mid.join("─" * (w + 2) for w in widths) + right

    def line(cells: Sequence[str]) -> str:
        padded = (f" {c}{' ' * (w - display_width(c))} " for c, w in zip(cells, widths, strict=True))
        return "│" + "│".join(padded) + "│"

    out = [rule("┌", "┬", "┐"), line(headers)]
    for row in rows:
        out += [rule("├", "┼", "┤"), line(row)]
    out.append(rule("└", "┴", "┘"))
    return "\n".join(out)
