"""What the feature pages cost (issue 14, item 2): a ``mergescope probe`` run profiled with cProfile, its rendering
share and the bytes of its largest layer's pages and of its sprite sheets, then (``--compare``, default: the digits)
a ``mergescope compare`` of the same run folder, its rendering share by its own time-by-stage record — for this
checkout and (same run, same inputs) an earlier commit.

Two runs: two random-init torchvision AlexNets (``tv_alexnet``) over ``--images`` PIL-drawn JPEGs of
``--size`` px (an ImageFolder tree, 10 classes), ``--layers all`` so the two 4,096-unit linear layers are pages
too; and two trained digits CNNs (bench/checkpoints) on the digits. Each is run in a child process whose
``mergescope`` comes from either this checkout or ``git archive <--baseline>`` of ``src/``, so the two versions
see the same images, checkpoints and load.

    python bench/render_pages.py --baseline 80d9d32 --images 300

Prints one line per (case, version), the commands' time-by-stage lines and the after/before ratios; ``--json``
writes every number.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import baseline_src

ROOT = Path(__file__).resolve().parents[1]
RENDER_FUNCS = ("render_views", "render_report")  # studies/probe.py, report/html.py: every page of a probe run


def digits_checkpoints(folder: Path) -> list[str]:
    """Three digits CNNs (width 16, 6 epochs, seeds 0-2), trained with ``mergescope train`` unless already there."""
    paths = []
    for seed in (0, 1, 2):
        path = folder / f"cnn_digits_w16_e6_s{seed}.safetensors"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "mergescope.cli", "train", "--arch", "cnn_digits", "--arch-kwargs",
                            '{"width": 16}', "--epochs", "6", "--seed", str(seed), "--data", "digits", "--out",
                            str(path), "--quiet"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        paths.append(str(path))
    return paths


def make_tree(root: Path, images: int, size: int, classes: int = 10) -> Path:
    """An ImageFolder tree of smooth random photos-to-be (JPEG, quality 90), ``images`` in train/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        d = root / "train" / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
    return root


def make_alexnets(out: Path) -> list[str]:
    from mergescope.models import create_model
    from mergescope.train import save_checkpoint

    paths = []
    for seed in (0, 1):
        path = out / f"alexnet_s{seed}.safetensors"
        save_checkpoint(path, create_model("tv_alexnet", num_classes=10, seed=seed))
        paths.append(str(path))
    return paths


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def child(case: dict) -> dict:
    """Profile one ``mergescope probe`` (this process's mergescope), measure its pages and sheets; then compare the
    folder when ``case["compare"]``."""
    from mergescope.cli import main

    out = Path(case["out"])
    args = ["probe", *case["checkpoints"], "--data", case["data"], "--out", str(out), "--quiet", "--device", "cpu",
            "--batch-size", str(case["batch_size"]), "--subset-images", str(case["subset"]), "--layers", "all"]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    rc = main(args)
    prof.disable()
    total = time.perf_counter() - t0
    assert rc == 0, rc
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    render = sum(ct for (f, _, name), (_, _, _, ct, _) in stats.items() if name in RENDER_FUNCS
                 and ("studies" in f or "report" in f))
    template_calls = sum(nc for (f, _, _), (_, nc, _, _, _) in stats.items() if f.endswith(".html"))
    features = out / "features"
    pages = [p for p in features.rglob("*") if p.is_file() and "sprites" not in p.parts]
    layer = case["big_layer"]
    big = [p for p in pages if layer in p.name]
    sprites = [p for p in (features / "sprites").glob("*") if p.is_file()]
    record = {"seconds": total, "render_seconds": render, "render_share": render / total,
              "template_calls": template_calls, "pages": len([p for p in pages if p.suffix == ".html"]),
              "page_bytes": _bytes(pages), "big_layer": layer, "big_layer_files": len(big),
              "big_layer_bytes": _bytes(big), "largest_file_bytes": max((p.stat().st_size for p in pages), default=0),
              "sprite_files": len([p for p in sprites if p.suffix in (".png", ".jpg")]),
              "sprite_bytes": _bytes(sprites), "run_folder_bytes": _bytes(out.rglob("*")),
              "stages": {"probe": json.loads((out / "manifest.json").read_text(encoding="utf-8"))["time_by_stage"]}}
    if case.get("compare"):  # the same folder compared: its rendering by its own record (no profiler)
        assert main(["compare", str(out), "--quiet", "--device", "cpu", "--batch-size", str(case["batch_size"])]) == 0
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        record["stages"]["compare"] = manifest["compare"]["time_by_stage"]
        record["figure_bytes"] = _bytes(p for p in (out / "figures").glob("*") if p.is_file())
    return record


def static_alternative(run: Path, data: str, layer: str) -> dict:
    """The other lean form, measured on the same view: the leanest static markup of a layer's pairwise page (one
    ``<i>`` per tile: sheet class, offset, tooltip; one heading per channel; no template engine), against the
    data page this checkout writes — bytes and seconds of each for that one view."""
    from mergescope.data import open_dataset
    from mergescope.probe import load_probe
    from mergescope.report.feature_views import views_from_probe
    from mergescope.report.features import render_feature_pages
    from mergescope.report.sprites import sprite_layout

    dataset, probe = open_dataset(data, split="train"), load_probe(run / "probe")
    rows = {"A": "A", "B (before permutation)": "B", "B aligned to A": "B_aligned"}
    [view] = views_from_probe(probe, rows, "pair", "A and B", layers=[layer])
    t0 = time.perf_counter()
    render_feature_pages(run / "alt", dataset, [view])
    data_s = time.perf_counter() - t0
    data_bytes = (run / "alt" / "features" / f"pair_{layer}.html").stat().st_size
    t0 = time.perf_counter()
    ids = sorted({int(i) for v in view.rows.values() for i in v.ravel() if i >= 0})
    tiles = sprite_layout(ids, "sprites", "pair", "jpg", 56)
    sheets = {t: n for n, t in enumerate(dict.fromkeys(t.sheet for t in tiles.values()))}
    parts = []
    for c in range(len(next(iter(view.rows.values())))):
        parts.append(f'<section id="c{c}"><h3>channel {c}</h3>')
        for label, table in view.rows.items():
            cells = "".join(f'<i class="s{sheets[tiles[int(i)].sheet]}" style="background-position:-{tiles[int(i)].x}px '
                            f'-{tiles[int(i)].y}px" title="image {int(i)} ({dataset.classes[int(dataset.targets[int(i)])]})'
                            f': {float(v):.3g}"></i>' for i, v in zip(table[c], view.values[label][c]) if i >= 0)
            parts.append(f'<div class="frow"><span class="lbl">{label}</span>{cells}</div>')
        parts.append("</section>")
    static_bytes = len("".join(parts).encode())
    return {"layer": layer, "data_page_bytes": data_bytes, "data_page_seconds": data_s,
            "static_markup_bytes": static_bytes, "static_markup_seconds": time.perf_counter() - t0}


def run_child(src: Path, case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child ({src}) failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "stage_lines": [x for x in lines if x.startswith("time ")]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None, help="commit whose src/ is the 'before' (default: none)")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--cases", nargs="+", default=["alexnet", "digits"])
    p.add_argument("--compare", nargs="*", default=["digits"], help="cases whose run folder is also compared "
                   "(default: digits)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(tempfile.mkdtemp(prefix="render_pages_"))
    versions = {"after": ROOT / "src"}
    if args.baseline:
        versions = {"before": baseline_src(args.baseline, work / "baseline"), **versions}
    sys.path.insert(0, str(ROOT / "src"))
    cases = {}
    if "alexnet" in args.cases:
        tree = make_tree(work / "tree", args.images, args.size)
        cases["alexnet"] = {"checkpoints": make_alexnets(work), "data": str(tree), "batch_size": args.batch_size,
                            "subset": args.images, "big_layer": "classifier.2", "compare": "alexnet" in args.compare}
    if "digits" in args.cases:
        cases["digits"] = {"checkpoints": digits_checkpoints(ROOT / "bench" / "checkpoints"),
                           "data": "digits", "batch_size": 256, "subset": 1437, "big_layer": "features.5",
                           "compare": "digits" in args.compare}
    results: dict[str, dict[str, dict]] = {}
    for name, case in cases.items():
        for version, src in versions.items():
            r = run_child(src, {**case, "out": str(work / f"{name}_{version}")})
            results.setdefault(name, {})[version] = r
            print(f"{name:8s} {version:6s} total {r['seconds']:7.1f} s  rendering {r['render_seconds']:6.2f} s "
                  f"({100 * r['render_share']:4.1f}%)  template calls {r['template_calls']:>9,}  "
                  f"{r['pages']:4d} pages {r['page_bytes'] / 1e6:7.2f} MB  {r['big_layer']}: {r['big_layer_files']} "
                  f"files {r['big_layer_bytes'] / 1e6:6.3f} MB  largest file {r['largest_file_bytes'] / 1e6:.3f} MB  "
                  f"run folder {r['run_folder_bytes'] / 1e6:.1f} MB  sprite sheets {r['sprite_files']}, "
                  f"{r['sprite_bytes'] / 1e6:.3f} MB" + (f"  compare's figures {r['figure_bytes'] / 1e6:.3f} MB"
                                                         if "figure_bytes" in r else ""), flush=True)
            for command, t in r["stages"].items():
                print(f"{name:8s} {version:6s} {command:8s} recorded rendering {t['stages']['rendering']:.3f} of "
                      f"{t['total_s']:.3f} s ({100 * t['stages']['rendering'] / t['total_s']:.1f}%)", flush=True)
            for line in r["stage_lines"]:
                print(f"{name:8s} {version:6s} {line}", flush=True)
        if len(results[name]) == 2:
            b, a = results[name]["before"], results[name]["after"]
            print(f"{name:8s} after/before: rendering time {a['render_seconds'] / b['render_seconds']:.3f}, "
                  f"share {a['render_share'] / b['render_share']:.3f}, page bytes "
                  f"{a['page_bytes'] / b['page_bytes']:.4f}, {b['big_layer']} bytes "
                  f"{a['big_layer_bytes'] / b['big_layer_bytes']:.4f}, sprite bytes "
                  f"{a['sprite_bytes'] / b['sprite_bytes']:.4f}, run total {a['seconds'] / b['seconds']:.3f}")
    if "alexnet" in cases:
        alt = static_alternative(work / "alexnet_after", cases["alexnet"]["data"], cases["alexnet"]["big_layer"])
        results["alexnet"]["alternative"] = alt
        print(f"alexnet  {alt['layer']} pairwise page, two lean forms: data + script {alt['data_page_bytes'] / 1e6:.3f} MB "
              f"in {alt['data_page_seconds']:.2f} s; leanest static markup {alt['static_markup_bytes'] / 1e6:.3f} MB "
              f"in {alt['static_markup_seconds']:.2f} s (ratio {alt['static_markup_bytes'] / alt['data_page_bytes']:.1f}×)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
