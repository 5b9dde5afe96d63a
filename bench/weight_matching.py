"""Weight matching (Git Re-Basin) wall time and objective: mergescope vs the `rebasin` package, same run.

What it measures
    Two randomly initialised torchvision models (seed 0 = A, seed 1 = B; ResNet18 and ResNet50 by default) on
    the CPU.  For each: the time to align B to A by weight matching and the objective reached -- the summed
    inner product of all permutable weights of A and P(B), ``mergescope.align.weight_objective``, the same
    function for every method -- next to the objective of the identity (no permutation).

    * ours     -- ``build_spec`` (tracing, timed separately) + ``weight_matching(sa, sb, spec)`` + applying the
                  permutation (``permute_model``); objective of ``apply_permutation(sb, spec, perms)``.
    * rebasin  -- PyPI ``rebasin`` 0.0.47, if importable: ``PermutationCoordinateDescent(a, b, x)`` (tracing
                  with torchview, timed separately) then ``.rebasin()`` (coordinate descent + permuting b in
                  place); objective of the permuted b's state dict.  Not a dependency of mergescope:
                  ``pip install rebasin`` to get this column (it pulls graphviz + torchview).

    Both methods are checked to preserve B's function (max relative output difference is printed). Next to the
    wall times, the process CPU time of each repeat (``time.process_time``, all threads) is printed: on a shared
    machine other jobs stretch wall time much more than CPU time.

Baseline
    rebasin, measured on this machine in the same run (its README reports 1.06 s / 3.5 s for ResNet18 /
    ResNet50 on a laptop CPU; not comparable across machines, hence the same-run measurement).

Goal
    Faster than rebasin (ratio rebasin / ours > 1) with the same or a better objective (difference >= 0).

Run
    python bench/weight_matching.py                           # ResNet18 + ResNet50, 1 timing each (~2-3 min)
    python bench/weight_matching.py --repeats 3               # median of 3 (for RESULTS.md)
    python bench/weight_matching.py --models resnet18 --no-rebasin --device cuda
"""
from __future__ import annotations

import os

# On a shared, loaded 2-core machine GNU OpenMP's default spin-waiting makes 2-thread torch ops 4-5x slower;
# passive waiting keeps the timings meaningful.  Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

from mergescope.align import weight_matching, weight_objective  # noqa: E402
from mergescope.perm import apply_permutation, build_spec, permute_model  # noqa: E402

README_ANCHOR = {"resnet18": 1.06, "resnet50": 3.5}  # rebasin's own numbers, laptop CPU (another machine)


def make(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).eval()


def rel_out_diff(m1, m2, x) -> float:
    with torch.inference_mode():
        y1, y2 = m1.eval()(x), m2.eval()(x)
    return ((y1 - y2).abs().max() / y1.abs().max().clamp_min(1e-12)).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(a, b, device, trace_size: int):
    sa, sb = a.state_dict(), b.state_dict()
    t0 = time.perf_counter()
    spec = build_spec(a, torch.zeros(2, 3, trace_size, trace_size, device=device))
    t1, c1 = time.perf_counter(), time.process_time()
    res = weight_matching(sa, sb, spec, device=device)
    aligned = permute_model(b, spec, res.perms)
    sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    obj = weight_objective(sa, apply_permutation(sb, spec, res.perms), spec)
    return t1 - t0, t2 - t1, c2 - c1, obj, aligned, spec


def run_rebasin(rebasin, a, b, device, trace_size: int, seed: int):
    b = copy.deepcopy(b)
    x = torch.randn(1, 3, trace_size, trace_size, device=device)
    torch.manual_seed(seed)  # rebasin draws its group order from torch's global generator
    t0 = time.perf_counter()
    pcd = rebasin.PermutationCoordinateDescent(a, b, x, device_a=device, device_b=device)
    t1, c1 = time.perf_counter(), time.process_time()
    pcd.rebasin()
    sync(device)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t1, c2 - c1, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="init seeds of A and B")
    p.add_argument("--repeats", type=int, default=1, help="timings per method; the median is printed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace-size", type=int, default=64, help="H=W of the example input used for tracing")
    p.add_argument("--no-rebasin", action="store_true", help="skip the rebasin column")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rebasin, why = None, ""
    if not args.no_rebasin:
        try:
            import rebasin  # noqa: F811
        except Exception as e:  # ImportError, or a broken install of one of its dependencies
            why = f"{type(e).__name__}: {e}"
    else:
        why = "--no-rebasin"
    load = os.getloadavg()
    print(f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} seeds A,B={args.seeds} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} loadavg(1m,5m)={load[0]:.2f},{load[1]:.2f}")
    if rebasin is None:
        print(f"rebasin column skipped ({why}); `pip install rebasin` to measure it")

    rows = []
    for name in args.models:
        a, b = make(name, args.seeds[0]).to(device), make(name, args.seeds[1]).to(device)
        sa = a.state_dict()
        x = torch.randn(4, 3, args.trace_size, args.trace_size, device=device)
        ours, reb = [], []
        for _ in range(args.repeats):
            t_trace, t_match, c_match, obj, aligned, spec = run_ours(a, b, device, args.trace_size)
            ours.append((t_trace, t_match, c_match))
            if rebasin is not None:
                try:
                    r_trace, r_match, r_cpu, b_reb = run_rebasin(rebasin, a, b, device, args.trace_size,
                                                                 args.seeds[1])
                    reb.append((r_trace, r_match, r_cpu))
                except Exception as e:  # keep our column when rebasin fails on this model
                    why = f"{name}: {type(e).__name__}: {e}"
                    print(f"rebasin failed ({why})")
                    b_reb = None
        row = {"model": name, "groups": len(spec.groups),
               "identity": weight_objective(sa, b.state_dict(), spec),
               "ours trace": statistics.median(t for t, _, _ in ours),
               "ours match": statistics.median(m for _, m, _ in ours),
               "ours obj": obj, "ours fn": rel_out_diff(b, aligned, x), "ours all": [m for _, m, _ in ours],
               "ours cpu": [c for _, _, c in ours]}
        if reb and b_reb is not None:
            row.update({"reb trace": statistics.median(t for t, _, _ in reb),
                        "reb match": statistics.median(m for _, m, _ in reb),
                        "reb obj": weight_objective(sa, b_reb.state_dict(), spec),
                        "reb fn": rel_out_diff(b, b_reb, x), "reb all": [m for _, m, _ in reb],
                        "reb cpu": [c for _, _, c in reb]})
        rows.append(row)
        print(f"  {name}: done", flush=True)

    head = (f"{'model':<9} {'groups':>6} {'identity obj':>13} {'ours obj':>12} {'rebasin obj':>12} {'obj diff':>9} "
            f"{'ours s':>7} {'rebasin s':>9} {'ratio':>6} {'ours+trace':>10} {'reb+trace':>9} {'ratio':>6} "
            f"{'fn err ours/reb':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        has = "reb obj" in r
        reb_obj = f"{r['reb obj']:>12.1f}" if has else f"{'-':>12}"
        diff = f"{r['ours obj'] - r['reb obj']:>+9.1f}" if has else f"{'-':>9}"
        reb_s = f"{r['reb match']:>9.2f}" if has else f"{'-':>9}"
        ratio = f"{r['reb match'] / r['ours match']:>5.1f}x" if has else f"{'-':>6}"
        ours_tot = r["ours trace"] + r["ours match"]
        reb_tot = f"{r['reb trace'] + r['reb match']:>9.2f}" if has else f"{'-':>9}"
        ratio_tot = f"{(r['reb trace'] + r['reb match']) / ours_tot:>5.1f}x" if has else f"{'-':>6}"
        fn = f"{r['ours fn']:.0e}/" + (f"{r['reb fn']:.0e}" if has else "-")
        print(f"{r['model']:<9} {r['groups']:>6} {r['identity']:>13.1f} {r['ours obj']:>12.1f} {reb_obj} {diff} "
              f"{r['ours match']:>7.2f} {reb_s} {ratio} {ours_tot:>10.2f} {reb_tot} {ratio_tot} {fn:>16}")
    for r in rows:
        print(f"{r['model']} matching seconds per repeat: ours {[round(t, 2) for t in r['ours all']]}"
              + (f", rebasin {[round(t, 2) for t in r['reb all']]}" if "reb all" in r else ""))
        cpu = statistics.median(r["ours cpu"])
        print(f"{r['model']} process CPU seconds per repeat: ours {[round(t, 2) for t in r['ours cpu']]}"
              + (f", rebasin {[round(t, 2) for t in r['reb cpu']]}, ratio of medians "
                 f"{statistics.median(r['reb cpu']) / cpu:.1f}x" if "reb cpu" in r else ""))
    print(f"loadavg after: {os.getloadavg()[0]:.2f}")
    print("ours s / rebasin s: matching + applying the permutation; '+trace' adds building the graph "
          "(build_spec / torchview). ratio = rebasin / ours (>1: ours faster); obj diff = ours - rebasin "
          f"(>=0: ours as good). rebasin README anchor (laptop CPU): {README_ANCHOR}. Process CPU seconds "
          "(all threads) of the same steps: less sensitive than wall time to other jobs on a shared machine.")


if __name__ == "__main__":
    main()
