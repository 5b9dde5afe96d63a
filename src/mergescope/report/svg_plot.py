"""The reports' figures as small SVG documents: panels side by side, each an axes of lines, markers, bands, step
outlines, rules and horizontal bars on linear or log scales, with round ticks, a title, axis labels and a legend.

Why not matplotlib (issue 14, item 2: rendering ≤ 5 % of a run): a report figure cost it 0.13–0.5 s, most of it
laying out text (``layout="constrained"`` doubles it), and importing it 0.3–0.6 s more in every command that draws
one — on ``mergescope demo`` 1.6 of its 17.6 s, a fixed cost whatever the data. Here a figure is a few ms of
string formatting; the browser draws the text (it can be selected and searched), the figure stays sharp at any
zoom, and every marker carries its exact value as a tooltip. Nothing here computes a statistic: callers pass the
numbers they draw. Text is escaped unless it is a :class:`markupsafe.Markup` fragment (e.g. a subscript).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"'
TICK_FONT, LABEL_FONT, TITLE_FONT, LEGEND_FONT, SUPTITLE_FONT = 13, 14, 15, 12, 17
MARGIN = 0.05  # the share of the data range left free on each side of an axis without limits (matplotlib's)
GRID = 'stroke="#b0b0b0" stroke-opacity="0.45" stroke-width="1" fill="none"'


@dataclass(frozen=True)
class Line:
    """Points joined in order (``stroke``) and/or drawn as markers; a non-finite value breaks the line there.

    ``dash``: lengths in multiples of ``width`` (matplotlib's convention), empty for solid; ``marker``: one of
    :data:`MARKERS` ('' for none), ``size`` its width in px, ``edge`` its outline colour; ``tips``: a tooltip per
    point (its marker's)."""

    x: Sequence[float]
    y: Sequence[float]
    color: str
    width: float = 2.0
    dash: tuple[float, ...] = ()
    marker: str = ""
    size: float = 0.0
    edge: str = ""
    label: str = ""
    stroke: bool = True
    tips: Sequence[str] = ()


@dataclass(frozen=True)
class Step:
    """A histogram's outline: ``counts[i]`` items in ``[edges[i], edges[i + 1])``, drawn from and back to 0."""

    edges: Sequence[float]
    counts: Sequence[float]
    color: str
    width: float = 2.5
    label: str = ""


@dataclass(frozen=True)
class Band:
    """The area between ``lo`` and ``hi`` over ``x`` (e.g. a min–max range over seeds)."""

    x: Sequence[float]
    lo: Sequence[float]
    hi: Sequence[float]
    color: str
    opacity: float = 0.25
    label: str = ""


@dataclass(frozen=True)
class Rule:
    """A line across the axes at ``at``: vertical (an x value) or, with ``vertical=False``, horizontal."""

    at: float
    color: str = "#000"
    width: float = 1.2
    dash: tuple[float, ...] = ()
    label: str = ""
    vertical: bool = True


@dataclass(frozen=True)
class Bars:
    """Horizontal bars from 0, bar k on the k-th of the panel's ``categories`` (top to bottom); ``notes[k]`` =
    (text, inside) writes text at the bar's end, inside it (white) or just beyond it."""

    values: Sequence[float]
    colors: Sequence[str]
    notes: Sequence[tuple[str, bool]] = ()
    height: float = 0.7


Item = Line | Step | Band | Rule | Bars


@dataclass(frozen=True)
class Panel:
    """One axes. ``xlim``/``ylim`` fix a range (else the data's, with :data:`MARGIN`); ``categories`` makes y a
    list of names, top to bottom (bar k at y = k); ``legend``: '' (none in the panel), 'lower left', or 'best'
    (the upper corner the data leave emptier)."""

    items: Sequence[Item]
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    xlim: tuple[float, float] | None = None
    ylim: tuple[float, float] | None = None
    xlog: bool = False
    ylog: bool = False
    xticks: Sequence[float] | None = None
    categories: Sequence[str] = ()
    grid: str = "xy"
    legend: str = ""
    whole_y: bool = False  # y ticks at whole numbers only (counts)


MARKERS = ("o", "s", "^", "v", "<", ">", "D", "P")


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values inside ``[lo, hi]`` (steps 1, 2, 2.5 or 5 × 10^k, about ``target`` of them)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis over ``[lo, hi]`` (both > 0): the powers of ten inside, with 2× and 5× between them
    when fewer than three powers fall inside, and round linear ticks when even those are fewer than two."""
    k0, k1 = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    ticks = [10.0 ** k for k in range(k0, k1 + 1)]
    if len(ticks) < 3:
        ticks = sorted(m * 10.0 ** k for k in range(k0 - 1, k1 + 1) for m in (1, 2, 5)
                       if lo * (1 - 1e-9) <= m * 10.0 ** k <= hi * (1 + 1e-9))
    return ticks if len(ticks) >= 2 else nice_ticks(lo, hi)


def tick_label(v: float, step: float | None) -> str:
    """A tick's text with the decimals a linear ``step`` needs (``None``: a log axis, shortest form), a true minus."""
    if step is None:
        text = f"{v:g}"
    else:
        decimals = next(d for d in range(13) if abs(round(step * 10 ** d) - step * 10 ** d) < 1e-6)
        text = f"{v:.{decimals}f}"
        if float(text) == 0:
            text = text.lstrip("-")
    return text.replace("-", "\u2212")


def text_width(text: str, size: float) -> float:
    """About how wide ``text`` is drawn at ``size`` px in a sans-serif face (for margins and legends)."""
    return 0.56 * size * len(str(text))


def _text(value: str) -> str:
    return str(value) if isinstance(value, Markup) else escape(str(value))


def _words(value: str) -> str:
    """``value`` as plain text: a :class:`Markup` fragment without its tags, anything else as it is."""
    return value.striptags() if isinstance(value, Markup) else str(value)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _dash(dash: Sequence[float], width: float) -> str:
    return f' stroke-dasharray="{" ".join(f"{d * width:.1f}" for d in dash)}"' if dash else ""


def _marker(kind: str, cx: float, cy: float, size: float, fill: str, edge: str, tip: str = "") -> str:
    r = size / 2
    look = f'fill="{fill}"' + (f' stroke="{edge}" stroke-width="1"' if edge else "")
    inner = f"<title>{_text(tip)}</title>" if tip else ""
    if kind == "o":
        return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" {look}>{inner}</circle>'
    points = {"s": [(-r, -r), (r, -r), (r, r), (-r, r)],
              "^": [(0, -r), (r, r), (-r, r)], "v": [(0, r), (r, -r), (-r, -r)],
              "<": [(-r, 0), (r, -r), (r, r)], ">": [(r, 0), (-r, -r), (-r, r)],
              "D": [(0, -r), (0.75 * r, 0), (0, r), (-0.75 * r, 0)],
              "P": [(-r / 3, -r), (r / 3, -r), (r / 3, -r / 3), (r, -r / 3), (r, r / 3), (r / 3, r / 3),
                    (r / 3, r), (-r / 3, r), (-r / 3, r / 3), (-r, r / 3), (-r, -r / 3), (-r / 3, -r / 3)]}[kind]
    d = "M" + "L".join(f"{cx + dx:.1f} {cy + dy:.1f}" for dx, dy in points) + "Z"
    return f'<path d="{d}" {look}>{inner}</path>'


class _Scale:
    """Data → pixels along one axis (linear or log10), ``lo`` at pixel ``p0`` and ``hi`` at ``p1``."""

    def __init__(self, lo: float, hi: float, p0: float, p1: float, log: bool) -> None:
        self.log = log
        self.lo, self.hi = (math.log10(lo), math.log10(hi)) if log else (lo, hi)
        self.p0, self.p1 = p0, p1

    def __call__(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.p0 + (t - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)


def _extent(values: list[float], lim: tuple[float, float] | None, log: bool) -> tuple[float, float]:
    """An axis range: ``lim``, else the values' range widened by :data:`MARGIN` on each side (in log10 on a log
    axis, whose non-positive values are left out)."""
    if lim is not None:
        return lim
    vals = [v for v in values if _finite(v) and (v > 0 or not log)]
    if not vals:
        return (1.0, 10.0) if log else (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    if hi == lo:
        lo, hi = lo - (0.5 if log or lo == 0 else 0.05 * abs(lo)), hi + (0.5 if log or hi == 0 else 0.05 * abs(hi))
    pad = MARGIN * (hi - lo)
    lo, hi = lo - pad, hi + pad
    return (10.0 ** lo, 10.0 ** hi) if log else (lo, hi)


def _xs(item: Item) -> list[float]:
    if isinstance(item, Line | Band):
        return list(item.x)
    if isinstance(item, Step):
        return list(item.edges)
    if isinstance(item, Bars):
        return [0.0, *item.values]
    return [item.at] if item.vertical else []


def _ys(item: Item) -> list[float]:
    if isinstance(item, Line):
        return list(item.y)
    if isinstance(item, Band):
        return [*item.lo, *item.hi]
    if isinstance(item, Step):
        return [0.0, *item.counts]
    if isinstance(item, Rule):
        return [] if item.vertical else [item.at]
    return []


def _path(points: Sequence[tuple[float, float]]) -> str:
    return "M" + "L".join(f"{x:.1f} {y:.1f}" for x, y in points)


def _swatch(item: Item, x: float, y: float) -> str:
    """A legend entry's sample, 26 px wide, centred on the text line at height ``y``."""
    if isinstance(item, Step):
        return (f'<rect x="{x + 4:.1f}" y="{y - 4.5:.1f}" width="18" height="9" fill="none" stroke="{item.color}" '
                f'stroke-width="2"/>')
    if isinstance(item, Band):
        return (f'<rect x="{x + 2:.1f}" y="{y - 5:.1f}" width="22" height="10" fill="{item.color}" '
                f'fill-opacity="{item.opacity}"/>')
    out = ""
    if not isinstance(item, Line) or item.stroke:
        out += (f'<path d="M{x:.1f} {y:.1f}H{x + 26:.1f}" stroke="{item.color}" stroke-width="{item.width:.2f}"'
                f'{_dash(item.dash, item.width)} fill="none"/>')
    if isinstance(item, Line) and item.marker:
        out += _marker(item.marker, x + 13, y, max(item.size, 5.0), item.color, item.edge)
    return out


def _legend_items(items: Sequence[Item]) -> list[Item]:
    """The items with a label, each label once (its first item)."""
    seen, out = set(), []
    for item in items:
        label = getattr(item, "label", "")
        if label and label not in seen:
            seen.add(label)
            out.append(item)
    return out


def _legend_rows(items: Sequence[Item], x: float, y: float) -> list[str]:
    """A legend as one column of entries, the first centred at height ``y``."""
    out = []
    for k, item in enumerate(items):
        yy = y + 17 * k
        out.append(_swatch(item, x, yy))
        out.append(f'<text class="legend" x="{x + 32:.1f}" y="{yy + 4:.1f}" font-size="{LEGEND_FONT}">'
                   f'{_text(item.label)}</text>')
    return out


def legend_width(items: Sequence[Item]) -> float:
    return 40 + max((text_width(i.label, LEGEND_FONT) for i in items), default=0)


def _draw(item: Item, sx: _Scale, sy: _Scale, bar_height: float) -> list[str]:
    if isinstance(item, Band):
        keep = [(x, lo, hi) for x, lo, hi in zip(item.x, item.lo, item.hi) if _finite(lo) and _finite(hi)]
        if not keep:
            return []
        pts = [(sx(x), sy(hi)) for x, _, hi in keep] + [(sx(x), sy(lo)) for x, lo, _ in reversed(keep)]
        return [f'<path class="band" d="{_path(pts)}Z" fill="{item.color}" fill-opacity="{item.opacity}"/>']
    if isinstance(item, Rule):
        if item.vertical:
            d = f"M{sx(item.at):.1f} {sy.p0:.1f}V{sy.p1:.1f}"
        else:
            d = f"M{sx.p0:.1f} {sy(item.at):.1f}H{sx.p1:.1f}"
        return [f'<path class="rule" d="{d}" stroke="{item.color}" stroke-width="{item.width:.2f}"'
                f'{_dash(item.dash, item.width)} fill="none"/>']
    if isinstance(item, Step):
        e, c = list(item.edges), list(item.counts)
        d = [f"M{sx(e[0]):.1f} {sy(0):.1f}"] + [f"V{sy(c[i]):.1f}H{sx(e[i + 1]):.1f}" for i in range(len(c))]
        return [f'<path class="outline" d="{"".join(d)}V{sy(0):.1f}" stroke="{item.color}" '
                f'stroke-width="{item.width}" fill="none"/>']
    if isinstance(item, Bars):
        out, half = [], bar_height * item.height / 2
        for k, (v, color) in enumerate(zip(item.values, item.colors)):
            if not _finite(v):
                continue
            x0, x1, yc = sx(0), sx(v), sy(k)
            out.append(f'<rect class="bar" x="{min(x0, x1):.1f}" y="{yc - half:.1f}" width="{abs(x1 - x0):.1f}" '
                       f'height="{2 * half:.1f}" fill="{color}"/>')
            if k < len(item.notes):
                text, inside = item.notes[k]
                at = f'x="{x1 - 4:.1f}" text-anchor="end" fill="#fff"' if inside else f'x="{x1 + 4:.1f}"'
                out.append(f'<text class="note" {at} y="{yc + 4:.1f}" font-size="{LEGEND_FONT}">{_text(text)}</text>')
        return out
    out = []
    ok = [_finite(x) and _finite(y) and (x > 0 or not sx.log) and (y > 0 or not sy.log)
          for x, y in zip(item.x, item.y)]
    if item.stroke:
        runs, run = [], []
        for x, y, good in zip(item.x, item.y, ok):
            if good:
                run.append((sx(x), sy(y)))
            elif run:
                runs.append(run)
                run = []
        runs.append(run)
        d = "".join(_path(r) for r in runs if r)
        if d:
            out.append(f'<path class="line" d="{d}" stroke="{item.color}" stroke-width="{item.width:.2f}"'
                       f'{_dash(item.dash, item.width)} stroke-linejoin="round" fill="none"/>')
    if item.marker:
        tips = list(item.tips) + [""] * len(ok)
        out += [_marker(item.marker, sx(x), sy(y), item.size, item.color, item.edge, tip)
                for x, y, good, tip in zip(item.x, item.y, ok, tips) if good]
    return out


def _best_corner(items: Sequence[Item], sx: _Scale, sy: _Scale, box: tuple[float, float]) -> str:
    """'left' or 'right': the upper corner of the axes where a legend of ``box`` (w, h) px covers fewer points."""
    def covered(x0: float, x1: float) -> int:
        count = 0
        for item in items:
            if isinstance(item, Step):
                pts = [((a + b) / 2, c) for a, b, c in zip(item.edges, item.edges[1:], item.counts)]
            elif isinstance(item, Line):
                pts = list(zip(item.x, item.y))
            else:
                continue
            count += sum(1 for x, y in pts if _finite(x) and _finite(y) and x0 <= sx(x) <= x1
                         and sy(y) <= sy.p1 + box[1] + 10)
        return count
    left = covered(sx.p0, sx.p0 + box[0] + 20)
    right = covered(sx.p1 - box[0] - 20, sx.p1)
    return "left" if left <= right else "right"


def _panel(p: Panel, x0: float, y0: float, width: float, height: float, index: int) -> list[str]:
    """SVG elements of one panel whose top-left corner is (x0, y0)."""
    if p.categories:
        ylo, yhi = p.ylim or (-0.6, len(p.categories) - 0.4)
        yticks, ylabels = list(range(len(p.categories))), [str(c) for c in p.categories]
    else:
        ylo, yhi = _extent([v for it in p.items for v in _ys(it)], p.ylim, p.ylog)
        yticks = log_ticks(ylo, yhi) if p.ylog else nice_ticks(ylo, yhi, 6)
        if p.whole_y:
            yticks = [t for t in yticks if float(t).is_integer()]
        ystep = None if p.ylog else (yticks[1] - yticks[0] if len(yticks) > 1 else 1.0)
        ylabels = [tick_label(t, ystep) for t in yticks]
    top = y0 + (30 if p.title else 12)
    bottom = y0 + height - (48 if p.xlabel else 28)
    left = x0 + (24 if p.ylabel else 6) + max((text_width(t, TICK_FONT) for t in ylabels), default=0) + 10
    right = x0 + width - 14
    out = ['<g class="panel">']
    if p.title:
        out.append(f'<text class="title" x="{(left + right) / 2:.1f}" y="{y0 + 19:.1f}" text-anchor="middle" '
                   f'font-size="{TITLE_FONT}">{_text(p.title)}</text>')
    xlo, xhi = _extent([v for it in p.items for v in _xs(it)], p.xlim, p.xlog)
    sx = _Scale(xlo, xhi, left, right, p.xlog)
    # categories run down from the top; values up from the bottom
    sy = _Scale(ylo, yhi, top, bottom, False) if p.categories else _Scale(ylo, yhi, bottom, top, p.ylog)
    if p.xticks is not None:
        xticks = [t for t in p.xticks if xlo <= t <= xhi]
    else:
        xticks = log_ticks(xlo, xhi) if p.xlog else nice_ticks(xlo, xhi)
    xstep = None if p.xlog else (min(b - a for a, b in zip(xticks, xticks[1:])) if len(xticks) > 1 else 1.0)
    grid = [f"M{sx(t):.1f} {top:.1f}V{bottom:.1f}" for t in xticks] if "x" in p.grid else []
    grid += [f"M{left:.1f} {sy(t):.1f}H{right:.1f}" for t in yticks] if "y" in p.grid and not p.categories else []
    if grid:
        out.append(f'<path class="grid" d="{"".join(grid)}" {GRID}/>')
    clip = f"clip{index}"
    out.append(f'<clipPath id="{clip}"><rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
               f'height="{bottom - top:.1f}"/></clipPath><g clip-path="url(#{clip})">')
    bar_px = abs(sy(1) - sy(0)) if p.categories else 0.0
    for item in p.items:
        out += _draw(item, sx, sy, bar_px)
    out.append("</g>")
    out.append(f'<rect class="frame" x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
               f'height="{bottom - top:.1f}" fill="none" stroke="#000" stroke-width="1"/>')
    for t in xticks:
        out.append(f'<text class="xtick" x="{sx(t):.1f}" y="{bottom + 18:.1f}" text-anchor="middle" '
                   f'font-size="{TICK_FONT}">{tick_label(t, xstep)}</text>')
    for t, label in zip(yticks, ylabels):
        out.append(f'<text class="ytick" x="{left - 6:.1f}" y="{sy(t) + 5:.1f}" text-anchor="end" '
                   f'font-size="{TICK_FONT}">{_text(label)}</text>')
    if p.xlabel:
        out.append(f'<text class="xlabel" x="{(left + right) / 2:.1f}" y="{bottom + 40:.1f}" text-anchor="middle" '
                   f'font-size="{LABEL_FONT}">{_text(p.xlabel)}</text>')
    if p.ylabel:
        mid = (top + bottom) / 2
        out.append(f'<text class="ylabel" x="{x0 + 15:.1f}" y="{mid:.1f}" text-anchor="middle" '
                   f'font-size="{LABEL_FONT}" transform="rotate(-90 {x0 + 15:.1f} {mid:.1f})">{_text(p.ylabel)}</text>')
    entries = _legend_items(p.items) if p.legend else []
    if entries:
        box = (legend_width(entries), 17 * len(entries))
        if p.legend == "lower left":
            lx, ly = left + 8, bottom - 8 - box[1] + 8
        else:
            corner = _best_corner(p.items, sx, sy, box)
            lx, ly = (left + 8 if corner == "left" else max(left + 8, right - 8 - box[0])), top + 14
        out += _legend_rows(entries, lx, ly)
    return [*out, "</g>"]


def _pack(items: Sequence[Item], width: float) -> list[list[tuple[Item, float]]]:
    """Legend entries in rows of at most ``width`` px, in order: (item, its width with the gap after it)."""
    rows: list[list[tuple[Item, float]]] = [[]]
    for item in items:
        w = legend_width([item]) + 18
        if rows[-1] and sum(x for _, x in rows[-1]) + w > width:
            rows.append([])
        rows[-1].append((item, w))
    return rows


@dataclass(frozen=True)
class Figure:
    """Panels side by side (each ``panel_width`` × ``height`` px), a title above them and a legend of every
    labelled item (each label once) below them (``legend="bottom"``, in rows as wide as the figure) or on the right."""

    panels: Sequence[Panel]
    panel_width: float = 560
    height: float = 380
    suptitle: str = ""
    legend: str = ""
    empty: str = "nothing to draw"

    def svg(self) -> str:
        entries = _legend_items([it for p in self.panels for it in p.items]) if self.legend else []
        head = 32 if self.suptitle else 0
        n = max(len(self.panels), 1)
        side = legend_width(entries) + 10 if entries and self.legend == "right" else 0
        width = self.panel_width * n + side
        lines = _pack(entries, width - 20) if entries and self.legend == "bottom" else []
        rows = len(lines)
        height = head + self.height + (17 * rows + 16 if rows else 0)
        if side:  # a long legend on the right makes the figure taller, never runs off it
            height = max(height, head + 40 + 17 * len(entries))
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
                 f'viewBox="0 0 {width:.0f} {height:.0f}" {FONT} fill="#1f2328">',
                 f"<title>{escape(_words(self.suptitle)) if self.suptitle else 'figure'}</title>",
                 f'<rect width="{width:.0f}" height="{height:.0f}" fill="#fff"/>']
        if self.suptitle:
            parts.append(f'<text class="suptitle" x="{width / 2:.1f}" y="23" text-anchor="middle" '
                         f'font-size="{SUPTITLE_FONT}">{_text(self.suptitle)}</text>')
        for i, p in enumerate(self.panels):
            parts += _panel(p, self.panel_width * i, head, self.panel_width, self.height, i)
        if not self.panels:
            parts.append(f'<text x="{width / 2:.1f}" y="{head + self.height / 2:.1f}" text-anchor="middle" '
                         f'font-size="{LABEL_FONT}">{_text(self.empty)}</text>')
        for r, line in enumerate(lines):  # each row of entries centred under the panels
            x = (width - sum(w for _, w in line)) / 2
            for item, w in line:
                parts += _legend_rows([item], x, head + self.height + 10 + 17 * r)
                x += w
        if side:
            parts += _legend_rows(entries, width - side + 4, head + 30)
        parts.append("</svg>")
        return "\n".join(parts) + "\n"


__all__ = ["Band", "Bars", "Figure", "Line", "MARKERS", "Panel", "Rule", "Step", "log_ticks", "nice_ticks",
           "tick_label"]
