"""Step histograms as a small SVG: panels side by side, one outline per series, axes with round ticks, a legend.

What :func:`mergescope.report.compare_figures.plot_metric_histograms` draws per layer. Matplotlib took 0.3–0.5 s a
four-panel figure warm (0.14 s without its layout engine, at 72 dpi, 10 bins), ~1 s in a ``mergescope compare``,
whose rendering it was nearly all of on the digits; this is ~2 ms of string formatting, and the browser draws the
text (issue 14, item 2). The counts are computed by the caller (``np.histogram``); nothing here bins.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

PANEL_W, PANEL_H = 374, 320  # px of one panel (matplotlib's 3.4 × 3.1 in at 110 dpi, less the suptitle)
_TOP, _LEFT, _RIGHT, _BOTTOM = 30, 58, 12, 36  # margins around the axes inside a panel
_SUPTITLE = 28
_FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"'


@dataclass(frozen=True)
class Series:
    """One outline: ``counts[i]`` items in ``[edges[i], edges[i + 1])``."""

    label: str
    color: str
    counts: np.ndarray  # int [bins]
    edges: np.ndarray  # float [bins + 1], increasing


@dataclass(frozen=True)
class Panel:
    title: str
    series: Sequence[Series]
    ylabel: str = "channels"


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values inside ``[lo, hi]`` (steps 1, 2, 2.5 or 5 × 10^k, about ``target`` of them)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _label(v: float, step: float) -> str:
    """A tick's text with the decimals its step needs, a true minus sign."""
    decimals = next(d for d in range(13) if abs(round(step * 10 ** d) - step * 10 ** d) < 1e-6)
    text = f"{v:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text.replace("-", "\u2212")


def _panel(p: Panel, x0: float, y0: float) -> list[str]:
    """SVG elements of one panel whose top-left corner is (x0, y0)."""
    left, right = x0 + _LEFT, x0 + PANEL_W - _RIGHT
    top, bottom = y0 + _TOP, y0 + PANEL_H - _BOTTOM
    out = ['<g class="panel">', f'<text class="title" x="{(left + right) / 2:.1f}" y="{y0 + 18}" '
           f'text-anchor="middle" font-size="15">{escape(p.title)}</text>']
    series = [s for s in p.series if int(np.sum(s.counts)) > 0]
    if not series:
        return [*out, "</g>"]
    lo, hi = min(float(s.edges[0]) for s in series), max(float(s.edges[-1]) for s in series)
    xlo, xhi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)  # matplotlib's x margins
    ymax = max(int(np.max(s.counts)) for s in series)
    yhi = 1.05 * ymax  # its y margin above; counts start at 0

    def px(v: float) -> float:
        return left + (v - xlo) / (xhi - xlo) * (right - left)

    def py(v: float) -> float:
        return bottom - v / yhi * (bottom - top)

    xticks = nice_ticks(lo, hi)
    yticks = [t for t in nice_ticks(0, yhi, 6) if float(t).is_integer()]  # whole channels
    grid = [f"M{px(t):.1f} {top:.1f}V{bottom:.1f}" for t in xticks]
    grid += [f"M{left:.1f} {py(t):.1f}H{right:.1f}" for t in yticks]
    out.append(f'<path d="{"".join(grid)}" stroke="#b0b0b0" stroke-opacity="0.45" stroke-width="1" fill="none"/>')
    for ticks, along in ((xticks, "x"), (yticks, "y")):
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        for t in ticks:
            at = (f'x="{px(t):.1f}" y="{bottom + 20:.1f}" text-anchor="middle"' if along == "x"
                  else f'x="{left - 6:.1f}" y="{py(t) + 5:.1f}" text-anchor="end"')
            out.append(f'<text class="{along}tick" {at} font-size="15">{_label(t, step)}</text>')
    mid = (top + bottom) / 2
    out.append(f'<text x="{x0 + 14:.1f}" y="{mid:.1f}" text-anchor="middle" font-size="15" '
               f'transform="rotate(-90 {x0 + 14:.1f} {mid:.1f})">{escape(p.ylabel)}</text>')
    for s in series:
        e, c = np.asarray(s.edges, dtype=float), np.asarray(s.counts)
        d = [f"M{px(e[0]):.1f} {py(0):.1f}"] + [f"V{py(c[i]):.1f}H{px(e[i + 1]):.1f}" for i in range(len(c))]
        out.append(f'<path class="outline" d="{"".join(d)}V{py(0):.1f}" stroke="{s.color}" stroke-width="2.5" '
                   f'fill="none"/>')
    out.append(f'<rect class="frame" x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
               f'height="{bottom - top:.1f}" fill="none" stroke="#000" stroke-width="1"/>')
    # the legend in the upper corner the outlines leave emptier (matplotlib's "best", between two corners)
    third = max(1, min(len(s.counts) for s in series) // 3)
    crowded_left = max(int(np.max(s.counts[:third])) for s in series)
    crowded_right = max(int(np.max(s.counts[-third:])) for s in series)
    texts = [f"{s.label} (n={int(np.sum(s.counts))})" for s in series]
    wide = 24 + 7 * max(len(t) for t in texts)  # the legend's width at 12 px (about 7 px a character)
    lx = left + 10 if crowded_left < crowded_right else max(left + 10, right - 10 - wide)
    for k, (s, text) in enumerate(zip(series, texts)):
        y = top + 17 + 17 * k
        out.append(f'<rect x="{lx:.1f}" y="{y - 8:.1f}" width="18" height="9" fill="none" stroke="{s.color}" '
                   f'stroke-width="2"/><text class="legend" x="{lx + 24:.1f}" y="{y:.1f}" font-size="12">'
                   f'{escape(text)}</text>')
    return [*out, "</g>"]


def histogram_panels(panels: Sequence[Panel], suptitle: str = "", empty: str = "no usable channels") -> str:
    """An SVG document: ``panels`` side by side (one when there are none: ``empty`` written in it)."""
    n = max(len(panels), 1)
    head = _SUPTITLE if suptitle else 0
    width, height = PANEL_W * n, PANEL_H + head
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" {_FONT} fill="#1f2328">',
             f"<title>{escape(suptitle or 'histograms')}</title>",
             f'<rect width="{width}" height="{height}" fill="#fff"/>']
    if suptitle:
        parts.append(f'<text x="{width / 2:.1f}" y="21" text-anchor="middle" font-size="17">{escape(suptitle)}</text>')
    for i, p in enumerate(panels):
        parts += _panel(p, PANEL_W * i, head)
    if not panels:
        parts.append(f'<text x="{width / 2:.1f}" y="{head + PANEL_H / 2:.1f}" text-anchor="middle" '
                     f'font-size="14">{escape(empty)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


__all__ = ["Panel", "Series", "histogram_panels", "nice_ticks"]
