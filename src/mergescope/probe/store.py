"""Probe results on disk: computed once, rendered later, and an interrupted pass resumes from its checkpoint.

Format ``mergescope.probe/1`` — a run directory holds:

``probe.safetensors``
    One tensor per (model, layer) and field, keyed ``"{model}/{layer}/{field}"``:

    ==============  =========================  =========================================================
    field           dtype, shape               meaning
    ==============  =========================  =========================================================
    ``topk_values`` float32 [C, k']            each channel's k' = min(k, images) largest activations,
                                               descending
    ``topk_ids``    int64 [C, k']              their image ids (dataset indices); ties: smaller id first
    ``mean``        float64 [C]                mean activation over all images seen
    ``m2``          float64 [C]                sum of squared deviations from the mean (mergeable)
    ``std``         float64 [C]                population std, ``sqrt(m2 / num_images)``
    ``subset``      float16 [|D'|, C]          activations on the subset D' (only when one was given),
                                               rows in the order of the ``subset_ids`` tensor; bfloat16
                                               for a layer beyond float16's range, float32 in files
                                               written before 2026-12 (all read back as float32)
    ==============  =========================  =========================================================

    plus ``subset_ids`` int64 [|D'|] when a subset was given. A channel's activation for an image is the
    spatial max (``reduction: "max"``) or mean (``"mean"``) of its feature map. The safetensors header
    metadata holds the JSON record below under the key ``"mergescope.probe"``, so the file is
    self-contained.

``probe.json``
    The same JSON record, human-readable::

        {"format": "mergescope.probe/1", "kind": "result", "mergescope_version": "0.1.0",
         "models": {"a": {"class": "CifarResNet", "state_sha256": "..."}, ...},
         "layers": {"a": ["relu", "layer1.0", ...], ...},
         "channels": {"a": {"relu": 16, ...}, ...},
         "k": 10, "reduction": "max",
         "dataset": {"name": "cifar10", "fingerprint": "<sha256>", "size": 10000},
         "subset": {"size": 500, "sha256": "<sha256 of the int64 ids>"} or null,
         "num_images": 10000}

    ``models`` .. ``subset`` are the *config*: a later probe with the same config and dataset fingerprint loads
    this file instead of recomputing.

``probe.partial.safetensors`` / ``probe.partial.json`` (``probe.partial.rank{r}.*`` per rank when distributed)
    A checkpoint of an unfinished pass, same layout, ``"kind": "partial"`` and a ``"pass"`` record
    ``{"batch_size", "world_size", "rank", "batches": [first, stop), "batches_done"}``: the batch sequence is
    deterministic (no shuffle), so the pass resumes exactly after ``batches_done`` batches. Removed once the
    result is written.

Every file is written atomically (temporary sibling, then rename); the tensor file is written before its
sidecar and is the one that is read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..runs.atomic import atomic_save_tensors, atomic_write_text
from ..runs.jsonio import package_version
from ..errors import MergescopeError
from ..timing import stage
from .result import LayerProbe, ProbeResult
from .state import compact_subset
from .stats import Moments

FORMAT = "mergescope.probe/1"
META_KEY = "mergescope.probe"
RESULT_FILE = "probe.safetensors"
CONFIG_KEYS = ("models", "layers", "k", "reduction", "dataset", "subset", "precision")  # what must match to
#                                                                                       reuse a result
_CONFIG_DEFAULTS = {"precision": "float32"}  # what a result stored before the key existed was computed with


def stored_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The config keys of a stored result's metadata (or a result's config), the keys older files lack at the value
    they were computed with."""
    return {k: meta.get(k, _CONFIG_DEFAULTS.get(k)) for k in CONFIG_KEYS}


def partial_file(rank: int = 0, world_size: int = 1) -> str:
    """File name of a pass checkpoint (one per rank when the pass is distributed)."""
    return "probe.partial.safetensors" if world_size == 1 else f"probe.partial.rank{rank}.safetensors"


def state_sha256(model: nn.Module) -> str:
    """The fingerprint a stored probe records per model (``models[name]["state_sha256"]``): sha256 of the state dict.

    Covers every key, dtype, shape and byte of ``model.state_dict()`` (buffers included), in order; the device
    does not matter. Equal hashes mean the same weights, so a stored probe can be tied to the models it probed.

    Example:
        >>> state_sha256(aligned_b) == load_probe("runs/x/probe").config["models"]["B_aligned"]["state_sha256"]
    """
    h = hashlib.sha256(b"mergescope.state/1")
    for key, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _key(model: str, layer: str, name: str) -> str:
    return f"{model}/{layer}/{name}"


def probe_tensors(probes: dict[str, dict[str, LayerProbe]], subset_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The flat safetensors dict of the layout above."""
    out: dict[str, torch.Tensor] = {}
    for m, layers in probes.items():
        for layer, p in layers.items():
            out[_key(m, layer, "topk_values")] = p.topk_values
            out[_key(m, layer, "topk_ids")] = p.topk_ids
            if p.moments.mean is not None:
                out[_key(m, layer, "mean")] = p.moments.mean
                out[_key(m, layer, "m2")] = p.moments.m2
                out[_key(m, layer, "std")] = p.moments.std
            if p.subset is not None:
                out[_key(m, layer, "subset")] = compact_subset(p.subset)
    if subset_ids is not None:
        out["subset_ids"] = subset_ids
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` with ``meta`` in the header, then the JSON sidecar."""
    text = json.dumps(meta, sort_keys=False)
    with stage("writing"):
        atomic_save_tensors(path, tensors, {META_KEY: text})
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return path


def read_meta(path: Path) -> dict[str, Any] | None:
    """The JSON record in a probe file's header, or None if there is no such file."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise MergescopeError(f"{path} is not a readable safetensors file ({e}); delete it or use another "
                              "run directory") from None
    if META_KEY not in header:
        raise MergescopeError(f"{path} is not a mergescope probe file (no '{META_KEY}' metadata)")
    meta = json.loads(header[META_KEY])
    if meta.get("format") != FORMAT:
        raise MergescopeError(f"{path} has format {meta.get('format')!r}; this mergescope reads {FORMAT!r}")
    return meta


def read_probes(path: Path, meta: dict[str, Any]) -> tuple[dict[str, dict[str, LayerProbe]], torch.Tensor | None]:
    """The per-layer results and subset ids stored in ``path`` (whose header is ``meta``)."""
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())

        def get(name: str) -> torch.Tensor | None:
            return f.get_tensor(name) if name in names else None

        probes: dict[str, dict[str, LayerProbe]] = {}
        for m, layers in meta["layers"].items():
            probes[m] = {}
            for layer in layers:
                values, ids = get(_key(m, layer, "topk_values")), get(_key(m, layer, "topk_ids"))
                if values is None or ids is None:
                    raise MergescopeError(f"{path}: no top-k stored for model '{m}', layer '{layer}'")
                moments = Moments()
                mean = get(_key(m, layer, "mean"))
                if mean is not None:
                    moments.n, moments.mean, moments.m2 = meta["num_images"], mean, get(_key(m, layer, "m2"))
                subset = get(_key(m, layer, "subset"))
                probes[m][layer] = LayerProbe(values, ids, moments, None if subset is None else subset.float())
        return probes, get("subset_ids")


def result_meta(result: ProbeResult) -> dict[str, Any]:
    """The JSON record of a finished result."""
    return {
        "format": FORMAT,
        "kind": "result",
        "mergescope_version": package_version(),
        **stored_config(result.config),
        "channels": {m: {layer: p.channels for layer, p in layers.items()} for m, layers in result.probes.items()},
        "num_images": result.num_images,
    }


def save_probe(result: ProbeResult, path: str | Path) -> Path:
    """Write ``result`` to ``path`` (a ``.safetensors`` file, or a directory that gets ``probe.safetensors``).

    Returns:
        The safetensors path; the JSON sidecar lies beside it.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / RESULT_FILE
    return write(path, probe_tensors(result.probes, result.subset_ids), result_meta(result))


def result_from_file(path: Path, meta: dict[str, Any]) -> ProbeResult:
    probes, subset_ids = read_probes(path, meta)
    return ProbeResult(probes, meta["k"], meta["reduction"], meta["dataset"], meta["num_images"], subset_ids,
                       stored_config(meta), path)


def load_probe(path: str | Path) -> ProbeResult:
    """Load a stored probe result.

    Args:
        path: a run directory holding ``probe.safetensors``, or the file itself.

    Returns:
        The :class:`ProbeResult` (CPU tensors). A missing or foreign file raises :class:`MergescopeError`.

    Example:
        >>> result = load_probe("runs/probe-cifar")
        >>> result["a", "layer1.0"].topk_ids[3]  # the 10 images that activate channel 3 most
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    meta = read_meta(path)
    if meta is None:
        raise MergescopeError(f"no probe result at {path}")
    if meta.get("kind") != "result":
        raise MergescopeError(f"{path} is a {meta.get('kind')} probe checkpoint, not a finished result")
    return result_from_file(path, meta)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def config_mismatch(saved: dict[str, Any], wanted: dict[str, Any]) -> str:
    """A one-line description of how two configs differ ('' when they are equal)."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(wanted)))
    diffs = []
    for key in list(dict.fromkeys([*a, *b])):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            sa, sb = (_short(a.get(key, "<absent>")), _short(b.get(key, "<absent>")))
            diffs.append(f"{key}: stored {sa}, now {sb}")
    if len(diffs) > 4:
        diffs = diffs[:4] + [f"... {len(diffs) - 4} more"]
    return "; ".join(diffs)


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."
