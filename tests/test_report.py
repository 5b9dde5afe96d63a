"""Tests for mergescope.report: barriers, CSV, figures and the HTML page."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import escape

from mergescope.errors import MergescopeError
from mergescope.report import barriers, headline, interpolation_figures, method_colors, read_csv, render_report, write_csv
from mergescope.report import html as report_html

ALPHAS = [round(0.05 * i, 2) for i in range(21)]
# Accuracy at α = 0 (model B), α = 1 (model A), and the dip depth at α = 0.5, per method.
DIPS = {"naive": 0.85, "permuted": 0.20, "permuted+repair": 0.03, "permuted+reset": 0.06}


def _row(method, alpha, split, loss, accuracy):
    return {"method": method, "alpha": alpha, "split": split, "loss": loss, "accuracy": accuracy}


def synthetic_rows(splits=("test", "train")):
    """Smooth curves whose accuracy dips by DIPS[method]·(1 − |2α − 1|) below the line between endpoints."""
    rows = []
    for split in splits:
        acc_b, acc_a = (0.969, 0.972) if split == "test" else (0.995, 0.997)
        for method, dip in DIPS.items():
            for a in ALPHAS:
                bump = 1 - abs(2 * a - 1)
                acc = (1 - a) * acc_b + a * acc_a - dip * bump
                loss = 0.1 + 2.2 * dip * bump
                rows.append(_row(method, a, split, loss, acc))
    return rows


def synthetic_results(title="ResNet-20 × CIFAR-10"):
    return {
        "title": title,
        "summary": {"architecture": "resnet20", "dataset": "cifar10", "seeds": [0, 1], "runtime_s": 12.5},
        "endpoints": [
            {"model": "A", "split": "test", "loss": 0.1, "accuracy": 0.972},
            {"model": "B", "split": "test", "loss": 0.1, "accuracy": 0.969},
        ],
        "rows": synthetic_rows(),
        "matching": [{"group": "block1.conv", "size": 64, "mean_correlation": 0.61, "dead_a": 0, "dead_b": 2}],
        "sections": [{"title": "Extra", "html": "<p class='extra'>pre-rendered <b>fragment</b></p>"}],
    }


# ---------------------------------------------------------------- barriers


def test_v_shaped_loss_barrier_matches_hand_computation():
    # Endpoints L(0) = 1, L(1) = 3; the straight line at α = 0.5 is 2; the curve peaks at 5 there.
    rows = [_row("m", 0.0, "test", 1.0, 0.9), _row("m", 0.25, "test", 3.0, 0.6),
            _row("m", 0.5, "test", 5.0, 0.3), _row("m", 0.75, "test", 4.0, 0.6), _row("m", 1.0, "test", 3.0, 0.8)]
    (b,) = barriers(rows)
    assert b["method"] == "m" and b["split"] == "test"
    # gaps: α=.25: 3 − 1.5 = 1.5; α=.5: 5 − 2 = 3; α=.75: 4 − 2.5 = 1.5
    assert b["loss_barrier"] == pytest.approx(3.0)
    assert b["alpha_at_loss_barrier"] == pytest.approx(0.5)
    # accuracy line at α=.25: 0.875 → gap 0.275; α=.5: 0.85 → 0.55; α=.75: 0.825 → 0.225
    assert b["accuracy_barrier"] == pytest.approx(0.55)
    assert b["midpoint_loss"] == pytest.approx(5.0)
    assert b["midpoint_accuracy"] == pytest.approx(0.3)


def test_straight_line_has_zero_barrier():
    rows = [_row("m", a, "train", 2.0 - 1.5 * a, 0.5 + 0.4 * a) for a in ALPHAS]
    (b,) = barriers(rows)
    assert b["loss_barrier"] == pytest.approx(0.0, abs=1e-12)
    assert b["accuracy_barrier"] == pytest.approx(0.0, abs=1e-12)
    assert b["midpoint_accuracy"] == pytest.approx(0.7)


def test_barriers_use_each_methods_own_endpoints_and_sort_by_alpha():
    rows = [_row("x", 1.0, "test", 4.0, 0.5), _row("x", 0.5, "test", 6.0, 0.5), _row("x", 0.0, "test", 2.0, 0.5),
            _row("y", 0.0, "test", 0.0, 1.0), _row("y", 0.5, "test", 1.0, 0.2), _row("y", 1.0, "test", 0.0, 1.0)]
    by = {b["method"]: b for b in barriers(rows)}
    assert by["x"]["loss_barrier"] == pytest.approx(3.0)  # 6 − (2 + 4) / 2
    assert by["x"]["accuracy_barrier"] == pytest.approx(0.0)
    assert by["y"]["loss_barrier"] == pytest.approx(1.0)
    assert by["y"]["accuracy_barrier"] == pytest.approx(0.8)


def test_barriers_against_the_models_themselves_when_given():
    """A map merge whose α = 0 is a poor rewrite of B: against its own endpoints the curve looks flat, against
    models A and B it has a barrier; only the split whose A and B are both known changes."""
    rows = [_row("map", 0.0, s, 3.0, 0.5) for s in ("test", "train")] + \
        [_row("map", 0.5, s, 2.0, 0.7) for s in ("test", "train")] + [_row("map", 1.0, s, 1.0, 0.9) for s in ("test", "train")]
    ends = [{"model": "A", "split": "test", "loss": 1.0, "accuracy": 0.9},
            {"model": "B", "split": "test", "loss": 1.0, "accuracy": 0.9},
            {"model": "A", "split": "train", "loss": 1.0, "accuracy": 0.9}]
    own = {b["split"]: b for b in barriers(rows)}
    real = {b["split"]: b for b in barriers(rows, ends)}
    assert own["test"]["loss_barrier"] == pytest.approx(0.0) and own["test"]["accuracy_barrier"] == pytest.approx(0.0)
    assert real["test"]["loss_barrier"] == pytest.approx(2.0)  # at α = 0: 3 − 1
    assert real["test"]["alpha_at_loss_barrier"] == 0.0
    assert real["test"]["accuracy_barrier"] == pytest.approx(0.4)  # at α = 0: 0.9 − 0.5
    assert real["train"] == own["train"]  # B's train record is missing: the curve's own endpoints


def test_the_midpoint_is_measured_never_interpolated():
    rows = [_row("m", a, "test", l, acc) for a, l, acc in [(0.0, 1.0, 0.9), (0.4, 2.0, 0.5), (0.6, 4.0, 0.3), (1.0, 1.0, 0.9)]]
    (b,) = barriers(rows)  # between α = 0.4 and 0.6 the curve can be anything: no guess
    assert math.isnan(b["midpoint_loss"]) and math.isnan(b["midpoint_accuracy"])
    (b,) = barriers(rows + [_row("m", 0.5, "test", 7.0, 0.1)])
    assert b["midpoint_loss"] == 7.0 and b["midpoint_accuracy"] == 0.1


def test_missing_endpoint_is_an_error():
    with pytest.raises(MergescopeError, match="α = 1"):
        barriers([_row("m", 0.0, "test", 1.0, 0.9), _row("m", 0.5, "test", 2.0, 0.5)])


def test_nan_curve_gives_nan_barrier():
    rows = [_row("m", 0.0, "test", 1.0, 0.9), _row("m", 0.5, "test", math.nan, 0.5), _row("m", 1.0, "test", 1.0, 0.9)]
    (b,) = barriers(rows)
    assert math.isnan(b["loss_barrier"]) and b["accuracy_barrier"] == pytest.approx(0.4)


# ---------------------------------------------------------------- CSV


def test_csv_round_trip_is_exact(tmp_path):
    rows = synthetic_rows() + [_row("weird, \"name\"", 0.1, "val", 1e-300, 1 / 3), _row("n", 0.0, "val", math.inf, 0.0)]
    path = write_csv(tmp_path / "sub" / "interp.csv", rows)
    assert path.read_text().splitlines()[0] == "method,alpha,split,loss,accuracy"
    back = read_csv(path)
    assert back == rows
    assert not [p for p in path.parent.iterdir() if p.name != "interp.csv"]  # no temp files left


def test_csv_rejects_rows_without_required_columns(tmp_path):
    with pytest.raises(MergescopeError, match="accuracy"):
        write_csv(tmp_path / "x.csv", [{"method": "m", "alpha": 0, "split": "test", "loss": 1.0}])
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------- headline and HTML


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_headline_names_lowest_barrier_method_and_direct_average():
    text = headline(synthetic_rows(), synthetic_results()["endpoints"])
    # the dips peak at α = 0.5: barriers = DIPS; α = 0.5: line = (0.969 + 0.972) / 2 = 0.9705; repair − 0.03 = 94.05
    # → "94.0%" or "94.1%"; naive − 0.85 = 12.05
    assert re.match(r"permuted\+repair has the smallest test accuracy barrier, \+3\.0 pts \(the largest drop of "
                    r"accuracy below the straight line from model B at α = 0 to model A at α = 1\), and reaches "
                    r"94\.[01]% at α = 0\.5; the direct average \+85\.0 pts, 12\.[01]% at α = 0\.5 \(endpoints", text)
    assert "model A 97.2%, model B 96.9%" in text
    assert "the best at α = 0.5" not in text  # the lowest barrier is also the best midpoint here


def test_headline_without_naive_compares_with_the_largest_barrier():
    rows = [r for r in synthetic_rows(("test",)) if r["method"] != "naive"]
    text = headline(rows)  # endpoints come from the curve itself
    assert re.match(r"permuted\+repair has the smallest test accuracy barrier, \+3\.0 pts \(the largest drop of "
                    r"accuracy below the straight line between the method's own accuracies at α = 0 and α = 1\), and "
                    r"reaches 94\.[01]% at α = 0\.5; the largest, \+20\.0 pts, is permuted's", text)
    assert "model A 97.2%, model B 96.9%" in text


# Q1 (000 Fig. 3.1) asks whether the path crosses a barrier: the featured merge is the one of the smallest accuracy
# barrier, not the best at α = 0.5. Models: B 96.0%, A 97.0% on test; the line from B to A is 0.96 + 0.01·α.
Q1_ENDS = [{"model": "A", "split": "test", "loss": 0.1, "accuracy": 0.97},
           {"model": "B", "split": "test", "loss": 0.1, "accuracy": 0.96}]
Q1_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
Q1_CURVES = {  # accuracy at Q1_ALPHAS, and the accuracy barrier against models A and B worked out by hand
    # α = 0 is B rewritten in A's basis, 70%: 0.96 − 0.70 = 0.26 there; above the line at α = 0.5 (98.1%)
    "regression+repair": ((0.70, 0.95, 0.981, 0.975, 0.97), 0.26),
    "naive": ((0.96, 0.40, 0.12, 0.45, 0.97), 0.965 - 0.12),
    "permuted": ((0.96, 0.85, 0.80, 0.86, 0.97), 0.965 - 0.80),
    # the smallest: 0.965 − 0.949 = 0.016 at α = 0.5
    "permuted+repair": ((0.96, 0.955, 0.949, 0.96, 0.97), 0.965 - 0.949),
}


def q1_rows(curves=None, split="test"):
    return [_row(m, a, split, 0.1 + (0.97 - acc), acc) for m, (accs, _) in (curves or Q1_CURVES).items()
            for a, acc in zip(Q1_ALPHAS, accs)]


def test_hand_built_q1_barriers_are_the_hand_computed_ones():
    by = {b["method"]: b for b in barriers(q1_rows(), Q1_ENDS)}
    for method, (_, barrier) in Q1_CURVES.items():
        assert by[method]["accuracy_barrier"] == pytest.approx(barrier, abs=1e-12), method


def test_headline_features_the_smallest_barrier_not_the_best_midpoint():
    text = headline(q1_rows(), Q1_ENDS)
    assert text.startswith("permuted+repair has the smallest test accuracy barrier, +1.6 pts (the largest drop of "
                           "accuracy below the straight line from model B at α = 0 to model A at α = 1), and reaches "
                           "94.9% at α = 0.5; the direct average +84.5 pts, 12.0% at α = 0.5; ")
    # the best midpoint is named as such, with its barrier, so it is not mistaken for the answer
    assert "; regression+repair, the best at α = 0.5 (98.1%), has a barrier of +26.0 pts (endpoints: model A " \
           "97.0%, model B 96.0%)." in text
    # against its own α = 0 end (70%) regression+repair looks barrier-free: the headline must use models A and B
    assert not headline(q1_rows()).startswith("permuted+repair")


def test_headline_breaks_equal_barriers_by_the_higher_midpoint():
    # both drop 0.05 below the line at α = 0.25 (the same numbers, so exactly equal barriers); at α = 0.5 "late"
    # keeps more accuracy. Whatever their order, "late" is featured; a merge with a larger barrier never is.
    tied = {"early": ((0.96, 0.9125, 0.93, 0.96, 0.97), 0.05), "late": ((0.96, 0.9125, 0.95, 0.96, 0.97), 0.05),
            "worse": ((0.96, 0.9, 0.96, 0.96, 0.97), 0.0625)}
    stats = barriers(q1_rows(tied), Q1_ENDS)
    assert stats[0]["accuracy_barrier"] == stats[1]["accuracy_barrier"]
    for order in (("early", "late", "worse"), ("late", "early", "worse"), ("worse", "early", "late")):
        text = headline(q1_rows({m: tied[m] for m in order}), Q1_ENDS)
        assert text.startswith("late has the smallest test accuracy barrier, +5.0 pts"), order
        assert "worse, the best at α = 0.5 (96.0%), has a barrier of +6.2 pts" in text, order


def test_headline_skips_a_merge_whose_barrier_is_nan():
    # "broken" (listed first) has no accuracy at α = 0.75: its barrier is NaN, so it is neither the answer nor,
    # although its 99.0% at α = 0.5 is the best, the best midpoint named beside it
    curves = {"broken": ((0.96, 0.96, 0.99, math.nan, 0.97), math.nan), **Q1_CURVES}
    stats = barriers(q1_rows(curves), Q1_ENDS)
    assert math.isnan(stats[0]["accuracy_barrier"]) and stats[0]["midpoint_accuracy"] == 0.99
    text = headline(q1_rows(curves), Q1_ENDS)
    assert text.startswith("permuted+repair has the smallest test accuracy barrier, +1.6 pts") and "broken" not in text
    assert "regression+repair, the best at α = 0.5 (98.1%), has a barrier of +26.0 pts" in text
    only_broken = {"broken": curves["broken"]}
    assert headline(q1_rows(only_broken), Q1_ENDS) == "No merge has a finite accuracy barrier on the test split."


def test_headline_with_only_the_direct_average():
    text = headline(q1_rows({"naive": Q1_CURVES["naive"]}), Q1_ENDS)
    assert text == ("The direct average (naive) has a test accuracy barrier of +84.5 pts (the largest drop of accuracy "
                    "below the straight line from model B at α = 0 to model A at α = 1), and reaches 12.0% at "
                    "α = 0.5 (endpoints: model A 97.0%, model B 96.0%).")


def test_report_tags_the_smallest_barrier_card_best(tmp_path):
    results = {"title": "q1", "summary": {}, "endpoints": Q1_ENDS, "rows": q1_rows()}
    page = render_report(tmp_path, results).read_text(encoding="utf-8")
    tags = {method: role for role, method in re.findall(r'<div class="card ?(\w*)"[^>]*>\s*<div><span '
                                                        r'class="name">([^<]+)</span>', page)}
    assert tags == {"regression+repair": "", "naive": "baseline", "permuted": "", "permuted+repair": "best"}
    assert str(escape(headline(results["rows"], results["endpoints"]))) in page


def test_method_colours_are_fixed_and_distinct():
    colors = method_colors(["custom", "permuted+REPAIR", "naive", "other"])
    assert colors["permuted+REPAIR"] == method_colors(["permuted+repair"])["permuted+repair"]
    assert len(set(colors.values())) == 4


def test_figures_survive_awkward_names_and_values(tmp_path):
    rows = [_row("cost $x$", a, "held-out $", math.inf if a == 0.5 else 1.0 + a, 0.5) for a in ALPHAS]
    rows += [_row("naive", a, "test", 1e-3 + a * (1 - a) * 10, 0.9 - a * (1 - a)) for a in ALPHAS]
    paths = interpolation_figures(rows, tmp_path)
    assert [p.name for p in paths] == ["interpolation_test.svg", "interpolation_held-out__.svg"]
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_render_report_writes_page_with_numbers_methods_and_existing_images(tmp_path):
    results = synthetic_results()
    page_path = render_report(tmp_path, results)
    assert page_path == tmp_path / "report.html"
    page = page_path.read_text(encoding="utf-8")

    assert str(escape(headline(results["rows"], results["endpoints"]))) in page
    for method in DIPS:
        assert f">{method}<" in page
    assert "12.5" in page and "resnet20" in page and "block1.conv" in page
    assert "<p class='extra'>pre-rendered <b>fragment</b></p>" in page  # sections are inserted as-is
    assert "<details>" in page and "http://" not in page and "https://" not in page

    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) == 2  # test and train
    for src in parser.srcs:
        assert not src.startswith("/") and (tmp_path / src).is_file()
        assert ET.parse(tmp_path / src).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert parser.srcs[0].endswith("interpolation_test.svg")


def test_headline_numbers_appear_in_page(tmp_path):
    results = synthetic_results()
    page = render_report(tmp_path, results).read_text(encoding="utf-8")
    text = headline(results["rows"], results["endpoints"])
    for number in re.findall(r"\d+\.\d%", text):
        assert number in page
    assert "permuted+repair" in page and "direct average" in page


def test_html_special_characters_in_user_strings_are_escaped(tmp_path):
    results = synthetic_results(title='<script>alert("x")</script> & co')
    results["summary"]["note"] = "<b>bold?</b>"
    for row in results["rows"]:
        if row["method"] == "permuted":
            row["method"] = "perm<i>"
    page = render_report(tmp_path, results).read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>bold?</b>" not in page and "perm<i>" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co" in page
    assert "perm&lt;i&gt;" in page


def test_failed_render_leaves_no_report(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("figures failed")

    import mergescope.report.figures as report_figures  # the page imports its figures when it draws them

    monkeypatch.setattr(report_figures, "interpolation_figures", broken)
    with pytest.raises(RuntimeError, match="figures failed"):
        render_report(tmp_path, synthetic_results())
    assert not (tmp_path / "report.html").exists()
    assert not list(tmp_path.glob("*report.html*"))


def test_failed_rerender_keeps_previous_report_intact(tmp_path, monkeypatch):
    good = render_report(tmp_path, synthetic_results()).read_text(encoding="utf-8")

    def broken_render(*args, **kwargs):
        raise RuntimeError("template failed")

    monkeypatch.setattr(report_html, "report_context", broken_render)
    with pytest.raises(RuntimeError):
        render_report(tmp_path, synthetic_results(title="second"))
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "report.html"]


def test_render_report_without_rows_is_an_error(tmp_path):
    with pytest.raises(MergescopeError, match="rows"):
        render_report(tmp_path, {"title": "empty", "rows": []})
    assert not (tmp_path / "report.html").exists()


def _svg_panels(svg: str) -> list[dict]:
    """Per panel of a histogram SVG: its title, legend texts and, per outline, (colour, the counts read back from
    the path's heights against the panel's drawn y ticks)."""
    import xml.etree.ElementTree as ET

    ns = {"s": "http://www.w3.org/2000/svg"}
    panels = []
    for g in ET.fromstring(svg).findall("s:g[@class='panel']", ns):
        texts = {c: [t for t in g.findall(f"s:text[@class='{c}']", ns)] for c in ("title", "ytick", "legend")}
        ticks = sorted((float(t.get("y")) - 5, float(t.text.replace("\u2212", "-"))) for t in texts["ytick"])
        (p0, v0), (p1, v1) = ticks[0], ticks[-1]  # the top and bottom tick: pixel, value
        outlines = []
        for p in g.findall(".//s:path[@class='outline']", ns):  # inside the panel's clipped group
            heights = [float(v) for v in re.findall(r"V([\d.]+)", p.get("d"))[:-1]]  # the last V: back to 0
            outlines.append((p.get("stroke"), [round(v0 + (h - p0) * (v1 - v0) / (p1 - p0), 3) for h in heights]))
        panels.append({"title": texts["title"][0].text, "legend": [t.text for t in texts["legend"]],
                       "outlines": outlines})
    return panels


def test_metric_histograms_are_an_svg_whose_outlines_are_the_counts(tmp_path):
    """The compare figures (SVG, no matplotlib): one panel per metric with values, one outline per pair whose
    heights, read back against the drawn y ticks, are np.histogram's 20 counts over the metric's range."""
    import numpy as np

    from mergescope.report.compare_figures import plot_metric_histograms

    rng = np.random.default_rng(3)
    values = {"kendall_tau": {"B": rng.uniform(-1, 1, 300), "C & <D>": rng.uniform(-0.2, 0.9, 120)},
              "clip_delta": {"B": rng.uniform(0.1, 0.4, 77)},
              "overlap": {"B": np.array([])}}  # no usable channel: no panel
    titles = {"kendall_tau": "Kendall τ on D′ (50 images)", "clip_delta": "fallback-δ of the top-k"}
    path = plot_metric_histograms(values, titles, tmp_path / "compare_l.svg", suptitle="layer l: usable $x$")
    svg = path.read_text(encoding="utf-8")
    assert path.suffix == ".svg" and "layer l: usable $x$" in svg and "C &amp; &lt;D&gt; (n=120)" in svg
    panels = _svg_panels(svg)
    assert [p["title"] for p in panels] == [titles["kendall_tau"], titles["clip_delta"]]
    tau, delta = panels
    assert [c for c, _ in tau["outlines"]] == ["#1f77b4", "#ff7f0e"]  # the pair colours, in order
    for (_, got), v in zip(tau["outlines"], values["kendall_tau"].values()):  # drawn to 0.1 px
        np.testing.assert_allclose(got, np.histogram(v, bins=20, range=(-1, 1))[0], atol=0.05)
    v = values["clip_delta"]["B"]
    want = np.histogram(v, bins=20, range=(v.min(), v.max()))[0]
    np.testing.assert_allclose(delta["outlines"][0][1], want, atol=0.05)
    assert delta["legend"] == ["B (n=77)"] and tau["legend"] == ["B (n=300)", "C & <D> (n=120)"]
    empty = plot_metric_histograms({"overlap": {"B": np.array([])}}, {}, tmp_path / "e.svg").read_text()
    assert "no usable channels" in empty and "<path" not in empty


def test_no_figure_imports_matplotlib(tmp_path):
    """Every figure is SVG written by :mod:`mergescope.report.svg_plot` (matplotlib cost 0.13–0.5 s a figure and
    0.3–0.6 s to import, most of a small run's rendering): neither importing the report pages nor drawing a
    report's figures may import it (it is not a dependency any more)."""
    import subprocess
    import sys

    code = ("import sys, mergescope.report, mergescope.report.features, mergescope.studies.probe, "
            "mergescope.report.compare_pages, mergescope.report.many_pages, mergescope.report.bench_pages, "
            "mergescope.report.regression_pages; "
            "from mergescope.report import render_report; import tests.test_report as t; "
            f"render_report({str(tmp_path)!r}, t.synthetic_results()); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-500:]
