"""A merge plan: which methods merge which models with which weights — the one skeleton under the α sweep and the
N-model merge.

The sweep is a plan over α (weightings (α, 1−α) of two models, :mod:`mergescope.studies.sweep`); the N-model merge
is the same plan with one weighting (1/N each, :mod:`mergescope.studies.merge`). Executing a plan takes, whatever
the number of models, methods and weightings:

1. an alignment pass if a method needs matches (activation matching of every model to the reference; weight
   matching needs no data) and one pass of joint feature statistics if a method needs them (at the observation
   points and, for OT fusion, the pre-activations); each method then turns these into every model's maps into the
   merged space (:func:`mergescope.merge.methods.get_merge_method`, one code path per method; once per method, or
   per weighting for maps that depend on the weights);
2. θ = Σ_k w_k·T_k(θ_k) for every method and weighting (:func:`mergescope.merge.merge_models_with_maps`; for
   permutations exactly permute-then-interpolate);
3. one pass of REPAIR and RESET for every merged model that asks for it (:func:`mergescope.merge.repair_many`);
4. one pass per evaluation split for every model at once (the inputs, their aligned copies and every merge).

A method that is not :attr:`~mergescope.merge.methods.MergeMethod.plan_ready` (aggregation over a shared base,
soups, Fisher, RegMean, ensembles, the learned permutations ``ste``, compositions ``alignment>aggregation``) gets
its maps in step 1 like any other and replaces step 2 by its own :meth:`~mergescope.merge.methods.MergeMethod.merge`,
reading what the plan gives it (:attr:`MergePlan.base`, ``data``, ``heldout``, ``sample_counts``); the passes over
data that such a step makes itself are counted (:func:`method_passes`). Fixes apply as to any merge; an ensemble
takes none (it is not one set of weights).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..align import MatchResult, match_many, weight_matching
from ..align.covariance import group_covariances_at
from ..data import ImageDataset, iter_batches, len_batches
from ..errors import ArchitectureError, MergescopeError
from ..evaluate import evaluate_models
from ..merge import RepairTarget, map_layout, merge_models_with_maps, repair_many
from ..merge.methods import AlignInputs, MergeMethod
from ..merge.recipes import (ALL_METHODS, COMBINED, FIXES, REPAIR_FIXES, check_methods, corrections, has_batchnorm,
                             map_places, resolve_method, split_method)
from ..perm import PermSpec, build_spec, permute_model
from ..timing import staged
from .common import check_same_architecture

MATCHINGS = ("activation", "weight")  # activation matching (Jordan et al. 2023), weight matching (Git Re-Basin Alg. 1)


@dataclass
class MergePlan:
    """Methods × weightings over a list of models (the first is the reference whose channel space is merged into).

    Attributes:
        methods: merge method names (base or base+fix, :mod:`mergescope.merge.recipes`).
        weightings: one weight per model for each merge, e.g. ``[(α, 1−α) for α in alphas]`` or ``[(1/N,) * N]``.
        matching: how ``permuted`` matches the models to the reference: ``"activation"`` or ``"weight"``.
        batch_size: images per batch in every pass.
        stats_ids: images of the statistics set used for matching, map statistics and REPAIR (None: all).
        match_points: where a residual stream is measured: ``"stage_end"`` (REPAIR's reference) or ``"all"``.
        match_always: match the models to the reference even when no method needs it.
        base: the shared base the models were fine-tuned from (task vectors: methods that need ``"base"``).
        data: the batches a combine step reads (Fisher, RegMean, SWA's BatchNorm pass, ``ste``): one factory,
            or one per model (each model's own data); None: the statistics set's batches.
        heldout: a model -> its held-out score (greedy soup, :func:`mergescope.merge.soups.heldout_accuracy`).
        sample_counts: each model's number of training examples (FedAvg).
        params: method (base name) -> its hyperparameters by name (the rest at the reference's defaults).
    """

    methods: Sequence[str]
    weightings: Sequence[Sequence[float]]
    matching: str = "activation"
    batch_size: int = 500
    stats_ids: Sequence[int] | None = None
    match_points: str = "stage_end"
    match_always: bool = False  # match the models even if no method needs it (the sweep reports B aligned)
    base: nn.Module | None = None
    data: Callable[[], Any] | Sequence[Callable[[], Any]] | None = None
    heldout: Callable[[nn.Module], float] | None = None
    sample_counts: Sequence[int] | None = None
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass
class PlanResult:
    """What executing a plan produced.

    Attributes:
        merged: (method, weighting index) -> the merged model.
        scores: split -> model key -> {"loss", "accuracy"}; keys are ``"model k"``, ``"model k aligned"`` (when
            the models were matched) and ``"<method>@<weighting index>"``.
        matches: the matches of models[1:] to the reference (None when no method needed them).
        aligned: models[1:] permuted onto the reference (empty without matches).
        methods: the methods run (``+reset`` dropped for models without BatchNorm, every fix for ensembles).
        passes: pass kind -> the passes over data made (``"method data"``, ``"held-out"``: :func:`method_passes`).
    """

    merged: dict[tuple[str, int], nn.Module]
    scores: dict[str, dict[str, dict]]
    matches: list[MatchResult] | None
    aligned: list[nn.Module]
    methods: list[str]
    passes: dict[str, int]
    timings: dict[str, float]
    spec: PermSpec
    corrections: dict[str, str] = field(default_factory=dict)
    method_seconds: dict[str, float] = field(default_factory=dict)  # base -> seconds of its own maps and merges


def plan_methods(methods: Sequence[str]) -> list[str]:
    """The methods, in order and without repeats: any of :data:`~mergescope.merge.recipes.ALL_METHODS`, of
    :data:`~mergescope.merge.recipes.COMBINED` with or without a fix, or a composition ``alignment>aggregation``;
    an unknown one is a one-line error (a composition's names the part that is wrong)."""
    methods = list(dict.fromkeys(methods))
    for method in methods:
        if ">" in split_method(method)[0]:
            resolve_method(method)
    return check_methods(methods, (*ALL_METHODS, *(b + f for b in COMBINED for f in FIXES),
                                   *(m for m in methods if ">" in split_method(m)[0])))


def method_passes(entry: MergeMethod, params: Mapping[str, Any], n: int, step: str) -> dict[str, int]:
    """The passes over data a method's own ``step`` (``"align"`` or ``"combine"``) makes beyond the plan's:
    ``"method data"`` — ``ste``'s alignment ``epochs`` per other model (a composition's at the defaults); Fisher
    and RegMean one per model, SWA one (its BatchNorm statistics) — and ``"held-out"`` — greedy soup N (one per
    ingredient) + N − 1 (one per candidate soup)."""
    align, _, combine = entry.name.rpartition(">")
    if step == "align":
        if "ste" not in (align, combine):
            return {"method data": 0}
        epochs = params["epochs"] if combine == "ste" else resolve_method("ste")[0].defaults()["epochs"]
        return {"method data": epochs * (n - 1)}
    return {"method data": {"fisher": n, "regmean": n, "swa": 1}.get(combine, 0),
            "held-out": 2 * n - 1 if combine == "greedy_soup" else 0}


def missing_input(methods: Sequence[str], given: Mapping[str, object]) -> tuple[str, str] | None:
    """The first (method, need) among ``"base"``, ``"heldout"``, ``"sample_counts"`` that ``given`` (need ->
    value) leaves None, or None when every method has what it needs."""
    for method in methods:
        for need in ("base", "heldout", "sample_counts"):
            if need in resolve_method(method)[0].needs and given.get(need) is None:
                return method, need
    return None


def merge_key(method: str, index: int) -> str:
    """The evaluation key of a merged model."""
    return f"{method}@{index}"


def check_function_preserved(model: nn.Module, permuted: nn.Module, x: torch.Tensor) -> None:
    """Permuting must not change what a model computes; a failure here is a spec bug, said plainly."""
    with torch.inference_mode():
        ya, yb = model.eval()(x), permuted.eval()(x)
    err = (ya - yb).abs().max().item() / max(ya.abs().max().item(), 1e-12)
    if err > 1e-4:
        raise ArchitectureError(f"the permuted model's outputs differ by {err:.2e} (relative): "
                                "the derived permutation spec is wrong for this architecture")


@staged("assignment")  # what its data pass's own stages leave: the assignment problems, weight matching
def match_models(matching: str, reference: nn.Module, others: Sequence[nn.Module], spec: PermSpec, batches,
                 total: int | None = None, device: torch.device | str = "cpu", progress: bool = False,
                 points: str = "stage_end") -> tuple[list[MatchResult], int]:
    """Every other model matched to the reference by ``matching`` (:data:`MATCHINGS`); also the number of data
    passes it took. ``batches()`` makes the statistics set's batches (activation matching: one pass for all)."""
    if matching == "activation":
        return match_many(reference, others, spec, batches(), device=device, progress=progress, total=total,
                          points=points), 1
    if matching == "weight":
        return [weight_matching(reference.state_dict(), m.state_dict(), spec, device=device) for m in others], 0
    raise MergescopeError(f"unknown matching '{matching}'; use one of: {', '.join(MATCHINGS)}")


def execute_plan(
    plan: MergePlan,
    models: Sequence[nn.Module],
    train: ImageDataset,
    evals: Mapping[str, ImageDataset],
    spec: PermSpec | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> PlanResult:
    """Align, merge every method at every weighting, REPAIR/RESET, and evaluate everything (module docstring).

    Args:
        plan: the methods, weightings and statistics settings.
        models: two or more trained models of one architecture; the first is the reference.
        train: the statistics set (matching, feature statistics, REPAIR/RESET).
        evals: split name -> dataset to evaluate on.
        spec: the permutation spec (default: traced from the reference).
    """
    methods = plan_methods(plan.methods)
    n = len(models)
    if n < 2:
        raise MergescopeError(f"merging needs at least two models, got {n}")
    for w in plan.weightings:
        if len(w) != n:
            raise MergescopeError(f"a weighting of {len(w)} weights for {n} models")
    for m in models[1:]:
        check_same_architecture(models[0], m)
    entries = {b: resolve_method(b)[0] for b in dict.fromkeys(split_method(m)[0] for m in methods)}
    for entry in entries.values():
        entry.check_models(n)
    missing = missing_input(list(entries), {"base": plan.base, "heldout": plan.heldout,
                                            "sample_counts": plan.sample_counts})
    if missing:
        raise MergescopeError(f"{missing[0]} needs MergePlan.{missing[1]}, which is not given")
    models = [m.to(device).eval() for m in models]
    ref, others = models[0], models[1:]
    methods = [m for m in methods if split_method(m)[1] != "reset" or has_batchnorm(ref)]
    methods = [m for m in methods if not split_method(m)[1] or entries[split_method(m)[0]].family != "ensemble"]
    ids = None if plan.stats_ids is None else torch.as_tensor(list(plan.stats_ids))

    def stats_batches():
        return iter_batches(train, plan.batch_size, ids=ids)

    n_stats = len_batches(train, plan.batch_size, ids=ids)
    probe_x = next(iter(stats_batches())).x[:8].to(device)
    spec = spec or build_spec(ref, probe_x)
    places = map_places(list(entries))  # where some method needs joint statistics: one pass gathers them all
    passes = {"matching": 0, **({"map statistics": 0} if places else {}), "repair/reset": 0, "evaluation": 0}
    combined = {b: e for b, e in entries.items() if not e.plan_ready}
    if combined:
        passes.update({"method data": 0, "held-out": 0})
    hps = {b: e.resolve(plan.params.get(b)) for b, e in entries.items()}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    matches, aligned = None, []
    if plan.match_always or any("matches" in e.needs for e in entries.values()):
        matches, used = match_models(plan.matching, ref, others, spec, stats_batches, n_stats, device, progress,
                                     plan.match_points)
        passes["matching"] += used
        aligned = [permute_model(m, spec, r.perms) for m, r in zip(others, matches)]
        for m, a in zip(others, aligned):
            check_function_preserved(m, a, probe_x)
    timings["matching"] = time.perf_counter() - t0
    stats = None
    if places:
        t0 = time.perf_counter()
        stats = group_covariances_at(ref, others, spec, stats_batches(), places, device=device, progress=progress,
                                     total=n_stats, points=plan.match_points)
        passes["map statistics"] += 1
        timings["map statistics"] = time.perf_counter() - t0
    seconds: dict[str, float] = {}
    maps: dict[tuple, list] = {}  # (method, weights or None) -> per model, its maps into the merged space

    def maps_for(base: str, weights: Sequence[float]) -> list:
        """Per model, its maps into the merged space (computed once per method unless they depend on the
        weights, as ZipIt!'s do)."""
        key = (base, tuple(weights) if entries[base].uses_weights else None)
        if key not in maps:
            t0 = time.perf_counter()
            maps[key] = entries[base](inputs_for(weights), **({} if entries[base].combine else hps[base]))
            if base in combined:
                passes["method data"] += method_passes(combined[base], hps[base], n, "align")["method data"]
            seconds[base] = seconds.get(base, 0.0) + time.perf_counter() - t0
        return maps[key]

    def inputs_for(weights: Sequence[float]) -> AlignInputs:
        data = stats_batches if plan.data is None else plan.data
        return AlignInputs(models=models, spec=spec, matches=matches, stats=stats, device=device,
                           weights=list(weights), base=plan.base, data=data, heldout=plan.heldout,
                           sample_counts=plan.sample_counts)

    layout = map_layout(ref, spec)
    merged: dict[tuple[str, int], nn.Module] = {}
    repair, reset = [], []
    for i, weights in enumerate(plan.weightings):
        built: dict[str, nn.Module] = {}
        for method in methods:
            base, fix = split_method(method)
            if base not in built:
                base_maps = maps_for(base, weights)
                t0 = time.perf_counter()
                if base in combined:
                    built[base] = combined[base].merge(inputs_for(weights), maps=base_maps, layout=layout,
                                                       **hps[base])
                    for kind, used in method_passes(combined[base], hps[base], n, "combine").items():
                        passes[kind] += used
                else:
                    built[base] = merge_models_with_maps(models, list(weights), base_maps, layout)
                seconds[base] = seconds.get(base, 0.0) + time.perf_counter() - t0
            net = merged[method, i] = copy.deepcopy(built[base]) if fix else built[base]
            if fix in REPAIR_FIXES:
                repair.append(RepairTarget(net, tuple(weights), maps_for(base, weights), REPAIR_FIXES[fix]))
            elif fix == "reset":
                reset.append(net)

    t0 = time.perf_counter()
    if repair or reset:  # every REPAIR targets the original models, seen through each method's maps
        repair_many(models, spec, stats_batches(), repair=repair, reset=reset, device=device, progress=progress,
                    total=n_stats)
        passes["repair/reset"] += 1
    timings["repair/reset"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    everything = {f"model {k}": m for k, m in enumerate(models)}
    everything.update({f"model {k} aligned": a for k, a in enumerate(aligned, start=1)})
    everything.update({merge_key(m, i): net for (m, i), net in merged.items()})
    scores = {}
    for split, ds in evals.items():
        scores[split] = evaluate_models(everything, iter_batches(ds, plan.batch_size), device=device,
                                        progress=progress, total=len_batches(ds, plan.batch_size),
                                        desc=f"evaluating on {split}")
        passes["evaluation"] += 1
    timings["evaluation"] = time.perf_counter() - t0
    return PlanResult(merged, scores, matches, aligned, methods, passes, timings, spec, corrections(spec, methods),
                      seconds)
