"""The probe: one streaming pass over a dataset serves many models and all their layers at once.

For every channel of every probed layer of every model it records the k images that activate the channel most
(activation = spatial max of the channel's feature map by default, or the mean; DESIGN.md "Definitions"),
the running mean/std of that activation, and optionally the full activation matrix on a fixed image subset D'.
Each batch is loaded once and fed to every model; memory is O(models · channels · k) plus the subset.

With a ``run_dir`` the result is stored (see :mod:`mergescope.probe.store`), a finished probe of the same
config is loaded instead of recomputed, and an interrupted pass resumes from its last checkpoint. Inside a
``torch.distributed`` process group the pass is sharded over the ranks automatically
(:mod:`mergescope.probe.distributed`).
"""
from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runs.jsonio import package_version
from ..data.base import ImageDataset, as_ids
from ..data.loader import iter_batches, len_batches
from ..errors import ArchitectureError, MergescopeError
from ..perm import LAYER_SELECTIONS, select_layers
from ..perm.spec import traced_spec
from .distributed import barrier, batch_range, gather_flags, gather_state, world
from .engine import run_pass
from .reduce import REDUCTIONS, tap_reduced
from .result import ProbeResult
from .state import LayerShapes, ProbeState
from .store import (
    FORMAT,
    RESULT_FILE,
    config_mismatch,
    partial_file,
    probe_tensors,
    read_meta,
    read_probes,
    result_from_file,
    save_probe,
    state_sha256,
    stored_config,
    write,
)

Layers = Mapping[str, str | Sequence[str]] | str | Sequence[str] | None
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}  # the forward's precision -> autocast dtype (None: off)


def probe(
    models: Mapping[str, nn.Module],
    dataset: ImageDataset,
    layers: Layers = "conv",
    k: int = 10,
    reduction: str = "max",
    batch_size: int = 256,
    subset_ids: Any = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    run_dir: str | Path | None = None,
    resume: bool = True,
    checkpoint_every: int | None = 50,
    checkpoint_dir: str | Path | None = None,
    other_pass: str = "error",
    num_workers: int | None = None,
    precision: str = "float32",
    permuted: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
) -> ProbeResult:
    """Probe every layer of every model in one pass over ``dataset``.

    Args:
        models: name -> model (names become file keys: no ``/``). Models are moved to ``device`` and probed in
            eval mode; their train/eval flags are restored afterwards.
        dataset: an index-stable dataset; image ids are its indices.
        layers: a selection of :func:`mergescope.perm.select_layers` — ``"conv"`` (default; None means the
            same): the layers with spatial feature maps, i.e. the output of each conv's nonlinearity and, in
            ResNets, every block output (a model without any, e.g. an MLP: all its layers); ``"all"``: linear
            layers too — or canonical layer names (:func:`mergescope.perm.list_layers`, any node name of the
            traced graph), one list for all models, or a dict model -> selection or list.
        k: images kept per channel.
        reduction: ``"max"`` or ``"mean"`` over the spatial positions of a feature map.
        batch_size: images per batch (the batch sequence is fixed: no shuffle, so resuming is exact).
        subset_ids: optional fixed subset D' (unique ids); its full activation matrix is kept per layer.
        device: where the models run and the accumulators live.
        progress: show a progress bar (rank 0 only).
        run_dir: directory for ``probe.safetensors`` + ``probe.json`` and pass checkpoints; None keeps
            everything in memory.
        resume: reuse a finished result / continue a checkpoint of the same config in ``run_dir``, raising
            :class:`MergescopeError` if what is stored there has a different config; False recomputes from
            scratch and overwrites.
        checkpoint_every: save the pass state every this many batches (None: never).
        checkpoint_dir: where the pass checkpoints go (default ``run_dir``), e.g. a folder that outlives a
            staging folder (:class:`mergescope.runs.Staging`'s ``resume``).
        other_pass: what a checkpoint of a different pass (other models, layers, k...) in ``checkpoint_dir``
            means: ``"error"`` (default) raises, ``"restart"`` removes it with a note and starts over.
        num_workers: DataLoader workers for datasets that are not in memory (default: the process's setting,
            :func:`mergescope.data.set_workers`).
        precision: the models' forward: ``"float32"`` (default, as the thesis probes) or ``"bfloat16"``
            (``torch.autocast``: convolutions and matrix products in bfloat16, about twice as fast on a GPU with
            bfloat16 units; activations carry bfloat16's 8 bits, so near-equal images can swap places in a
            top-k). Reductions, moments and D′ are taken from the activations in float32/float64 either way.
        permuted: models of ``models`` that are channel permutations of another one there, derived instead of run:
            name -> (source name, {layer: order}), channel ``c`` of each of the source's probed layers in the
            named model being channel ``order[layer][c]`` of the source's — as in a model made by
            :func:`mergescope.perm.permute_model` (orders: :func:`mergescope.perm.layer_orders`). Its probe is the
            source's re-indexed (:meth:`LayerProbe.reindexed`): what its forward gives up to floating-point
            summation order, for none of its forward time. The config still records it with its own weights'
            hash, so a stored result is reused exactly when it would be had the model been run.

    Returns:
        A :class:`ProbeResult`; inside a process group every rank returns the same, complete result (only
        rank 0 writes files).

    Example:
        >>> from mergescope.data import load_digits
        >>> from mergescope.models import create_model
        >>> ds = load_digits("train")
        >>> models = {f"seed{s}": create_model("cnn_digits", width=8, seed=s) for s in (0, 1)}
        >>> result = probe(models, ds, progress=False)
        >>> result["seed0", "features.2"].topk_ids.shape  # 8 channels × top 10 image ids
        torch.Size([8, 10])
    """
    models = dict(models)
    _check_arguments(models, dataset, layers, k, reduction, batch_size, checkpoint_every, precision)
    permuted = _check_permuted(permuted, models, layers)
    run_models = {n: m for n, m in models.items() if n not in permuted}
    device = torch.device(device)
    rank, world_size = world()
    subset = _subset(subset_ids, len(dataset))
    run_dir = Path(run_dir) if run_dir is not None else None
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else run_dir
    if other_pass not in ("error", "restart"):
        raise ValueError(f"other_pass must be 'error' or 'restart', got {other_pass!r}")

    with _eval_mode(models.values()):
        run_layers = {n: layers[n] for n in run_models} if isinstance(layers, Mapping) else layers
        tapped, run_shapes = _tap_all(run_models, run_layers, dataset, reduction, device)
        orders = _permuted_orders(permuted, run_shapes)
        shapes = {n: run_shapes[n] if n in run_shapes else run_shapes[permuted[n][0]] for n in models}
        config = _config(models, shapes, k, reduction, dataset, subset, precision)
        pass_config = {**config, "models": {n: config["models"][n] for n in run_models},
                       "layers": {n: config["layers"][n] for n in run_models}}  # what a pass checkpoint holds
        num_batches = len_batches(dataset, batch_size)
        first, stop = batch_range(num_batches, rank, world_size)
        pass_info = {"batch_size": batch_size, "world_size": world_size, "rank": rank, "batches": [first, stop]}
        state = ProbeState(run_shapes, k, subset, device)

        if run_dir is not None:
            finished = _stored_result(run_dir, config, resume)
            if finished is not None:
                return finished
            _resume_state(checkpoints, pass_config, pass_info, state, resume, other_pass)

        def checkpoint() -> None:
            meta = _meta("partial", pass_config, run_shapes, state.images_seen)
            meta["pass"] = {**pass_info, "batches_done": state.batches_done}
            write(checkpoints / partial_file(rank, world_size), probe_tensors(state.layer_probes(), subset), meta)

        def consume(batch, x, outs) -> None:
            state.update(batch.ids, {name: feats for name, (_, feats) in outs.items()})
            if (run_dir is not None and checkpoint_every and state.batches_done % checkpoint_every == 0
                    and first + state.batches_done < stop):
                checkpoint()

        start = first + state.batches_done
        ids = torch.arange(start * batch_size, min(stop * batch_size, len(dataset)))  # this rank's remaining ids
        batches = iter_batches(dataset, batch_size, ids=ids, num_workers=num_workers)
        run_pass(tapped, batches, consume, device=device, desc="probe", total=stop - start,
                 progress=progress and rank == 0, autocast=PRECISIONS[precision])

    if world_size > 1:
        gather_state(state)
    probes = state.layer_probes()
    for name, (source, _) in permuted.items():
        probes[name] = {layer: p.reindexed(orders[name][layer]) for layer, p in probes[source].items()}
    result = ProbeResult({n: probes[n] for n in models}, k, reduction, config["dataset"], state.images_seen, subset,
                         config)
    if run_dir is not None:
        path = run_dir / RESULT_FILE
        if rank == 0:
            save_probe(result, path)
        barrier()  # the result exists before any rank returns or drops its checkpoint
        result.path = path
        partial = checkpoints / partial_file(rank, world_size)
        partial.unlink(missing_ok=True)
        partial.with_suffix(".json").unlink(missing_ok=True)
    return result


def _check_arguments(models: dict[str, nn.Module], dataset: ImageDataset, layers: Layers, k: int, reduction: str,
                     batch_size: int, checkpoint_every: int | None, precision: str) -> None:
    if not models:
        raise MergescopeError("probe needs at least one model")
    for name in models:
        if not isinstance(name, str) or not name or "/" in name:
            raise MergescopeError(f"model names must be non-empty strings without '/', got {name!r}")
    if isinstance(layers, Mapping):
        unknown = [m for m in layers if m not in models]
        missing = [m for m in models if m not in layers]
        if unknown or missing:
            raise MergescopeError(f"layers must name exactly the models {sorted(models)}; "
                                  f"unknown {unknown}, missing {missing}")
    if reduction not in REDUCTIONS:
        raise MergescopeError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if precision not in PRECISIONS:
        raise MergescopeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if k < 1 or batch_size < 1 or (checkpoint_every is not None and checkpoint_every < 1):
        raise MergescopeError(f"k, batch_size and checkpoint_every must be positive, got {k}, {batch_size}, "
                              f"{checkpoint_every}")
    if len(dataset) == 0 or len(dataset) >= 2**32:
        raise MergescopeError(f"the probe handles 1..2**32-1 images, the dataset has {len(dataset)}")


def _check_permuted(permuted: Mapping[str, tuple[str, Mapping[str, Any]]] | None, models: dict[str, nn.Module],
                    layers: Layers) -> dict[str, tuple[str, Mapping[str, Any]]]:
    permuted = dict(permuted or {})
    for name, entry in permuted.items():
        if name not in models:
            raise MergescopeError(f"permuted names '{name}', which is not one of the probed models {sorted(models)}")
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[1], Mapping)):
            raise MergescopeError(f"permuted['{name}'] must be (source model, {{layer: channel order}})")
        source = entry[0]
        if source not in models or source in permuted:
            raise MergescopeError(f"permuted['{name}'] is derived from '{source}', which must be a probed model that "
                                  "is run (not itself permuted)")
        if isinstance(layers, Mapping) and layers[name] != layers[source]:
            raise MergescopeError(f"permuted model '{name}' must be probed at the layers of its source '{source}'")
    return permuted


def _permuted_orders(permuted: dict[str, tuple[str, Mapping[str, Any]]],
                     shapes: LayerShapes) -> dict[str, dict[str, torch.Tensor]]:
    """Each permuted model's channel order at every layer of its source, checked to be a permutation of its
    channels."""
    out = {}
    for name, (source, orders) in permuted.items():
        out[name] = {}
        for layer, (channels, _) in shapes[source].items():
            if layer not in orders:
                raise MergescopeError(f"permuted['{name}'] has no channel order for layer '{layer}'")
            order = torch.as_tensor(orders[layer]).cpu()
            if (order.dim() != 1 or order.dtype not in (torch.int32, torch.int64)
                    or not torch.equal(order.sort().values, torch.arange(channels, dtype=order.dtype))):
                raise MergescopeError(f"permuted['{name}'] at layer '{layer}' must be a permutation of its {channels} "
                                      f"channels, got {tuple(order.shape)} {order.dtype}")
            out[name][layer] = order.long()
    return out


def _subset(subset_ids: Any, n: int) -> torch.Tensor | None:
    if subset_ids is None:
        return None
    ids = as_ids(subset_ids, n)  # [S]
    if ids.unique().numel() != ids.numel():
        raise MergescopeError("subset_ids contains repeated ids")
    return ids


@contextmanager
def _eval_mode(models: Sequence[nn.Module] | Any) -> Iterator[None]:
    """Put every module in eval mode for the pass and restore each one's flag afterwards (the tapped copies
    share the models' submodules)."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def _tap_all(models: dict[str, nn.Module], layers: Layers, dataset: ImageDataset, reduction: str,
             device: torch.device) -> tuple[dict[str, nn.Module], LayerShapes]:
    """The reducing tapped models and, per model and layer, (channels, channel_dim), learnt on a zero image (the
    models are in eval mode here): from the permutation spec, or for layers outside it from a forward of the
    tapped model."""
    example = torch.zeros(1, dataset.num_channels, *dataset.image_size)  # no data read: reuse stays pass-free
    tapped, shapes = {}, {}
    for name, model in models.items():
        wanted = layers[name] if isinstance(layers, Mapping) else layers
        if wanted is None:
            wanted = "conv"
        elif isinstance(wanted, str) and wanted not in LAYER_SELECTIONS:
            wanted = [wanted]  # one layer name
        try:
            spec, traced = traced_spec(model, example)
        except ArchitectureError:
            if isinstance(wanted, str):
                raise
            spec, traced = None, None  # explicit layers of a model the spec can't handle: channels on axis 1
        spec_layers = spec.layers if spec is not None else {}
        names = select_layers(spec, wanted) if isinstance(wanted, str) else list(dict.fromkeys(wanted))
        if not names:
            raise MergescopeError(f"no layers to probe in model '{name}'")
        dims = {layer: spec_layers[layer].channel_dim if layer in spec_layers else 1 for layer in names}
        tapped[name] = tap_reduced(model, dims, reduction, traced).to(device)
        channels = {layer: spec_layers[layer].channels for layer in names if layer in spec_layers}
        if len(channels) < len(names):
            with torch.inference_mode():
                _, acts = tapped[name](example.to(device))  # each [1, C]
            channels = {layer: int(acts[layer].shape[1]) for layer in names}
        shapes[name] = {layer: (channels[layer], dims[layer]) for layer in names}
    return tapped, shapes


def _config(models: dict[str, nn.Module], shapes: LayerShapes, k: int, reduction: str, dataset: ImageDataset,
            subset: torch.Tensor | None, precision: str = "float32") -> dict[str, Any]:
    """What a stored result must match to be reused (JSON-able)."""
    return {
        "models": {n: {"class": type(m).__name__, "state_sha256": state_sha256(m)} for n, m in models.items()},
        "layers": {n: list(layers) for n, layers in shapes.items()},
        "k": k,
        "reduction": reduction,
        "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint, "size": len(dataset)},
        "subset": None if subset is None else {
            "size": len(subset), "sha256": hashlib.sha256(subset.numpy().astype("<i8").tobytes()).hexdigest()},
        "precision": precision,
    }


def _meta(kind: str, config: dict[str, Any], shapes: LayerShapes, num_images: int) -> dict[str, Any]:
    return {"format": FORMAT, "kind": kind, "mergescope_version": package_version(), **config,
            "channels": {m: {layer: c for layer, (c, _) in layers.items()} for m, layers in shapes.items()},
            "num_images": num_images}


_ABSENT, _MATCH, _MISMATCH = 0, 1, 2


def _stored_result(run_dir: Path, config: dict[str, Any], resume: bool) -> ProbeResult | None:
    """A finished result of this config in ``run_dir`` (when every rank sees it), or None."""
    if not resume:
        return None
    path = run_dir / RESULT_FILE
    meta = read_meta(path)
    diff = "" if meta is None else config_mismatch(stored_config(meta), config)
    status = _ABSENT if meta is None else (_MISMATCH if diff else _MATCH)
    everyone = gather_flags([status])[:, 0]
    if bool((everyone == _MISMATCH).any()):
        raise MergescopeError(f"{path} holds a probe of a different config ({diff or 'seen by another rank'}); "
                              "pass resume=False (on the command line: --overwrite) to recompute and overwrite it, or "
                              "use another run directory")
    if bool((everyone == _MATCH).all()):
        return result_from_file(path, meta)
    return None


def _set_aside(path: Path) -> Path:
    """Rename an unreadable file (and its JSON twin) to ``<name>.unreadable[.N]``; return the new path."""
    n, aside = 0, path.with_name(path.name + ".unreadable")
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.unreadable.{n}")
    path.rename(aside)
    twin = path.with_suffix(".json")
    if twin.exists():
        twin.rename(aside.with_name(aside.name + ".json"))
    return aside


def _resume_state(folder: Path, config: dict[str, Any], pass_info: dict[str, Any], state: ProbeState,
                  resume: bool, other_pass: str = "error") -> None:
    """Continue ``state`` from this rank's checkpoint in ``folder`` when it belongs to the same pass (one of
    another pass: an error, or with ``other_pass="restart"`` removed and the pass started over)."""
    if not resume:
        return
    path = folder / partial_file(pass_info["rank"], pass_info["world_size"])
    try:
        meta = read_meta(path)
        if meta is not None:
            probes, _ = read_probes(path, meta)
    except MergescopeError as e:  # e.g. cut short by a kill during its write: set aside, start the pass over
        meta = None
        aside = _set_aside(path)
        print(f"note: the pass checkpoint {path} could not be read ({e}); set aside as {aside.name}, the pass "
              "starts over", file=sys.stderr)
    diff = ""
    if meta is not None:
        saved = stored_config(meta)
        saved["pass"] = {k: v for k, v in meta.get("pass", {}).items() if k != "batches_done"}
        diff = config_mismatch(saved, {**config, "pass": pass_info})
    status = _ABSENT if meta is None else (_MISMATCH if diff else _MATCH)
    other = bool((gather_flags([status])[:, 0] == _MISMATCH).any())
    if other and other_pass == "restart":
        if status == _MISMATCH:
            print(f"note: {path} is a checkpoint of another pass ({diff}); removed, the pass starts over",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
        return
    if other:
        raise MergescopeError(f"cannot resume: {path} is a checkpoint of a different pass "
                              f"({diff or 'seen by another rank'}); pass resume=False (on the command line: --overwrite) to "
                              "start over")
    if status == _MATCH:
        state.restore(probes, meta["pass"]["batches_done"], meta["num_images"])
