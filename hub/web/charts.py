"""A line chart as inline SVG, drawn on the server (no JavaScript chart library to ship)."""

from __future__ import annotations

from collections import defaultdict
from html import escape

from hub.fleet import SeriesPoint

__all__ = ["defect_chart_svg"]

COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#808000"]


def defect_chart_svg(points: list[SeriesPoint], width: int = 900, height: int = 320) -> str:
    if not points:
        return '<p class="muted">No defect samples in this period.</p>'
    left, right, top, bottom = 50, 170, 15, 40
    buckets = sorted({p.bucket for p in points})
    t0, t1 = buckets[0].timestamp(), buckets[-1].timestamp()
    span = max(t1 - t0, 1.0)
    ymax = max(max(p.defects for p in points), 1)
    x = lambda t: left + (t - t0) / span * (width - left - right)  # noqa: E731
    y = lambda v: top + (1 - v / ymax) * (height - top - bottom)  # noqa: E731
    by_line: dict[str, list[SeriesPoint]] = defaultdict(list)
    for p in points:
        by_line[p.line].append(p)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="defects per line over time">',
           f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" stroke="#888"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{y(0):.1f}" stroke="#888"/>']
    for frac in (0, 0.5, 1):
        v = ymax * frac
        out.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:.0f}</text>')
    for b in (buckets[0], buckets[len(buckets) // 2], buckets[-1]):
        out.append(f'<text x="{x(b.timestamp()):.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                   f'font-size="11">{b:%m-%d %H:%M}</text>')
    for i, (line, pts) in enumerate(sorted(by_line.items())):
        c = COLORS[i % len(COLORS)]
        pts.sort(key=lambda p: p.bucket)
        for attr, dash in (("defects", ""), ("confirmed", ' stroke-dasharray="4 3"')):
            coords = " ".join(f"{x(p.bucket.timestamp()):.1f},{y(getattr(p, attr)):.1f}" for p in pts)
            out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{coords}"/>')
        out.append(f'<text x="{width - right + 10}" y="{top + 14 * (i + 1)}" font-size="12" fill="{c}">'
                   f'{escape(line)}</text>')
    out.append("</svg>")
    return "\n".join(out)
