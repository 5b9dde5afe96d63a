"""Where a data pass's statistics time goes: wall seconds per statistics function, and per tensor shape.

What it measures
    One model pair (random init, BatchNorm calibrated on the images, as in ``bench/data_passes.py``) and one pass —
    activation matching (``match_many``) or the map merges' joint covariance (``group_covariances``) — over
    pre-loaded random images. The pass's statistics functions in ``mergescope.probe.stats`` and
    ``mergescope.probe.blocks`` are wrapped with timers: ``_sums`` (Σx and Σx², the one-read means), ``sum64``
    (Σx alone), ``for_products`` (matching: the means, the one-read test and, where a channel fails it, the centred
    copy), ``with_own_products`` (covariance: the same with the batch's product with itself, whose diagonal is Σx²),
    ``Extremes.update_channels`` (min and max, for dead channels; matching only), ``products`` (the float32 matrix
    products), ``add_into`` (float32 parts added into the float64 sums), ``append`` (a batch copied into the
    buffers of a held group, ``probe.blocks``) and the float64 updates of the accumulators (``_combine`` of
    matching's ``CoMoments``, ``_combine_blocks`` of the joint scatter), wherever the pass calls them. It also counts the tensors where at least one channel failed the one-read test
    (mean² > 3·variance) and so took the centred path, with how many channels failed.

    The times nest: ``for_products`` includes its ``_sums`` calls, ``with_own_products`` its ``sum64`` and
    ``products``, and ``_sums`` its ``sum64``. Wrapping adds a few microseconds per call, so
    compare runs of this script with each other, not with ``bench/data_passes.py``. That script's
    statistics ÷ forward ratio is the measure of issue 14. This script says which function to work on next.

Baseline
    The bare forwards of both models over the same batches, timed in the same run.

Run
    python bench/stat_functions.py                                  # ResNet20, matching, 1,000 images, batch 250
    python bench/stat_functions.py --model vgg11_bn --pass covariance --batch-size 500
    PYTHONPATH=<older checkout>/src python bench/stat_functions.py  # the same for an older tree
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/data_passes.py

import argparse  # noqa: E402
import collections  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from data_passes import MODELS, calibrate_bn, random_dataset  # noqa: E402
from mergescope.align import match_many  # noqa: E402
from mergescope.align import covariance  # noqa: E402
from mergescope.align.covariance import group_covariances  # noqa: E402
from mergescope.data import iter_batches  # noqa: E402
from mergescope.models import create_model  # noqa: E402
from mergescope.perm import build_spec  # noqa: E402
from mergescope.probe import blocks, stats  # noqa: E402

SECONDS: collections.Counter = collections.Counter()  # (function, shape) -> wall seconds
CALLS: collections.Counter = collections.Counter()  # (function, shape) -> calls
CENTRED: dict[tuple, list[int]] = {}  # shape -> [tensors, tensors with a failing channel, failing channels]


def timed(name: str, modules) -> None:
    """Replace function ``name`` in every module of ``modules`` that holds it (where it is defined, and where it
    was imported by name) by one wrapper that adds its wall seconds to SECONDS[name, shape of its first tensor]."""
    holders = [m for m in modules if hasattr(m, name)]
    f = getattr(holders[0], name)

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        key = (name, tuple(first.shape) if first is not None else ())
        t0 = time.perf_counter()
        out = f(*args, **kwargs)
        SECONDS[key] += time.perf_counter() - t0
        CALLS[key] += 1
        return out

    for m in holders:
        if getattr(m, name) is f:
            setattr(m, name, wrapper)


def count_centred() -> None:
    """Count, per shape, the tensors ``for_products`` and ``with_own_products`` test and those with channels that
    fail the one-read test."""
    tested = stats._tested

    @functools.wraps(tested)
    def wrapper(x3, s, q, products=False):
        mean, m2, redo = tested(x3, s, q, products)
        if products:
            c = CENTRED.setdefault(tuple(x3.shape), [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + (redo.numel() > 0), c[2] + redo.numel()
        return mean, m2, redo

    stats._tested = wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20", choices=[m for m in MODELS if m != "tv_resnet50"])
    p.add_argument("--pass", dest="which", default="matching", choices=["matching", "covariance"])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=2, help="timed passes after one warm-up; the last is printed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.repeats < 1 or args.images < 1 or args.batch_size < 1:
        p.error("--repeats, --images and --batch-size must be at least 1")
    torch.set_num_threads(args.threads)

    kwargs, size = MODELS[args.model]
    ds = random_dataset(args.images, size, seed=0)
    batches = list(iter_batches(ds, args.batch_size))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(calibrate_bn(create_model(args.model, **kwargs), batches, "cpu"))
    a, b = models
    spec = build_spec(a, batches[0].x[:8])
    run = {"matching": lambda: match_many(a, [b], spec, batches),
           "covariance": lambda: group_covariances(a, [b], spec, batches)}[args.which]

    def bare() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                a(batch.x), b(batch.x)
        return time.perf_counter() - t0

    for name in ("_sums", "sum64", "for_products", "with_own_products", "products", "add_into"):
        timed(name, (stats, blocks, covariance))
    timed("update_channels", (stats.Extremes,))
    timed("append", (blocks._Held,))
    timed("_combine_blocks", (covariance.JointMoments,))
    timed("_combine", (stats.CoMoments,))
    count_centred()

    bare(), run()  # warm-up
    for _ in range(args.repeats):
        SECONDS.clear(), CALLS.clear(), CENTRED.clear()
        fwd = bare()
        t0 = time.perf_counter()
        run()
        whole = time.perf_counter() - t0
    print(f"{args.model} {args.which}: {args.images} images, batch {args.batch_size}, threads {args.threads}")
    print(f"bare forwards {fwd:.3f} s; the whole call {whole:.3f} s (tracing and solving included)")
    print(f"{'function':<18} {'tensor shape':<22} {'calls':>6} {'seconds':>8}")
    for (name, shape), s in sorted(SECONDS.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"{name:<18} {str(shape):<22} {CALLS[name, shape]:>6} {s:>8.3f}")
    totals = collections.Counter()
    for (name, _), s in SECONDS.items():
        totals[name] += s
    print("totals: " + " · ".join(f"{n} {s:.3f} s" for n, s in sorted(totals.items(), key=lambda kv: -kv[1])))
    print("one-read test (tensor shape: tested, with a failing channel, failing channels):")
    for shape, (n, failing, channels) in CENTRED.items():
        print(f"  {shape}: {n}, {failing}, {channels}")


if __name__ == "__main__":
    main()
