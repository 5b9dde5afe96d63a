"""The study overview (issue 11, item 3) on a real small study: three digit CNNs (width 8, 3 epochs) swept, probed,
compared with partial merging, regressed and merged with the CLI, once per module.

Every number the overview states is checked against the parts' results.json — the barriers, the partial-merge gaps
and the pooled Observation 3 shares recomputed here from the stored rows, written out from their definitions —
and every link and image of the pages it writes must resolve on disk.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.report.feature_data import decode, page_tiles, read_page_data
from mergescope.report.sprites import Drawn, drawn
from mergescope.report.overview import render_overview

A_NAME = "A<script>alert(1)<script>.safetensors"  # a user-supplied string the pages must escape


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """STUDY/{ckpt,sweep,features,merge} and its overview; returns (study dir, parts, Overview)."""
    root = tmp_path_factory.mktemp("study")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    names = [A_NAME, "B.safetensors", "C.safetensors"]
    for seed, name in enumerate(names):
        assert main(["train", "--arch", "cnn_digits", "--arch-kwargs", '{"width": 8}', "--data", "digits",
                     "--epochs", "3", "--seed", str(seed), "--out", str(ckpt / name), "--quiet"]) == 0
    a, b, c = (str(ckpt / n) for n in names)
    assert main(["sweep", a, b, "--data", "digits", "--out", str(root / "sweep"), "--alpha-step", "0.1",
                 "--quiet"]) == 0
    assert main(["probe", a, b, c, "--alpha", "0.5", "--data", "digits", "--out", str(root / "features"),
                 "--quiet"]) == 0
    assert main(["compare", str(root / "features"), "--partial-merge", "--seeds", "0", "1", "--quiet"]) == 0
    assert main(["regress", str(root / "features"), "--quiet"]) == 0
    assert main(["merge", a, b, c, "--data", "digits", "--out", str(root / "merge"), "--quiet"]) == 0
    parts = {name: root / name for name in ("sweep", "features", "merge")}
    return root, parts, render_overview(root, parts)


class _Page(HTMLParser):
    """Every data-key number (key -> (value, text)), href, img src, style sheet url() and example of a page."""

    def __init__(self):
        super().__init__()
        self.numbers: dict[str, tuple[str, str]] = {}
        self.hrefs, self.srcs, self.urls, self.examples, self.thesis = [], [], [], [], {}
        self._open: list[list] = []  # stack of [tag, key, text] for data-key / data-thesis spans
        self._style = False
        self._example: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
            if self._example is not None and "href" not in self._example:
                self._example["href"] = a["href"]
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "style":
            self._style = True
        if "data-example" in a:
            self._example = {"key": a["data-example"], "tiles": []}
            self.examples.append(self._example)
        if tag == "span" and self._example is not None and "t" in (a.get("class") or "").split():
            self._example["tiles"].append(a.get("title", ""))
        if "data-key" in a:
            self._open.append(["key", a["data-key"], a["data-value"], ""])
        elif "data-thesis" in a:
            self._open.append(["thesis", a["data-thesis"], None, ""])
        elif self._open:
            self._open.append(["inner", None, None, ""])

    def handle_endtag(self, tag):
        if tag == "style":
            self._style = False
        if self._open and tag == "span":
            kind, key, value, text = self._open.pop()
            if kind == "key":
                self.numbers[key] = (value, text.strip())
            elif kind == "thesis":
                self.thesis[key] = text.strip()

    def handle_data(self, data):
        if self._style:
            self.urls += re.findall(r'url\("([^"]+)"\)', data)
        for entry in self._open:
            entry[3] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _results(part: Path) -> dict:
    return json.loads((part / "results.json").read_text(encoding="utf-8"))


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _points(x: float) -> str:
    return f"{100 * x:+.1f} pts"


def _number(value: str) -> float:
    return float(value)


def test_interpolation_barriers_match_the_sweep(study):
    root, parts, out = study
    page, res = _parse(out.path), _results(parts["sweep"])
    ends = {(e["model"], e["split"]): e for e in res["endpoints"]}
    methods = {r["method"] for r in res["rows"]}
    assert methods and len(methods) == len(res["methods"])
    for method in methods:
        for split in {r["split"] for r in res["rows"]}:
            curve = [r for r in res["rows"] if r["method"] == method and r["split"] == split]
            b, a = ends["B", split], ends["A", split]
            # DESIGN "Barrier": max over α of the drop below the line from B (α = 0) to A (α = 1)
            loss = max(r["loss"] - ((1 - r["alpha"]) * b["loss"] + r["alpha"] * a["loss"]) for r in curve)
            acc = max(((1 - r["alpha"]) * b["accuracy"] + r["alpha"] * a["accuracy"]) - r["accuracy"] for r in curve)
            value, text = page.numbers[f"q1.{split}.{method}.accuracy_barrier"]
            assert _number(value) == pytest.approx(acc, abs=1e-12) and text == _points(acc)
            value, _ = page.numbers[f"q1.{split}.{method}.loss_barrier"]
            assert _number(value) == pytest.approx(loss, abs=1e-12)
            mid = next(r["accuracy"] for r in curve if abs(r["alpha"] - 0.5) < 1e-9)
            assert page.numbers[f"q1.{split}.{method}.midpoint_accuracy"][1] == _percent(mid)
    assert page.numbers["q1.naive.accuracy_barrier"] == page.numbers["q1.test.naive.accuracy_barrier"]
    # the answer row features the merge of the smallest test accuracy barrier (ties: the higher midpoint)
    test = {m: float(page.numbers[f"q1.test.{m}.accuracy_barrier"][0]) for m in methods if m != "naive"}
    mids = {m: float(page.numbers[f"q1.test.{m}.midpoint_accuracy"][0]) for m in test}
    answer = min(test, key=lambda m: (test[m], -mids[m]))
    assert page.numbers["q1.best.accuracy_barrier"] == page.numbers[f"q1.test.{answer}.accuracy_barrier"]
    row = re.search(r'<a href="#q1">Q1 Interpolation</a></td><td>(.*?)</td></tr>', out.path.read_text("utf-8"), re.S)
    assert row[1].startswith(f"<b>{answer}</b>: the smallest accuracy barrier")


# Models B 96.0% and A 97.0%; the line from B (α = 0) to A (α = 1) is 0.96 + 0.01·α. Per merge its accuracy at
# α = 0, 0.25, 0.5, 0.75, 1 and its accuracy barrier against that line, worked out by hand.
Q1_CURVES = {
    "naive": ((0.96, 0.40, 0.12, 0.45, 0.97), 0.965 - 0.12),
    "regression+repair": ((0.70, 0.95, 0.981, 0.975, 0.97), 0.96 - 0.70),  # best at α = 0.5, its α = 0 end 70%
    "broken": ((0.96, 0.96, 0.99, math.nan, 0.97), math.nan),  # NaN barrier: never the answer
    "permuted+repair": ((0.96, 0.955, 0.949, 0.96, 0.97), 0.965 - 0.949),  # the smallest barrier
    "permuted": ((0.96, 0.85, 0.80, 0.86, 0.97), 0.965 - 0.80),
}


def _hand_sweep(root: Path, curves: dict) -> Path:
    """A sweep folder holding only results.json: the rows of ``curves`` on the test split and models A and B."""
    rows = [{"method": m, "alpha": a, "split": "test", "loss": 0.1 + (0.97 - acc), "accuracy": acc}
            for m, (accs, _) in curves.items() for a, acc in zip((0.0, 0.25, 0.5, 0.75, 1.0), accs)]
    ends = [{"model": "A", "split": "test", "loss": 0.1, "accuracy": 0.97},
            {"model": "B", "split": "test", "loss": 0.1, "accuracy": 0.96}]
    sweep = root / "sweep"
    sweep.mkdir(parents=True)
    (sweep / "results.json").write_text(json.dumps({"rows": rows, "endpoints": ends, "summary": {}}), "utf-8")
    return sweep


def test_q1_answer_is_the_smallest_barrier_not_the_best_midpoint(tmp_path):
    out = render_overview(tmp_path, {"sweep": _hand_sweep(tmp_path, Q1_CURVES)})
    page = _parse(out.path)
    for method, (_, barrier) in Q1_CURVES.items():
        if not math.isnan(barrier):
            assert float(page.numbers[f"q1.test.{method}.accuracy_barrier"][0]) == pytest.approx(barrier, abs=1e-12)
    value, text = page.numbers["q1.best.accuracy_barrier"]
    assert float(value) == pytest.approx(0.016, abs=1e-12) and text == "+1.6 pts"
    assert page.numbers["q1.naive.accuracy_barrier"][1] == "+84.5 pts"
    value, text = page.numbers["q1.best_midpoint.accuracy_barrier"]
    assert float(value) == pytest.approx(0.26, abs=1e-12) and text == "+26.0 pts"
    row = re.search(r'<a href="#q1">Q1 Interpolation</a></td><td>(.*?)</td></tr>', out.path.read_text("utf-8"), re.S)
    words = re.sub(r"<[^>]+>", "", " ".join(row[1].split()))
    assert words == ("permuted+repair: the smallest accuracy barrier, +1.6 pts (the largest drop below the straight "
                     "line from model B at α = 0 to model A at α = 1; positive = below), 94.9% at α = 0.5; direct "
                     "average (naive): +84.5 pts; best at α = 0.5: regression+repair (98.1%), accuracy barrier "
                     "+26.0 pts (test)")


def test_q1_answer_ties_and_the_direct_average_alone(tmp_path):
    # equal barriers (the same 0.05 drop at α = 0.25): the higher accuracy at α = 0.5 is the answer, whatever the
    # order; it is then also the best midpoint, so no second merge is named
    tied = {"early": ((0.96, 0.9125, 0.93, 0.96, 0.97), 0.05), "late": ((0.96, 0.9125, 0.95, 0.96, 0.97), 0.05)}
    for i, order in enumerate((("early", "late"), ("late", "early"))):
        out = render_overview(tmp_path / str(i), {"sweep": _hand_sweep(tmp_path / str(i), {m: tied[m] for m in order})})
        html = out.path.read_text("utf-8")
        assert "<b>late</b>: the smallest accuracy barrier" in html and "best at α = 0.5" not in html
    out = render_overview(tmp_path / "naive", {"sweep": _hand_sweep(tmp_path / "naive", {"naive": Q1_CURVES["naive"]})})
    page = _parse(out.path)
    assert "q1.best.accuracy_barrier" not in page.numbers and "q1.best_midpoint.accuracy_barrier" not in page.numbers
    assert page.numbers["q1.naive.accuracy_barrier"][1] == "+84.5 pts"


def test_partial_merging_against_random_matches_the_comparison(study):
    root, parts, out = study
    page, rows = _parse(out.path), _results(parts["features"])["compare"]["partial_merge"]
    fractions = sorted({r["fraction"] for r in rows})
    random = {f: [r["accuracy"] for r in rows if r["metric"] == "random" and r["fraction"] == f] for f in fractions}
    assert all(len(v) == 2 for v in random.values())  # --seeds 0 1
    for i, f in enumerate(fractions):
        assert _number(page.numbers[f"q2.random.{i}.mean"][0]) == pytest.approx(sum(random[f]) / 2, abs=1e-12)
        sd = abs(random[f][0] - random[f][1]) / 2 ** 0.5  # ddof = 1 with two seeds
        assert _number(page.numbers[f"q2.random.{i}.sd"][0]) == pytest.approx(sd, abs=1e-12)
    interior = [f for f in fractions if 0 < f < 1]
    curves = {(r["metric"], r["direction"]) for r in rows if r["metric"] != "random"}
    assert len(curves) >= 6  # τ, δ, overlap, correlation × most / least similar first
    for metric, direction in curves:
        acc = {r["fraction"]: r["accuracy"] for r in rows if (r["metric"], r["direction"]) == (metric, direction)}
        gap = sum(acc[f] - sum(random[f]) / 2 for f in interior) / len(interior)
        outside = sum(not min(random[f]) <= acc[f] <= max(random[f]) for f in interior)
        value, text = page.numbers[f"q2.{metric}.{direction}.mean_gap"]
        assert _number(value) == pytest.approx(gap, abs=1e-12) and text == _points(gap)
        assert page.numbers[f"q2.{metric}.{direction}.outside"][1] == str(outside)


def test_observations_1_2_match_the_comparison(study):
    root, parts, out = study
    page, compare = _parse(out.path), _results(parts["features"])["compare"]
    checked = 0
    for s in compare["layers"]:
        for metric in ("kendall_tau", "clip_delta", "overlap", "correlation"):
            share = s[f"share_similar_{metric}"]
            if share is None:
                continue
            value, text = page.numbers[f"obs1.{s['model']}.{s['layer']}.{metric}"]
            assert _number(value) == share and text == _percent(share)
            checked += 1
    assert checked >= 6 * 3
    for model in {s["model"] for s in compare["layers"]}:
        mine = [s for s in compare["layers"] if s["model"] == model]
        pooled = sum(s["n_similar_kendall_tau"] for s in mine) / sum(s["channels"] for s in mine)
        assert page.numbers[f"obs1.pooled.{model}.kendall_tau"][1] == _percent(pooled)
    for r in compare["observation2"]:
        for c in ("A", "B", "mixed", "neither", "undefined"):
            value, text = page.numbers[f"obs2.{r['layer']}.{c}"]
            assert _number(value) == r[f"share_{c}"] and text == _percent(r[f"share_{c}"])
    for c in ("A", "B", "mixed", "neither"):
        o2 = compare["observation2"]
        pooled = sum(r[f"n_{c}"] for r in o2) / sum(r["unmatched"] for r in o2)
        assert page.numbers[f"obs2.pooled.{c}"][1] == _percent(pooled)


def test_observation3_shares_stand_beside_the_thesis_ranges(study):
    root, parts, out = study
    page, compare = _parse(out.path), _results(parts["features"])["compare"]
    rows = compare["observation3"]
    assert rows and all(r["models"] == 2 for r in rows)
    for r in rows:
        for c in ("all similar", "most similar", "few similar", "all dissimilar"):
            value, text = page.numbers[f"obs3.{r['layer']}.{c}"]
            assert _number(value) == r[f"share_{c}"] and text == _percent(r[f"share_{c}"])
    thesis = {"all similar": "5–10%", "most similar": "35–50%", "all dissimilar": "40–60%"}  # 000 §3.2.3
    assert {k: compare["thesis"][k] for k in thesis} == thesis
    for c, text in thesis.items():
        pooled = sum(r[f"n_{c}"] for r in rows) / sum(r["channels"] for r in rows)
        for key in (f"obs3.pooled.{c}", f"obs3.pooled.{c}.table"):
            assert page.numbers[key] == (repr(pooled), _percent(pooled)), key
        assert page.thesis[c] == f"thesis {text}"
    html = out.path.read_text(encoding="utf-8")
    cells = re.findall(r'<td class="num" data-o3="([^"]+)">(.*?)</td>', html, flags=re.S)
    beside = {c: cell for c, cell in cells}
    for c, text in thesis.items():  # the measured share and the thesis's range in one cell, in that order
        assert beside[c].index(f'data-key="obs3.pooled.{c}.table"') < beside[c].index(f"thesis {text}")
    answers = re.sub(r"<[^>]+>", "", html[html.index("Observation 3</a>"):html.index("Observation 4</a>")])
    assert re.findall(r"(all similar|most similar|all dissimilar|thesis [0-9–%]+)", answers) == [
        "all similar", "thesis 5–10%", "most similar", "thesis 35–50%", "all dissimilar", "thesis 40–60%"]


def test_observation4_and_merge_match_their_results(study):
    root, parts, out = study
    page = _parse(out.path)
    summary = _results(parts["features"])["regression"]["summary"]
    kept = [r for r in summary if r["fraction"] is not None and not r["refit"]]
    assert kept
    for r in kept:
        value, _ = page.numbers[f"obs4.{r['layer']}.{r['label']}"]
        assert _number(value) == r["mean_recovered"]
    full = [r["mean_recovered"] for r in kept if r["fraction"] == 1.0]
    assert _number(page.numbers["obs4.full"][0]) == pytest.approx(sum(full) / len(full), abs=1e-12)
    many = _results(parts["merge"])["many"]
    for r in many["rows"]:
        value, text = page.numbers[f"merge.{r['split']}.{r['method']}.accuracy"]
        assert _number(value) == r["accuracy"] and text == _percent(r["accuracy"])
    mean = sum(e["accuracy"] for e in many["endpoints"]) / 3
    best = max(r["accuracy"] for r in many["rows"])
    assert _number(page.numbers["merge.best_gap.test"][0]) == pytest.approx(best - mean, abs=1e-12)


def _compare_rows(features: Path) -> list[dict]:
    with open(features / "compare.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_example_channels_are_the_most_typical_and_link_to_their_pages(study):
    root, parts, out = study
    page = _parse(out.path)
    by_key: dict[str, list[dict]] = {}
    for e in page.examples:
        by_key.setdefault(e["key"], []).append(e)
    assert [len(by_key.get(k, [])) for k in ("obs1", "obs2", "obs3", "obs4")] == [2, 3, 3, 2]
    for e in page.examples:
        assert (root / e["href"]).is_file(), e["href"]
        assert len(e["tiles"]) >= 2 * 10 and all(t.startswith("image ") for t in e["tiles"])
    # Observation 1's "similar" example: among A vs B's usable similar channels (τ), the one closest to their median
    rows = [r for r in _compare_rows(parts["features"]) if r["model"] == "B_aligned"
            and r["similar_kendall_tau"] == "true" and r["dead"] == "false" and r["kendall_defined"] == "true"]
    taus = np.array([float(r["kendall_tau"]) for r in rows])
    best = rows[int(np.argmin(np.abs(taus - np.median(taus))))]
    assert by_key["obs1"][0]["href"] == f"channels/{best['layer']}/c{best['channel']}.html"


def _resolves(base: Path, url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        return False  # the pages must open from disk: nothing remote
    return not parts.path or (base / unquote(parts.path)).is_file()


def test_every_link_and_image_of_every_page_resolves(study):
    root, parts, out = study
    pages = [p for p in out.files if p.suffix == ".html"]
    assert out.path == pages[-1] == root / "report.html"
    channel_pages = [p for p in pages if "channels" in p.parts]
    assert len(channel_pages) == 8 + 16 + 32  # one per channel of the three probed layers
    assert all(p.is_file() for p in out.files)
    for path in pages:
        page = _parse(path)
        assert page.hrefs, path
        for url in [*page.hrefs, *page.srcs, *page.urls]:
            assert _resolves(path.parent, url), f"{path.relative_to(root)}: {url}"
    overview = _parse(out.path)
    assert {"sweep/figures/interpolation_test.svg", "features/figures/partial_merge.svg",
            "features/figures/regression.svg"} <= set(overview.srcs)
    for layer in ("features.2", "features.5", "features.9"):
        assert f"layers/{layer}.html" in overview.hrefs and f"features/features/table_{layer}.html" in overview.hrefs


def _feature_tiles(page: Path, channel: int) -> dict[str, list[tuple[str, Drawn]]]:
    """Row label -> (sheet, how it is drawn) of every tile of one channel on a feature page (from the page's data)."""
    record = read_page_data(page)
    ids, _ = decode(record)
    where, at = page_tiles(record), record["order"].index(channel)
    return {label: [(where[i].sheet, drawn(where[i], record["tile"])) for i in rows[at] if i >= 0]
            for label, rows in ids.items()}


def test_channel_page_shows_every_model_metric_and_regression(study):
    root, parts, out = study
    layer, channel = "features.5", 3
    path = root / "channels" / layer / f"c{channel}.html"
    html = path.read_text(encoding="utf-8")
    sheets = dict(re.findall(r'\.s(\d+) \{ background-image: url\("([^"]+)"\); \}', html))
    sizes = {s: (int(w), int(h)) for s, w, h in re.findall(r'\.s(\d+) \{ background-size: (\d+)px (\d+)px;', html)}
    images = html[:html.index("Metrics against")]  # the models' rows (the regression's rows come later)
    rows = {label: [((path.parent / sheets[s]).resolve(), int(x), int(y), sizes[s]) for s, x, y in
                    re.findall(r'class="t s(\d+)"[^>]*background-position: -(\d+)px -(\d+)px', cells)]
            for label, cells in re.findall(r'<span class="lbl">(.*?)</span>(.*?)</div>', images, flags=re.S)}
    features = parts["features"] / "features"
    pair = _feature_tiles(features / f"pair_{layer}.html", channel)
    many = _feature_tiles(features / f"many_{layer}.html", channel)
    # every row of the pairwise page, then the many-model page's other models: the tiles its feature page shows
    expected = {**pair, **{label: t for label, t in many.items() if label not in pair and label != "A (reference)"}}
    assert list(rows) == list(expected)
    for label, tiles in expected.items():
        sheet = "pair" if label in pair else "many"
        # drawn as its feature page draws it: same sheet, same scaled offset and sheet size (8×8 digits: ×7)
        assert rows[label] == [((features / s).resolve(), d.x, d.y, (d.width, d.height)) for s, d in tiles], label
        assert all(f"/{sheet}_{layer}_0." in str(p) for p, *_ in rows[label])
        assert {d.scale for _, d in tiles} == {7} and not any(any(d.border) for _, d in tiles)
    assert {"A", "B (before permutation)", "B aligned to A", "C aligned to A", "merged (permuted, α=0.5)"} <= set(rows)
    mine = [r for r in _compare_rows(parts["features"]) if r["layer"] == layer and int(r["channel"]) == channel]
    assert len(mine) == 2
    for r in mine:
        for metric in ("kendall_tau", "overlap", "correlation", "clip_delta"):
            assert f">{float(r[metric]):.3g}<" in html
            t = float(r[f"null_threshold_{metric}"])
            assert f"{'&lt;' if metric == 'clip_delta' else '&gt;'} {t:.3g}<" in html
    with open(parts["features"] / "regression.csv", newline="", encoding="utf-8") as f:
        reg = [r for r in csv.DictReader(f) if r["layer"] == layer and int(r["channel"]) == channel]
    table = html[html.index("R² held-out"):]
    assert len(reg) >= 3 and table.count("<tr><td class=\"num\">") == len(reg)
    for r in reg:
        assert f">{float(r['r2_heldout']):.3g}<" in table


def test_user_strings_are_escaped(study):
    root, parts, out = study
    html = out.path.read_text(encoding="utf-8")
    assert "<script" not in html
    assert "A&lt;script&gt;alert(1)&lt;script&gt;.safetensors" in html


def test_missing_parts_still_render(study, tmp_path):
    root, parts, _ = study
    for keep in (("sweep", "features"), ("features",), ("sweep",), ()):
        out_dir = tmp_path / "_".join(keep or ("none",))
        out_dir.mkdir()
        for name in keep:
            shutil.copytree(parts[name], out_dir / name)
        out = render_overview(out_dir, {name: out_dir / name for name in keep})
        html = out.path.read_text(encoding="utf-8")
        page = _parse(out.path)
        for url in [*page.hrefs, *page.srcs, *page.urls]:
            assert _resolves(out_dir, url), f"{keep}: {url}"
        assert ("Not run: the study has no N-model merge." in html) and "merge/report.html" not in html
        assert ("features" in keep) == ("obs3.pooled.all similar" in page.numbers)
        assert ("sweep" in keep) == ("q1.test.naive.accuracy_barrier" in page.numbers)
    with pytest.raises(MergescopeError, match="unknown study part"):
        render_overview(tmp_path, {"merges": parts["merge"]})
    with pytest.raises(MergescopeError, match="would be overwritten"):
        render_overview(parts["sweep"], {"sweep": parts["sweep"]})


def test_layer_page_lists_every_channel_with_its_categories(study):
    root, parts, out = study
    layer = "features.9"
    html = (root / "layers" / f"{layer}.html").read_text(encoding="utf-8")
    rows = [r for r in _compare_rows(parts["features"]) if r["layer"] == layer]
    data = json.loads(re.search(r'<script type="application/json" id="table-data">(.*?)</script>', html, re.S)[1])
    assert [row[0] for row in data["rows"]] == list(range(32))  # drawn by the page's script, one link each
    assert [row[2] for row in data["rows"]] == [f"channels/features.9/c{c}.html" for c in range(32)]
    assert 'root = "..";' in html
    options = re.findall(r"<select[^>]*>(.*?)</select>", html, flags=re.S)
    assert len(options) == 2  # Observation 2's category and Observation 3's consensus
    for column, select in zip(("category", "consensus"), options):
        values = {r[column] for r in rows if r[column]}
        assert re.findall(r"<option>(.*?)</option>", select) == sorted(values)
    assert f'src="../features/figures/compare_{layer}.svg"' in html


def test_only_example_channel_pages_when_asked(study, tmp_path):
    root, parts, _ = study
    shutil.copytree(parts["features"], tmp_path / "features")
    out = render_overview(tmp_path, {"features": tmp_path / "features"}, all_channels=False)
    pages = {p.relative_to(tmp_path).as_posix() for p in out.files if "channels" in p.parts}
    examples = {e["href"] for e in _parse(out.path).examples}
    assert pages == examples and 2 <= len(pages) <= 10
    for path in out.files:
        if path.suffix == ".html":
            page = _parse(path)
            for url in [*page.hrefs, *page.srcs, *page.urls]:
                assert _resolves(path.parent, url), f"{path.relative_to(tmp_path)}: {url}"
