"""Data passes and wall time of activation matching + REPAIR: mergescope's one-pass design vs layer-by-layer.

What it measures
    For each model (default: vgg11_bn, resnet20 width 1, tv_resnet50 at 3x64x64; random init with BatchNorm
    statistics calibrated on the data, random images), the full "align B to A, merge at several alphas,
    REPAIR every merged model" pipeline, run twice in the same process on the same batches:

    * ours      -- ``match_many`` once (all permutation groups observed in one pass over the statistics set),
                   then ``repair_and_reset`` once for all merged models (A, B and every merged model in one pass).
    * baseline  -- the layer-by-layer schedule of the REPAIR reference code, built from the library's own
                   pieces and run for real: one ``match_many`` per permutation group, each with the spec
                   restricted to that single group (so each group costs one full pass), then one
                   ``repair_and_reset`` per merged model.  The reference code spends 3 passes per merged model
                   (endpoint A, endpoint B, the merged model); ``repair_and_reset`` does those three models in
                   one pass, so the baseline's REPAIR passes are *counted* as 3 per merged model (and its wall
                   time, which runs the same 3 forwards per batch, is what was measured).

    Passes are counted, not computed: the batches iterable is wrapped and every batch served is counted;
    passes = batches served / batches per pass.  Also measured: "in-pass" seconds, the time between a pass's
    first batch request and its exhaustion (excludes tracing the models and solving the assignments).

Baseline
    Layer-by-layer: #groups matching passes (8 for VGG11, 12 for ResNet20 w1 -- stem stream + 2 downsample
    streams + 9 block-internal groups -- and 37 for ResNet50) + 3 passes per merged model for REPAIR.

Goal
    1 + 1 passes whatever the number of groups and merged models, with wall time well below the baseline's,
    and identical results: the script asserts that both schedules give the same permutations (the statistics
    are the same) and the same repaired weights.

Statistics over forward (``--stats``, issue 14)
    Each pass on its own next to the bare forwards of the models it runs, on the same pre-loaded batches,
    interleaved, median of ``--repeats``: matching (A, B), REPAIR of 3 merged models (A, B eval; the merged models
    in the mode the pass runs them: BatchNorm in train mode where REPAIR resets it), evaluation (A, B) and the
    joint covariance of the map merges (A, B). Statistics = in-pass seconds − bare seconds, over bare seconds
    (goal ≤ 0.3), and the ``statistics`` stage alone over the bare seconds (the rest of the difference is the
    tapped forward's hooks and what the pass keeps alive); in-pass seconds are the pass's own time-by-stage record (decode, transfer, forward,
    statistics, top-k: what it adds after its last batch, e.g. held groups of batches, included; tracing and
    solving not). ``--clock cpu`` measures process CPU seconds (all threads) instead of wall seconds: steadier
    where other jobs share the cores. Models: vgg11_bn and resnet20 (w1) on CIFAR-10 (``--data``) or random 32²
    images, tv_alexnet on random 3×224² images. Run it with ``PYTHONPATH=<older checkout>/src`` for the "before"
    numbers. ``--marginal`` also times every pass on the first half of the images and prints the second half's
    statistics over its forwards: the cost per further image, without what a pass pays once (e.g. the page faults
    of a 4,096-unit layer's float64 accumulators, ~1 s on a VM), which dominates a pass of a few hundred 224² images.

Run
    python bench/data_passes.py --stats --models vgg11_bn resnet20 tv_alexnet --repeats 3
    python bench/data_passes.py --stats --marginal --models tv_alexnet --passes covariance --alex-images 512
    python bench/data_passes.py                                  # default, ~3 min on a busy 2-core CPU
    python bench/data_passes.py --repeats 3                      # median of 3 timings (for RESULTS.md)
    python bench/data_passes.py --data ../shared/datasets/cifar10 --images 1000 --device cuda
"""
from __future__ import annotations

import os

# On a shared, loaded 2-core machine GNU OpenMP's default spin-waiting makes 2-thread torch ops 4-5x slower
# (threads spin for cores another process holds); passive waiting keeps the timings meaningful.  Set
# OMP_WAIT_POLICY yourself to override (it must be set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mergescope import timing  # noqa: E402
from mergescope.align import match_many  # noqa: E402
from mergescope.data import InMemoryDataset, iter_batches, len_batches, open_dataset  # noqa: E402
from mergescope.merge import interpolate_model, repair_and_reset  # noqa: E402
from mergescope.models import create_model  # noqa: E402
from mergescope.perm import build_spec, permute_model  # noqa: E402

MODELS = {  # name -> (create_model kwargs, random-data input size C,H,W)
    "vgg11_bn": ({}, (3, 32, 32)),
    "resnet20": ({"width": 1}, (3, 32, 32)),
    "tv_resnet50": ({}, (3, 64, 64)),
    "tv_alexnet": ({}, (3, 224, 224)),
}
_OPENED: dict = {}


class CountedBatches:
    """Hands out fresh iterables over the statistics set and counts every batch served (and in-pass time)."""

    def __init__(self, dataset, batch_size: int, ids: torch.Tensor):
        self.dataset, self.batch_size, self.ids = dataset, batch_size, ids
        self.per_pass = len_batches(dataset, batch_size, ids=ids)
        self.served = 0
        self.seconds = 0.0

    def __call__(self):
        t0 = None
        for batch in iter_batches(self.dataset, self.batch_size, ids=self.ids):
            if t0 is None:
                t0 = time.perf_counter()
            self.served += 1
            yield batch
        if t0 is not None:
            self.seconds += time.perf_counter() - t0

    @property
    def passes(self) -> float:
        return self.served / self.per_pass


def random_dataset(n: int, size: tuple[int, int, int], seed: int) -> InMemoryDataset:
    """n random uint8 images, smoothed a little so neighbouring pixels correlate (not pure noise)."""
    c, h, w = size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = (0.7 * x + 0.3 * torch.rand(n, c, h, w, generator=g)).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    labels = torch.randint(0, 10, (n,), generator=g)
    return InMemoryDataset(images, labels.numpy(), [str(i) for i in range(10)], [0.5] * c, [0.25] * c,
                           name="random")


def calibrate_bn(model: nn.Module, batches, device) -> nn.Module:
    """Give a randomly initialised model realistic BatchNorm statistics (setup, not part of any timing)."""
    model.to(device).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for b in batches:
            model(b.x.to(device))
    return model.eval()


def run_ours(a, b, spec, counted: CountedBatches, alphas, device):
    [match] = match_many(a, [b], spec, counted(), device=device)
    aligned = permute_model(b, spec, match.perms)
    merged = [interpolate_model(a, aligned, al) for al in alphas]
    repair_and_reset(a, aligned, spec, counted(), repair=list(zip(alphas, merged)), device=device)
    return match.perms, merged


def run_baseline(a, b, spec, counted: CountedBatches, alphas, device):
    perms = {}
    for g, group in spec.groups.items():
        one = dataclasses.replace(spec, groups={g: group})
        [match] = match_many(a, [b], one, counted(), device=device)
        perms[g] = match.perms[g]
    aligned = permute_model(b, spec, perms)
    merged = []
    for al in alphas:
        m = interpolate_model(a, aligned, al)
        repair_and_reset(a, aligned, spec, counted(), repair=[(al, m)], device=device)
        merged.append(m)
    return perms, merged


def max_state_diff(ms1, ms2) -> float:
    worst = 0.0
    for m1, m2 in zip(ms1, ms2):
        s1, s2 = m1.state_dict(), m2.state_dict()
        for k in s1:
            if s1[k].is_floating_point():
                worst = max(worst, (s1[k] - s2[k]).abs().max().item())
    return worst


def bench_model(name: str, args, device) -> dict:
    kwargs, size = MODELS[name]
    if args.data:
        if args.data not in _OPENED:  # decode the pack once for all models
            _OPENED[args.data] = open_dataset(args.data, split="train")
        ds = _OPENED[args.data]
        n = min(args.images, len(ds))
    else:
        ds = random_dataset(args.images, size, seed=0)
        n = args.images
    ids = torch.arange(n)
    setup = CountedBatches(ds, args.batch_size, ids)
    torch.manual_seed(0)
    a = calibrate_bn(create_model(name, **kwargs), setup(), device)
    torch.manual_seed(1)
    b = calibrate_bn(create_model(name, **kwargs), setup(), device)
    probe_x = next(iter(iter_batches(ds, 8, ids=ids))).x.to(device)
    spec = build_spec(a, probe_x)
    alphas = args.alphas

    rows = {"ours": [], "baseline": []}
    result = {}
    def plain_pass() -> float:
        """One plain inference pass of model A over the statistics set: the unit of model compute."""
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in iter_batches(ds, args.batch_size, ids=ids):
                a(batch.x.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    plain_pass()  # warm-up
    fwd = []
    for _ in range(args.repeats):
        fwd.append(plain_pass())
        for label, fn in (("ours", run_ours), ("baseline", run_baseline)):
            counted = CountedBatches(ds, args.batch_size, ids)
            t0 = time.perf_counter()
            perms, merged = fn(a, b, spec, counted, alphas, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            rows[label].append((wall, counted.seconds))
            result[label] = (perms, merged, counted.passes)

    (p_ours, m_ours, served_ours), (p_base, m_base, served_base) = result["ours"], result["baseline"]
    same = all(torch.equal(p_ours[g], p_base[g]) for g in spec.groups)
    assert same, f"{name}: the two schedules found different permutations"
    diff = max_state_diff(m_ours, m_base)
    assert diff <= 1e-5, f"{name}: repaired weights differ by {diff:.3g}"

    n_groups = len(spec.groups)
    ref_passes = n_groups + 3 * len(alphas)  # as the reference code counts them
    # the measured baseline served n_groups + len(alphas) passes; its REPAIR passes each ran 3 models
    assert abs(served_base - (n_groups + len(alphas))) < 1e-9, served_base
    med = {k: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for k, v in rows.items()}
    return {
        "model": name, "groups": n_groups, "images": n, "batches/pass": setup.per_pass,
        "passes ours": served_ours, "passes base (served)": served_base, "passes base (ref)": ref_passes,
        "wall ours": med["ours"][0], "wall base": med["baseline"][0],
        "in-pass ours": med["ours"][1], "in-pass base": med["baseline"][1], "fwd": statistics.median(fwd),
        "fwds ours": 2 + 2 + len(alphas), "fwds base": 2 * n_groups + 3 * len(alphas),
        "all": {k: [round(w, 2) for w, _ in v] for k, v in rows.items()},
        "identical": "perms equal" + (", weights equal" if diff == 0 else f", weights ~{diff:.0e}"),
    }


def bench_stats(name: str, args, device) -> dict:
    """Each pass's in-pass seconds next to the bare forwards of the same models (module docstring)."""
    from mergescope.align import group_covariances
    from mergescope.evaluate import evaluate_models
    from mergescope.merge.repair import _reset_mode, repair_plan

    kwargs, size = MODELS[name]
    if args.data and size[1] <= 32:
        ds = _OPENED.setdefault(args.data, open_dataset(args.data, split="train"))
        n = min(args.images, len(ds))
    else:
        n = args.images if size[1] <= 64 else args.alex_images
        ds = random_dataset(n, size, seed=0)
    ids = torch.arange(n)
    loaded = list(iter_batches(ds, args.batch_size, ids=ids))  # data loading is in neither timing
    torch.manual_seed(0)
    a = calibrate_bn(create_model(name, **kwargs), loaded, device)
    torch.manual_seed(1)
    b = calibrate_bn(create_model(name, **kwargs), loaded, device)
    spec = build_spec(a, loaded[0].x[:8].to(device))
    [match] = match_many(a, [b], spec, loaded, device=device)
    aligned = permute_model(b, spec, match.perms)
    alphas = (0.25, 0.5, 0.75)

    def in_pass(run, batches) -> tuple[float, float]:
        """A pass's own seconds by its time-by-stage record: decode (waiting for batches), transfer, forward,
        statistics — the batches' and what is added after the last one (groups of held batches) — and top-k;
        no tracing, no solving. Also its ``statistics`` stage alone."""
        with timing.timed() as times:
            run(batches)
        stages = times.record()["stages"]
        return (sum(stages.get(s, 0.0) for s in ("decode", "transfer", "forward", "statistics", "top-k")),
                stages.get("statistics", 0.0))

    def bare(models, batches=loaded) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                x = batch.x.to(device)
                for m in models:
                    m(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def merged_models():
        return [interpolate_model(a, aligned, al) for al in alphas]

    _, reset_bn = repair_plan(spec)
    plain_merged = [(_reset_mode(m) if reset_bn else m.eval()) for m in merged_models()]
    passes = {
        "matching": (lambda bs: match_many(a, [b], spec, bs, device=device), [a, b]),
        "REPAIR x3": (lambda bs: repair_and_reset(a, aligned, spec, bs, repair=list(zip(alphas, merged_models())),
                                                  device=device), [a.eval(), aligned.eval(), *plain_merged]),
        "evaluation": (lambda bs: evaluate_models({"a": a, "b": b}, bs, device=device), [a, b]),
        "covariance": (lambda bs: group_covariances(a, [b], spec, bs, device=device), [a, b]),
    }
    bare(passes["matching"][1])  # warm-up
    rows = {}
    for label, (run, models) in passes.items():
        if args.passes and label not in args.passes:
            continue
        sets = {"all": loaded, "half": loaded[: len(loaded) // 2]} if args.marginal else {"all": loaded}
        times, bares, stats_stage = {k: [] for k in sets}, {k: [] for k in sets}, []
        for _ in range(args.repeats):
            for k, batches in sets.items():
                bares[k].append(bare(models, batches))
                total, own = in_pass(run, batches)
                times[k].append(total)
                if k == "all":
                    stats_stage.append(own / bares[k][-1])
                a.eval(), b.eval()
        t, f = statistics.median(times["all"]), statistics.median(bares["all"])
        rows[label] = {"models": len(models), "bare": f, "pass": t, "stats/fwd": (t - f) / f,
                       "stage/fwd": statistics.median(stats_stage)}
        if args.marginal:  # the second half's statistics over its forwards: what each further image costs
            th, fh = statistics.median(times["half"]), statistics.median(bares["half"])
            rows[label]["marginal"] = ((t - th) - (f - fh)) / (f - fh)
    return {"model": name, "images": n, "rows": rows}


def main_stats(args, device) -> None:
    print(f"{'model':<12} {'pass':<11} {'models':>6} {'images':>6} {'bare fwd s':>10} {'in-pass s':>9} "
          f"{'stats / fwd':>11} {'stage / fwd':>11}" + (f" {'marginal':>8}" if args.marginal else ""))
    for name in args.models:
        r = bench_stats(name, args, device)
        for label, row in r["rows"].items():
            print(f"{name:<12} {label:<11} {row['models']:>6} {r['images']:>6} {row['bare']:>10.2f} "
                  f"{row['pass']:>9.2f} {row['stats/fwd']:>11.2f} {row['stage/fwd']:>11.2f}"
                  + (f" {row['marginal']:>8.2f}" if args.marginal else ""), flush=True)
    print(f"loadavg after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--images", type=int, default=64, help="images in the statistics set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--repeats", type=int, default=1, help="timings per schedule; the median is printed")
    p.add_argument("--data", default=None, help="a dataset spec for mergescope.data.open_dataset "
                   "(e.g. ../shared/datasets/cifar10); default: random images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--stats", action="store_true", help="each pass's statistics time over its bare forwards")
    p.add_argument("--passes", nargs="+", default=None, choices=["matching", "REPAIR x3", "evaluation", "covariance"],
                   help="with --stats: only these passes (default: all)")
    p.add_argument("--alex-images", type=int, default=64, help="with --stats: random 224² images for tv_alexnet")
    p.add_argument("--marginal", action="store_true",
                   help="with --stats: each pass timed on the first half of the images too; 'marginal' is the second "
                        "half's statistics over its forwards (per-pass fixed costs, e.g. a 4,096-unit layer's float64 "
                        "accumulators touched once, left out)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="with --stats: wall seconds, or process CPU seconds of all threads (steadier under load)")
    args = p.parse_args()
    if args.clock == "cpu":  # every timer below, and the passes' time-by-stage records, read this clock
        time.perf_counter = time.process_time
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()
    print(f"device={device} threads={torch.get_num_threads()} images={args.images} batch={args.batch_size} "
          f"alphas={args.alphas} repeats={args.repeats} data={args.data or 'random'} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} clock={args.clock} "
          f"loadavg(1m,5m)={load[0]:.2f},{load[1]:.2f}")
    if args.stats:
        main_stats(args, device)
        return
    out = []
    for name in args.models:
        r = bench_model(name, args, device)
        out.append(r)
        print(f"  {name}: done", flush=True)
    head = (f"{'model':<12} {'groups':>6} {'passes ours':>11} {'base served':>11} {'base ref':>8} {'pass ratio':>10} "
            f"{'wall ours s':>11} {'wall base s':>11} {'speedup':>7} {'in-pass ours':>12} {'in-pass base':>12} "
            f"{'1 fwd s':>7} {'ours fwd-equiv':>14} {'base fwd-equiv':>14}  check")
    print(head)
    print("-" * len(head))
    for r in out:
        print(f"{r['model']:<12} {r['groups']:>6} {r['passes ours']:>11.0f} {r['passes base (served)']:>11.0f} "
              f"{r['passes base (ref)']:>8} {r['passes base (ref)'] / r['passes ours']:>9.1f}x "
              f"{r['wall ours']:>11.2f} {r['wall base']:>11.2f} {r['wall base'] / r['wall ours']:>6.1f}x "
              f"{r['in-pass ours']:>12.2f} {r['in-pass base']:>12.2f} {r['fwd']:>7.2f} "
              f"{r['in-pass ours'] / r['fwd']:>5.1f} (ran {r['fwds ours']:>2}) {r['in-pass base'] / r['fwd']:>5.1f} "
              f"(ran {r['fwds base']:>2})  {r['identical']}")
    for r in out:
        print(f"{r['model']} wall seconds per repeat: ours {r['all']['ours']}, baseline {r['all']['baseline']}")
    print(f"loadavg after: {os.getloadavg()[0]:.2f}")
    print("passes ours = matching (1) + REPAIR of all merged models (1); base ref = #groups + 3 x #alphas "
          "(the reference's count); base served = #groups + #alphas (what the library-built baseline iterated).")
    print("in-pass: seconds inside the passes; 1 fwd: one plain inference pass of one model over the set; "
          "fwd-equiv = in-pass / 1 fwd, next to the model forwards the schedule ran (the rest is statistics).")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
