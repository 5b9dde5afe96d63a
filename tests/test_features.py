"""The feature study (``mergescope probe``): its merges (endpoints, REPAIR's statistics, inputs untouched) and its
aligned rows."""
from __future__ import annotations

import copy

import pytest
import torch

from mergescope.align.store import ALIGNMENT_FILE, load_alignments
from mergescope.data import iter_batches, load_digits
from mergescope.studies.probe import aligned_key, merged_pair
from mergescope.studies.probe import run as feature_study
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.probe import probe, state_sha256


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


@pytest.fixture(scope="module")
def pair(helpers):
    """(A, B, spec, perms): two digit CNNs of different seeds, B's alignment a random permutation."""
    a = helpers.randomize_batchnorm(create_model("cnn_digits", width=8, seed=0), seed=2).eval()
    b = helpers.randomize_batchnorm(create_model("cnn_digits", width=8, seed=1), seed=3).eval()
    spec = build_spec(a)
    return a, b, spec, random_perms(spec, torch.Generator().manual_seed(0))


def _outputs(model, dataset):
    with torch.no_grad():
        return torch.cat([model.eval()(b.x) for b in iter_batches(dataset, 500)])


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_merges_at_the_endpoints_compute_the_endpoint(alpha, pair, digits):
    a, b, spec, perms = pair
    merged = merged_pair(a, b, spec, perms, digits, alpha, batch_size=500)
    assert set(merged) == {"permuted", "permuted+repair", "naive"}
    ref = _outputs(a if alpha == 1.0 else b, digits)  # aligned B computes B's function
    scale = ref.abs().max()
    for method, model in merged.items():
        torch.testing.assert_close(_outputs(model, digits), ref, rtol=1e-4, atol=1e-4 * scale, msg=method)


def test_repaired_merge_has_the_interpolated_statistics(pair, digits, helpers):
    alpha = 0.5
    a, b, spec, perms = pair
    states = [copy.deepcopy(m.state_dict()) for m in (a, b)]
    merged = merged_pair(a, b, spec, perms, digits, alpha, batch_size=len(digits))  # one batch: exact targets

    for m, state in zip((a, b), states):  # the inputs are untouched
        assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    aligned_b = permute_model(b, spec, perms)
    one_batch = list(iter_batches(digits, len(digits)))
    stats_a, stats_b = (helpers.point_moments(m, spec, one_batch) for m in (a, aligned_b))
    helpers.assert_repaired(spec, helpers.point_moments(merged["permuted+repair"], spec, one_batch),
                            helpers.point_moments(merged["permuted"], spec, one_batch),
                            helpers.interpolated_targets(spec, stats_a, stats_b, alpha))
    assert not torch.allclose(_outputs(merged["permuted+repair"], digits), _outputs(merged["permuted"], digits))
    naive = {k: alpha * v + (1 - alpha) * b.state_dict()[k] for k, v in a.state_dict().items() if v.is_floating_point()}
    assert all(torch.allclose(merged["naive"].state_dict()[k], v) for k, v in naive.items())


def test_a_resnet_merge_repaired_with_added_layers_is_probed_at_the_references_block_outputs(tmp_path, digits):
    """REPAIR on a ResNet appends a BatchNorm to every block: the feature study probes every row at A's layers,
    and a merge's block output ``layer1.0`` is the corrected one (the block's own output, after that layer)."""
    from mergescope.align import activation_matching
    from mergescope.merge import extra_layers
    from mergescope.probe.taps import tap_model

    a, b = (create_model("resnet20", in_channels=1, width=1, seed=s).eval() for s in (0, 1))
    spec = build_spec(a, next(iter(iter_batches(digits, 2))).x)
    match = activation_matching(a, b, spec, iter_batches(digits, 512))
    merged = merged_pair(a, b, spec, match.perms, digits, batch_size=512)
    repaired = merged["permuted+repair"]
    assert "layer1.0" in extra_layers(repaired)
    result, _, _ = feature_study(tmp_path, digits, {"A": a, "B": b}, matches={"B": match},
                                 merged={"permuted+repair": repaired}, spec=spec, batch_size=512)
    assert set(result.layers["merged_0"]) == set(spec.layers)
    x = next(iter(iter_batches(digits, 64))).x
    tapped = tap_model(repaired, ["layer1.0"]).eval()
    seen = {}
    hook = repaired.get_submodule("layer1.0").register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    try:
        with torch.no_grad():
            _, feats = tapped(x)
            repaired(x)
    finally:
        hook.remove()
    torch.testing.assert_close(feats["layer1.0"], seen["out"])


def test_every_aligned_row_is_what_the_aligned_model_itself_computes(tmp_path, digits, trained_digits):
    """The study derives each aligned model's probe from its unaligned twin's (no forward of it); the oracle is a
    separate probe that runs the aligned models — three trained, non-permuted CNNs aligned by activation
    matching inside the study, their alignment read back from the run folder."""
    models = {t: trained_digits("cnn_digits", s, width=16) for s, t in enumerate("ABC")}
    result, _, _ = feature_study(tmp_path, digits, models, batch_size=256, progress=False)
    spec, alignment = build_spec(models["A"]), load_alignments(tmp_path / ALIGNMENT_FILE)
    aligned = {aligned_key(t): permute_model(models[t], spec, alignment.perms(t)) for t in "BC"}
    assert sum(not torch.equal(p, torch.arange(len(p))) for t in "BC" for p in alignment.perms(t).values()) >= 4
    ran = probe(aligned, digits, layers=result.layers["A"], batch_size=256, subset_ids=result.subset_ids,
                progress=False)
    for name, model in aligned.items():
        assert result.config["models"][name]["state_sha256"] == state_sha256(model)
        for layer in result.layers["A"]:
            got, want = result[name, layer], ran[name, layer]
            assert torch.equal(got.topk_ids, want.topk_ids), (name, layer)
            torch.testing.assert_close(got.topk_values, want.topk_values, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.subset, want.subset, rtol=2**-10, atol=1e-4)
