"""The SVG figures (mergescope.report.svg_plot) read back: every drawn coordinate, converted to data units through
the panel's own drawn ticks, is the value given — on linear and log axes, for lines, markers, bands and bars — and
the reports' figures draw their rows' numbers."""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from markupsafe import Markup

from mergescope.report.svg_plot import Band, Bars, Figure, Line, Panel, Rule, log_ticks, nice_ticks

NS = {"s": "http://www.w3.org/2000/svg"}


def _number(text: str) -> float:
    return float(text.replace("\u2212", "-"))


def _axis(ticks: list[tuple[float, float]], log: bool):
    """pixel -> value through the first and last drawn tick (their pixel, their value)."""
    (p0, v0), (p1, v1) = ticks[0], ticks[-1]
    if log:
        v0, v1 = math.log10(v0), math.log10(v1)
    def value(p: float) -> float:
        t = v0 + (p - p0) * (v1 - v0) / (p1 - p0)
        return 10 ** t if log else t
    return value


def _subpaths(d: str) -> list[list[tuple[float, float]]]:
    return [[(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+) (-?[\d.]+)", part)]
            for part in d.split("M")[1:]]


def read_panels(svg: str, xlog: bool = False, ylog: bool = False) -> list[dict]:
    """Per panel: lines (colour -> subpaths in data units), markers (colour -> points), bars ((x0, x1) in data
    units), bands (outline points), categories, legend texts — all converted through the panel's drawn ticks."""
    out = []
    for g in ET.fromstring(svg).findall("s:g[@class='panel']", NS):
        xt = sorted((float(t.get("x")), _number(t.text)) for t in g.findall("s:text[@class='xtick']", NS))
        yt = [(float(t.get("y")) - 5, t.text) for t in g.findall("s:text[@class='ytick']", NS)]
        fx = _axis(xt, xlog)
        panel = {"xticks": [v for _, v in xt], "legend": [t.text for t in g.findall(".//s:text[@class='legend']", NS)],
                 "lines": {}, "markers": {}, "bars": [], "bands": []}
        try:
            fy = _axis(sorted((p, _number(v)) for p, v in yt), ylog)
            panel["yticks"] = sorted(_number(v) for _, v in yt)
        except ValueError:  # category names
            fy, panel["categories"] = None, [v for _, v in sorted(yt)]
        conv = (lambda x, y: (fx(x), fy(y) if fy else y))
        drawn = g.find("s:g[@clip-path]", NS)
        for p in drawn.findall("s:path[@class='line']", NS):
            panel["lines"].setdefault(p.get("stroke"), []).append([[conv(x, y) for x, y in sp] for sp in _subpaths(p.get("d"))])
        for c in drawn.findall("s:circle", NS):
            panel["markers"].setdefault(c.get("fill"), []).append(conv(float(c.get("cx")), float(c.get("cy"))))
        for p in drawn.findall("s:path[@class='band']", NS):
            panel["bands"].append([conv(x, y) for x, y in _subpaths(p.get("d"))[0]])
        for r in drawn.findall("s:rect[@class='bar']", NS):
            x, w = float(r.get("x")), float(r.get("width"))
            panel["bars"].append((fx(x), fx(x + w), float(r.get("y")) + float(r.get("height")) / 2))
        panel["frame"] = [float(g.find("s:rect[@class='frame']", NS).get(k)) for k in ("x", "y", "width", "height")]
        out.append(panel)
    return out


def test_lines_and_markers_read_back_to_their_values_through_the_drawn_ticks():
    rng = np.random.default_rng(0)
    x = np.linspace(-3.7, 12.2, 17)
    y1, y2 = rng.normal(5, 20, 17), rng.uniform(-0.004, 0.011, 17)
    y1[6] = math.nan  # a gap: the line breaks there, no marker
    svg = Figure([Panel([Line(x, y1, "#123456", marker="o", size=5, label="one")], "a", legend="best"),
                  Panel([Line(x, y2, "#abcdef", label="two"), Rule(0.0, vertical=False)], "b")]).svg()
    first, second = read_panels(svg)
    (runs,) = first["lines"]["#123456"]
    assert [len(r) for r in runs] == [6, 10]  # broken at the NaN
    got = np.array(runs[0] + runs[1])
    keep = ~np.isnan(y1)
    np.testing.assert_allclose(got[:, 0], x[keep], atol=0.02 * np.ptp(x) / 100)  # 0.1 px of ~500 px
    np.testing.assert_allclose(got[:, 1], y1[keep], atol=np.ptp(y1[keep]) / 1000)
    np.testing.assert_allclose(np.array(first["markers"]["#123456"]), got, atol=np.ptp(y1[keep]) / 1000)
    np.testing.assert_allclose(np.array(second["lines"]["#abcdef"][0][0])[:, 1], y2, atol=np.ptp(y2) / 1000)
    for panel, ys in ((first, y1[keep]), (second, y2)):  # every value inside the axes, ticks inside the range
        assert panel["yticks"][0] >= ys.min() - 0.06 * np.ptp(ys) and panel["yticks"][-1] <= ys.max() + 0.06 * np.ptp(ys)
        assert len(panel["yticks"]) >= 3
    assert first["legend"] == ["one"] and second["legend"] == []  # a panel's legend only where asked


def test_a_log_axis_places_values_by_their_logarithm_and_leaves_out_non_positive_ones():
    x = np.array([1 / 64, 1 / 16, 0.1, 0.25, 1.0])
    y = np.array([0.9, 0.0, 0.5, 0.7, 1.0])
    svg = Figure([Panel([Line(x, y, "#111111", marker="s", size=6)], xlog=True, ylim=(-0.05, 1.05))]).svg()
    (panel,) = read_panels(svg, xlog=True)
    assert panel["xticks"] == [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]  # two powers of ten inside: their 2× and 5× too
    got = np.array(panel["lines"]["#111111"][0][0])
    np.testing.assert_allclose(np.log10(got[:, 0]), np.log10(x), atol=1e-3)
    np.testing.assert_allclose(got[:, 1], y, atol=2e-3)
    svg = Figure([Panel([Line([1, 2, 3], [10.0, -1.0, 1000.0], "#222222")], ylog=True)]).svg()
    (panel,) = read_panels(svg, ylog=True)
    assert [len(r) for r in panel["lines"]["#222222"][0]] == [1, 1]  # −1 cannot be drawn on a log axis
    assert panel["yticks"] == [10.0, 100.0, 1000.0]


def test_bars_run_from_zero_to_their_value_on_their_category_with_rules_and_bands():
    values = [88.5, 12.25, 61.0]
    names = ["ot+repair", "<naive & co>", "permuted"]
    band = Band([0, 50, 100], [10, 20, 30], [15, 40, 35], "#999999", label="band")
    svg = Figure([Panel([Bars(values, ["#1", "#2", "#3"], [("88.5%", True), ("12.2%", False), ("61%", True)]),
                         Rule(50.0, label="mean")], categories=names, xlim=(0, 102), grid="x"),
                  Panel([band], "b", legend="lower left")], legend="bottom").svg()
    bars, banded = read_panels(svg)
    assert bars["categories"] == names  # top to bottom, escaped in the SVG
    assert "&lt;naive &amp; co&gt;" in svg
    for (x0, x1, _), v in zip(sorted(bars["bars"], key=lambda b: b[2]), values):
        assert abs(x0) < 0.1 and abs(x1 - v) < 0.1
    outline = np.array(banded["bands"][0])  # along hi, back along lo
    np.testing.assert_allclose(outline[:, 1], [15, 40, 35, 30, 20, 10], atol=0.1)
    assert banded["legend"] == ["band"]
    legend = [t.text for t in ET.fromstring(svg).findall("s:text[@class='legend']", NS)]
    assert legend == ["mean", "band"]  # the figure's legend: every label once, in order


def test_text_is_escaped_unless_it_is_markup_and_nothing_runs_outside_the_axes():
    svg = Figure([Panel([Line([0, 1], [0, 2], "#000", label='<b>"x"</b>')], title="a < b", xlabel="&",
                        ylim=(0, 1))], suptitle=Markup("θ<tspan baseline-shift='sub'>A</tspan>"), legend="right").svg()
    root = ET.fromstring(svg)  # well-formed
    assert "&lt;b&gt;&quot;x&quot;&lt;/b&gt;" in svg or "&lt;b&gt;&#34;x&#34;&lt;/b&gt;" in svg
    assert "a &lt; b" in svg and "<tspan baseline-shift='sub'>A</tspan>" in svg
    assert root.find("s:title", NS).text == "θA"
    clip = root.find(".//s:clipPath/s:rect", NS)
    frame = root.find(".//s:rect[@class='frame']", NS)
    assert [clip.get(k) for k in ("x", "y", "width", "height")] == [frame.get(k) for k in ("x", "y", "width", "height")]


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 1.0), (3.2, 1187.0), (-0.0042, 0.0117), (96.1, 98.3)])
def test_nice_ticks_are_round_evenly_spaced_and_inside(lo, hi):
    ticks = nice_ticks(lo, hi)
    steps = np.diff(ticks)
    assert 3 <= len(ticks) <= 11 and np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(abs(mantissa - m) < 1e-9 for m in (1, 2, 2.5, 5))
    assert lo - 1e-12 <= ticks[0] and ticks[-1] <= hi + 1e-12


def test_log_ticks_are_powers_of_ten_or_their_halves_and_fifths():
    assert log_ticks(0.004, 1.2) == [0.01, 0.1, 1.0]
    assert log_ticks(0.03, 0.6) == [0.05, 0.1, 0.2, 0.5]
    assert log_ticks(0.03, 2.0) == [0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
    assert log_ticks(0.11, 0.19) == nice_ticks(0.11, 0.19)


def test_the_interpolation_figure_draws_each_methods_rows():
    """The report's figure against its rows: each method's accuracy line read back is 100 × its accuracies, its
    loss line its losses (on a log axis once they span more than 30×), its endpoints outlined markers."""
    from mergescope.report.figures import method_colors, plot_interpolation

    alphas = [round(0.1 * i, 1) for i in range(11)]
    acc = {"naive": [0.9 - 0.8 * a * (1 - a) * 4 for a in alphas], "permuted+repair": [0.9 - 0.05 * a * (1 - a) for a in alphas]}
    loss = {"naive": [0.2 + 30 * a * (1 - a) for a in alphas], "permuted+repair": [0.2 + a * (1 - a) for a in alphas]}
    rows = [{"method": m, "alpha": a, "split": "test", "accuracy": acc[m][i], "loss": loss[m][i]}
            for m in acc for i, a in enumerate(alphas)]
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        svg = plot_interpolation(rows, "test", Path(tmp) / "f.svg").read_text(encoding="utf-8")
    colors = method_colors(list(acc))
    acc_panel, = read_panels(svg)[:1]
    loss_panel = read_panels(svg, ylog=True)[1]
    for m in acc:
        (run,) = acc_panel["lines"][colors[m]][0]
        np.testing.assert_allclose(np.array(run), np.c_[alphas, np.array(acc[m]) * 100], atol=0.05)
        (run,) = loss_panel["lines"][colors[m]][0]
        np.testing.assert_allclose(np.log10(np.array(run)[:, 1]), np.log10(loss[m]), atol=2e-3)
    assert "Loss (log scale)" in svg
    ends = [c for c in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}circle") if c.get("stroke") == "#000"
            and float(c.get("r")) == 6.0]
    assert len(ends) == 2 * 2 * 2 + 1  # two endpoints × two methods × two panels, and the legend's key


@pytest.mark.parametrize("items, kwargs", [
    ([Line([0.5], [3.0], "#000", marker="o", size=4)], {}),  # one point
    ([Line([1, 2, 3], [7.0, 7.0, 7.0], "#000")], {}),  # constant
    ([Line([1, 2], [math.nan, math.inf], "#000", marker="s", size=4)], {}),  # nothing finite
    ([Line([0.01], [0.5], "#000")], {"xlog": True}),  # one point on a log axis
    ([Line([1, 2], [-1.0, 0.0], "#000")], {"ylog": True}),  # nothing positive on a log axis
    ([], {}),  # an empty panel
    ([Bars([], [])], {"categories": []}),
    ([Band([0, 1], [math.nan, 1.0], [math.nan, 2.0], "#999")], {}),
])
def test_degenerate_data_still_gives_a_well_formed_figure_with_finite_coordinates(items, kwargs):
    svg = Figure([Panel(items, "t", "x", "y", **kwargs)], legend="bottom").svg()
    ET.fromstring(svg)
    assert not re.search(r"nan|inf", svg, re.IGNORECASE)
