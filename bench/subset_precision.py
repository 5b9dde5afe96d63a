"""What keeping D′ in 16 bits costs (issue 14, item 4): Kendall's τ per matched channel pair and the regression's R²
from a float32 probe (an earlier commit's ``src/``) against this checkout's float16 one, bfloat16 emulated from the
float32 activations, and the run folders' sizes — the same checkpoints, images and commands for both.

Cases: ``digits`` (three trained digits CNNs, bench/checkpoints; D′ = all 1,437 images; regression too),
``cifar`` (three AlexNet-CIFAR ×0.25 of bench/checkpoints on the CIFAR-10 test pack, D′ = 1,000 images),
``alexnet`` (two random-init torchvision AlexNets, ``--alpha 0.5``, ``--layers all``, ``--images`` PIL-drawn
224 px JPEGs, D′ = all of them: the issue's 1,000-image run folder).

    python bench/subset_precision.py --baseline ea30f61 --cases digits cifar alexnet --images 1000
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from baseline import baseline_src  # noqa: E402
from render_pages import make_alexnets, make_tree  # noqa: E402  (the same inputs as the page benchmark)

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cli(src: Path, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-m", "mergescope.cli", *args, "--quiet"], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:2])} ({src}) failed:\n{proc.stderr[-3000:]}")


def tau_effect(before: Path, after: Path) -> dict:
    """|Δτ| over every (reference, aligned model, layer, channel) with τ defined, float16 and bfloat16 vs float32."""
    import numpy as np
    import torch

    from mergescope.compare import kendall_tau_b
    from mergescope.probe import load_probe

    exact, half = load_probe(before / "probe"), load_probe(after / "probe")
    assert torch.equal(exact.subset_ids, half.subset_ids)
    ref = exact.models[0]
    diffs: dict[str, list[np.ndarray]] = {"float16": [], "bfloat16": []}
    for model in [m for m in exact.models if m.endswith("_aligned")]:
        for layer in exact.layers[ref]:
            x, y = exact[ref, layer].subset, exact[model, layer].subset
            t32 = kendall_tau_b(x, y)
            kept = {"float16": kendall_tau_b(half[ref, layer].subset, half[model, layer].subset),
                    "bfloat16": kendall_tau_b(x.bfloat16().float(), y.bfloat16().float())}
            for name, t in kept.items():
                ok = (t32.defined & t.defined).numpy()
                diffs[name].append((t.tau - t32.tau).abs().numpy()[ok])
    out = {}
    for name, d in diffs.items():
        d = np.concatenate(d)
        out[name] = {"pairs": int(d.size), "max": float(d.max()), "mean": float(d.mean()),
                     "p99": float(np.quantile(d, 0.99)), "over_0.01": float((d > 0.01).mean())}
    return out


def r2_effect(before: Path, after: Path) -> float:
    """max |ΔR²| (held-out and in-sample) between the two runs' regression.csv."""
    def rows(run: Path) -> list[dict]:
        with open(run / "regression.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    a, b = rows(before), rows(after)
    assert len(a) == len(b) > 0
    return max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b) for k in ("r2_heldout", "r2_in_sample")
               if x[k] and y[k])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="commit whose src/ stores D' in float32")
    p.add_argument("--cases", nargs="+", default=["digits", "cifar", "alexnet"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="subset_precision_"))
    versions = {"float32": baseline_src(args.baseline, work / "baseline"), "16-bit": ROOT / "src"}
    sys.path.insert(0, str(ROOT / "src"))
    ck = ROOT / "bench" / "checkpoints"
    cases = {
        "digits": ([str(ck / f"cnn_digits_w16_e6_s{s}.safetensors") for s in (0, 1, 2)],
                   ["--data", "digits", "--subset-images", "1437"], True),
        "cifar": ([str(ck / f"alexnet_cifar_w0.25_e3_s{s}.safetensors") for s in (0, 1, 2)],
                  ["--data", str(CIFAR), "--split", "test", "--subset-images", "1000", "--batch-size", "500"], False),
    }
    if "alexnet" in args.cases:
        tree = make_tree(work / "tree", args.images, 224)
        cases["alexnet"] = (make_alexnets(work), ["--data", str(tree), "--subset-images", str(args.images),
                                                 "--batch-size", "50", "--alpha", "0.5", "--layers", "all"], False)
    results = {}
    for name in args.cases:
        checkpoints, options, regress = cases[name]
        runs = {}
        for version, src in versions.items():
            run = work / f"{name}_{version}"
            cli(src, ["probe", *checkpoints, "--out", str(run), "--device", "cpu", *options])
            if regress:
                cli(src, ["regress", str(run), "--device", "cpu"])
            runs[version] = run
        r = {"run_folder_MB": {v: _bytes(run) / 1e6 for v, run in runs.items()},
             "probe_MB": {v: _bytes(run / "probe") / 1e6 for v, run in runs.items()},
             "tau": tau_effect(runs["float32"], runs["16-bit"])}
        if regress:
            r["max_abs_delta_r2"] = r2_effect(runs["float32"], runs["16-bit"])
        results[name] = r
        sizes = " ".join(f"{v} {mb:.1f} MB" for v, mb in r["run_folder_MB"].items())
        print(f"{name:8s} run folder {sizes} (ratio {r['run_folder_MB']['16-bit'] / r['run_folder_MB']['float32']:.3f});"
              f" probe/ {r['probe_MB']['float32']:.1f} -> {r['probe_MB']['16-bit']:.1f} MB", flush=True)
        for kind, t in r["tau"].items():
            print(f"{name:8s} |Δτ| {kind:8s} over {t['pairs']} channel pairs: max {t['max']:.4f} mean {t['mean']:.2e} "
                  f"p99 {t['p99']:.4f} share > 0.01: {100 * t['over_0.01']:.2f}%", flush=True)
        if regress:
            print(f"{name:8s} regression max |ΔR²| {r['max_abs_delta_r2']:.2e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
