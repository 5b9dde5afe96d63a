"""Activation matching (Jordan et al. 2023, REPAIR; Ainsworth et al. 2023, Git Re-Basin §3.1).

For every permutation group, the Pearson correlation between each channel of the reference and each channel of
the other model, over images × positions; the permutation maximizes the total matched correlation
(``scipy.optimize.linear_sum_assignment``). All groups of all models are measured in ONE pass over the data.

Where a group is measured (``points``, :func:`mergescope.perm.observation_points`): by default where the
reference code measures it — a residual stream on the output of its stage's last block (REPAIR's notebooks
correlate ``blocks[:k+1]`` of both nets, k the stage's last block); ``points="all"`` averages the correlation
matrices of every place the stream is observed (stem activation and every block output). Groups observed at
one place (all non-residual ones) are measured there under both rules.

Inside a ``torch.distributed`` process group each rank walks its share of the batches and the co-moments are
merged over the ranks before any correlation is taken (:mod:`mergescope.distributed`): every rank gets the
one-process permutations.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..distributed import merge_over_ranks, shard
from ..errors import NumericsError
from ..perm import PermSpec, observation_points
from ..probe.blocks import Gathered
from ..probe.engine import run_pass
from ..probe.stats import CoMoments, co_update
from ..probe.taps import tap_model
from ..timing import stage
from ._assignment import best_permutation
from .result import MatchResult


def match_many(
    reference: nn.Module,
    others: Sequence[nn.Module],
    spec: PermSpec,
    batches: Iterable,
    device: torch.device | str = "cpu",
    progress: bool = False,
    total: int | None = None,
    points: str = "stage_end",
) -> list[MatchResult]:
    """Align every model in ``others`` to ``reference`` by activation correlation, in one data pass.

    Args:
        reference: model A (all models must share the architecture described by ``spec``).
        others: the models to permute onto the reference.
        spec: the permutation spec of the architecture (:func:`mergescope.perm.build_spec`).
        batches: iterable of batches with an ``.x`` tensor (e.g. :func:`mergescope.data.iter_batches`).
        points: ``"stage_end"`` (default, the reference's) or ``"all"`` (module docstring).

    Returns:
        One :class:`MatchResult` per model in ``others``.

    Example:
        >>> [res] = match_many(model_a, [model_b], build_spec(model_a), iter_batches(ds, 500))
        >>> model_b_aligned = permute_model(model_b, spec, res.perms)
    """
    where = {g: observation_points(group, points) for g, group in spec.groups.items()}
    taps = list({t.name: t for pts in where.values() for t in pts}.values())
    tapped = {str(i): tap_model(m, [t.name for t in taps]).to(device).eval()
              for i, m in enumerate([reference, *others])}
    stats = {(k, t.name): CoMoments() for k in range(1, len(others) + 1) for t in taps}

    gathered = Gathered(co_update)  # linear layers' batches added in groups (the (Ca, Cb) float64 sums)

    def consume(batch, x, outs):
        ref_feats = outs["0"][1]
        for t in taps:  # each tensor in its own layout (no reshape copies); the reference's moments once
            gathered.add(t.name, [stats[k, t.name] for k in range(1, len(others) + 1)], ref_feats[t.name],
                         [outs[str(k)][1][t.name] for k in range(1, len(others) + 1)], t.channel_dim)

    batches, total = shard(batches, total)
    run_pass(tapped, batches, consume, device=device, desc="matching", total=total, progress=progress)
    with torch.inference_mode(), stage("statistics"):  # the pass's tensors are inference tensors
        gathered.flush()
    stats = dict(zip(stats, merge_over_ranks(list(stats.values()), device)))
    _check_finite(stats)

    results = []
    for k in range(1, len(others) + 1):
        perms, sims, dead_a, dead_b = {}, {}, {}, {}
        for gname, pts in where.items():
            corr = sum(stats[k, t.name].correlation() for t in pts) / len(pts)
            da = torch.stack([stats[k, t.name].dead()[0] for t in pts]).all(0)
            db = torch.stack([stats[k, t.name].dead()[1] for t in pts]).all(0)
            sims[gname] = corr.cpu().numpy()
            perms[gname] = best_permutation(sims[gname], f"correlation ({gname})")
            dead_a[gname] = da.nonzero().flatten().tolist()
            dead_b[gname] = db.nonzero().flatten().tolist()
        results.append(MatchResult(perms, sims, "activation", dead_a, dead_b))
    return results


def _check_finite(stats: dict[tuple[int, str], CoMoments]) -> None:
    """A NaN/Inf activation anywhere in the pass reaches the reduced moments: checked once, on those."""
    for (k, name), st in stats.items():
        if st.cab is None:
            raise NumericsError("no data: the batches were empty")
        for side, m in ((0, st.a), (k, st.b)):
            if not (torch.isfinite(m.mean).all() and torch.isfinite(m.m2).all()):
                who = "the reference model" if side == 0 else f"model {side}"
                raise NumericsError(f"NaN/Inf activations at layer '{name}' of {who}")


def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermSpec, batches: Iterable,
                        **kw) -> MatchResult:
    """Align ``model_b`` to ``model_a`` by activation correlation (see :func:`match_many`)."""
    return match_many(model_a, [model_b], spec, batches, **kw)[0]


def mean_matched_correlation(result: MatchResult) -> float:
    """Average over all channels of all groups of the matched correlation (a one-number alignment quality)."""
    return float(np.concatenate([result.matched_similarity(g) for g in result.perms]).mean())
