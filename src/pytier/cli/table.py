"""Box-drawn tables in EasyTier's look: one space of padding, a rule between every row, no wrapping."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence


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


ELLIPSIS = "…"
MIN_COLUMN = 5  # a shortened column keeps this many terminal columns, the ellipsis included


def table_width(widths: Sequence[int]) -> int:
    """Terminal columns a table with these column widths takes: padding and borders included."""
    return sum(w + 3 for w in widths) + 1


def truncate(text: str, width: int) -> str:
    """`text` cut to `width` terminal columns, ending in an ellipsis when it had to be cut."""
    if display_width(text) <= width:
        return text
    out, used = [], 0
    for c in text:
        w = display_width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + ELLIPSIS


def fit_table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None,
              optional: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    """The table narrowed to `width` terminal columns (None: as it is). First the `optional` columns
    go, in their order, while the table is too wide; then the widest columns but the first are cut with
    an ellipsis, down to MIN_COLUMN each, and the first one last. A table that still does not fit is
    left that wide."""
    keep = list(range(len(headers)))
    widths = [max([display_width(headers[i]), *(display_width(r[i]) for r in rows)]) for i in keep]
    if width is not None:
        for name in optional:
            if table_width([widths[i] for i in keep]) <= width:
                break
            if name in headers and len(keep) > 1:
                keep.remove(headers.index(name))
    cut = {i: widths[i] for i in keep}
    if width is not None:
        excess = table_width(list(cut.values())) - width
        # The first column names the row (an address, a URL, a key): it is cut last.
        for columns in (keep[1:], keep):
            while excess > 0 and columns:
                widest = max(columns, key=lambda i: cut[i])
                if cut[widest] <= MIN_COLUMN:
                    break
                cut[widest] -= 1
                excess -= 1
    return ([truncate(headers[i], cut[i]) for i in keep],
            [[truncate(r[i], cut[i]) for i in keep] for r in rows])


def output_width(environ: Mapping[str, str], stdout_is_terminal: bool,
                 terminal_columns: int | None) -> int | None:
    """How wide pytier-cli's tables may be: COLUMNS when it says (as `watch` sets it), else the
    terminal's width when printing to one; None (no limit) into a pipe or a file."""
    columns = environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return terminal_columns if stdout_is_terminal else None
