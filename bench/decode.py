"""JPEG decode + resize throughput at 224 px, its scaling with DataLoader workers, and whether a pass of
AlexNet-sized models is decode-bound (issue 14).

What it measures (one run, same images)
    * ``per core``  -- ``decode_files`` with the ImageNet geometry (resize the short side to 256, centre-crop 224)
                       in this process: images/s of one core.
    * ``workers w`` -- ``iter_batches`` over the same tree opened lazily (``preset="imagenet"``,
                       ``in_memory=False``) with ``num_workers=w`` (w = 0, 1, 2 by default): decoded and normalized
                       images/s as a pass sees them.
    * ``pass``      -- ``--models`` torchvision AlexNets (random init) run on every batch of that lazy loader
                       (``workers=--pass-workers``), against the same models on the same batches decoded
                       beforehand (the bare forward, baseline in the same run): pass / bare near 1 means the pass
                       is not decode-bound.
    * ``--decode device`` -- the same loader with the workers only reading the files and the JPEGs decoded on
                       ``--device`` (``torchvision.io.decode_jpeg`` batched: nvJPEG on CUDA), resized and normalized
                       there: images/s, and how far its pixels are from Pillow's.

The images: ``--images`` synthetic JPEGs of ImageNet's typical 500×375 / 375×500 size (smooth random colour
fields plus noise, quality 90) written to a temporary ImageFolder tree; real photos decode at a similar rate.

Run
    python bench/decode.py                     # 2-core CPU: ~1-2 min
    python bench/decode.py --device cuda       # the models and --decode device on the GPU
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from mergescope.data import ImageFolderDataset, iter_batches  # noqa: E402
from mergescope.data.decode import decode_files  # noqa: E402
from mergescope.data.folder import imagenet_geometry  # noqa: E402


def write_tree(root: Path, n: int, seed: int = 0) -> list[str]:
    """n JPEGs of 500×375 or 375×500 in two class folders; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        field = rng.random((h // 25 + 1, w // 25 + 1, 3))
        img = Image.fromarray((field * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        folder = root / ("a" if i < n // 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return sorted(paths)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_decode(ds, batch: int, workers: int, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """``--decode device`` as a pass sees it: ``iter_batches`` with the workers reading the files and the JPEGs
    decoded, resized and normalized on ``device`` (mergescope.data.device_decode). Returns images/s, and the largest
    and mean pixel difference (levels of 256) from the default Pillow path's batches."""
    from mergescope.data import set_decode_device

    def walk():
        for b in iter_batches(ds, batch, num_workers=workers):
            b.x.sum().item()  # the batch is ready
    set_decode_device(device)
    try:
        walk()
        rate = len(ds) / timed(walk, repeats)
        got = [b.x.cpu() for b in iter_batches(ds, batch, num_workers=workers)]
    finally:
        set_decode_device(None)
    std = torch.tensor(ds.std).view(1, 3, 1, 1) * 255
    diffs = [((a.x - g) * std).abs() for a, g in zip(iter_batches(ds, batch, num_workers=workers), got)]
    return rate, max(float(d.max()) for d in diffs), float(torch.cat([d.flatten() for d in diffs]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", type=int, default=2, help="AlexNets in the pass")
    p.add_argument("--pass-workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"images={args.images} batch={args.batch_size} threads={args.threads} device={device} "
          f"cpus={len(os.sched_getaffinity(0))} loadavg={os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tree(Path(tmp), args.images)
        mb = sum(os.path.getsize(q) for q in paths) / len(paths) / 1024
        print(f"{len(paths)} JPEGs, {mb:.0f} KiB each on average")
        one = args.images / timed(lambda: decode_files(paths, imagenet_geometry, (224, 224)), args.repeats)
        print(f"decode + resize 256 + crop 224, one process (per core): {one:.0f} images/s")
        ds = ImageFolderDataset(tmp, preset="imagenet", in_memory=False)
        rates = {}
        for w in args.workers:
            def walk(w=w):
                for _ in iter_batches(ds, args.batch_size, num_workers=w):
                    pass
            rates[w] = args.images / timed(walk, args.repeats)
            print(f"iter_batches workers={w}: {rates[w]:.0f} images/s ({rates[w] / one:.2f}x one process)")

        models = []
        for s in range(args.models):
            torch.manual_seed(s)
            models.append(torchvision.models.alexnet(weights=None).to(device).eval())
        decoded = list(iter_batches(ds, args.batch_size, num_workers=0))

        def forward(batches):
            with torch.inference_mode():
                for b in batches:
                    x = b.x.to(device, non_blocking=True)
                    for m in models:
                        m(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        forward(decoded[:1])
        for w in args.pass_workers:
            bare = timed(lambda: forward(decoded), args.repeats)
            full = timed(lambda: forward(iter_batches(ds, args.batch_size, num_workers=w)), args.repeats)
            print(f"{args.models} x AlexNet, pass with workers={w}: bare forward {args.images / bare:.1f} images/s "
                  f"({bare:.2f} s), pass {args.images / full:.1f} images/s ({full:.2f} s), pass / bare = "
                  f"{full / bare:.2f}", flush=True)
        for w in args.workers:
            rate, worst, mean = device_decode(ds, args.batch_size, w, args.repeats, device)
            print(f"--decode device ({device}, decode_jpeg batched {args.batch_size} + resize + crop + normalize), "
                  f"workers={w} reading the files: {rate:.0f} images/s; pixels vs Pillow's: max {worst:.2f}, "
                  f"mean {mean:.4f} levels")
    print(f"loadavg after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
