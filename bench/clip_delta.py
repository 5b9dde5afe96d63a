"""δ (the CLIP-δ formula) for a whole model pair, with the fallback embedder behind an ``EmbeddingCache`` (issue 4).

What it measures
    Two ``cnn_digits`` models (seeds 0 and 1, untrained unless ``--epochs``), B aligned to A by activation
    matching, both probed on digits (top-k = ``--k``, every layer). Then, layer by layer in probe order,
    ``clip_delta_from_ids(topk_A, topk_B, lambda ids: cache.get(ids, digits))`` with the fallback embedder
    (penultimate features of model A — not CLIP). Per layer: wall time (embedding of the images not cached yet
    + δ), top-k slots (2 · C · k ids looked up), distinct images in the layer's sets, images newly embedded.
    A second sweep over the now-warm cache times δ alone.

What must hold
    Each distinct image is embedded exactly once: after the sweep, ``cache.computed`` equals the number of
    distinct ids over all layers, each layer embeds exactly its ids not seen in earlier layers, and the warm
    sweep embeds nothing (asserted).

Run
    python bench/clip_delta.py                 # untrained pair, k = 10
    python bench/clip_delta.py --epochs 2 --k 20
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time

import torch

from mergescope.align import match_many
from mergescope.compare import clip_delta_from_ids
from mergescope.studies.compare import CompareConfig, make_embedder
from mergescope.data import iter_batches, load_digits
from mergescope.embed import EmbeddingCache
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model
from mergescope.probe import probe


def train(model, data, epochs: int, seed: int):
    """Plain SGD on digits (only with ``--epochs``; the benchmark does not need trained models)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for batch in iter_batches(data, 64, shuffle=True, seed=seed):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(batch.x), batch.y).backward()
            opt.step()
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_digits("train")
    a, b = (create_model("cnn_digits", width=args.width, seed=s) for s in (0, 1))
    if args.epochs:
        a, b = train(a, data, args.epochs, 0), train(b, data, args.epochs, 1)
        with torch.no_grad():
            acc = [sum(int((m(bt.x).argmax(1) == bt.y).sum()) for bt in iter_batches(data, 512)) / len(data)
                   for m in (a, b)]
        print(f"train accuracy after {args.epochs} epochs: A {acc[0]:.3f}, B {acc[1]:.3f}")
    spec = build_spec(a, torch.zeros(2, 1, 8, 8))
    [match] = match_many(a, [b], spec, iter_batches(data, 512))
    result = probe({"A": a, "B_aligned": permute_model(b, spec, match.perms)}, data, k=args.k, batch_size=512,
                   progress=False)
    layers = result.layers["A"]
    cache = EmbeddingCache(make_embedder(CompareConfig(), a, data))
    embed = lambda ids: cache.get(ids, data)
    print(f"{len(data)} digits images, cnn_digits width {args.width}, epochs {args.epochs}, k {args.k}, "
          f"embedder: {cache.name}")
    print(f"{'layer':<14}{'C':>5}{'slots':>8}{'distinct':>10}{'embedded':>10}{'s (cold)':>10}{'s (warm)':>10}"
          f"{'defined':>9}")
    seen: set[int] = set()
    total = {"slots": 0, "cold": 0.0, "warm": 0.0}
    for layer in layers:
        ids_a, ids_b = result["A", layer].topk_ids, result["B_aligned", layer].topk_ids
        both = torch.cat([ids_a.reshape(-1), ids_b.reshape(-1)])
        both = both[both >= 0]
        distinct = set(both.tolist())
        before = cache.computed
        t = time.perf_counter()
        res = clip_delta_from_ids(ids_a, ids_b, embed)
        cold = time.perf_counter() - t
        new = cache.computed - before
        assert new == len(distinct - seen), (layer, new, len(distinct - seen))  # only ids not embedded before
        seen |= distinct
        t = time.perf_counter()
        again = clip_delta_from_ids(ids_a, ids_b, embed)
        warm = time.perf_counter() - t
        assert cache.computed == len(seen) and torch.equal(again.delta, res.delta)  # warm: nothing embedded
        total["slots"] += both.numel()
        total["cold"] += cold
        total["warm"] += warm
        print(f"{layer:<14}{ids_a.shape[0]:>5}{both.numel():>8}{len(distinct):>10}{new:>10}{cold:>10.3f}"
              f"{warm:>10.4f}{int(res.defined.sum()):>5}/{ids_a.shape[0]}")
    assert cache.computed == len(seen) == len(cache)  # every distinct image embedded exactly once
    print(f"{'total':<14}{'':>5}{total['slots']:>8}{len(seen):>10}{cache.computed:>10}{total['cold']:>10.3f}"
          f"{total['warm']:>10.4f}")
    print(f"embedded {cache.computed} distinct images for {total['slots']} top-k slots "
          f"({total['slots'] / max(cache.computed, 1):.1f} slots per embedding); lookups requested: {cache.requested}")


if __name__ == "__main__":
    main()
