"""Alignments as data: the permutations of a run and the matrices they were chosen from, stored once in the run
folder (``alignment.safetensors``) so later stages read them instead of matching again.

Layout (safetensors): ``<tag>/perm/<group>`` int64 (C,) and ``<tag>/similarity/<group>`` float32 (C_A, C_B), in
B's own channel order, for every model ``tag`` aligned to the reference; the metadata holds ``format``, the
matching ``method`` per tag and ``layers`` (layer -> group) as JSON.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._atomic import atomic_path
from ..errors import MergescopeError
from ..perm import PermSpec
from .result import MatchResult

ALIGNMENT_FILE = "alignment.safetensors"
_FORMAT = "mergescope.alignments/1"


def save_alignments(path: str | os.PathLike, spec: PermSpec, matches: Mapping[str, MatchResult]) -> Path:
    """Write every model's alignment to the reference (tag -> :class:`MatchResult`) atomically; return the path."""
    tensors = {}
    for tag, match in matches.items():
        for group, perm in match.perms.items():
            tensors[f"{tag}/perm/{group}"] = perm.detach().cpu().to(torch.int64).contiguous()
            tensors[f"{tag}/similarity/{group}"] = torch.from_numpy(np.asarray(match.similarity[group],
                                                                               dtype=np.float32)).contiguous()
    meta = {"format": _FORMAT, "methods": json.dumps({t: m.method for t, m in matches.items()}),
            "layers": json.dumps({name: tap.group for name, tap in spec.layers.items() if tap.group is not None})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_perms(path: str | os.PathLike, tag: str) -> dict[str, torch.Tensor] | None:
    """The stored permutations of model ``tag`` (group -> LongTensor, as :attr:`MatchResult.perms`), or None when
    the file holds none for it."""
    prefix = f"{tag}/perm/"
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != _FORMAT:
                raise MergescopeError(f"{path} is not a mergescope alignment file")
            perms = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError) as e:
        raise MergescopeError(f"{path} is not a readable alignment file ({e})") from None
    return perms or None


def correlation_matrices(path: str | os.PathLike, tag: str) -> dict[str, np.ndarray] | None:
    """Per layer, the correlation of A's channel i with aligned ``tag``'s channel j (the aligned model's channel
    order), from a stored activation matching; None when ``tag`` was aligned by weights or is not stored."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise MergescopeError(f"{path} is not a mergescope alignment file")
            if json.loads(meta["methods"]).get(tag) != "activation":
                return None
            by_group = {}
            for group in set(json.loads(meta["layers"]).values()):
                sim, perm = f"{tag}/similarity/{group}", f"{tag}/perm/{group}"
                if sim in f.keys():
                    by_group[group] = f.get_tensor(sim).numpy()[:, f.get_tensor(perm).numpy()]
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise MergescopeError(f"{path} is not a readable alignment file ({e})") from None
    return {layer: by_group[g] for layer, g in json.loads(meta["layers"]).items() if g in by_group}
