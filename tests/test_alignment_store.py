"""The stored alignment refuses checkpoints that are not the files it aligned (align/store.py), on its own: the
run folder's manifest check in front of it (runs/folder.py) is a second, separate guard."""
from __future__ import annotations

import pytest
import torch

from mergescope.align import activation_matching
from mergescope.align.store import load_alignments, save_alignments
from mergescope.data import iter_batches, load_digits
from mergescope.data.cache import file_sha256
from mergescope.errors import MergescopeError
from mergescope.models import create_model
from mergescope.perm import build_spec
from mergescope.train import save_checkpoint


def test_check_sources_refuses_a_checkpoint_changed_after_it_was_aligned(tmp_path):
    a, b = create_model("mlp", seed=0, width=16).eval(), create_model("mlp", seed=1, width=16).eval()
    paths = {"A": tmp_path / "a.safetensors", "B": tmp_path / "b.safetensors"}
    save_checkpoint(paths["A"], a)
    save_checkpoint(paths["B"], b)
    spec = build_spec(a)
    match = activation_matching(a, b, spec, iter_batches(load_digits("train"), 100, ids=torch.arange(200)))
    sources = {t: {"checkpoint": str(p), "sha256": file_sha256(p)} for t, p in paths.items()}
    stored = load_alignments(save_alignments(tmp_path / "alignment.safetensors", spec, {"B": match},
                                             sources=sources))
    stored.check_sources(paths)  # the files it aligned
    for g, perm in stored.perms("B").items():
        assert torch.equal(perm, match.perms[g])
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
    save_checkpoint(paths["B"], b)  # B replaced after the alignment
    with pytest.raises(MergescopeError, match=r"model B.*sha256 differs"):
        stored.check_sources(paths)
    stored.check_sources({"A": paths["A"]})  # the reference alone is still the file it aligned
