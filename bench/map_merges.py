"""Midpoint accuracy of permutation merging vs merging with maps (CCA, OT, regression, ZipIt!), with REPAIR/RESET.

What it measures
    Two cnn_digits models trained from different seeds on the digits training split (6 epochs, batch 64,
    lr 0.05); test accuracy of their α = 0.5 merges:

    * direct average   -- no alignment;
    * permutation      -- activation matching (correlation + linear_sum_assignment, ``match_many``);
    * OT               -- soft transport maps from 1 − correlation, Sinkhorn at relative ε (``ot_maps``);
    * CCA              -- Horoi et al. 2024, relative ridge λ (``cca_maps``);
    * regression       -- the least-squares map of A's features on B's (``regression_maps``): all weights, or the
                          top 25 % / 10 % refitted; fitted on the thesis's 5 images per class ("5/class") or on
                          the whole training split;
    * ZipIt!           -- greedy feature zipping with within-model merges (a = 0.3, b = 0.125).

    Each merge plain, + REPAIR (targets: A and B rewritten in the merged basis, i.e. the map's α = 0 endpoint
    ``map_model(B, maps)``; not defined for ZipIt!, whose merged channels have no single counterpart in A) and
    + REPAIR(P) (targets from the permutation-aligned B instead, defined for every method) and + RESET
    (BatchNorm statistics recomputed). Feature statistics for OT/CCA/ZipIt! come from one pass over the
    training split; all merged models are evaluated in ONE pass over the test split. "B in A's basis" is the
    accuracy of the rewritten B alone: what the map's approximation after each ReLU costs before any merging.

Baseline / goal
    permutation + REPAIR, same models, same run. Goal (issue 5): the best map-based merge beats it.

Run
    python bench/map_merges.py                      # width 32, seeds 0 and 1 (~1-2 min on 2 CPU cores)
    python bench/map_merges.py --width 16 --seeds 3 4
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core machines: no spinning OpenMP threads

import argparse
import time

import torch

from mergescope.align import match_many
from mergescope.align.covariance import group_covariances
from mergescope.align.regression import regression_subset
from mergescope.data import iter_batches, load_digits
from mergescope.evaluate import evaluate_models
from mergescope.merge import interpolate_model, repair_and_reset
from mergescope.merge.cca import cca_maps
from mergescope.merge.maps import (
    map_layout,
    map_model,
    merge_with_maps,
    permutation_maps,
)
from mergescope.merge.ot import ot_maps
from mergescope.merge.regression_merge import regression_maps
from mergescope.merge.zipit import zipit_merge
from mergescope.models import create_model
from mergescope.perm import build_spec
from mergescope.train import TrainConfig, train_model

ALPHA = 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=32, help="cnn_digits width")
    p.add_argument("--seeds", type=int, nargs=2, default=(0, 1), help="init + training seeds of A and B")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    train, test = load_digits("train"), load_digits("test")

    models = []
    for s in args.seeds:
        m = create_model("cnn_digits", seed=s, width=args.width)
        train_model(m, train, TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, seed=s), progress=False)
        models.append(m.eval())
    a, b = models
    spec = build_spec(a)
    layout = map_layout(a, spec)

    def train_batches():
        return iter_batches(train, 500)

    [match] = match_many(a, [b], spec, train_batches())
    [stats] = group_covariances(a, [b], spec, train_batches())
    subset = regression_subset(train)
    [stats_5] = group_covariances(a, [b], spec, iter_batches(train, 50, ids=subset))

    maps = {  # name -> maps of B into A's basis
        "permutation": permutation_maps(match.perms),
        "OT ε=0.01": ot_maps(stats, reg=0.01)[0],
        "OT ε=0.05": ot_maps(stats, reg=0.05)[0],
        "CCA λ=0.1": cca_maps(stats, ridge=0.1)[0],
        "CCA λ=0.01": cca_maps(stats, ridge=0.01)[0],
        "regression all (5/class)": regression_maps(stats_5)[0],
        "regression all (train)": regression_maps(stats)[0],
        "regression 25% refit (train)": regression_maps(stats, 0.25)[0],
        "regression 10% refit (train)": regression_maps(stats, 0.10)[0],
        "regression all, pinv (train)": regression_maps(stats, inverse="pinv")[0],
    }
    merged = {"direct average": interpolate_model(a, b, ALPHA)}
    merged.update({name: merge_with_maps(a, b, mp, ALPHA, layout) for name, mp in maps.items()})
    merged["ZipIt!"] = zipit_merge(a, b, None, spec, ALPHA, layout=layout, stats=stats).model
    endpoints = {name: map_model(b, mp, layout) for name, mp in maps.items()}

    repaired, repaired_p, reset = {}, {}, {}
    aligned_b = map_model(b, maps["permutation"], layout)  # exact: a permutation
    for name, model in merged.items():
        if name == "ZipIt!":
            continue
        repaired[name] = _copy(model)
        end_b = b if name == "direct average" else endpoints[name]
        repair_and_reset(a, end_b, spec, train_batches(), repair=[(ALPHA, repaired[name])])
    # REPAIR targets from the permuted B instead: every merge but the direct average, in one pass
    repaired_p = {name: _copy(m) for name, m in merged.items() if name not in ("direct average", "permutation")}
    repair_and_reset(a, aligned_b, spec, train_batches(), repair=[(ALPHA, m) for m in repaired_p.values()])
    reset = {name: _copy(model) for name, model in merged.items()}
    repair_and_reset(a, b, spec, train_batches(), reset=list(reset.values()))

    everything = {"A": a, "B": b}
    everything.update({f"{n}|plain": m for n, m in merged.items()})
    everything.update({f"{n}|repair": m for n, m in repaired.items()})
    everything.update({f"{n}|repair_p": m for n, m in repaired_p.items()})
    everything.update({f"{n}|reset": m for n, m in reset.items()})
    everything.update({f"{n}|endpoint": m for n, m in endpoints.items()})
    scores = evaluate_models(everything, iter_batches(test, 500))  # ONE pass for every model

    acc = {k: 100 * v["accuracy"] for k, v in scores.items()}
    print(f"cnn_digits width={args.width} seeds={tuple(args.seeds)} epochs={args.epochs}  α={ALPHA}  "
          f"test accuracy (%), {len(test)} images")
    print(f"endpoints: A {acc['A']:.1f}  B {acc['B']:.1f}  mean {(acc['A'] + acc['B']) / 2:.1f}")
    head = f"{'method':<30} {'plain':>7} {'+REPAIR':>8} {'+REPAIR(P)':>11} {'+RESET':>7} {'B in A basis':>13}"
    print(head)
    print("-" * len(head))
    def cell(name, kind, width):
        key = f"{name}|{kind}"
        return f"{acc[key]:>{width}.1f}" if key in acc else f"{'n/a':>{width}}"

    for name in merged:
        print(f"{name:<30} {cell(name, 'plain', 7)} {cell(name, 'repair', 8)} "
              f"{cell(name, 'repair_p', 11)} {cell(name, 'reset', 7)} {cell(name, 'endpoint', 13)}")
    best = max((k for k in acc if "|" in k and not k.startswith(("permutation", "direct"))
                and not k.endswith("endpoint")), key=acc.get)
    base = acc["permutation|repair"]
    print(f"best map-based merge: {best.replace('|', ' + ')} {acc[best]:.1f} vs permutation + REPAIR {base:.1f} "
          f"(difference {acc[best] - base:+.1f} points)")
    print(f"total {time.perf_counter() - t_start:.0f} s")


def _copy(model):
    import copy
    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
