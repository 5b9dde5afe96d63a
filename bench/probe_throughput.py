"""Probe throughput against the bare forward pass of the same models on the same batches (issue 3).

Baseline (measured in the same run): `run_pass` of the M models with nothing recorded — the physical limit
of the job. Ours: `probe()` of the same M models, every layer, top-k=10, moments. The ratio bare/probe time is
the probe's efficiency (goal ≥ 0.9, issue 14); the one-time set-up (tracing every model) is timed too and the
efficiency of the pass alone printed beside it. The one-pass design also replaces layers × models single-model passes
(MILAN and the REPAIR notebooks loop over layers), so the ratio against that approach is printed too.

`--memory` also measures peak resident memory of the probe in fresh processes as the dataset grows 10×
(it should stay flat: the probe's state is O(models · channels · k)).

    python bench/probe_throughput.py [--images 2048] [--models 5] [--arch resnet20] [--device cpu] [--memory]
    python bench/probe_throughput.py --device cuda --images 50000 --arch resnet20 --width 4 --precision bfloat16
    python bench/probe_throughput.py --device cuda --arch tv_alexnet --size 224 --images 4096
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mergescope.data import InMemoryDataset, iter_batches  # noqa: E402
from mergescope.models import create_model  # noqa: E402
from mergescope.perm import list_layers  # noqa: E402
from mergescope.probe import probe, run_pass  # noqa: E402
from mergescope.probe.probe import _tap_all  # noqa: E402


def random_dataset(n: int, size: int = 32) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return InMemoryDataset(images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)],
                           (0.5,) * 3, (0.25,) * 3, name="random")


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def peak_rss_mb(args, images: int) -> float:
    """Peak RSS of a fresh process that probes ``images`` images (after building everything)."""
    argv = ["x", "--images", str(images), "--models", str(args.models), "--arch", args.arch, "--size", str(args.size),
            "--repeats", "1", "--probe-only"] + (["--width", str(args.width)] if args.width is not None else [])
    code = f"import sys; sys.argv={argv!r}; exec(open({__file__!r}).read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=None, help="width multiplier, for the archs that take one "
                   "(e.g. 4 for ResNet20×4)")
    p.add_argument("--size", type=int, default=32, help="side of the random images, px (e.g. 224 for tv_alexnet)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="the forward of both the bare pass and the probe (bfloat16: autocast)")
    p.add_argument("--memory", action="store_true", help="peak RSS as the dataset grows 10x")
    p.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if min(args.images, args.models, args.batch_size, args.repeats, args.size) < 1:
        p.error("--images, --models, --batch-size, --repeats and --size must be at least 1")
    torch.set_num_threads(args.threads)
    ds = random_dataset(args.images, args.size)
    kwargs = {} if args.width is None else {"width": args.width}
    models = {f"m{i}": create_model(args.arch, seed=i, **kwargs).to(args.device).eval() for i in range(args.models)}
    if args.probe_only:
        probe(models, ds, batch_size=args.batch_size, device=args.device, progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return
    layers = len(list_layers(models["m0"]))
    cast = torch.bfloat16 if args.precision == "bfloat16" else None
    bare = lambda: run_pass(models, iter_batches(ds, args.batch_size), lambda b, x, o: None, device=args.device,  # noqa: E731
                            autocast=cast)
    probed = lambda: probe(models, ds, batch_size=args.batch_size, device=args.device, progress=False,  # noqa: E731
                           precision=args.precision)
    bare(), probed()  # warm-up
    t_bare = min(timed(bare, args.device) for _ in range(args.repeats))
    t_probe = min(timed(probed, args.device) for _ in range(args.repeats))
    # the probe's one-time set-up (tracing each model, splicing the reductions in, one zero-batch forward)
    t_setup = min(timed(lambda: _tap_all(models, None, ds, "max", torch.device(args.device)), args.device)
                  for _ in range(args.repeats))
    mi = args.models * args.images
    arch = args.arch if args.width is None else f"{args.arch} ×{args.width:g}"
    print(f"{args.models} × {arch} ({layers} layers each), {args.images} {args.size}² images, batch {args.batch_size}, "
          f"{args.device}, {args.precision}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"| bare forward | {t_bare:.2f} s | {mi / t_bare:,.0f} model-images/s |")
    print(f"| probe, all layers, k=10 | {t_probe:.2f} s | {mi / t_probe:,.0f} model-images/s |")
    print(f"probe efficiency (bare / probe time): {t_bare / t_probe:.2f}  (goal ≥ 0.9)")
    print(f"  of which one-time set-up {t_setup:.2f} s (tracing, {args.models} models); the pass alone: "
          f"{t_bare / (t_probe - t_setup):.2f}")
    print(f"vs one pass per layer per model ({layers} × {args.models} single-model passes): "
          f"{layers * t_bare / t_probe:.1f}× fewer model-forward work (goal ≥ {0.8 * layers:.1f})")
    if args.memory:
        small, large = peak_rss_mb(args, args.images), peak_rss_mb(args, 10 * args.images)
        print(f"peak RSS: {args.images} images {small:.0f} MB, {10 * args.images} images {large:.0f} MB "
              f"(dataset tensor alone grows by {9 * args.images * 3072 / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
