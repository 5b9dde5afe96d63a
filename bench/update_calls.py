"""Milliseconds per statistics update of one batch, for this checkout and an earlier commit, side by side.

What it measures
    The two per-batch updates of the pair passes, called on their own on activation-like tensors (ReLU of
    Gaussian values, (images, channels, positions)) of the shapes the benchmarks' models give them:
    matching's ``co_update`` (A's and B's moments, extremes and cross products) and the map merges'
    ``update_shared`` (the joint scatter Σ_AA, Σ_AB, Σ_BB). Each accumulator first sees ``--warm`` batches, so
    what is timed is a long pass's steady state (matching's extremes settled after its first batches, float64
    accumulators touched); the time is the best of ``--repeats`` runs of ``--calls`` updates.

    ``bench/stat_functions.py`` says where a whole pass's time goes; this script isolates one change's effect
    on the updates from the noise of the forwards around them (±0.05 in ``bench/data_passes.py``'s ratios).

Baseline
    The same updates from ``git archive <--baseline> src`` in a child process, run in turns with this
    checkout's (``--rounds`` turns each, the best kept), so both see the same load.

Run
    python bench/update_calls.py --baseline 2b5b5bf
    python bench/update_calls.py                      # this checkout only
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/data_passes.py

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from baseline import baseline_src  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # (images, channels, positions): where the benchmarks' models give them
    "resnet20 stage 1, batch 32": (32, 16, 1024),
    "resnet20 stage 2, batch 32": (32, 32, 256),
    "resnet20 stage 1, batch 250": (250, 16, 1024),
    "resnet20 stage 3, a held group": (1, 64, 8192),
    "vgg11 32², batch 32": (32, 64, 1024),
    "vgg11 16², batch 32": (32, 128, 256),
    "vgg11 8², a held group": (1, 512, 8192),
}


def measure(calls: int, repeats: int, warm: int) -> dict[str, dict[str, float]]:
    """{shape name: {update: best ms per call}} for the importable ``mergescope``."""
    import torch

    from mergescope.align.covariance import JointMoments, update_shared
    from mergescope.probe.stats import CoMoments, co_update

    torch.set_num_threads(2)
    out: dict[str, dict[str, float]] = {}
    for name, shape in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(shape, generator=g).relu() for _ in range(2))
        row = {}
        for update, make in (("co_update", CoMoments), ("update_shared", JointMoments)):
            fn = co_update if update == "co_update" else update_shared
            stats = [make()]
            with torch.inference_mode():
                for _ in range(warm):
                    fn(stats, a, [b])
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn(stats, a, [b])
                    best = min(best, (time.perf_counter() - t0) / calls)
            row[update] = best * 1e3
        out[name] = row
    return out


def child(src: Path | None, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = [sys.executable, __file__, "--child", "--calls", str(args.calls), "--repeats", str(args.repeats),
           "--warm", str(args.warm)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"update_calls.py: the child run failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default=None, help="commit whose src/ is the 'before' (default: none)")
    p.add_argument("--calls", type=int, default=20, help="updates per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per turn; the best is kept")
    p.add_argument("--warm", type=int, default=4, help="batches each accumulator sees before it is timed")
    p.add_argument("--rounds", type=int, default=2, help="turns of each version, alternately")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.calls, args.repeats, args.rounds) < 1 or args.warm < 0:
        p.error("--calls, --repeats and --rounds must be at least 1, --warm at least 0")
    if args.child:
        print(json.dumps(measure(args.calls, args.repeats, args.warm)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_src(args.baseline, Path(tmp)) if args.baseline else None
        versions = {"before": base, "after": ROOT / "src"} if base else {"after": ROOT / "src"}
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for version, src in versions.items():
                run = child(src, args)
                prev = best.setdefault(version, run)
                for name, row in run.items():
                    for update, ms in row.items():
                        prev[name][update] = min(prev[name][update], ms)
    header = f"{'shape':<32} {'(images, C, positions)':<24}"
    cols = [(u, v) for u in ("co_update", "update_shared") for v in versions]
    print(f"ms per update, best of {args.rounds} turns × {args.repeats} runs of {args.calls} calls; "
          f"baseline {args.baseline or 'none'}")
    print(header + "".join(f" {u + ' ' + v:>22}" for u, v in cols) + ("   after/before" if base else ""))
    for name, shape in SHAPES.items():
        line = f"{name:<32} {str(shape):<24}" + "".join(f" {best[v][name][u]:>22.3f}" for u, v in cols)
        if base:
            line += "   " + " ".join(f"{best['after'][name][u] / best['before'][name][u]:.2f}"
                                     for u in ("co_update", "update_shared"))
        print(line)


if __name__ == "__main__":
    main()
