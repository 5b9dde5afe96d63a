"""Time a ``mergescope study`` by stage, and the share of it spent in data passes.

    python bench/study_stages.py examples/digits.toml --out /tmp/digits_study
    python bench/study_stages.py examples/cifar10_alexnet.toml --out /tmp/cifar_study \
        --checkpoints bench/checkpoints/alexnet_cifar_w0.25_e3_s{0,1,2,3,4}.safetensors

Runs the study from scratch into ``--out`` (removed first), then reads what each stage stored: the seconds of
every stage (``stages.json``) and, inside each, the seconds of its passes over the data (matching, map
statistics, REPAIR/RESET, evaluation; the probe; partial merging; the regression's fit and top-k pass), and prints
a table with the share of the stage's time those passes took. Then it reruns the study and reports the rerun's
time (every stage stored: no pass). ``--checkpoints`` loads trained models instead of training (their time is
then not part of the study).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PASS_KEYS = {  # stage -> the timing entries (results.json) that are passes over the data
    "sweep": ("matching", "map statistics", "repair/reset", "evaluation"),
    "merge": ("matching", "map statistics", "repair/reset", "evaluation"),
    "compare": ("partial merging",),
    "regress": ("fit", "top-k pass"),
}


def _config_with_checkpoints(config: Path, checkpoints: list[str], folder: Path) -> Path:
    """The config with ``[models]`` replaced by the given checkpoints (mergescope checkpoints, with sidecars)."""
    import tomllib

    data = tomllib.loads(config.read_text())
    data["models"] = {"checkpoints": [str(Path(c).resolve()) for c in checkpoints]}
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items() if not isinstance(v, dict)]
    path = folder / f"{config.stem}.bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", help="override the config's data")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoints", nargs="+", help="load these instead of training")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = Path(args.config)
    if args.checkpoints:
        config = _config_with_checkpoints(config, args.checkpoints, out.parent)
    cmd = [sys.executable, "-m", "mergescope.cli", "study", str(config), "--out", str(out / "study"), "--quiet",
           "--device", args.device, *(["--data", args.data] if args.data else [])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr.strip().splitlines()[-1])
    study = out / "study"
    stages = json.loads((study / "stages.json").read_text())
    folder = {"sweep": "sweep", "features": "features", "compare": "features", "regress": "features", "merge": "merge"}
    results = {n: json.loads((study / f / "results.json").read_text()) for n, f in folder.items()
               if (study / f / "results.json").is_file()}
    print(f"{config.name}: {total:.0f} s in all on {args.device} ({os.cpu_count()} CPUs)")
    print(f"{'stage':<10} {'seconds':>8} {'data passes':>12} {'share':>7}")
    in_passes = 0.0
    for name, entry in stages.items():
        secs = entry["seconds"]
        if name == "sweep":
            timings = results["sweep"]["timings"]
        elif name == "merge":
            timings = results["merge"]["many"]["timings"]
        elif name == "compare":
            timings = results["features"]["compare"]["timings"]
        elif name == "regress":
            timings = results["features"]["regression"]["timings"]
        else:
            timings = {}
        passes = secs if name in ("train", "features") else sum(timings.get(k, 0.0) for k in PASS_KEYS[name])
        in_passes += passes
        print(f"{name:<10} {secs:8.1f} {passes:12.1f} {100 * passes / max(secs, 1e-9):6.0f}%")
    staged = sum(e["seconds"] for e in stages.values())
    print(f"{'all':<10} {staged:8.1f} {in_passes:12.1f} {100 * in_passes / max(staged, 1e-9):6.0f}%   "
          "(train and features count as passes throughout)")
    t0 = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True)
    print(f"rerun: {time.perf_counter() - t0:.1f} s, "
          f"{again.stdout.count('stored result still valid')} of {len(stages)} stages stored")
    print(proc.stdout.strip())


if __name__ == "__main__":
    main()
