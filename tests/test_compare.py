"""Channel-comparison metrics: Kendall's τ-b against scipy, CLIP-δ against hand computations and a loop over
the formula, top-k overlap and the Observation 2/3 categories on hand-built id sets, and the metrics on a model
vs its permuted copy end to end (probe → compare)."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from mergescope.compare import (
    CONSENSUS_CATEGORIES,
    category_table,
    clip_delta,
    clip_delta_from_ids,
    clip_delta_pairs_from_ids,
    consensus_categories,
    consensus_from_similar,
    merged_categories_null,
    null_threshold,
    unmatched_partners,
    embedding_category_table,
    kendall_tau_b,
    merged_categories,
    merged_categories_embedding,
    merged_categories_embedding_from_ids,
    metric_spread,
    overlap_counts,
    topk_overlap,
)
from mergescope.compare import kendall as kendall_module
from mergescope.data import load_digits
from mergescope.embed import EmbeddingCache, FallbackEmbedder
from mergescope.errors import MergescopeError, NumericsError
from mergescope.models import create_model
from mergescope.perm import build_spec, permute_model, random_perms
from mergescope.perm.apply import invert
from mergescope.probe import probe


def scipy_tau(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return np.array([scipy.stats.kendalltau(x[:, c], y[:, c]).statistic for c in range(x.shape[1])])


@pytest.fixture(params=["compiled", "vectorized"])
def discordant_path(request, monkeypatch):
    """Run a test with scipy's compiled discordant-pair kernel and with the vectorized fallback."""
    if request.param == "vectorized":
        monkeypatch.setattr(kendall_module, "_discordant", lambda: kendall_module._discordant_vectorized)
    else:
        assert kendall_module._discordant() is kendall_module._discordant_compiled  # available here
    return request.param


def assert_matches_scipy(result, x, y):
    ref = scipy_tau(x, y)
    assert torch.equal(result.defined, torch.from_numpy(~np.isnan(ref)))
    np.testing.assert_allclose(result.tau.numpy(), np.nan_to_num(ref, nan=0.0), rtol=0, atol=1e-6)
    assert not torch.isnan(result.tau).any()


def test_kendall_matches_scipy_on_integer_data_with_ties(discordant_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (80, 40))  # many ties in x, in y, and in both
    y = rng.integers(-3, 3, (80, 40))
    y[:, 5] = x[:, 5]  # tau = 1
    y[:, 6] = -x[:, 6]  # tau = -1
    x[:, 0] = 4  # dead channel in A: constant -> undefined
    y[:, 1] = 0  # dead channel in B
    result = kendall_tau_b(torch.from_numpy(x), torch.from_numpy(y))
    assert_matches_scipy(result, x, y)
    assert result.defined.tolist()[:2] == [False, False] and result.defined[2:].all()
    assert result.tau[:2].tolist() == [0.0, 0.0] and torch.isnan(result.tau_or_nan()[:2]).all()
    assert result.tau[5] == 1.0 and result.tau[6] == -1.0


@pytest.mark.parametrize("kind", ["float32", "float64", "float16", "int64_large", "signed_zero_inf"])
def test_kendall_matches_scipy_for_every_key_type(kind, discordant_path):
    rng = np.random.default_rng(1)
    n, c = 300, 9
    if kind == "float32":
        x = rng.standard_normal((n, c)).astype(np.float32)
        y = np.maximum(x + rng.standard_normal((n, c)).astype(np.float32), 0)  # ReLU: ties at 0
    elif kind == "float64":  # values float32 can't hold: the 64-bit key path
        x = rng.standard_normal((n, c))
        y = x + 1e-12 * rng.integers(0, 3, (n, c))
    elif kind == "float16":
        x = rng.standard_normal((n, c)).astype(np.float16)
        y = (x + rng.standard_normal((n, c))).astype(np.float16)
    elif kind == "int64_large":  # beyond 2**24: integer keys
        x = rng.integers(-2**40, 2**40, (n, c)) // 2**30 * 2**30
        y = rng.integers(0, 2**50, (n, c))
    else:
        x = rng.choice(np.array([-0.0, 0.0, 1.0, -np.inf, np.inf, -2.5], np.float32), (n, c))
        y = rng.choice(np.array([0.0, -0.0, 3.0, np.inf], np.float32), (n, c))
    result = kendall_tau_b(torch.from_numpy(x), torch.from_numpy(y))
    assert_matches_scipy(result, x, y)


def test_kendall_compiled_and_vectorized_counts_agree_on_larger_data():
    rng = np.random.default_rng(2)
    sy = rng.integers(1, 500, (6, 3000))  # 1-based y ranks
    sx = np.sort(rng.integers(1, 2000, (6, 3000)), 1)
    for r in range(6):  # order within x ties by y, as the caller guarantees
        order = np.lexsort((sy[r], sx[r]))
        sx[r], sy[r] = sx[r][order], sy[r][order]
    fast = kendall_module._discordant_compiled(sx, sy)
    slow = kendall_module._discordant_vectorized(sx, sy)
    brute = [int(sum(((sx[r, :j] < sx[r, j]) & (sy[r, :j] > sy[r, j])).sum() for j in range(200)))
             for r in range(6)]
    assert np.array_equal(fast, slow)
    assert np.array_equal(kendall_module._discordant_vectorized(sx[:, :200], sy[:, :200]), brute)


def test_kendall_edge_cases():
    x = torch.tensor([[1.0, 2.0]])
    one = kendall_tau_b(x, x)  # a single image: no pairs
    assert not one.defined.any() and one.tau.tolist() == [0.0, 0.0]
    assert one.to_dict() == {"tau": [None, None], "defined": 0}
    with pytest.raises(NumericsError):
        kendall_tau_b(torch.tensor([[float("nan")], [1.0]]), torch.ones(2, 1))
    with pytest.raises(MergescopeError):
        kendall_tau_b(torch.ones(3, 2), torch.ones(3, 3))
    r = kendall_tau_b(np.arange(6.0).reshape(3, 2), np.arange(6.0).reshape(3, 2)[::-1].copy())
    assert r.tau.tolist() == [-1.0, -1.0] and r.tau.dtype == torch.float64


def test_clip_delta_hand_computed():
    # d = 2, k = 2, two channels; e1 = (1, 0), e2 = (0, 1), u = (1, 1)/√2 = r·(1, 1), ids: e1 -> 0, e2 -> 1, u -> 2.
    #   channel 0: T_A = {e1, u}, T_B = {e2, u};   channel 1: T_A = {e2, u}, T_B = {e2, u} (identical).
    # Thesis (default): only C(T_A, T_A) leaves out an image's pair with itself.
    #   C(T_A(0), T_A(0)) = cos(e1, u) = r                                   (the one distinct pair)
    #   C(T_A(0), T_B(0)) = mean{e1·e2 = 0, e1·u = r, u·e2 = r, u·u = 1} = (1 + √2)/4
    #   C(T_A(0), T_A(1)) = the same four pairs = (1 + √2)/4                 (the denominator of channel 0)
    #   δ(0) = (r − (1+√2)/4) / ((1+√2)/4) = (√2 − 1)/(√2 + 1) = 3 − 2√2
    #   δ(1): T_B = T_A, S = cos(e2, u) = r, C(T_A, T_B) = (2 + 2r)/4, denominator (1+√2)/4:
    #         δ(1) = (r − (1 + r)/2) / ((1+√2)/4) = −2(1 − r)/(1 + √2)       (= −(1 − S)/(k·b), k = 2)
    # Named variant "distinct_images": u·u is left out of every C:
    #   C(T_A(0), T_B(0)) = C(T_A(0), T_A(1)) = mean{0, r, r} = √2/3,  δ(0) = (r − √2/3)/(√2/3) = 1/2,  δ(1) = 0.
    r = math.sqrt(0.5)
    e1, e2, u = [1.0, 0.0], [0.0, 1.0], [r, r]
    emb_a = torch.tensor([[e1, u], [e2, u]])
    emb_b = torch.tensor([[e2, u], [e2, u]])
    ids_a, ids_b = torch.tensor([[0, 2], [1, 2]]), torch.tensor([[1, 2], [1, 2]])
    res = clip_delta(emb_a, emb_b, ids_a=ids_a, ids_b=ids_b)
    assert res.defined.all() and res.variant == "thesis"
    thesis = [3 - 2 * math.sqrt(2), -2 * (1 - r) / (1 + math.sqrt(2))]
    torch.testing.assert_close(res.delta, torch.tensor(thesis, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.self_similarity[0].item(), r, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.cross_similarity[0].item(), (1 + math.sqrt(2)) / 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.baseline[0].item(), (1 + math.sqrt(2)) / 4, rtol=0, atol=1e-12)
    distinct = clip_delta(emb_a, emb_b, ids_a=ids_a, ids_b=ids_b, variant="distinct_images")
    torch.testing.assert_close(distinct.delta, torch.tensor([0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(distinct.cross_similarity[0].item(), math.sqrt(2) / 3, rtol=0, atol=1e-12)
    # without ids nothing is known to be the same image: both variants are the thesis's
    torch.testing.assert_close(clip_delta(emb_a, emb_b).delta, res.delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(clip_delta(emb_a, emb_b, variant="distinct_images").delta, res.delta, rtol=0, atol=1e-12)
    # unnormalised input: normalised inside, same result
    torch.testing.assert_close(clip_delta(emb_a * 7, emb_b * 0.1, ids_a=ids_a, ids_b=ids_b).delta, res.delta)
    # from ids: a table, and a lookup function that must be called once with each distinct id
    table = torch.tensor([e1, e2, u])
    torch.testing.assert_close(clip_delta_from_ids(ids_a, ids_b, table).delta, res.delta)
    calls = []
    looked_up = clip_delta_from_ids(ids_a, ids_b, lambda ids: (calls.append(ids.tolist()), table[ids] * 3)[1])
    assert calls == [[0, 1, 2]]
    torch.testing.assert_close(looked_up.delta, res.delta)
    with pytest.raises(MergescopeError, match="variant"):
        clip_delta(emb_a, emb_b, variant="distinct")


def test_clip_delta_of_identical_top_k_sets_has_the_closed_form():
    """T_B(j) = T_A(j) (k distinct images): C(T_A, T_B) = (k·1 + k(k−1)·S)/k², so
    δ = (S − 1/k − (k−1)S/k) / b = −(1 − S)/(k·b), with S = C(T_A, T_A) (distinct pairs) and b the denominator."""
    g = torch.Generator().manual_seed(1)
    k, channels = 10, 6
    table = torch.rand(200, 12, generator=g, dtype=torch.float64) + 0.05
    ids = torch.stack([torch.randperm(200, generator=g)[:k] for _ in range(channels)])
    res = clip_delta_from_ids(ids, ids, table)
    unit = table / table.norm(dim=1, keepdim=True)
    for j in range(channels):
        e = unit[ids[j]]  # [k, d]
        s = ((e @ e.T).sum() - k) / (k * (k - 1))  # C(T_A, T_A) over the k(k−1) distinct ordered pairs
        b = sum(float((e @ unit[ids[p]].T).mean()) for p in range(channels) if p != j) / (channels - 1)
        expected = -(1 - float(s)) / (k * b)
        assert expected < 0
        assert res.delta[j].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert res.baseline[j].item() == pytest.approx(b, rel=1e-12)
    distinct = clip_delta_from_ids(ids, ids, table, variant="distinct_images")
    assert distinct.delta.abs().max() < 1e-12  # the named variant: identical sets give 0


def clip_delta_loop(emb_a, emb_b, ids_a, ids_b, variant="thesis"):
    """The formula written out pair by pair. Thesis: only C(X, X) skips the pair of an image with itself;
    "distinct_images": every C skips pairs of one image (equal ids)."""
    def unit(v):
        return v / v.norm()

    def c(x_emb, x_ids, y_emb, y_ids, self_pairs):
        sims = []
        for i in range(len(x_ids)):
            for j in range(len(y_ids)):
                if x_ids[i] < 0 or y_ids[j] < 0:
                    continue  # padding
                if (self_pairs or variant == "distinct_images") and x_ids[i] == y_ids[j]:
                    continue
                sims.append(float(unit(x_emb[i]) @ unit(y_emb[j])))
        return sum(sims) / len(sims)

    out = []
    for j in range(emb_a.shape[0]):
        base = [c(emb_a[j], ids_a[j], emb_a[p], ids_a[p], False) for p in range(emb_a.shape[0]) if p != j]
        out.append((c(emb_a[j], ids_a[j], emb_a[j], ids_a[j], True) - c(emb_a[j], ids_a[j], emb_b[j], ids_b[j], False))
                   / (sum(base) / len(base)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["thesis", "distinct_images"])
def test_clip_delta_vectorized_equals_the_formula_pair_by_pair(variant):
    g = torch.Generator().manual_seed(0)
    table = torch.rand(30, 8, generator=g, dtype=torch.float64) + 0.05  # positive, CLIP-like: denominators > 0
    ids_a, ids_b = (torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(6)]) for _ in range(2))
    ids_b[2] = ids_a[2]  # one identical channel
    ids_b[3, 4] = -1  # padding
    res = clip_delta_from_ids(ids_a, ids_b, table, variant=variant)
    expected = clip_delta_loop(table[ids_a.clamp_min(0)], table[ids_b.clamp_min(0)], ids_a.tolist(),
                               ids_b.tolist(), variant)
    assert res.defined.all()
    torch.testing.assert_close(res.delta, expected, rtol=0, atol=1e-10)


def test_clip_delta_on_half_shared_sets_equals_a_literal_loop():
    """5 of 10 top images shared between A and B on every channel: the thesis's δ from explicit loops over the
    images (cosines of raw embeddings), against the library; the distinct-images reading differs clearly."""
    g = torch.Generator().manual_seed(3)
    k, channels, d = 10, 8, 16
    emb = torch.rand(400, d, generator=g, dtype=torch.float64) + 0.1
    ids_a = torch.stack([torch.randperm(400, generator=g)[:k] for _ in range(channels)])
    ids_b = ids_a.clone()
    for j in range(channels):
        fresh = [i for i in torch.randperm(400, generator=g).tolist() if i not in ids_a[j].tolist()][: k // 2]
        ids_b[j, k // 2:] = torch.tensor(fresh)  # 5 shared, 5 new

    def cos(x, y):
        return float(x @ y) / (float(x.norm()) * float(y.norm()))

    expected = []
    for j in range(channels):
        ta, tb = ids_a[j].tolist(), ids_b[j].tolist()
        self_sum, self_n = 0.0, 0
        for x in ta:
            for y in ta:
                if x != y:
                    self_sum += cos(emb[x], emb[y])
                    self_n += 1
        cross = sum(cos(emb[x], emb[y]) for x in ta for y in tb) / (len(ta) * len(tb))
        others = []
        for p in range(channels):
            if p != j:
                tp = ids_a[p].tolist()
                others.append(sum(cos(emb[x], emb[y]) for x in ta for y in tp) / (len(ta) * len(tp)))
        expected.append((self_sum / self_n - cross) / (sum(others) / len(others)))
    res = clip_delta_from_ids(ids_a, ids_b, emb)
    np.testing.assert_allclose(res.delta.numpy(), expected, rtol=0, atol=1e-12)
    distinct = clip_delta_from_ids(ids_a, ids_b, emb, variant="distinct_images")
    assert (distinct.delta - res.delta).abs().min() > 1e-4  # another number: the variants are told apart


def test_clip_delta_pairs_diagonal_is_clip_delta_and_rows_use_a_terms():
    g = torch.Generator().manual_seed(2)
    table = torch.rand(60, 8, generator=g, dtype=torch.float64) + 0.05
    ids_a, ids_b = (torch.stack([torch.randperm(60, generator=g)[:4] for _ in range(5)]) for _ in range(2))
    for variant in ("thesis", "distinct_images"):
        pairs = clip_delta_pairs_from_ids(ids_a, ids_b, table, variant=variant)
        diag = clip_delta_from_ids(ids_a, ids_b, table, variant=variant)
        torch.testing.assert_close(pairs.delta.diagonal(), diag.delta, rtol=0, atol=1e-14)
        for p in range(5):  # column p: B's channel p put in place of B's channel j, one channel at a time
            shifted = ids_b[p].expand(5, -1)
            torch.testing.assert_close(pairs.delta[:, p], clip_delta_from_ids(ids_a, shifted, table,
                                                                              variant=variant).delta,
                                       rtol=0, atol=1e-14)


def test_clip_delta_flags_undefined_and_rejects_bad_input():
    one_channel = clip_delta(torch.rand(1, 3, 4) + 0.1, torch.rand(1, 3, 4) + 0.1)
    assert not one_channel.defined.any() and one_channel.delta.tolist() == [0.0]
    assert torch.isnan(one_channel.delta_or_nan()).all() and one_channel.to_dict()["delta"] == [None]
    k1 = clip_delta(torch.rand(3, 1, 4) + 0.1, torch.rand(3, 1, 4) + 0.1)  # no distinct pair in T_A
    assert not k1.defined.any()
    orthogonal = torch.eye(12).reshape(3, 4, 12)  # 12 orthogonal images: every C(T_A(j), T_A(p)) is 0
    ids = torch.arange(12).reshape(3, 4)
    for variant in ("thesis", "distinct_images"):
        assert not clip_delta(orthogonal, orthogonal, ids_a=ids, ids_b=ids, variant=variant).defined.any()
    shared = torch.eye(4)[None].expand(3, 4, 4)  # the same 4 orthogonal images in every channel
    same = torch.arange(12).reshape(3, 4) % 4
    assert clip_delta(shared, shared, ids_a=same, ids_b=same).defined.all()  # thesis: b = 1/4 (shared images)
    assert not clip_delta(shared, shared, ids_a=same, ids_b=same, variant="distinct_images").defined.any()
    with pytest.raises(NumericsError):
        clip_delta(torch.zeros(2, 2, 3), torch.ones(2, 2, 3))
    with pytest.raises(MergescopeError):  # one id, two embeddings
        clip_delta(torch.rand(2, 2, 3), torch.rand(2, 2, 3), ids_a=torch.tensor([[0, 1], [0, 2]]),
                   ids_b=torch.tensor([[3, 4], [5, 6]]))
    with pytest.raises(MergescopeError):
        clip_delta(torch.rand(2, 2, 3), torch.rand(3, 2, 3))


def test_topk_overlap_by_id_with_padding_and_duplicates():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 5, -1, -1], [7, 8, 9, 10]])
    b = torch.tensor([[4, 3, 2, 1], [4, 9, 1, -1], [5, -1, -1, -1], [-1, -1, -1, -1]])
    assert overlap_counts(a, b).tolist() == [4, 2, 1, 0]
    assert topk_overlap(a, b).tolist() == [1.0, 0.5, 0.25, 0.0]
    with pytest.raises(MergescopeError):
        topk_overlap(a, b[:3])


def test_merged_categories_on_hand_built_sets():
    a = torch.arange(10).repeat(7, 1)  # T_A = {0..9} for every channel
    b = (100 + torch.arange(10)).repeat(7, 1)  # T_B = {100..109}: no match ...
    b[0] = a[0]  # ... except channel 0
    b[6] = torch.tensor([0, 1, 2, 3, 104, 105, 106, 107, 108, 109])  # overlap 0.4 < 0.5: unmatched
    m = torch.tensor([
        list(range(10)),                                   # 0: matched (overlap 1)
        [0, 1, 2, 3, 4, 5, 6, 7, 100, 200],               # 1: 8 from A, 1 from B, 1 neither -> "A"
        [100, 101, 102, 103, 104, 105, 106, 0, 300, 301],  # 2: 7 from B, 1 from A -> "B"
        [0, 1, 2, 3, 100, 101, 102, 103, 400, 401],        # 3: 4 and 4 -> "mixed"
        [0, 100, 500, 501, 502, 503, 504, 505, 506, 507],  # 4: 8 from neither -> "neither"
        [0, 100, 500, 501, 502, 503, -1, -1, -1, -1],      # 5: 1 and 1, 4 neither (< 5): tie -> "mixed"
        [0, 1, 2, 3, 4, 5, 6, 104, 600, 601],              # 6: 4 shared, 3 A only, 1 B only -> "A"
    ])
    res = merged_categories(a, b, m, match_threshold=0.5, neither_min=0.5, mixed_min=0.2)
    assert res.names() == ["matched", "A", "B", "mixed", "neither", "mixed", "A"]
    assert res.from_a_only.tolist() == [0, 8, 1, 4, 1, 1, 3]
    assert res.from_b_only.tolist() == [0, 1, 7, 4, 1, 1, 1]
    assert res.from_both.tolist() == [10, 0, 0, 0, 0, 0, 4]
    assert res.from_neither.tolist() == [0, 1, 2, 2, 8, 4, 2]
    shares = res.shares()
    assert (shares["matched"], shares["unmatched"]) == (1, 6)
    assert (shares["n_A"], shares["n_B"], shares["n_mixed"], shares["n_neither"]) == (2, 1, 2, 1)
    assert shares["share_A"] == pytest.approx(2 / 6)
    table = category_table({"features.0": res, "features.3": res})
    assert [row["layer"] for row in table] == ["features.0", "features.3"] and table[0]["n_B"] == 1
    # the thresholds are parameters: a laxer match threshold counts channel 6 (overlap 0.4) as matched,
    # a stricter mixed rule turns channel 3 (4 and 4 of 10) into a tie, still "mixed", and channel 1 stays "A"
    assert merged_categories(a, b, m, mixed_min=0.5).names()[1:4] == ["A", "B", "mixed"]
    assert merged_categories(a, b, m, match_threshold=0.4).names()[6] == "matched"


def _concept_table(concepts: int, d: int = 64) -> torch.Tensor:
    """Unit embeddings (u + e_c)/√2 of orthogonal "concepts" c sharing a direction u: cos = 1 within a concept,
    1/2 between two concepts."""
    eye = torch.eye(d, dtype=torch.float64)
    return (eye[0] + eye[1:concepts + 1]) / math.sqrt(2)


def test_merged_categories_by_embedding_on_hand_built_sets():
    # image id 10·c + i (i < 10) is an image of concept c; every top-k set holds 2 distinct ids
    concept = _concept_table(20)
    table = concept.repeat_interleave(10, 0)  # row id -> concept id // 10
    a = torch.tensor([[0, 1], [10, 11], [20, 21], [30, 31], [40, 41]])  # T_A(j): concept j
    b = torch.tensor([[100, 101], [110, 111], [120, 121], [130, 131], [40, 41]])  # T_B(j): concept 10 + j ...
    m = torch.tensor([  # ... except channel 4, where B matches A
        [2, 3],      # 0: concept 0 = A's: s_A = 1, s_B = 1/2 -> "A"
        [112, 113],  # 1: concept 11 = B's -> "B"
        [22, 123],   # 2: one of each: s_A = s_B = (1 + 1/2)/2 -> "mixed"
        [190, 191],  # 3: another concept: s_A = s_B = 1/2 = baseline -> "neither"
        [42, 43],    # 4: matched by id, not classified
    ])
    res = merged_categories_embedding_from_ids(a, b, m, table)
    assert res.names() == ["A", "B", "mixed", "neither", "matched"]
    assert res.baseline.tolist() == pytest.approx([0.5] * 5)  # T_A sets of different concepts: cos 1/2
    assert res.sim_a.tolist() == pytest.approx([1, 0.5, 0.75, 0.5, 1])
    assert res.sim_b.tolist() == pytest.approx([0.5, 1, 0.75, 0.5, 1])
    assert res.rel_a.tolist() == pytest.approx([2, 1, 1.5, 1, 2])
    shares = res.shares()
    assert (shares["matched"], shares["unmatched"], shares["n_A"], shares["n_B"], shares["n_mixed"],
            shares["n_neither"], shares["n_undefined"]) == (1, 4, 1, 1, 1, 1, 0)
    assert shares["share_A"] == pytest.approx(0.25)
    assert embedding_category_table({"l": res})[0]["layer"] == "l"
    # the thresholds are parameters: with margin 1.5 nothing is clearly closer to one side ...
    assert merged_categories_embedding_from_ids(a, b, m, table, margin=1.5).names()[:4] == [
        "mixed", "mixed", "mixed", "neither"]
    # ... and with close_min 1.6 the half-and-half set of channel 2 is close to neither
    assert merged_categories_embedding_from_ids(a, b, m, table, close_min=1.6).names()[2] == "neither"
    # the pure function on the embeddings gives the same; a shared image is not paired with itself
    emb = [table[i] for i in (a, b, m)]
    same = merged_categories_embedding(*emb, ids_a=a, ids_b=b, ids_m=m)
    assert same.names() == res.names()
    m2 = m.clone()
    m2[0] = torch.tensor([0, 1])  # T_M = T_A: only the distinct pair (0, 1), (1, 0) counts -> s_A = 1
    assert merged_categories_embedding_from_ids(a, b, m2, table).sim_a[0].item() == pytest.approx(1.0)
    # a one-channel layer has no baseline: "undefined", never NaN
    one = merged_categories_embedding_from_ids(a[:1], b[:1], m[:1], table)
    assert one.names() == ["undefined"] and torch.isfinite(one.rel_a).all()
    with pytest.raises(MergescopeError):
        merged_categories_embedding(emb[0], emb[1][:, :, :3], emb[2], ids_a=a, ids_b=b, ids_m=m)


def test_consensus_categories_and_spread():
    # 4 models aligned to a reference, 6 channels; similar = tau >= 0.5
    tau = torch.tensor([
        [0.9, 0.9, 0.9, 0.1, 0.1, 0.6],
        [0.8, 0.2, 0.8, 0.2, 0.2, 0.1],
        [0.7, 0.8, 0.1, 0.3, 0.6, 0.2],
        [0.6, 0.9, 0.2, 0.1, 0.1, 0.3],
    ])
    res = consensus_categories(tau, 0.5)
    assert res.similar_count.tolist() == [4, 3, 2, 0, 1, 1]
    assert res.names() == ["all similar", "most similar", "most similar", "all dissimilar", "few similar",
                           "few similar"]
    assert sum(res.shares()[f"n_{n}"] for n in CONSENSUS_CATEGORIES) == 6
    assert consensus_categories(tau, 0.5, max_outliers=1).names()[2] == "few similar"
    delta = 1 - tau  # CLIP-δ-like: lower is similar
    assert consensus_categories(delta, 0.5, higher_is_similar=False).names() == res.names()
    undefined = torch.ones_like(tau, dtype=torch.bool)
    undefined[3, 0] = False  # an undefined value counts as dissimilar
    assert consensus_categories(tau, 0.5, defined=undefined).names()[0] == "most similar"

    spread = metric_spread(tau)
    torch.testing.assert_close(spread.mean, tau.double().mean(0))
    torch.testing.assert_close(spread.std, tau.double().std(0, unbiased=False))
    sample = metric_spread(tau, undefined, ddof=1)
    torch.testing.assert_close(sample.mean[0].item(), 0.8, rtol=0, atol=1e-7)  # mean of 0.9, 0.8, 0.7
    torch.testing.assert_close(sample.std[0].item(), 0.1, rtol=0, atol=1e-7)
    assert sample.count.tolist() == [3, 4, 4, 4, 4, 4]


def test_unmatched_partners_are_seeded_distinct_and_never_the_matched_channel():
    small = unmatched_partners(4, partners=32)  # C − 1 ≤ partners: every unmatched channel, in order
    assert small.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    big = unmatched_partners(50, partners=7, seed=3)
    assert big.shape == (50, 7)
    assert (big != torch.arange(50)[:, None]).all()  # never j itself
    assert all(len(set(row)) == 7 for row in big.tolist())  # without replacement
    assert torch.equal(big, unmatched_partners(50, partners=7, seed=3))  # seeded
    assert not torch.equal(big, unmatched_partners(50, partners=7, seed=4))
    counts = torch.bincount(unmatched_partners(400, partners=40).reshape(-1), minlength=400)
    assert counts.min() > 10 and counts.max() < 80  # every channel is drawn about 40 times: uniform, no bias
    with pytest.raises(MergescopeError, match="partners"):
        unmatched_partners(5, partners=0)


def test_null_threshold_quantile_and_direction():
    values = np.arange(101, dtype=np.float64)  # 0 .. 100
    usable = values != 100  # the 100 is left out of the pool
    high = null_threshold("kendall_tau", values, usable, higher_is_similar=True, quantile=0.95)
    assert high.threshold == pytest.approx(np.quantile(np.arange(100.0), 0.95)) and high.size == 100
    low = null_threshold("clip_delta", values, usable, higher_is_similar=False, quantile=0.95)
    assert low.threshold == pytest.approx(np.quantile(np.arange(100.0), 0.05))
    # strictly beyond; unusable values are not judged
    assert high.similar(np.array([95.0, 94.0, 99.0]), np.array([True, True, False])) == [True, False, None]
    assert low.similar(np.array([4.0, 5.0, 0.0]), np.array([True, True, True])) == [True, False, True]
    discrete = null_threshold("overlap", np.zeros(50), np.ones(50, bool), higher_is_similar=True)
    assert discrete.threshold == 0.0 and discrete.similar(np.array([0.0, 0.1]), np.ones(2, bool)) == [False, True]
    empty = null_threshold("kendall_tau", values, np.zeros(101, bool), higher_is_similar=True)
    assert empty.threshold is None and empty.similar(values[:2], np.ones(2, bool)) == [None, None]
    for q in (0.0, 1.0, 1.5):
        with pytest.raises(MergescopeError, match="quantile"):
            null_threshold("kendall_tau", values, usable, higher_is_similar=True, quantile=q)


def test_merged_categories_null_and_consensus_from_similar():
    matched = [True, False, False, False, False, None, False]
    from_a = [False, True, False, True, False, True, None]
    from_b = [False, False, True, True, False, True, True]
    res = merged_categories_null(matched, from_a, from_b, {"metric": "kendall_tau"})
    assert res.names() == ["matched", "A", "B", "mixed", "neither", "undefined", "undefined"]
    shares = res.shares()
    assert (shares["matched"], shares["unmatched"], shares["n_A"], shares["n_undefined"]) == (1, 6, 1, 2)
    assert shares["share_mixed"] == pytest.approx(1 / 6)
    similar = torch.tensor([[True, True, False, False], [True, False, False, True], [True, True, False, False]])
    cons = consensus_from_similar(similar, max_outliers=1)
    assert cons.names() == ["all similar", "most similar", "all dissimilar", "few similar"]
    assert cons.similar_count.tolist() == [3, 2, 0, 1]


def test_model_vs_its_permuted_copy_is_identical_by_every_metric():
    """Permute a model, align it back with the inverse permutation: identical activations, so τ = 1,
    overlap = 1 and CLIP-δ = 0 on every channel; the unaligned copy is visibly different."""
    digits = load_digits("train")
    model = create_model("cnn_digits", width=8, seed=0)
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    permuted = permute_model(model, spec, perms)
    aligned = permute_model(permuted, spec, {g: invert(p) for g, p in perms.items()})
    subset = torch.arange(0, 1437, 5)
    result = probe({"a": model, "b": permuted, "b_aligned": aligned}, digits, k=10, subset_ids=subset,
                   progress=False)
    cache = EmbeddingCache(FallbackEmbedder(model, mean=digits.mean, std=digits.std))
    layers = [name for name, tap in spec.layers.items() if tap.group is not None]
    assert len(layers) == 3
    for name in layers:
        a, b, al = result["a", name], result["b", name], result["b_aligned", name]
        tau = kendall_tau_b(a.subset, al.subset)
        assert tau.defined.any(), name
        assert (tau.tau[tau.defined] == 1.0).all(), name
        assert (topk_overlap(a.topk_ids, al.topk_ids) == 1.0).all(), name
        delta = clip_delta_from_ids(a.topk_ids, al.topk_ids, lambda ids: cache.get(ids, digits))
        k = a.topk_ids.shape[1]
        closed = -(1 - delta.self_similarity) / (k * delta.baseline)  # identical sets: the closed form
        assert delta.defined.all() and torch.allclose(delta.delta, closed, rtol=1e-10, atol=1e-14), name
        distinct = clip_delta_from_ids(a.topk_ids, al.topk_ids, lambda ids: cache.get(ids, digits),
                                       variant="distinct_images")
        assert (distinct.delta.abs() < 1e-12).all(), name
        # unaligned: channel i of b is channel perms[i] of a, so most channels differ
        assert topk_overlap(a.topk_ids, b.topk_ids).mean() < 0.9, name
        assert (clip_delta_from_ids(a.topk_ids, b.topk_ids, lambda ids: cache.get(ids, digits)).delta > 0).any()
    assert cache.computed == len(cache) <= 1437
