"""Plain-text tables that fit a width: cells are never wrapped, so a narrow terminal or
a pipe (80 columns) never splits a word or folds a cell character by character.
To fit, columns shrink (their lines cut with an ellipsis) and low-priority columns
are left out, in an order the caller gives; whatever width is left is given back."""

from __future__ import annotations

from dataclasses import dataclass

GAP = "  "
ELLIPSIS = "…"


@dataclass
class Column:
    header: str
    right: bool = False  # right-justified (numbers)
    min_width: int | None = None  # narrowest it may shrink to; None: never shrinks


@dataclass
class Fitted:
    lines: list[str]
    dropped: list[str]  # headers of the columns left out


def cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, ending in an ellipsis when cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS if width >= 1 else ""


def fit(columns: list[Column], rows: list[list[str]], width: int, steps: list[tuple[str, str]]) -> Fitted:
    """Lay out `rows` (cells may hold several lines) under `columns` in `width` characters.
    `steps` says how to make room, in order: ("shrink", header) or ("drop", header)."""
    natural = {
        c.header: max([len(c.header)] + [len(line) for row in rows for line in row[i].split("\n")])
        for i, c in enumerate(columns)
    }
    widths = dict(natural)
    shown = [c.header for c in columns]

    def excess() -> int:
        return sum(widths[h] for h in shown) + len(GAP) * (len(shown) - 1) - width

    by_header = {c.header: c for c in columns}
    for action, header in steps:
        if excess() <= 0:
            break
        if header not in shown:
            continue
        if action == "drop":
            shown.remove(header)
        elif by_header[header].min_width is not None:
            floor = min(natural[header], max(by_header[header].min_width, len(header)))
            widths[header] = max(floor, widths[header] - excess())
    for action, header in steps:  # room left after a drop goes back to what was shrunk
        if action == "shrink" and header in shown and excess() < 0:
            widths[header] = min(natural[header], widths[header] - excess())

    index = {c.header: i for i, c in enumerate(columns)}
    lines = [_line([(by_header[h], h) for h in shown], widths), GAP.join("─" * widths[h] for h in shown)]
    for row in rows:
        cells = [row[index[h]].split("\n") for h in shown]
        for n in range(max(len(c) for c in cells)):
            parts = [(by_header[h], cells[k][n] if n < len(cells[k]) else "") for k, h in enumerate(shown)]
            lines.append(_line(parts, widths))
    return Fitted([cut(line, width) for line in lines], [h for h in natural if h not in shown])


def _line(parts: list[tuple[Column, str]], widths: dict[str, int]) -> str:
    out = []
    for column, text in parts:
        text = cut(text, widths[column.header])
        out.append(text.rjust(widths[column.header]) if column.right else text.ljust(widths[column.header]))
    return GAP.join(out).rstrip()
