"""Kendall's τ-b for a whole layer: mergescope's ``kendall_tau_b`` vs a loop of ``scipy.stats.kendalltau``.

What it measures
    Activations of one layer on the subset D': n images × C channels (default 5,000 × 512, float32, ReLU-like:
    ~1/3 exact zeros, so ties matter), for model A and an "aligned B" correlated with it. τ-b for every channel:

    * ours   -- ``mergescope.compare.kendall_tau_b(x, y)``: all channels at once (radix sorts in numpy + scipy's
                compiled discordant-pair kernel; see the module docstring). ``--fallback`` times the pure
                vectorized discordant count instead of the compiled kernel.
    * scipy  -- ``[scipy.stats.kendalltau(x[:, c], y[:, c]) for c in ...]`` on ``--scipy-channels`` channels,
                extrapolated linearly to C (each channel is an independent call of the same size).

    Both give the same numbers: the largest |difference| over the scipy channels is printed.

Baseline
    The scipy loop, measured on this machine in the same run.

Goal
    ratio scipy / ours >= 50.

Run
    python bench/kendall.py                          # 512 × 5,000, median of 3
    python bench/kendall.py --channels 64 --images 20000 --repeats 5
"""
from __future__ import annotations

import os

# Spinning OpenMP threads make torch ops crawl on a loaded 2-core machine (see bench/weight_matching.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

from mergescope.compare import kendall as kendall_module  # noqa: E402
from mergescope.compare import kendall_tau_b  # noqa: E402


def layer_activations(n: int, channels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [n, C] pairs: y = ReLU(x + noise) with x = ReLU(gaussian): ties at 0 in both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, generator=g).add_(0.5).relu_()
    y = (x + torch.randn(n, channels, generator=g)).relu_()
    return x, y


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--scipy-channels", type=int, default=32, help="channels the scipy loop is timed on")
    p.add_argument("--repeats", type=int, default=3, help="timings per method; the median is printed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fallback", action="store_true", help="time the vectorized discordant count, not scipy's kernel")
    args = p.parse_args()

    x, y = layer_activations(args.images, args.channels, args.seed)
    if args.fallback:
        kendall_module._discordant = lambda: kendall_module._discordant_vectorized
    path = kendall_module._discordant().__name__.lstrip("_")
    print(f"n={args.images} C={args.channels} float32, {float((x == 0).float().mean()):.0%} zeros in x; "
          f"discordant count: {path}; scipy {scipy.__version__}, numpy {np.__version__}; "
          f"loadavg before: {os.getloadavg()[0]:.2f}")

    kendall_tau_b(x[:100, :8], y[:100, :8])  # warm up imports and caches
    ours_s, ours = timed(lambda: kendall_tau_b(x, y), args.repeats)

    sub = min(args.scipy_channels, args.channels)
    xs, ys = x[:, :sub].numpy(), y[:, :sub].numpy()
    scipy_sub_s, ref = timed(lambda: [scipy.stats.kendalltau(xs[:, c], ys[:, c]).statistic for c in range(sub)],
                             args.repeats)
    scipy_s = scipy_sub_s * args.channels / sub
    ref = np.array(ref)
    diff = float(np.nanmax(np.abs(np.nan_to_num(ref) - ours.tau[:sub].numpy())))

    print(f"{'method':<8} {'seconds':>9} {'ms/channel':>11}")
    print(f"{'ours':<8} {ours_s:>9.3f} {1e3 * ours_s / args.channels:>11.3f}")
    print(f"{'scipy':<8} {scipy_s:>9.3f} {1e3 * scipy_s / args.channels:>11.3f}   "
          f"(timed on {sub} channels: {scipy_sub_s:.3f} s, extrapolated linearly)")
    print(f"ratio scipy / ours: {scipy_s / ours_s:.1f}x (goal >= 50x); max |tau difference| on the scipy channels: "
          f"{diff:.1e}; defined: {int(ours.defined.sum())}/{args.channels}")
    print(f"loadavg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
