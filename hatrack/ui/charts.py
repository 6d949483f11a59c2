"""Charts drawn on the server as inline SVG: no script, no external asset. Each
recorded point is one <circle class="pt"> (its value in a <title>), so what a chart
shows can be counted against the registry."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT, PAD = 560, 220, 52
PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y), drawn as a line through circles
    marks: list[tuple[float, float]] | None = None  # extra points without a line (eval loss)


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def line_chart(series: list[Series], x_label: str = "step", y_label: str = "loss") -> str:
    """Lines through each series' points plus its marks; an empty note when nothing was recorded."""
    every = [p for s in series for p in s.points + (s.marks or [])]
    if not every:
        return '<p class="muted">no loss curve recorded</p>'
    xs, ys = [p[0] for p in every], [p[1] for p in every]
    sx = _scale(min(xs), max(xs), PAD, WIDTH - 10)
    sy = _scale(min(ys), max(ys), HEIGHT - PAD + 10, 10)
    out = [f'<svg class="chart line" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           f'aria-label="{escape(y_label)} by {escape(x_label)}">',
           f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD + 10}" x2="{WIDTH - 10}" y2="{HEIGHT - PAD + 10}"/>',
           f'<line class="axis" x1="{PAD}" y1="10" x2="{PAD}" y2="{HEIGHT - PAD + 10}"/>',
           f'<text class="tick" x="{PAD - 4}" y="16" text-anchor="end">{_fmt(max(ys))}</text>',
           f'<text class="tick" x="{PAD - 4}" y="{HEIGHT - PAD + 10}" text-anchor="end">{_fmt(min(ys))}</text>',
           f'<text class="tick" x="{PAD}" y="{HEIGHT - 12}">{_fmt(min(xs))}</text>',
           f'<text class="tick" x="{WIDTH - 10}" y="{HEIGHT - 12}" text-anchor="end">{_fmt(max(xs))} {escape(x_label)}</text>']
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        label = escape(s.label)
        out.append(f'<g class="series" data-label="{label}">')
        if len(s.points) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        for x, y in s.points:
            out.append(f'<circle class="pt" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{color}">'
                       f'<title>{label} {escape(x_label)} {_fmt(x)}: {_fmt(y)}</title></circle>')
        for x, y in s.marks or []:
            out.append(f'<rect class="mark" x="{sx(x) - 4:.1f}" y="{sy(y) - 4:.1f}" width="8" height="8" '
                       f'fill="none" stroke="{color}" stroke-width="2"><title>{label} eval {_fmt(y)}</title></rect>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def bar_chart(groups: list[tuple[str, list[tuple[str, float | None]]]]) -> str:
    """One group of bars per metric: (metric, [(who, value), ...]); each group has its own
    scale, since loss and rates are not on one axis."""
    groups = [(m, [(w, v) for w, v in bars if v is not None]) for m, bars in groups]
    groups = [(m, bars) for m, bars in groups if bars]
    if not groups:
        return '<p class="muted">no scores recorded</p>'
    row_h, label_w = 18, 150
    height = sum(14 + row_h * len(bars) + 8 for _, bars in groups)
    out = [f'<svg class="chart bars" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="scores beside the base">']
    y = 0
    for metric, bars in groups:
        top = max(abs(v) for _, v in bars) or 1.0
        out.append(f'<text class="metric" x="0" y="{y + 11}">{escape(metric)}</text>')
        y += 14
        for i, (who, value) in enumerate(bars):
            w = abs(value) / top * (WIDTH - label_w - 60)
            color = PALETTE[i % len(PALETTE)]
            out.append(f'<text class="tick" x="{label_w - 6}" y="{y + 12}" text-anchor="end">{escape(who)}</text>'
                       f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" fill="{color}">'
                       f'<title>{escape(who)} {escape(metric)}: {_fmt(value)}</title></rect>'
                       f'<text class="tick" x="{label_w + w + 4:.1f}" y="{y + 12}">{_fmt(value)}</text>')
            y += row_h
        y += 8
    out.append("</svg>")
    return "".join(out)
