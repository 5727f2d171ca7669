"""The training loss curve as an SVG: no JavaScript, no build step, no plotting library.

The trainer writes it next to a run's losses (`loss.svg`) and the dashboard draws it inline
(bot/dashboard/chart.py), from the same (step, loss) points."""

from __future__ import annotations

from html import escape


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / count
    return [low + i * step for i in range(count + 1)]


def _fmt(value: float) -> str:
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


def loss_chart_svg(
    points: list[tuple[float, float]], *, title: str = "training loss",
    width: int = 640, height: int = 260,
) -> str:
    """A line chart of (step, loss) points with labelled axes; empty input gives a note."""
    if not points:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40" role="img" '
                f'aria-label="{escape(title)}: no data"><text x="8" y="24">no loss recorded'
                "</text></svg>")
    left, right, top, bottom = 56, 16, 28, 36
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss-chart" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<title>{escape(title)}</title>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#bbb"/>',
    ]
    for tick in _ticks(y0, y1):
        y = py(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
                     f'text-anchor="end">{_fmt(tick)}</text>')
    x_ticks = _ticks(x0, x1)
    if all(x == int(x) for x in xs):  # steps: whole numbers on the axis
        x_ticks = sorted({round(t) for t in x_ticks})
    for tick in x_ticks:
        x = px(tick)
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" font-size="11" '
                     f'text-anchor="middle">{_fmt(tick)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="11" '
                 'text-anchor="middle">step</text>')
    coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys, strict=True))
    parts.append(f'<polyline class="loss" fill="none" stroke="#2563eb" stroke-width="2" '
                 f'points="{coords}"/>')
    for x, y in zip(xs, ys, strict=True):
        parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="#2563eb">'
                     f'<title>step {_fmt(x)}: loss {y:.4f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)
