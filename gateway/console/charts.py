"""Charts as SVG, drawn on the server: stacked bars per day, one colour per series, no script and no library.

Each chart is an image with a text alternative (``role="img"`` and ``aria-label``) and a ``<title>`` per bar
segment for hover; the page puts a table with the same numbers under it. Pure functions of their input::

    svg = stacked_bars(title="Images per day", days=days, series=["hidream-i1-fast"],
                       value=lambda day, name: counts.get((day, name), 0), label=str)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import date

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 12, 28
PALETTE_SIZE = 6  # series colours come from the stylesheet: .s0 ... .s5 (an inline style would break the CSP)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5 or 5 times a power of ten that is at least ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-12):
            return float(step * power)
    return float(10 * power)


def series_class(index: int) -> str:
    """The CSS class that colours the ``index``-th series (the palette repeats after six)."""
    return f"s{index % PALETTE_SIZE}"


def stacked_bars(
    *,
    title: str,
    days: Sequence[date],
    series: Sequence[str],
    value: Callable[[date, str], float],
    label: Callable[[float], str],
    whole: bool = False,
) -> Markup:
    """An SVG of one stacked bar per day (series bottom to top in order), scaled to its container's width.

    ``whole``: the values are counts, so a gridline that would fall between two counts is left unlabelled.
    """
    totals = [sum(value(day, name) for name in series) for day in days]
    top = nice_ceiling(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    bar = slot * 0.7
    grand = sum(totals)
    span = f"{days[0].isoformat()} to {days[-1].isoformat()}" if days else "no days"
    summary = f"{title}, {span}: total {label(grand)}" + ("" if grand else ", nothing yet")
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{escape(summary)}"'
        ' preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">'
    ]
    for fraction in (0.0, 0.5, 1.0):  # gridlines with their values
        y = TOP + plot_h * (1 - fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        if whole and (top * fraction) % 1:
            continue
        text = escape(label(top * fraction))
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{text}</text>')
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar) / 2
        base = float(TOP + plot_h)
        for j, name in enumerate(series):
            amount = value(day, name)
            if amount <= 0:
                continue
            h = plot_h * amount / top
            base -= h
            tip = f"{day.isoformat()} {name}: {label(amount)}"
            parts.append(
                f'<rect class="{series_class(j)}" x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}">'
                f"<title>{escape(tip)}</title></rect>"
            )
    if days:
        for i in sorted({0, len(days) // 2, len(days) - 1}):
            x, anchor = LEFT + i * slot + slot / 2, "middle"
            if i > 0 and i == len(days) - 1:  # ends at the plot's right edge, not past the picture's
                x, anchor = WIDTH - RIGHT, "end"
            when = days[i].strftime("%b %d")
            parts.append(f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">{when}</text>')
    if not grand:
        parts.append(
            f'<text class="empty" x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h / 2:.1f}" text-anchor="middle">'
            "No usage in these days yet</text>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704  (every interpolated text above is escaped)
