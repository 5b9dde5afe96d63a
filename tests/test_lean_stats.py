"""The lean pass statistics (issue 14) equal the plain (samples, C) computations they replace, and weight matching's
incremental cost updates equal recomputing every term."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from mergescope.align import JointMoments, match_many, weight_matching
from mergescope.errors import NumericsError
from mergescope.models import create_model
from mergescope.perm import build_spec
from mergescope.probe import blocks, stats
from mergescope.probe.stats import (CoMoments, Extremes, Moments, as_samples, channel_view, for_products,
                                    with_own_products)


def _activations(shape, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, shape[1]).view(
        1, -1, *[1] * (len(shape) - 2)).double() + offset).relu()


def _plain(x: torch.Tensor):
    """Mean and sum of squared deviations of (samples, C) data, written out."""
    mean = x.mean(0)
    return mean, ((x - mean) ** 2).sum(0)


@pytest.mark.parametrize("shape,dim", [((6, 5, 7, 9), 1), ((6, 40, 3, 3), 1), ((11, 7), 1), ((4, 3, 6), -1)])
def test_channel_layout_moments_equal_samples_moments(shape, dim):
    a, b = _activations(shape, 0), _activations(tuple(s + (2 if i == (dim % len(shape)) else 0)
                                                        for i, s in enumerate(shape)), 1)
    sa, sb = as_samples(a, dim), as_samples(b, dim)
    m = Moments()
    mean, std = m.update_channels(a, dim)
    ref_mean, ref_m2 = _plain(sa)
    assert torch.allclose(mean, ref_mean, rtol=1e-12) and torch.allclose(m.m2, ref_m2, rtol=1e-12)
    assert torch.allclose(std, (ref_m2 / len(sa)).sqrt(), rtol=1e-12)
    c = CoMoments()
    c.update_channels(a, b, dim)
    cab = (sa - sa.mean(0)).T @ (sb - sb.mean(0))
    assert torch.allclose(c.cab, cab, rtol=1e-10, atol=1e-10)
    assert torch.allclose(c.b.m2, _plain(sb)[1], rtol=1e-12)
    j = JointMoments()
    j.update_channels(a, b, dim)
    x = torch.cat([sa, sb], 1)
    assert torch.allclose(j.scatter, (x - x.mean(0)).T @ (x - x.mean(0)), rtol=1e-10, atol=1e-10)
    assert torch.allclose(j.mean, x.mean(0), rtol=1e-12)


def test_channel_view_is_a_view():
    t = torch.zeros(3, 4, 5, 6)
    assert channel_view(t, 1).data_ptr() == t.data_ptr() and channel_view(t, 1).shape == (3, 4, 30)
    assert channel_view(t, -1).shape == (60, 6, 1)


def test_extremes_counted_only_where_needed_keep_dead_channels_exact():
    """All-but-one-equal channels are found even far from zero in float32 (rounding of m2 and the range),
    and channels with two samples off each extreme are not."""
    n = 64
    x = torch.zeros(n, 6, 1, 1)
    x[:, 0] = 1000.0  # constant, large offset
    x[:, 1] = 1000.0
    x[5, 1] = 1000.0 + 2 ** -13  # one sample off by ~one float32 ulp of 1000 -> all but one equal
    x[9, 2] = 3.0  # ReLU unit firing once
    x[[3, 4], 3] = torch.tensor([[[1.0]], [[2.0]]])  # two samples: informative
    x[:, 4] = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    x[:, 5] = -7.0
    x[[1, 2], 5] = -7.5  # two samples below a constant: informative
    expected = [True, True, True, False, False, False]
    for chunks in ([x], x.split(16), x[torch.randperm(n, generator=torch.Generator().manual_seed(0))].split(7)):
        c = CoMoments()
        for ch in chunks:
            c.update_channels(ch, ch, 1)
        assert c.ext_a.all_but_one_equal().tolist() == expected
        e = Extremes()
        for ch in chunks:
            e.update(as_samples(ch, 1))
        assert e.all_but_one_equal().tolist() == expected


def _all_but_one_equal(x: torch.Tensor) -> list[bool]:
    """Per column of (samples, C): one value on every sample but at most one, written out."""
    return [int(torch.unique(col, return_counts=True)[1].max()) >= len(col) - 1 for col in x.T]


def test_settled_channels_are_not_read_again_and_dead_masks_stay_exact(monkeypatch):
    """A channel proven informative by one batch (two samples off each extreme) is not read for extremes again;
    the ones no batch proves stay open and are counted exactly, over several models and merged shards."""
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(48, 6, 2, 2)  # 48 images of 4 samples, added 8 images at a time
    a[:, 0] = 2.0  # constant: all but one equal, never settled
    a[40, 1, 0, 1] = 5.0  # fires once, in the 6th batch: all but one equal, never settled
    a[3, 2, 1, 0], a[30, 2, 0, 0] = 1.0, 4.0  # fires twice, in two batches: not all but one equal, never settled
    a[:, 3] = torch.randn(48, 2, 2, generator=g)  # settled by the first batch
    a[16:, 4] = torch.randn(32, 2, 2, generator=g)  # constant in batches 1-2, settled by the 3rd
    a[20, 5] = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # m2 beyond any all-but-one-equal's: settled by the 3rd
    expected = [True, True, False, False, False, False]
    assert _all_but_one_equal(as_samples(a)) == expected
    orders = {"a": list(range(6)), "b1": [5, 4, 3, 2, 1, 0], "b2": [2, 0, 1, 5, 3, 4]}
    x = {k: a[:, o] for k, o in orders.items()}

    reads = []
    real = stats._channel_extreme
    monkeypatch.setattr(stats, "_channel_extreme", lambda x3, reduce: reads.append(x3.shape[1]) or real(x3, reduce))

    def stream(images):
        cs = [CoMoments(), CoMoments()]
        for i in images.split(8):
            stats.co_update(cs, x["a"][i], [x["b1"][i], x["b2"][i]])
        return cs

    whole = stream(torch.arange(48))
    assert reads[:6] == [6] * 6  # the first batch reads every channel of A, B1, B2 (min and max)
    assert len(reads) == 6 * 6 and reads[-18:] == [3] * 18  # batches 4-6 only the 3 open channels
    first, second = stream(torch.arange(24)), stream(torch.arange(24, 48))
    for c, other in zip(first, second):
        c.merge(other)
    for cs in (whole, first):
        for c, b in zip(cs, ("b1", "b2")):
            for ext, key in ((c.ext_a, "a"), (c.ext_b, b)):
                order = orders[key]
                assert ext.all_but_one_equal().tolist() == [expected[i] for i in order]
                assert sorted(ext.open.tolist()) == [j for j, i in enumerate(order) if i < 3]
                assert ext.n == 48 * 4


def test_matching_names_the_model_with_nan_activations():
    a = create_model("cnn_digits", width=4, seed=0).eval()
    b = create_model("cnn_digits", width=4, seed=1).eval()
    x = torch.randn(8, 1, 8, 8)  # the digits images
    spec = build_spec(a, x)
    with torch.no_grad():
        next(b.parameters()).fill_(float("nan"))
    batches = [type("B", (), {"x": x})()]
    with pytest.raises(NumericsError, match="model 1"):
        match_many(a, [b], spec, batches)


def test_incremental_cost_updates_equal_full_recomputation(monkeypatch):
    torch.manual_seed(0)
    a = create_model("resnet20", width=1, in_channels=3).eval()
    torch.manual_seed(1)
    b = create_model("resnet20", width=1, in_channels=3).eval()
    spec = build_spec(a, torch.randn(2, 3, 32, 32))
    fast = weight_matching(a.state_dict(), b.state_dict(), spec)
    monkeypatch.setattr(sys.modules["mergescope.align.weight_matching"], "INCREMENTAL", False)  # every cost recomputed from scratch
    full = weight_matching(a.state_dict(), b.state_dict(), spec)
    assert all(torch.equal(fast.perms[g], full.perms[g]) for g in spec.groups)
    for g in spec.groups:
        np.testing.assert_allclose(fast.similarity[g], full.similarity[g], rtol=1e-4, atol=1e-4)


def _joint_scatter_written_out(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """The centred scatter of [a, b] over every image × position, in float64 (samples, Ca+Cb) form."""
    x = torch.cat([as_samples(a.double(), dim), as_samples(b.double(), dim)], 1)
    d = x - x.mean(0)
    return d.T @ d


@pytest.mark.parametrize("shape,dim", [((6, 5, 7, 9), 1), ((6, 40, 3, 3), 1), ((300, 24), 1)])
def test_joint_moments_float32_products_match_the_written_out_scatter(shape, dim, monkeypatch):
    """Per-image products (more positions than channels), the (samples, C) layout, several row blocks and image
    chunks per batch (``_ROWS``, ``_BLOCK`` made small) all give the float64 scatter of the samples: exactly
    (1e-12) for float64 input, within float32 rounding (1e-6 of the largest variance) for float32 input, as
    matching's CoMoments does. Σ_AA and Σ_BB are multiplied by row slabs (``SLAB`` made small: 2–8 slabs) on and
    above the diagonal, the rest their transposes."""
    monkeypatch.setattr(blocks, "ROWS", 8)  # several blocks of rows per batch
    monkeypatch.setattr(blocks, "SLAB", 2)  # a batch's product with itself by slabs of rows
    monkeypatch.setattr(blocks, "BLOCK", 2 * 5 * 8)  # per-image products two images at a time
    a = _activations(shape, seed=1, offset=3.0)  # a large mean: centring in float32 must not cost precision
    b = _activations((shape[0], shape[1] + 3, *shape[2:]), seed=2)
    want = _joint_scatter_written_out(a, b, dim)
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        st = JointMoments()
        for lo in range(0, shape[0], 4):  # several batches: Chan et al.'s update between them
            st.update_channels(a[lo:lo + 4].to(dtype), b[lo:lo + 4].to(dtype), dim)
        scale = want.diagonal().max().item()
        np.testing.assert_allclose(st.scatter.numpy(), want.numpy(), rtol=0, atol=rel * scale, err_msg=str(dtype))
        assert torch.equal(st.sab.T, st.scatter[st.size_a:, : st.size_a])  # Σ_BA written out on reading


def test_shared_reference_block_equals_one_model_at_a_time():
    """update_shared computes A's deviations and Σ_AA once for every model; each model's moments are those it
    gets alone."""
    from mergescope.align.covariance import update_shared

    a = _activations((5, 6, 8, 8), seed=3).float()
    bs = [_activations((5, 6, 8, 8), seed=s).float() for s in (4, 5)]
    shared, alone = [JointMoments(), JointMoments()], [JointMoments(), JointMoments()]
    for lo in (0, 2):
        update_shared(shared, a[lo:lo + 3], [b[lo:lo + 3] for b in bs])
        for st, b in zip(alone, bs):
            st.update_channels(a[lo:lo + 3], b[lo:lo + 3])
    for s, o in zip(shared, alone):
        assert s.n == o.n and torch.equal(s.mean, o.mean) and torch.equal(s.scatter, o.scatter)


@pytest.mark.parametrize("rows", [8, 10**6])
def test_held_maps_are_copied_channel_major_and_give_every_batchs_statistics(monkeypatch, rows):
    """Maps with fewer positions than channels are held back in buffers reused from group to group, channel-major,
    and reach the update as one image (1, C, samples): the joint scatter and matching's co-moments are those of
    every sample written out (float32 rounding), with batches of unequal sizes (a larger one added on its own),
    more groups than one, the last one partial, and the row slabs and ≤ ROWS chunks of one image's products."""
    from mergescope.align.covariance import update_shared
    from mergescope.probe.stats import co_update

    monkeypatch.setattr(blocks, "GROUP", 16)  # 16 samples a group: two batches of 2 images × 4 positions
    monkeypatch.setattr(blocks, "SLAB", 2)
    monkeypatch.setattr(blocks, "ROWS", rows)  # one image's positions in several chunks, or in one
    a = _activations((14, 6, 2, 2), seed=1, offset=2.0).float()
    b = _activations((14, 9, 2, 2), seed=2).float()
    sizes = [2, 2, 2, 3, 1, 2, 2]  # the 3-image batch (12 samples) does not fit beside one: a group of its own
    seen, joint, co = [], JointMoments(), CoMoments()
    for update, st in ((update_shared, joint), (co_update, co)):
        gathered = blocks.Gathered(lambda stats, x, ys, dim, update=update: (
            seen.append(tuple(x.shape)), update(stats, x, ys, dim)))
        lo = 0
        for n in sizes:
            gathered.add("key", [st], a[lo:lo + n], [b[lo:lo + n]], 1)
            lo += n
        gathered.flush()
    assert all(shape[0] == 1 and shape[1] == 6 for shape in seen)  # one image each, channel-major
    # samples 8+8 | 8 (the 12 does not fit beside it) | 12 | 4+8 (another 8 would not fit) | 8 (flushed)
    assert [shape[2] for shape in seen[: len(seen) // 2]] == [16, 8, 12, 12, 8]
    sa, sb = as_samples(a.double()), as_samples(b.double())
    x = torch.cat([sa, sb], 1)
    want = (x - x.mean(0)).T @ (x - x.mean(0))
    scale = want.diagonal().max().item()
    assert joint.n == 56 and torch.allclose(joint.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(joint.scatter.numpy(), want.numpy(), rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(co.cab.numpy(), want[:6, 6:].numpy(), rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(co.b.m2.numpy(), want.diagonal()[6:].numpy(), rtol=1e-6)


def test_batches_with_few_positions_are_added_in_groups(monkeypatch):
    """A linear layer's batches (the (samples, C) layout) are held back and added as one group of ≤ _GROUP samples:
    fewer scatter updates than batches, the same statistics as one batch of everything (to float32 rounding), and
    nothing is left out at the end of the pass."""
    from mergescope.align import group_covariances
    from mergescope.data import iter_batches, load_digits

    covariance = sys.modules["mergescope.align.covariance"]
    monkeypatch.setattr(blocks, "GROUP", 64)
    calls = []
    real = covariance.update_shared
    monkeypatch.setattr(covariance, "update_shared", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k)))
    a = create_model("mlp", seed=0, width=32).eval()
    b = create_model("mlp", seed=1, width=32).eval()
    spec = build_spec(a)
    ds = load_digits("train")
    ids = torch.arange(203)  # 203 = 29 batches of 7: the last group is a partial one
    [small] = group_covariances(a, [b], spec, iter_batches(ds, 7, ids=ids))
    grouped = len(calls)
    calls.clear()
    [whole] = group_covariances(a, [b], spec, iter_batches(ds, 203, ids=ids))
    assert grouped < 29 * len(spec.groups)  # 64 rows per group of batches: ceil(203 / 63) groups per point
    for g in spec.groups:
        assert small[g].n == whole[g].n == 203
        scale = whole[g].scatter.diagonal().max().item()
        assert torch.allclose(small[g].scatter, whole[g].scatter, rtol=1e-5, atol=1e-6 * scale)
        assert torch.allclose(small[g].mean, whole[g].mean, rtol=1e-6, atol=1e-7)


def test_matching_adds_linear_layers_in_groups_and_gets_the_one_batch_correlations(monkeypatch):
    """Matching holds back the (samples, C)-layout batches too (blocks.Gathered around co_update): fewer
    updates than batches, and the correlations and permutations of one batch of everything."""
    from mergescope.data import iter_batches, load_digits

    matching = sys.modules["mergescope.align.activation_matching"]
    monkeypatch.setattr(blocks, "GROUP", 64)
    calls = []
    real = matching.co_update
    monkeypatch.setattr(matching, "co_update", lambda *a, **k: (calls.append(a[1].shape[0]), real(*a, **k)))
    a = create_model("mlp", seed=0, width=32).eval()
    b = create_model("mlp", seed=1, width=32).eval()
    spec = build_spec(a)
    ds = load_digits("train")
    ids = torch.arange(203)  # 29 batches of 7: the last group is a partial one
    [small] = match_many(a, [b], spec, iter_batches(ds, 7, ids=ids))
    assert 0 < len(calls) < 29 * len(spec.groups) and sum(calls) == 203 * len(spec.groups)  # nothing left out
    [whole] = match_many(a, [b], spec, iter_batches(ds, 203, ids=ids))
    for g in spec.groups:
        np.testing.assert_allclose(small.similarity[g], whole.similarity[g], rtol=0, atol=1e-5)
        assert torch.equal(small.perms[g], whole.perms[g])


@pytest.mark.parametrize("shape", [(40, 9, 9, 9), (600, 9, 1, 1)])
def test_one_read_moments_are_float32_accurate_at_any_offset(shape):
    """Moments reads a float32 batch without centring it where Σx² − n·mean² is as accurate as centring (mean² ≤
    3·variance from float32 per-image sums; mean² < 2^20·variance where the sums are float64, one value per image)
    and centres the other channels: every channel's m2 within float32 rounding of the float64 one, from a mean of 0
    to a million standard deviations, constant channels exactly 0."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0.0, 0.5, 1.0, 1.7, 3.0, 30.0, 1e3, 1e6, 0.0], dtype=torch.float64)
    x = (x * torch.linspace(0.2, 5.0, shape[1]).view(1, -1, 1, 1).double()
         + offsets.view(1, -1, 1, 1) * torch.linspace(0.2, 5.0, shape[1]).view(1, -1, 1, 1).double())
    x[:, -1] = 2.5  # a constant channel
    x32 = x.float()
    want = _plain(as_samples(x32.double(), 1))[1]
    m = Moments()
    for lo in range(0, shape[0], shape[0] // 4):  # a few batches (Chan et al. between them)
        m.update_channels(x32[lo:lo + shape[0] // 4], 1)
    assert m.m2[-1] == 0
    np.testing.assert_allclose(m.m2[:-1].numpy(), want[:-1].numpy(), rtol=5e-7)
    np.testing.assert_allclose(m.mean.numpy(), as_samples(x32.double(), 1).mean(0).numpy(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", [(40, 8, 9, 9), (600, 8, 1, 1), (40, 8, 2, 2)])
def test_uncentred_cross_products_are_float32_accurate_at_any_offset(shape):
    """Matching's cross products and the map merges' joint scatter are taken of the batches as they are and
    corrected by the means where that is as accurate as centring (every channel's mean² ≤ 3·variance), else of the
    centred batch: every correlation, including those of channels offset by up to 1,000 standard deviations,
    within float32 rounding of the float64 one written out, on both paths (B with and without offset channels),
    per image, one position per image, and the (samples, C) layout of a few positions (always centred). Matching's
    centred channels (a few of them, or all) take their batch means and m2 from the centred values: within 5e-7
    (7e-8 measured). The covariance
    centres on the mean of per-image float32 sums, which for a channel 1,000σ from zero carry ~1e-5σ, and Chan et al.'s
    between-batch term passes that on: within 5e-6 (2.8e-6 measured with four batches)."""
    g = torch.Generator().manual_seed(11)
    scale = torch.linspace(0.2, 5.0, shape[1]).view(1, -1, 1, 1).double()
    offsets = torch.tensor([0.0, 0.5, 1.0, 1.7, 3.0, 30.0, 1e3, 0.2], dtype=torch.float64).view(1, -1, 1, 1)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    a = z * scale + offsets * scale  # offset channels: centred
    b_small = (0.6 * z + 0.8 * torch.randn(shape, generator=g, dtype=torch.float64)) * scale.flip(1)  # uncentred
    cases = [(a, b_small), (a, b_small + offsets.flip(1) * scale.flip(1)),  # 3 of 8 channels centred: a copy of those
             (a + 10 * scale, b_small)]  # every channel of A centred: its m2 from the whole centred copy
    for a, b in cases:
        a32, b32 = a.float(), b.float()
        sa, sb = as_samples(a32.double(), 1), as_samples(b32.double(), 1)
        da, db = sa - sa.mean(0), sb - sb.mean(0)
        want = (da.T @ db) / torch.outer(da.norm(dim=0), db.norm(dim=0))
        c, j = CoMoments(), JointMoments()
        for lo in range(0, shape[0], shape[0] // 4):  # a few batches (Chan et al. between them)
            c.update_channels(a32[lo:lo + shape[0] // 4], b32[lo:lo + shape[0] // 4], 1)
            j.update_channels(a32[lo:lo + shape[0] // 4], b32[lo:lo + shape[0] // 4], 1)
        np.testing.assert_allclose(c.correlation().numpy(), want.numpy(), rtol=0, atol=5e-7)
        x = torch.cat([sa, sb], 1)
        d = x - x.mean(0)
        want_joint = (d.T @ d) / torch.outer(d.norm(dim=0), d.norm(dim=0))
        np.testing.assert_allclose(j.correlation().numpy(), want_joint.numpy(), rtol=0, atol=5e-6)


def test_centred_values_minus_their_offset_are_the_deviations_from_the_mean_float64_too():
    """The contract of ``for_products`` and ``with_own_products``: values − offset = x − mean, the returned float64
    mean, also where a float64 batch is centred and matching refines the mean in place afterwards (float64's
    ``mean.to(float64)`` is the mean itself: the centre must be a copy, or the offset comes out 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 8, 50, generator=g, dtype=torch.float64) * 1e-3
    x[:, [1, 5]] += 1e7  # fail the one-read test even in float64 (Σx² > 2^20 · m2)
    fp, wo = for_products(x, True), with_own_products(x, True)
    for values, mean, offset in ((fp[0], fp[1], fp[3]), (wo[0], wo[1], wo[2])):
        assert values.data_ptr() != x.data_ptr()  # the centred copy was taken
        deviations = x - mean.view(1, -1, 1)  # exact: x and mean within a factor 2 of each other
        torch.testing.assert_close(values - offset.view(1, -1, 1), deviations, rtol=0, atol=1e-12)
    assert (fp[3][[1, 5]].abs() > 1e-10).any()  # a refined mean moved off its centre: the check above bites


def test_add_into_adds_float32_into_float64_exactly_in_cache_sized_slices(monkeypatch):
    """The sliced float32 → float64 add equals a float64 add of the converted part, bit for bit (both are exact
    conversions followed by the same float64 additions), over slices that do not divide the rows."""
    monkeypatch.setattr(blocks, "CAST", 7 * 13)  # 7 rows of 13 per slice: 47 rows end mid-slice
    g = torch.Generator().manual_seed(3)
    total = torch.randn(47, 13, generator=g, dtype=torch.float64)
    part = torch.randn(47, 13, generator=g) * 1e3
    want = total + part.double()
    assert torch.equal(blocks.add_into(total, part), want)
    assert torch.equal(total, want)  # in place


def test_joint_moments_blocks_and_the_assembled_scatter_stay_consistent_across_updates():
    """The three blocks are accumulated alone; the whole matrix is assembled when read, and batches added after
    a read reach it (its lower block Σ_BA too), as if it had never been read; the swapped copy is independent."""
    a, b = _activations((30, 6, 2, 2), 0), _activations((30, 4, 2, 2), 1)
    read_between, never_read = JointMoments(), JointMoments()
    read_between.update_channels(a[:12], b[:12])
    first = read_between.scatter.clone()
    read_between.update_channels(a[12:], b[12:])
    never_read.update_channels(a[:12], b[:12])
    never_read.update_channels(a[12:], b[12:])
    x = torch.cat([as_samples(a), as_samples(b)], 1)
    want = (x - x.mean(0)).T @ (x - x.mean(0))
    for st in (read_between, never_read):
        assert torch.allclose(st.scatter, want, rtol=1e-10, atol=1e-10)
        assert torch.equal(st.scatter, st.scatter.T)
        assert torch.equal(st.sab, st.scatter[:6, 6:]) and torch.equal(st.diagonal(), st.scatter.diagonal())
    assert not torch.allclose(first, want)
    swapped = never_read.swapped()
    order = torch.cat([torch.arange(6, 10), torch.arange(6)])
    assert torch.equal(swapped.scatter, never_read.scatter[order][:, order])
    swapped.update_channels(b[:3], a[:3])
    assert torch.allclose(never_read.scatter, want, rtol=1e-10, atol=1e-10)
