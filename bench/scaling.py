"""How `mergescope probe` scales: 1k → 10k → 50k CIFAR-10 images × 2 → 5 ResNet20s (issue 14).

What it measures
    The command a user runs for the feature study, ``mergescope probe CKPT... --data PACK --out OUT`` (align every
    model to the first: one matching pass; then the probe pass: moments + streaming top-k of every channel of
    every model, D′ activations kept; then the feature pages), in one fresh process per cell of
    images n × models m. Per cell: wall seconds of the child, its CPU seconds (user + system, its decoding workers
    included: on a shared machine less sensitive than wall time to other jobs holding a core), the manifest's
    ``time_by_stage`` (what the command records from the start of the study, after imports), peak RSS of the
    child (``os.wait4``'s ``ru_maxrss``: the largest single process of its tree, the forked decoding workers
    included), and the run folder's size.

    The models are random-init ResNet20s (seed i, BatchNorm at its initial statistics) saved once with the
    project's own ``save_checkpoint``; the time of a pass does not depend on the weights. ``probe`` has no option
    that limits the images, so an n-image pack is written into a temporary folder with numpy (same format as
    ``../shared/datasets/README.md``: the JPEG bytes copied, not re-encoded), n/10 images of each class, evenly
    spaced in the class; n = the whole pack uses the pack itself.

Baseline
    The smallest cell, 1k images × 2 models: seconds per (1000 images × model) and peak RSS of every cell are
    printed as ratios to it.

Goal
    Time linear in images × models: seconds per (1000 images × model) within ±25% of each other once n ≥ 10k
    (start-up amortised). Start-up is reported apart: ``start-up`` = wall − the manifest's total (interpreter,
    imports, argument parsing, up to the study's first stage), and ``fixed`` = wall − ``pass`` (``pass``: the
    stages of the data passes, decode, transfer, forward, statistics, top-k; ``decode`` includes the decoding of
    the whole pack when it is opened, before the passes). ``fixed`` is not all fixed: rendering grows a little
    with n (more distinct top-k images to draw). Memory flat in images apart from the
    dataset's own decoded bytes (n × 32 × 32 × 3 uint8: 154 MB at 50k) and D′ (min(n, 5000) images' activations,
    kept for Kendall's τ): the column ``RSS − data`` subtracts the decoded images.

    The 1k cells run first; from them the script estimates every other cell (fixed part + data-pass part × n/1000)
    and skips, largest first, the cells that would take the run past ``--budget`` seconds (it says which).

    A cell runs 2m model forwards per image: a matching pass over all m models, then the probe pass over all m
    (an aligned model's probe is derived from its unaligned twin's, not run; until ``ea1f13a`` it was run, 3m − 1
    forwards, which made exactly linear work 1.12× more per model at m = 5 than at m = 2).

Run
    python bench/scaling.py                                   # on a loaded 2-core CPU: ~9 min; 50k × 5 is skipped
    python bench/scaling.py --images 50000 --models 5         # that cell alone (~13 min there)
    python bench/scaling.py --images 1000 2000 --models 2     # a quick look
    python bench/scaling.py --keep /tmp/scaling               # keep the run folders (and the packs) there
"""
from __future__ import annotations

import os

# GNU OpenMP's spin-waiting makes 2-thread torch ops several times slower on a shared, loaded 2-core machine; the
# children inherit the setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from mergescope.models import create_model  # noqa: E402
from mergescope.train import save_checkpoint  # noqa: E402

PACK = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10" / "cifar10_train.npz"
PASS_STAGES = ("decode", "transfer", "forward", "statistics", "top-k")  # the stages that grow with n
IMAGE_BYTES = 32 * 32 * 3
MERGESCOPE = shutil.which("mergescope") or str(Path(sys.executable).with_name("mergescope"))  # the console script


@dataclass
class Cell:
    """One fresh `mergescope probe` run: its inputs and what was measured."""

    images: int
    models: int
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system seconds of the child and its decoding workers
    rss_mb: float = 0.0
    folder_mb: float = 0.0
    files: int = 0
    times: dict = field(default_factory=dict)  # the manifest's time_by_stage

    @property
    def start_up_s(self) -> float:
        return self.wall_s - self.times["total_s"]

    @property
    def pass_s(self) -> float:
        return sum(self.times["stages"].get(s, 0.0) for s in PASS_STAGES)

    @property
    def fixed_s(self) -> float:
        """Seconds that do not grow with the images: start-up, rendering, writing, other."""
        return self.wall_s - self.pass_s

    def per_unit(self, seconds: float) -> float:
        """Seconds per (1000 images × model)."""
        return seconds / (self.images / 1000 * self.models)


def subset_pack(source: Path, n: int, folder: Path) -> Path:
    """An n-image pack with the format of ``source``: n/10 images of each class, evenly spaced in the class."""
    pack = np.load(source, allow_pickle=False)
    labels, offsets, data = pack["labels"], pack["offsets"], pack["data"]
    if n >= len(labels):
        return source
    classes = np.unique(labels)
    if n % len(classes):
        raise SystemExit(f"--images: {n} is not a multiple of the {len(classes)} classes")
    ids = np.concatenate([np.flatnonzero(labels == c)[np.linspace(0, (labels == c).sum(), n // len(classes),
                                                                  endpoint=False).astype(np.int64)]
                          for c in classes])
    chunks = [data[offsets[i]:offsets[i + 1]] for i in ids]
    new_offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / source.name  # same name: the loader takes the CIFAR-10 statistics from it
    np.savez(out, data=np.concatenate(chunks), offsets=new_offsets, labels=labels[ids], classes=pack["classes"])
    return out


def folder_size(path: Path) -> tuple[float, int]:
    """(MB, files) under ``path``."""
    sizes = [p.stat().st_size for p in path.rglob("*") if p.is_file()]
    return sum(sizes) / 2**20, len(sizes)


def run_cell(cell: Cell, checkpoints: list[Path], pack: Path, out: Path, device: str, workers: str) -> Cell:
    """Run `mergescope probe` on the cell's models and images in a fresh process; fill in the measurements."""
    cmd = [MERGESCOPE, "probe", *map(str, checkpoints[:cell.models]), "--data", str(pack),
           "--out", str(out), "--device", device, "--workers", workers, "--quiet"]
    log = out.with_suffix(".log")
    with open(log, "w") as sink:
        t = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # not child.wait(): wait4 gives the child's rusage
        cell.wall_s = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}\n{log.read_text()[-2000:]}")
    cell.rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
    cell.cpu_s = usage.ru_utime + usage.ru_stime
    cell.times = json.loads((out / "manifest.json").read_text())["time_by_stage"]
    cell.folder_mb, cell.files = folder_size(out)
    return cell


def measure(cell: Cell, checkpoints: list[Path], packs: dict[int, Path], root: Path, args) -> Cell:
    """:func:`run_cell` with this script's options, one line printed."""
    run_cell(cell, checkpoints, packs[cell.images], root / f"run_{cell.images}x{cell.models}", args.device,
             args.workers)
    print(f"{cell.images:,} images × {cell.models} models: {cell.wall_s:.1f} s (CPU {cell.cpu_s:.1f} s), "
          f"peak RSS {cell.rss_mb:.0f} MB (loadavg {os.getloadavg()[0]:.2f})", flush=True)
    return cell


def estimate(cell: Cell, small: Cell) -> float:
    """Seconds of ``cell`` from the 1k cell with the same models: fixed part + data passes × n / 1k."""
    return small.fixed_s + small.pass_s * cell.images / small.images


def print_table(cells: list[Cell]) -> None:
    base = cells[0]
    base_unit = base.per_unit(base.wall_s)
    base_rss = min(cells, key=lambda c: (c.images, c.models))
    data_mb = lambda c: c.images * IMAGE_BYTES / 2**20  # noqa: E731
    base_net = base_rss.rss_mb - data_mb(base_rss)
    print("\n| images | models | wall s | CPU s | start-up s | fixed s | pass s | s/(1k img·model) | ratio | "
          "pass s/(1k img·model) | ratio | CPU s/(1k img·model) | ratio | forward | peak RSS MB | ratio "
          "| RSS − data MB | ratio | run folder |")
    print("|---:" * 19 + "|")
    for c in cells:
        unit, pass_unit = c.per_unit(c.wall_s), c.per_unit(c.pass_s)
        fwd = c.times["stages"].get("forward", 0.0) / c.times["total_s"]
        net = c.rss_mb - data_mb(c)
        cpu_unit, base_cpu = c.per_unit(c.cpu_s), base.per_unit(base.cpu_s)
        print(f"| {c.images:,} | {c.models} | {c.wall_s:.1f} | {c.cpu_s:.1f} | {c.start_up_s:.1f} | {c.fixed_s:.1f} "
              f"| {c.pass_s:.1f} | {unit:.2f} | {unit / base_unit:.2f} | {pass_unit:.2f} "
              f"| {pass_unit / base.per_unit(base.pass_s):.2f} | {cpu_unit:.2f} | {cpu_unit / base_cpu:.2f} "
              f"| {100 * fwd:.0f}% | {c.rss_mb:.0f} | {c.rss_mb / base_rss.rss_mb:.2f} | {net:.0f} "
              f"| {net / base_net:.2f} | {c.folder_mb:.1f} MB, {c.files} files |")
    print("\ntime by stage (the manifest's time_by_stage, s):")
    names = [s for s in dict.fromkeys(k for c in cells for k in c.times["stages"])]
    print("| images | models | " + " | ".join(names) + " | other | total |")
    print("|---:|---:|" + "---:|" * (len(names) + 2))
    for c in cells:
        print(f"| {c.images:,} | {c.models} | " + " | ".join(f"{c.times['stages'].get(s, 0.0):.1f}" for s in names)
              + f" | {c.times['other_s']:.1f} | {c.times['total_s']:.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--models", type=int, nargs="+", default=[2, 5])
    p.add_argument("--pack", type=Path, default=PACK, help="the CIFAR-10 training pack (a .npz JPEG pack)")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", default="auto", help="mergescope's --workers (decoding processes)")
    p.add_argument("--budget", type=float, default=1200, help="seconds the whole run may take (estimated)")
    p.add_argument("--keep", type=Path, help="keep the packs and run folders in this folder")
    args = p.parse_args()
    if not args.pack.is_file():
        raise SystemExit(f"--pack: not a file: {args.pack}")
    if min(args.models) < 2:
        raise SystemExit("--models: probe needs at least 2 models (a reference and one to align)")
    load = os.getloadavg()
    print(f"mergescope probe, {args.arch} random init, {args.pack.name}, device {args.device}, "
          f"workers {args.workers}, cpus {len(os.sched_getaffinity(0))}, "
          f"loadavg at start (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}", flush=True)
    started = time.perf_counter()
    root = Path(args.keep or tempfile.mkdtemp(prefix="mergescope-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        checkpoints = [root / "models" / f"m{i}.safetensors" for i in range(max(args.models))]
        for i, path in enumerate(checkpoints):
            save_checkpoint(path, create_model(args.arch, seed=i), meta={"seed": i, "note": "random init"})
        images, models = sorted(args.images), sorted(args.models)
        packs = {n: subset_pack(args.pack, n, root / f"pack{n}") for n in images}
        done = [measure(Cell(images[0], m), checkpoints, packs, root, args) for m in models]
        small = {c.models: c for c in done}
        plan = [Cell(n, m) for n in images[1:] for m in models]
        spent = time.perf_counter() - started
        print(f"estimated total from the {images[0]:,}-image cells: "
              f"{spent + sum(estimate(c, small[c.models]) for c in plan):.0f} s (budget {args.budget:.0f} s)",
              flush=True)
        while plan and spent + sum(estimate(c, small[c.models]) for c in plan) > args.budget:
            c = max(plan, key=lambda c: (c.images * c.models, c.images))
            plan.remove(c)
            print(f"skip {c.images:,} images × {c.models} models: estimated {estimate(c, small[c.models]):.0f} s, "
                  f"the run would pass --budget", flush=True)
        done += [measure(c, checkpoints, packs, root, args) for c in plan]
        print_table(done)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; loadavg at end (1, 5, 15 min): "
          f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")


if __name__ == "__main__":
    main()
