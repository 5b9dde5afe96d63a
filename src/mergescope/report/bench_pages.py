"""The report section of ``mergescope bench-merge`` (:mod:`mergescope.studies.bench_merge`): per workload a bar
chart of every method's accuracy against the ensemble and the best single model, the table, and a paragraph that
reads the table (which family wins where) — computed from the rows, never written by hand.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2

from ..runs.atomic import atomic_write_text
from .html import FIGURES_DIR
from .svg_plot import Bars, Figure, Line, Panel, Rule

FAMILY_COLORS = {"ensemble": "#7f7f7f", "aggregation": "#1f77b4", "alignment": "#2ca02c", "map": "#9467bd"}
SURVEY_FAMILY = {"ensemble": "ensembling", "aggregation": "weight aggregation", "alignment": "neuron alignment",
                 "map": "neuron alignment"}  # the survey's (seed 003) three families; maps are soft alignment


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _split(rows: Sequence[Mapping]) -> str | None:
    splits = list(dict.fromkeys(r["split"] for r in rows))
    return "test" if "test" in splits else (splits[0] if splits else None)


def _same_model(a: Mapping, b: Mapping) -> bool:
    """Whether two rows score alike to the last digit (a greedy soup that kept one ingredient is that model)."""
    return all(abs(a[k] - b[k]) <= 1e-12 for k in ("accuracy", "loss", "accuracy_a", "accuracy_b") if _ok(a[k]))


def workload_summary(rows: Sequence[Mapping], workload: str, split: str) -> dict:
    """One workload's best merge (no ensemble, no input model, and no merge that scores exactly as one of the
    inputs: it selected a model rather than merging), its best ensemble and its best single model."""
    mine = [r for r in rows if r["workload"] == workload and r["split"] == split and _ok(r["accuracy"])]
    inputs = [r for r in mine if r["family"] == "input"]
    ensembles = [r for r in mine if r["family"] == "ensemble"]
    merges = [r for r in mine if r["family"] not in ("input", "ensemble")]
    selected = [r for r in merges if any(_same_model(r, i) for i in inputs)]
    merges = [r for r in merges if r not in selected]
    pick = lambda rs: max(rs, key=lambda r: r["accuracy"]) if rs else None  # noqa: E731
    return {"best_merge": pick(merges), "ensemble": pick(ensembles), "best_single": pick(inputs),
            "selected": [r["method"] for r in selected],
            "best_by_family": {SURVEY_FAMILY[f]: pick([r for r in merges if r["family"] == f])
                               for f in dict.fromkeys(r["family"] for r in merges)}}


def read_table(rows: Sequence[Mapping]) -> str:
    """One paragraph: per workload the family and method of the best merge, against the ensemble and the best
    single model; then which family wins on how many workloads."""
    split = _split(rows)
    if split is None:
        return ""
    parts, wins = [], {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        s = workload_summary(rows, workload, split)
        best, ens, single = s["best_merge"], s["ensemble"], s["best_single"]
        if best is None:
            continue
        family = SURVEY_FAMILY[best["family"]]
        wins.setdefault(family, []).append(workload)
        text = f"on {workload}, {family} wins among the merges ({best['method']}, {100 * best['accuracy']:.1f}%"
        if single is not None:
            gap = 100 * (best["accuracy"] - single["accuracy"])
            text += f", {abs(gap):.1f} points {'above' if gap >= 0 else 'below'} the best single model"
        if ens is not None:
            short = 100 * (ens["accuracy"] - best["accuracy"])
            where = "short of" if short > 0 else "above" if short < 0 else "level with"
            text += f", {abs(short):.1f} points {where} the {ens['method']}"
        others = [f"{f} {100 * r['accuracy']:.1f}%" for f, r in s["best_by_family"].items()
                  if r is not None and f != family]
        extra = [f"best of {', '.join(others)}"] if others else []
        if s["selected"]:
            extra.append(f"{', '.join(s['selected'])} returned one of the input models")
        parts.append(text + "".join(f"; {e}" for e in extra) + ")")
    if not parts:
        return ""
    tally = "; ".join(f"{family} on {len(ws)} of {len(parts)} workloads ({', '.join(ws)})"
                      for family, ws in sorted(wins.items(), key=lambda kv: -len(kv[1])))
    return f"Reading the table ({split} accuracy): " + "; ".join(parts) + f". Overall: {tally}."


def plot_workload(rows: Sequence[Mapping], workload: str, split: str, path: str | os.PathLike) -> Path:
    """Horizontal bars: every merge's accuracy on ``split`` (coloured by family), its accuracy on each subset's
    images (markers), the ensemble (dashed) and the best single model (dotted) (SVG)."""
    s = workload_summary(rows, workload, split)
    bars = [r for r in rows if r["workload"] == workload and r["split"] == split and r["family"] != "input"
            and _ok(r["accuracy"])]
    items: list = [Bars([100 * r["accuracy"] for r in bars], [FAMILY_COLORS.get(r["family"], "#333333") for r in bars])]
    for marker, key in (("<", "accuracy_a"), (">", "accuracy_b")):
        at = [k for k, r in enumerate(bars) if _ok(r[key])]
        label = f"on {bars[0]['subset_a' if key == 'accuracy_a' else 'subset_b']}" if bars else key
        items.append(Line([100 * bars[k][key] for k in at], at, "#000", marker=marker, size=8, stroke=False,
                          label=label, tips=[f"{bars[k]['method']} {label}: {100 * bars[k][key]:.1f}%" for k in at]))
    for r, dash, what in ((s["ensemble"], (4, 2), "ensemble"), (s["best_single"], (1, 1.5), "best single model")):
        if r is not None:
            items.append(Rule(100 * r["accuracy"], "#000", 1.5, dash,
                              label=f"{what}: {r['method']} {100 * r['accuracy']:.1f}%"))
    panel = Panel(items, f"{workload}: every method", f"{split} accuracy (%): bars all images, markers each subset's",
                  xlim=(0, 102), categories=[r["method"] for r in bars], grid="x")
    return atomic_write_text(path, Figure([panel], 760, 26 * len(bars) + 110, legend="bottom").svg())


_SECTION = jinja2.Environment(autoescape=True).from_string("""
<p>Every selected method on every workload: accuracy on all test images and on each subset's (the test images of
its classes), the data passes the method needs on its own and its held-out evaluations, its own seconds (the
shared passes are made once per workload), how it treats BatchNorm statistics and what it costs to run.
Every number is in <a href="{{ csv }}"><code>{{ csv }}</code></a>.</p>
<p class="headline">{{ reading }}</p>
{% for w in workloads %}
<h3>{{ w.name }}</h3>
<p>Models: {{ w.members | join(", ") }}; shared passes:
{% for k, v in w.passes.items() %}{{ k }} {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}.</p>
{% if w.figure %}<figure><img src="{{ w.figure }}" alt="accuracy of every method on {{ w.name }}"></figure>{% endif %}
<table>
<thead><tr><th>Method</th><th>Family</th><th>Split</th><th class="num">Accuracy</th>
<th class="num">{{ w.subset_a }}</th><th class="num">{{ w.subset_b }}</th><th class="num">Loss</th>
<th class="num">Passes</th><th class="num">Held-out</th><th class="num">Seconds</th><th>BatchNorm</th>
<th class="num">Parameters</th><th class="num">Forward passes</th><th>Note</th></tr></thead>
<tbody>
{% for r in w.rows %}<tr><td>{{ r.method }}</td><td>{{ r.family }}</td><td>{{ r.split }}</td>
<td class="num">{{ pct(r.accuracy) }}</td><td class="num">{{ pct(r.accuracy_a) }}</td>
<td class="num">{{ pct(r.accuracy_b) }}</td><td class="num">{{ num(r.loss, 4) }}</td>
<td class="num">{{ num(r.data_passes, 0) }}</td><td class="num">{{ num(r.heldout_passes, 0) }}</td>
<td class="num">{{ num(r.seconds, 2) }}</td><td>{{ r.batchnorm or "" }}</td>
<td class="num">{{ num(r.parameters, 0) }}</td>
<td class="num">{{ num(r.forward_passes, 0) }}</td><td>{{ r.note or "" }}</td></tr>
{% endfor %}</tbody></table>
{% endfor %}
""")


def _pct(value) -> str:
    return f"{100 * value:.1f}%" if _ok(value) else "—"


def _num(value, digits: int) -> str:
    return f"{value:.{digits}f}" if _ok(value) else "—"


def bench_section(run_dir: str | os.PathLike, result: Mapping, csv_name: str) -> tuple[dict, list[Path]]:
    """Draw one figure per workload; return the report section ``{"title", "html"}`` and the figures."""
    run_dir = Path(run_dir)
    rows = result["rows"]
    split = _split(rows)
    workloads, figures = [], []
    for name, shared in result["workloads"].items():
        mine = [r for r in rows if r["workload"] == name]
        figure = None
        if split is not None and any(r["family"] != "input" and _ok(r["accuracy"]) for r in mine):
            stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
            path = plot_workload(rows, name, split, run_dir / FIGURES_DIR / f"bench_{stem}.svg")
            figures.append(path)
            figure = path.relative_to(run_dir).as_posix()
        subsets = list(shared.get("subsets", {})) + ["subset a", "subset b"]
        workloads.append({"name": name, "members": shared["members"], "passes": shared["passes"], "rows": mine,
                          "figure": figure, "subset_a": subsets[0], "subset_b": subsets[1]})
    html = _SECTION.render(csv=csv_name, reading=result.get("reading", ""), workloads=workloads, pct=_pct, num=_num)
    return {"title": "Merge methods on every workload", "html": html}, figures
