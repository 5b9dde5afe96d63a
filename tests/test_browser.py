"""The digits demo's report in a real browser (issue 11, item 4): headless Chromium driven by selenium.

The run folder is built once (``mergescope demo``) and every HTML page in it is opened from disk (file:// URLs) in
one browser session; each page's images, CSS sprite sheets, links and console are recorded in one pass and the
tests below judge that record. The channel tables are then sorted by clicking their headers.

Needs selenium (the ``test`` extra) and Debian's ``chromium`` + ``chromium-driver``; without them the module is
skipped with the reason, unless ``MERGESCOPE_REQUIRE_BROWSER=1`` (``.ci/run`` sets it), where it fails instead.
"""
from __future__ import annotations

import math
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from mergescope.report.feature_data import DATA_ID, decode, read_page_data

REQUIRED = os.environ.get("MERGESCOPE_REQUIRE_BROWSER") == "1"
INSTALL = "apt-get install -y chromium chromium-driver; pip install 'selenium>=4.10' (.ci/run does both)"


def _missing(reason: str):
    if REQUIRED:
        pytest.fail(f"browser test required (MERGESCOPE_REQUIRE_BROWSER=1) but {reason}: {INSTALL}", pytrace=False)
    pytest.skip(f"BROWSER TEST NOT RUN: {reason} ({INSTALL})", allow_module_level=True)


try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
except ImportError:
    _missing("selenium is not installed")

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.access(p, os.X_OK)), None)
if CHROMIUM is None or CHROMEDRIVER is None:
    _missing(f"chromium ({CHROMIUM or 'not found'}) or chromedriver ({CHROMEDRIVER or 'not found'}) is missing")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Every url(...) in an inline style (the feature pages' sprite tiles) or in a <style> rule (the overview's channel
# pages give each sheet a CSS class), each loaded once into an Image: the sprite sheets are CSS backgrounds, not
# <img>, so document.images alone would not see a missing one.
_LOAD_BACKGROUNDS = """
const done = arguments[arguments.length - 1];
const urls = new Set();
const found = (text, base) => {
  for (const m of text.matchAll(/url\\(["']?([^"')]+)["']?\\)/g)) urls.add(new URL(m[1], base).href);
};
for (const el of document.querySelectorAll('[style*="url("]')) found(el.getAttribute("style"), document.baseURI);
for (const sheet of document.styleSheets) {
  for (const rule of sheet.cssRules) found(rule.cssText, sheet.href || document.baseURI);
}
Promise.all([...urls].map(u => new Promise(ok => {
  const im = new Image();
  im.onload = () => ok([u, im.naturalWidth]);
  im.onerror = () => ok([u, 0]);
  im.src = u;
}))).then(done);
"""
_IMAGES = "return Array.from(document.images, i => [i.src, i.complete, i.naturalWidth]);"
_LINKS = "return Array.from(document.querySelectorAll('a[href]'), a => a.href);"
_SORTABLE = "return document.querySelectorAll('th.sort').length;"


@pytest.fixture(scope="module")
def run_dir(demo_run) -> Path:
    return demo_run


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_script_timeout(60)
    yield d
    d.quit()


def _pages(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.html"))


@pytest.fixture(scope="module")
def visits(run_dir, driver) -> dict[Path, dict]:
    """Each HTML page of the run, opened once: {"title", "images", "backgrounds", "links", "sortable" (the
    number of sortable column headers), "console"}."""
    driver.get_log("browser")  # drop anything logged before the first page
    out = {}
    for page in _pages(run_dir):
        driver.get(page.as_uri())
        assert driver.execute_script("return document.readyState") == "complete", page
        if DATA_ID in _ids(page, {}):  # a feature page: its tiles are drawn once its data is unpacked
            assert driver.execute_async_script(_DRAWN, None) is not None, f"{page.name}: nothing drawn"
        out[page] = {"title": driver.title, "images": driver.execute_script(_IMAGES),
                     "backgrounds": driver.execute_async_script(_LOAD_BACKGROUNDS),
                     "links": driver.execute_script(_LINKS), "sortable": driver.execute_script(_SORTABLE),
                     "console": driver.get_log("browser")}
    return out


def test_the_report_and_every_feature_page_and_channel_table_load(run_dir, visits):
    assert run_dir / "report.html" in visits
    names = sorted(p.name for p in visits)
    for kind in ("table_", "pair_", "many_"):  # channel tables; feature pages of A and B, of every model
        assert any(n.startswith(kind) for n in names), f"no {kind}*.html page: {names}"
    untitled = [n for p, v in visits.items() if not v["title"] for n in [p.relative_to(run_dir).as_posix()]]
    assert not untitled, f"pages without a title (not rendered?): {untitled}"


def test_every_image_and_sprite_sheet_resolves(run_dir, visits):
    assert sum(len(v["images"]) for v in visits.values()) >= 5, "the report shows its figures as <img>"
    assert sum(len(v["backgrounds"]) for v in visits.values()) >= 1, "the feature pages' tiles use sprite sheets"
    broken = [f"{p.relative_to(run_dir)}: {src}" for p, v in visits.items()
              for src, complete, width in v["images"] if not (complete and width > 0)]
    broken += [f"{p.relative_to(run_dir)}: background {src}" for p, v in visits.items()
               for src, width in v["backgrounds"] if not width > 0]
    assert not broken, "images that did not load:\n" + "\n".join(broken)


def test_the_console_shows_no_errors(run_dir, visits):
    errors = [f"{p.relative_to(run_dir)}: {e['message']}" for p, v in visits.items()
              for e in v["console"] if e["level"] == "SEVERE"]
    assert not errors, "console errors:\n" + "\n".join(errors)


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids |= {v for k, v in attrs if k in ("id", "name") and v}


def _ids(path: Path, cache: dict[Path, set[str]]) -> set[str]:
    if path not in cache:
        parser = _Ids()
        parser.feed(path.read_text(encoding="utf-8"))
        cache[path] = parser.ids
    return cache[path]


# A feature page draws its channels from its data, once it has unpacked it: whether #c<j> exists is asked of the
# page after the hash moved, waiting (up to 5 s) for the script to draw it.
_HAS_ID = """
const [id, done] = [arguments[0], arguments[arguments.length - 1]];
if (location.hash !== "#" + id) location.hash = id;
const until = Date.now() + 5000;
(function poll() {
  if (document.getElementById(id) || Date.now() > until) done(!!document.getElementById(id));
  else setTimeout(poll, 10);
})();
"""
# Waits (up to 10 s) until the feature page's script has drawn page arguments[0] (null: any page); its number.
_DRAWN = """
const [page, done] = [arguments[0], arguments[arguments.length - 1]];
const until = Date.now() + 10000;
(function poll() {
  const drawn = document.documentElement.dataset.drawn;
  if ((drawn !== undefined && (page === null || drawn === String(page))) || Date.now() > until) done(drawn ?? null);
  else setTimeout(poll, 10);
})();
"""


def _drawn_ids(driver, page: Path, fragments: set[str]) -> set[str]:
    """The fragments that name an element of ``page`` once its script has shown them."""
    driver.get(page.as_uri())
    assert driver.execute_async_script(_DRAWN, None) is not None, f"{page.name}: nothing drawn"
    return {f for f in sorted(fragments) if driver.execute_async_script(_HAS_ID, f)}


def test_every_local_link_resolves_inside_the_run_folder(run_dir, visits, driver):
    root, cache, dead, checked = run_dir.resolve(), {}, [], 0
    drawn: dict[Path, dict[str, list[str]]] = {}  # feature page -> fragment -> links to it
    for page, v in visits.items():
        for href in v["links"]:
            url = urlsplit(href)
            if url.scheme != "file":
                continue
            checked += 1
            target = Path(unquote(url.path)).resolve()
            where = f"{page.relative_to(run_dir)} -> {href}"
            if not target.is_file():
                dead.append(f"{where}: no such file")
            elif root not in target.parents:
                dead.append(f"{where}: outside the run folder (the folder would not open elsewhere)")
            elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in _ids(target, cache):
                if DATA_ID in _ids(target, cache):
                    drawn.setdefault(target, {}).setdefault(unquote(url.fragment), []).append(where)
                else:
                    dead.append(f"{where}: no element with id {url.fragment!r}")
    assert drawn, "no link into a feature page's channels was checked"
    for target, fragments in drawn.items():
        found = _drawn_ids(driver, target, set(fragments))
        dead += [f"{w}: no channel {f!r} drawn" for f, where in fragments.items() if f not in found for w in where]
    assert checked >= 10, f"only {checked} local links seen"
    assert not dead, "dead links:\n" + "\n".join(dead)


def test_a_screenshot_of_the_report_is_written(run_dir, driver, tmp_path):
    from PIL import Image

    driver.get((run_dir / "report.html").as_uri())
    path = tmp_path / "report.png"
    assert driver.save_screenshot(str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.width >= 800 and im.height >= 600
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 1, "a blank screenshot"


_SECTIONS = """return Array.from(document.querySelectorAll("section.ch"),
                         s => [s.id, s.querySelectorAll(".frow").length, s.querySelectorAll(".t").length]);"""


@pytest.fixture(scope="module")
def wide_pages(tmp_path_factory) -> list[Path]:
    """Feature pages of 150 channels, 64 a page: all of them, and 70 of them in a chosen order with missing tiles."""
    import numpy as np

    from mergescope.data import load_digits
    from mergescope.report.features import FeatureView, render_feature_pages

    data, rng = load_digits("train"), np.random.default_rng(0)
    rows = {f"model {m}": rng.integers(0, len(data), (150, 10)) for m in range(3)}
    values = {label: -np.sort(-rng.random((150, 10)), axis=1) for label in rows}
    rows["model 2"][::7, 6:] = -1
    out = tmp_path_factory.mktemp("wide")
    views = [FeatureView("wide", "150 channels", "layer", rows, values, {"corr": rng.random(150)}),
             FeatureView("some", "70 channels", "layer", rows, values, {}, order=rng.permutation(150)[:70].tolist())]
    render_feature_pages(out, data, views, per_page=64)
    return sorted((out / "features").glob("*.html"))


def test_every_feature_page_draws_every_channel_with_its_tiles(run_dir, driver, wide_pages):
    """Page by page (the pager's #c links), each channel of a feature page's data is drawn once, in order, with one
    row per model and one tile per stored image."""
    pages = [p for p in _pages(run_dir) if p.parent.name == "features" and DATA_ID in _ids(p, {})]
    assert any(p.name.startswith("pair_") for p in pages) and any(p.name.startswith("many_") for p in pages)
    for page in [*pages, *wide_pages]:
        record = read_page_data(page)
        ids, _ = decode(record)
        per, order = record["per_page"], record["order"]
        seen = []
        for start in range(0, len(order), per):
            driver.get(f"{page.as_uri()}#c{order[start]}")
            assert driver.execute_async_script(_DRAWN, start // per) == str(start // per), f"{page.name} {start}"
            seen += driver.execute_script(_SECTIONS)
        want = [[f"c{c}", len(ids), sum(int((rows[i] >= 0).sum()) for rows in ids.values())]
                for i, c in enumerate(order)]
        assert seen == want, f"{page.name}: drawn {len(seen)} channels {seen[-2:]}, stored {len(want)} {want[-2:]}"
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"{page.name}: {errors}"


# ---------------------------------------------------------------- how a tile is drawn

class _Pictures:
    """A dataset of random pictures of the given sizes (what render_feature_pages reads of one)."""

    def __init__(self, name: str, sizes, seed: int = 0):
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.images = []
        for w, h in sizes:
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            self.images.append(im if max(w, h) <= 56 else im.resize((6, 6)).resize((w, h), Image.BICUBIC))
        self.targets, self.classes = np.arange(len(sizes)) % 3, ["a", "b", "c"]
        self.fingerprint = f"{name}-{seed}"

    def image(self, i):
        return self.images[i]


_KINDS = {"CIFAR-sized 32×32 (scale 1, 12 px border)": [(32, 32)] * 40, "12×20 (scale 2, borders)": [(12, 20)] * 40,
          "55×55 (1 px border right and below only)": [(55, 55)] * 40,
          "8×8 and 16×16 (finished tiles)": [(8, 8), (16, 16)] * 20, "photos 100×80 (thumbnails)": [(100, 80)] * 40}


@pytest.fixture(scope="module")
def tile_pages(tmp_path_factory, wide_pages) -> list[tuple[str, Path, object]]:
    """(kind, feature page, its dataset): the digits' 8×8 images (scale 7) and one page per kind of _KINDS."""
    import numpy as np

    from mergescope.data import load_digits
    from mergescope.report.features import FeatureView, render_feature_pages

    out = [("digits 8×8 (scale 7)", next(p for p in wide_pages if p.name.startswith("wide_")), load_digits("train"))]
    for n, (kind, sizes) in enumerate(_KINDS.items()):
        data, rng = _Pictures(f"kind{n}", sizes), np.random.default_rng(n)
        rows = {"A": rng.integers(0, len(sizes), (6, 5)), "B": rng.integers(0, len(sizes), (6, 5))}
        folder = tmp_path_factory.mktemp(f"kind{n}")
        render_feature_pages(folder, data, [FeatureView("k", kind, "layer", rows)])
        out.append((kind, folder / "features" / "k_layer.html", data))
    return out


def _shot(element):
    """The element as the browser shows it (RGB)."""
    import io

    from PIL import Image

    element.parent.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    return Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")


def _same_tile(got, want, lossless: bool) -> str | None:
    """Why two 56 px tiles differ (None: they do not), the rounded corners (2 px radius) left out."""
    import numpy as np

    if got.size != want.size:
        return f"{got.size[0]}×{got.size[1]} px, not {want.size[0]}×{want.size[1]}"
    diff = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max(axis=2)  # [56, 56]
    for cy in (slice(0, 3), slice(-3, None)):
        for cx in (slice(0, 3), slice(-3, None)):
            diff[cy, cx] = 0
    worst, mean = int(diff.max()), float(diff.mean())
    if (lossless and worst > 3) or (not lossless and mean > 8):
        return f"pixels differ (max {worst}, mean {mean:.1f})"
    return None


_TILE_IDS = 'return Array.from(document.querySelectorAll("#channels .t"), t => t.title);'


def test_a_small_images_tile_is_drawn_at_the_size_and_place_of_its_56_px_tile(driver, tile_pages):
    """Sheets hold small images at their native size and the page scales them (issue 14, item 2): in the browser,
    every kind of tile — the digits' 8×8 (×7), 32×32 with a white border, non-square, mixed sizes, photos —
    has the background size and offset of sprites.drawn and looks like tile_image of its image, pixel for pixel."""
    import re

    from mergescope.report.feature_data import page_tiles
    from mergescope.report.sprites import drawn, tile_image

    for kind, page, data in tile_pages:
        record = read_page_data(page)
        where = page_tiles(record)
        driver.get(page.as_uri())
        assert driver.execute_async_script(_DRAWN, 0) == "0", f"{kind}: nothing drawn"
        elements = driver.find_elements("css selector", "#channels .t")
        assert len(elements) >= 20, kind
        for el in elements[::7]:
            image = int(re.match(r"image (\d+)", el.get_attribute("title"))[1])
            d = drawn(where[image], record["tile"])
            sides = [f"border-{side}-width" for side in ("top", "right", "bottom", "left")]
            style = {p: el.value_of_css_property(p) for p in ("background-size", "background-position", *sides)}
            assert style == {"background-size": f"{d.width}px {d.height}px",
                             "background-position": f"{-d.x}px {-d.y}px",
                             **{p: f"{b}px" for p, b in zip(sides, d.border)}}, kind
            why = _same_tile(_shot(el), tile_image(data.image(image), 56), lossless="photos" not in kind)
            assert why is None, f"{kind}, image {image}: {why}"
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"{kind}: {errors}"


def test_the_channel_pages_draw_their_tiles_like_the_feature_pages(run_dir, driver):
    """The overview's channel pages (static markup: a CSS class per sheet) show each image as tile_image of it."""
    import json
    import re

    from mergescope.data import open_dataset
    from mergescope.report.sprites import tile_image

    inputs = json.loads((run_dir / "features" / "results.json").read_text(encoding="utf-8"))["features"]
    data = open_dataset(inputs["data"], split=inputs["split"])
    pages = sorted((run_dir / "channels").rglob("c*.html"))[:2]
    assert pages, "the demo wrote no channel pages"
    checked = 0
    for page in [*pages, run_dir / "report.html"]:
        driver.get(page.as_uri())
        for el in driver.find_elements("css selector", ".frow .t")[::5]:
            image = int(re.match(r"image (\d+)", el.get_attribute("title"))[1])
            why = _same_tile(_shot(el), tile_image(data.image(image), 56), lossless=True)
            assert why is None, f"{page.relative_to(run_dir)}, image {image}: {why}"
            checked += 1
    assert checked >= 10, checked


# ---------------------------------------------------------------- sorting the channel tables

_ROWS = "document.getElementById('channels').tBodies[0].rows"
_COLUMN = f"return Array.from({_ROWS}, r => r.cells[arguments[0]].dataset.v);"
_CHANNELS = f"return Array.from({_ROWS}, r => r.cells[0].dataset.v);"
_HEADS = "#channels thead tr:first-child th"
_TEXT_SORTED = "const v = arguments[0]; return v.every((x, i) => i === 0 || v[i - 1].localeCompare(x) <= 0);"


def _in_order(driver, values: list[str], numeric: bool, descending: bool) -> bool:
    """Defined values ascending (or descending), undefined ("") after all of them."""
    defined = [x for x in values if x != ""]
    if values[:len(defined)] != defined:
        return False
    if numeric:
        nums = [float(x) for x in defined]
        assert not any(math.isnan(x) for x in nums), values
        return nums == sorted(nums, reverse=descending)
    return driver.execute_script(_TEXT_SORTED, defined[::-1] if descending else defined)


def test_clicking_a_column_header_sorts_the_channel_table_and_a_second_click_reverses_it(run_dir, driver, visits):
    """Every page with a sortable table (the channel tables under features/, and any other), every sortable
    column: ascending after a click, descending after the second, undefined values last both times."""
    tables = [p for p, v in visits.items() if v["sortable"]]
    assert any(p.name.startswith("table_") for p in tables), sorted(p.name for p in tables)
    driver.get_log("browser")  # what earlier tests' pages logged is judged (or not) by them
    reordered = 0
    for table in tables:
        driver.get(table.as_uri())
        heads = driver.find_elements("css selector", _HEADS)
        channels = sorted(driver.execute_script(_CHANNELS), key=int)
        assert len(channels) > 2
        sortable = [(i, th) for i, th in enumerate(heads) if "sort" in th.get_attribute("class").split()]
        assert len(sortable) == visits[table]["sortable"] > 3, f"{table.name}: sortable headers outside #channels"
        for col, th in sortable:
            numeric = th.get_attribute("data-num") == "1"
            before = driver.execute_script(_COLUMN, col)
            for descending in (False, True):
                th.click()
                after = driver.execute_script(_COLUMN, col)
                where = f"{table.relative_to(run_dir)}, column {col}, {'second' if descending else 'first'} click"
                assert _in_order(driver, after, numeric, descending), f"{where} ({th.text!r}): not sorted: {after}"
                assert sorted(driver.execute_script(_CHANNELS), key=int) == channels, f"{where}: rows lost"
                assert ("desc" if descending else "asc") in th.get_attribute("class").split(), where
            reordered += not _in_order(driver, before, numeric, False)
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"{table.relative_to(run_dir)}: console errors while sorting: {errors}"
    assert reordered >= 3, "no column was out of order before its click: the test proved nothing"
