"""Alignments as data: the permutations of a run, the matrices they were chosen from and what they align, stored
once in the run folder (``alignment.safetensors``) so later studies read them instead of matching again.

Layout (safetensors): ``<tag>/perm/<group>`` int64 (C,) and ``<tag>/similarity/<group>`` float32 (C_A, C_B), in
the model's own channel order, for every model ``tag`` aligned to the reference. One metadata key holds the record
as JSON: ``format``, ``reference`` (its tag), ``layers`` (layer -> group) and, per aligned tag, ``models``: the
matching ``method``, its ``objective``, the ``points`` a residual stream was measured at, and the ``checkpoint`` and
``sha256`` of the model's weights file (the reference's under ``reference_source``). :func:`load_alignments` reads it back and
:meth:`StoredAlignments.check_sources` refuses checkpoints that are not the ones aligned.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..runs.atomic import atomic_save_tensors
from ..errors import MergescopeError
from ..perm import PermSpec
from .result import MatchResult

ALIGNMENT_FILE = "alignment.safetensors"
_FORMAT = "mergescope.alignments/2"
_FORMAT_1 = "mergescope.alignments/1"
_KEY = "mergescope.alignment"  # the metadata key holding the record (JSON)
OBJECTIVES = {  # matching method -> what its permutations maximise
    "activation": "sum over matched channel pairs of the correlation of their activations (Jordan et al. 2023, "
                  "REPAIR §3; Ainsworth et al. 2023 §3.1)",
    "weight": "sum over layers of <W_A, P W_B P'^T>, by coordinate descent (Ainsworth et al. 2023, Alg. 1)",
}


def save_alignments(path: str | os.PathLike, spec: PermSpec, matches: Mapping[str, MatchResult], *,
                    reference: str = "A", sources: Mapping[str, Mapping[str, str]] | None = None,
                    points: str = "stage_end") -> Path:
    """Write every model's alignment to the reference (tag -> :class:`MatchResult`) atomically; return the path.

    Args:
        reference: the reference model's tag.
        sources: tag -> {"checkpoint", "sha256"} of the weights files (reference included), when they came
            from files.
        points: where residual streams were measured for matching (``"stage_end"`` or ``"all"``).
    """
    tensors = {}
    for tag, match in matches.items():
        for group, perm in match.perms.items():
            tensors[f"{tag}/perm/{group}"] = perm.detach().cpu().to(torch.int64).contiguous()
            tensors[f"{tag}/similarity/{group}"] = torch.from_numpy(np.asarray(match.similarity[group],
                                                                               dtype=np.float32)).contiguous()
    sources = dict(sources or {})
    models = {t: {"method": m.method, "objective": OBJECTIVES.get(m.method, m.method), "points": points,
                  **dict(sources.get(t, {}))} for t, m in matches.items()}
    record = {"format": _FORMAT, "reference": reference, "reference_source": dict(sources.get(reference, {})),
              "models": models, "layers": {name: tap.group for name, tap in spec.layers.items() if tap.group is not None}}
    meta = {_KEY: json.dumps(record, sort_keys=True)}  # one key: safetensors writes its metadata in no fixed order
    path = Path(path)
    atomic_save_tensors(path, tensors, meta)
    return path


@dataclass
class StoredAlignments:
    """The alignments of a run folder, read by :func:`load_alignments`."""

    path: Path
    reference: str  # the reference's tag
    models: dict[str, dict]  # aligned tag -> method, objective, points, checkpoint, sha256
    reference_source: dict  # the reference's checkpoint and sha256
    layers: dict[str, str]  # layer -> group

    @property
    def tags(self) -> list[str]:
        """The aligned models' tags, in the order they were stored."""
        return list(self.models)

    def perms(self, tag: str) -> dict[str, torch.Tensor]:
        """Model ``tag``'s permutations (group -> LongTensor, as :attr:`MatchResult.perms`)."""
        return self._tensors(f"{tag}/perm/")

    def correlations(self, tag: str) -> dict[str, np.ndarray] | None:
        """Per layer, the correlation of the reference's channel i with aligned ``tag``'s channel j (the aligned
        model's channel order), from an activation matching; None for a weight matching."""
        if self.models[tag]["method"] != "activation":
            return None
        sims, perms = self._tensors(f"{tag}/similarity/"), self.perms(tag)
        by_group = {g: sims[g].numpy()[:, perms[g].numpy()] for g in sims}
        return {layer: by_group[g] for layer, g in self.layers.items() if g in by_group}

    def check_sources(self, checkpoints: Mapping[str, str | os.PathLike]) -> None:
        """Refuse checkpoints (tag -> path) whose sha256 differs from the one the alignment recorded."""
        from ..data.cache import file_sha256

        recorded = {self.reference: self.reference_source, **self.models}
        for tag, path in checkpoints.items():
            want = recorded.get(tag, {}).get("sha256")
            if want is not None and file_sha256(path) != want:
                raise MergescopeError(f"checkpoint {path} (model {tag}) is not the file {self.path.name} aligned "
                                      "(sha256 differs): it changed after the run; redo the run that aligned it")

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        except (SafetensorError, OSError) as e:
            raise MergescopeError(f"{self.path} is not a readable alignment file ({e})") from None


def load_alignments(path: str | os.PathLike) -> StoredAlignments:
    """Read the alignments of a run folder's ``alignment.safetensors`` (a one-line error if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise MergescopeError(f"{path} is missing: the run folder stores no alignment (made by an older mergescope? "
                              "redo the run that aligned the models)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if _KEY in meta:
            record = json.loads(meta[_KEY])
        elif meta.get("format") == _FORMAT_1:  # the first format: one metadata key per entry, no sources
            record = {"format": _FORMAT_1, "reference": "A", "reference_source": {}, "layers": json.loads(meta["layers"]),
                      "models": {t: {"method": m} for t, m in json.loads(meta["methods"]).items()}}
        else:
            record = {}
        if record.get("format") not in (_FORMAT_1, _FORMAT):
            raise MergescopeError(f"{path} is not a mergescope alignment file")
        return StoredAlignments(path, record["reference"], record["models"], record["reference_source"],
                                record["layers"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise MergescopeError(f"{path} is not a readable alignment file ({e})") from None
