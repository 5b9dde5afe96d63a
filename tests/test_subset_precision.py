"""The probe keeps D′ (the subset activations Kendall's τ ranks) in 16 bits (issue 14, item 4): float16 on disk,
float32 in memory, float32 files of earlier versions still read, and τ barely moved on a trained pair."""
from __future__ import annotations

import torch
from safetensors import safe_open

from mergescope.compare import kendall_tau_b
from mergescope.probe import load_probe, probe
from mergescope.probe.state import compact_subset
from mergescope.probe.store import probe_tensors, result_meta, write
from mergescope.probe.taps import tap_model

SUBSET = list(range(0, 1437, 3))  # 479 images of the digits' train split


def _stored_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys() if k.endswith("/subset")}


def test_the_subset_is_stored_in_float16_and_read_back_as_the_float32_the_probe_returned(digits_pair, digits_train,
                                                                                          tmp_path):
    a, b = digits_pair
    result = probe({"A": a, "B": b}, digits_train, subset_ids=SUBSET, batch_size=256, run_dir=tmp_path,
                   progress=False)
    assert _stored_dtypes(tmp_path / "probe.safetensors") == {torch.float16}
    back = load_probe(tmp_path)
    for m, layers in result.layers.items():
        for layer in layers:
            mine, loaded = result[m, layer].subset, back[m, layer].subset
            assert mine.dtype == loaded.dtype == torch.float32, (m, layer, loaded.dtype)
            assert torch.equal(mine, loaded), (m, layer)
            assert torch.equal(mine, mine.half().float())  # float16 values


def test_a_float32_probe_file_of_an_earlier_version_still_loads_exactly(digits_pair, digits_train, tmp_path):
    a, _ = digits_pair
    result = probe({"A": a}, digits_train, subset_ids=SUBSET, batch_size=256, progress=False)
    tensors = probe_tensors(result.probes, result.subset_ids)
    old = {layer: torch.rand(len(SUBSET), p.channels, dtype=torch.float32) * 3 + 1e-3  # not float16 values
           for layer, p in result.probes["A"].items()}
    tensors.update({f"A/{layer}/subset": v for layer, v in old.items()})
    write(tmp_path / "probe.safetensors", tensors, result_meta(result))
    assert _stored_dtypes(tmp_path / "probe.safetensors") == {torch.float32}
    back = load_probe(tmp_path)
    for layer, v in old.items():
        assert back["A", layer].subset.dtype == torch.float32 and torch.equal(back["A", layer].subset, v), layer


def test_a_layer_beyond_float16s_range_is_kept_in_bfloat16():
    x = torch.tensor([[1.0, 7e4], [3.0, -2e5]])
    kept = compact_subset(x)
    assert kept.dtype == torch.bfloat16 and torch.isfinite(kept.float()).all()
    torch.testing.assert_close(kept.float(), x, rtol=2 ** -8, atol=0)
    assert compact_subset(torch.tensor([[1.0, 6e4]])).dtype == torch.float16


def test_the_probe_state_keeps_each_layer_in_its_own_16_bit_format():
    """ProbeState holds every layer's D' in one matrix; the float16 / bfloat16 choice is still made per layer: a
    layer beyond float16's range does not coarsen the others (bfloat16 keeps 8 bits, float16 11)."""
    from mergescope.probe.state import ProbeState

    shapes = {"m": {"small": (3, 1), "big": (2, 1)}, "n": {"small": (4, 1)}}
    g = torch.Generator().manual_seed(0)
    acts = {"m": {"small": torch.rand(6, 3, generator=g) + 1, "big": torch.rand(6, 2, generator=g) * 1e5},
            "n": {"small": torch.rand(6, 4, generator=g) + 1}}
    state = ProbeState(shapes, k=2, subset_ids=torch.tensor([4, 1, 5]))
    state.update(torch.arange(6), acts)
    out = state.layer_probes()
    rows = torch.tensor([4, 1, 5])
    for m, layer, kept in (("m", "small", torch.float16), ("m", "big", torch.bfloat16), ("n", "small", torch.float16)):
        assert torch.equal(out[m][layer].subset, acts[m][layer][rows].to(kept).float()), (m, layer)
        assert torch.equal(out[m][layer].topk_ids, acts[m][layer].topk(2, dim=0).indices.T), (m, layer)
        torch.testing.assert_close(out[m][layer].mean, acts[m][layer].double().mean(0), rtol=1e-12, atol=0)


def test_kendall_tau_from_the_16_bit_subset_is_within_0_01_of_float32_on_a_trained_pair(digits_pair, digits_train):
    """τ of A's channel c and B's channel c (unaligned: any pair is a pair) from float32 activations computed here,
    against τ from the probe's subset: float16 rounding adds ties only between nearly equal values."""
    a, b = digits_pair
    result = probe({"A": a, "B": b}, digits_train, subset_ids=SUBSET, batch_size=256, progress=False)
    x = digits_train.get_batch(torch.tensor(SUBSET))[0]
    worst = 0.0
    for layer in result.layers["A"]:
        with torch.no_grad():
            full = [tap_model(m, [layer]).eval()(x)[1][layer].flatten(2).amax(2) for m in (a, b)]  # [S, C] each
        exact = kendall_tau_b(*full)
        kept = kendall_tau_b(result["A", layer].subset, result["B", layer].subset)
        assert torch.equal(exact.defined, kept.defined), layer
        worst = max(worst, float((exact.tau - kept.tau)[exact.defined].abs().max()))
    assert 0 < worst < 0.01, worst
