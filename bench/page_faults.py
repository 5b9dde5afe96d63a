"""What glibc's fresh mmaps cost a forward pass: page faults, time and peak memory, with and without
``mergescope._allocator.keep_freed_memory``.

What it measures
    The bare forward of one model (random init, eval, inference mode) on one batch of random images, ``--repeats``
    times after a warm-up, in a fresh process per mode: ``glibc`` (malloc as it comes) and ``kept``
    (``keep_freed_memory()`` first, as every mergescope data pass does). Per mode: the median and best seconds per
    forward, the minor page faults of the timed forwards, and the process's peak resident memory.

    Blocks above glibc's mmap threshold (at most 32 MB) are otherwise mapped afresh per allocation and unmapped on
    free, so a large batch's activations (a VGG11 activation of 500 32² images is 131 MB) fault their pages in
    again on every forward; where transparent huge pages are not used for them, 4 KB at a time.

Baseline
    ``glibc``, in the same run; the modes alternate for ``--rounds`` rounds.

Run
    python bench/page_faults.py                               # vgg11_bn, batch 500
    python bench/page_faults.py --model resnet20 --batch-size 250
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/data_passes.py

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def forward(mode: str, model: str, batch: int, repeats: int) -> dict:
    import resource
    import time

    import torch

    from mergescope._allocator import keep_freed_memory
    from mergescope.models import create_model

    kept = keep_freed_memory() if mode == "kept" else None
    torch.set_num_threads(2)
    m = create_model(model, seed=0).eval()
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        m(x)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"median": statistics.median(times), "best": min(times), "faults": usage.ru_minflt - faults,
            "peak_mb": usage.ru_maxrss / 1024, "tuned": kept}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vgg11_bn", choices=["vgg11_bn", "resnet20"])
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=6, help="timed forwards per process")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per mode, alternately")
    p.add_argument("--child", choices=["glibc", "kept"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.batch_size, args.repeats, args.rounds) < 1:
        p.error("--batch-size, --repeats and --rounds must be at least 1")
    if args.child:
        print(json.dumps(forward(args.child, args.model, args.batch_size, args.repeats)))
        return
    rows = {"glibc": [], "kept": []}
    for _ in range(args.rounds):
        for mode in rows:
            cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--batch-size",
                   str(args.batch_size), "--repeats", str(args.repeats)]
            rows[mode].append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    if rows["kept"][0]["tuned"] is False:
        print("note: not glibc's malloc here, keep_freed_memory() changed nothing")
    print(f"{args.model}, bare forward of {args.batch_size} random 32² images, {args.repeats} timed per process, "
          f"{args.rounds} processes per mode")
    print(f"{'mode':<6} {'round':>5} {'median s':>9} {'best s':>8} {'minor faults':>13} {'peak RSS MB':>12}")
    for mode, runs in rows.items():
        for i, r in enumerate(runs, 1):
            print(f"{mode:<6} {i:>5} {r['median']:>9.3f} {r['best']:>8.3f} {r['faults']:>13,} {r['peak_mb']:>12.0f}")
    med = {mode: statistics.median(r["median"] for r in runs) for mode, runs in rows.items()}
    flt = {mode: statistics.median(r["faults"] for r in runs) for mode, runs in rows.items()}
    print(f"kept / glibc: forward time {med['kept'] / med['glibc']:.2f}, page faults "
          f"{flt['kept'] / max(flt['glibc'], 1):.2f}")


if __name__ == "__main__":
    main()
