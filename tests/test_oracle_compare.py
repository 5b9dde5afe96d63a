"""Oracles for "similar" judged against a null (DESIGN "Similar") and the Observation 1–3 counts built on it, on a
*trained, non-permuted* triple of digits CNNs (B and C aligned to A by activation matching, A and B merged).

Every number is recomputed here from its definition, slowly, without the library's metric code: Kendall's τ with
scipy, top-k overlap with Python sets, the thesis's CLIP-δ with explicit loops over channel pairs; the null pool
over the unmatched pairs (j, p ≠ j) by explicit loops; the threshold with ``numpy.quantile``; the Observation 1
and 3 shares from the rows of ``compare.csv``.
"""
import numpy as np
import pytest
import scipy.stats
import torch

from mergescope.align import match_many
from mergescope.compare import ComparePair, compare_models, read_compare_csv, unmatched_partners
from mergescope.studies.compare import CompareConfig, make_embedder
from mergescope.studies.compare import run as channel_comparison
from mergescope.data import iter_batches, load_digits
from mergescope.embed import EmbeddingCache
from mergescope.studies.probe import run as feature_study
from mergescope.merge import interpolate_model
from mergescope.perm import build_spec, permute_model

Q = 0.95
PARTNERS = 32  # the default; the 64-channel layer samples, the smaller ones use every unmatched channel


@pytest.fixture(scope="module")
def study(tmp_path_factory, trained_digits):
    digits = load_digits("train")
    a, b, c = (trained_digits("cnn_digits", s, width=16) for s in (0, 1, 2))
    spec = build_spec(a, torch.zeros(2, 1, 8, 8))
    matches = match_many(a, [b, c], spec, iter_batches(digits, 512))
    merged = {"merged (α=0.5)": interpolate_model(a, permute_model(b, spec, matches[0].perms), 0.5)}
    run = tmp_path_factory.mktemp("oracle_compare")
    probed, _, recipes = feature_study(run, digits, {"A": a, "B": b, "C": c}, matches=dict(zip("BC", matches)),
                                       merged=merged, spec=spec, batch_size=512)
    cfg = CompareConfig(null_quantile=Q)
    embedder = make_embedder(cfg, a, digits)
    out = channel_comparison(run, digits, probed, recipes, cfg, embedder=embedder)
    cache = EmbeddingCache(embedder)
    return {"rows": read_compare_csv(run / "compare.csv"), "result": out.result, "probe": probed,
            "embed": lambda ids: cache.get(ids, digits).double().numpy()}


def _partners(channels: int) -> list[list[int]]:
    """The unmatched partners of each channel: every p ≠ j when C − 1 ≤ 32, else the library's seeded draw
    (checked here to be 32 distinct channels other than j)."""
    if channels - 1 <= PARTNERS:
        return [[p for p in range(channels) if p != j] for j in range(channels)]
    drawn = unmatched_partners(channels, PARTNERS, seed=0).tolist()
    for j, row in enumerate(drawn):
        assert len(row) == PARTNERS and len(set(row)) == PARTNERS and j not in row and all(0 <= p < channels for p in row)
    return drawn


def _tau(x: np.ndarray, y: np.ndarray) -> float | None:
    t = scipy.stats.kendalltau(x, y).statistic
    return None if np.isnan(t) else float(t)


def _overlap(ta: list[int], tb: list[int]) -> float:
    return len(set(ta) & set(tb)) / len(ta)


def _thesis_delta_terms(emb_a: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """C(T_A(j), T_A(j)) over distinct pairs, and mean_{p≠j} C(T_A(j), T_A(p)) over all k² pairs, per channel."""
    unit = [e / np.linalg.norm(e, axis=1, keepdims=True) for e in emb_a]
    selfs, bases = [], []
    for j, ej in enumerate(unit):
        k = len(ej)
        total = 0.0
        for i in range(k):
            for i2 in range(k):
                if i != i2:
                    total += float(ej[i] @ ej[i2])
        selfs.append(total / (k * (k - 1)))
        bases.append(float(np.mean([np.mean(ej @ unit[p].T) for p in range(len(unit)) if p != j])))
    return selfs, bases


def _null_and_values(metric: str, x, y, embed, partners: list[list[int]]):
    """(matched values with usability, null pool) of ``metric`` between probe layers x and y, literally."""
    channels = x.topk_ids.shape[0]
    dead_x, dead_y = (x.std == 0).tolist(), (y.std == 0).tolist()
    if metric == "clip_delta":
        ea = [embed(x.topk_ids[j]) for j in range(channels)]
        eb = [embed(y.topk_ids[p]) for p in range(channels)]
        selfs, bases = _thesis_delta_terms(ea)

    def value(j: int, p: int) -> float | None:
        if metric == "kendall_tau":
            return _tau(x.subset[:, j].double().numpy(), y.subset[:, p].double().numpy())
        if metric == "overlap":
            return _overlap(x.topk_ids[j].tolist(), y.topk_ids[p].tolist())
        ua = ea[j] / np.linalg.norm(ea[j], axis=1, keepdims=True)
        ub = eb[p] / np.linalg.norm(eb[p], axis=1, keepdims=True)
        cross = float(np.mean(ua @ ub.T))  # all k² pairs, a shared image included
        return (selfs[j] - cross) / bases[j]

    pool = []
    for j in range(channels):
        for p in partners[j]:
            assert p != j
            v = value(j, p)
            if v is not None and not dead_x[j] and not dead_y[p]:
                pool.append(v)
    matched = [value(j, j) for j in range(channels)]
    usable = [v is not None and not dead_x[j] and not dead_y[j] for j, v in enumerate(matched)]
    return matched, usable, np.array(pool)


def _threshold(metric: str, pool: np.ndarray) -> float:
    return float(np.quantile(pool, Q if metric != "clip_delta" else 1 - Q))


def _beyond(metric: str, v: float, t: float) -> bool:
    return v < t if metric == "clip_delta" else v > t


@pytest.mark.parametrize("metric", ["kendall_tau", "overlap", "clip_delta"])
def test_null_threshold_equals_the_quantile_of_unmatched_pairs_computed_literally(study, metric):
    rows, probe_result, embed = study["rows"], study["probe"], study["embed"]
    for model in ("B_aligned", "C_aligned"):
        for layer in probe_result.layers["A"]:
            mine = [r for r in rows if (r["model"], r["layer"]) == (model, layer)]
            x, y = probe_result["A", layer], probe_result[model, layer]
            matched, usable, pool = _null_and_values(metric, x, y, embed, _partners(x.channels))
            threshold = _threshold(metric, pool)
            assert len({r[f"null_threshold_{metric}"] for r in mine}) == 1, (model, layer)  # one per layer
            # δ: the test embeds the images in other batches than the library (float32 convolutions: ~1e-7)
            tol = {"rel": 1e-5} if metric == "clip_delta" else {"abs": 1e-9}
            assert mine[0][f"null_threshold_{metric}"] == pytest.approx(threshold, **tol), (model, layer)
            summary = next(s for s in study["result"].layers if (s["model"], s["layer"]) == (model, layer))
            assert summary[f"null_{metric}"]["size"] == len(pool)
            for r, v, ok in zip(mine, matched, usable):
                assert r[metric] == pytest.approx(v if v is not None else 0.0, **tol), (model, layer, r["channel"])
                assert r[f"similar_{metric}"] == (_beyond(metric, v, threshold) if ok else None), (model, layer)
            if metric == "kendall_tau":  # trained pairs: more matched channels beyond the null than the null's 5%
                assert np.mean([bool(r["similar_kendall_tau"]) for r in mine]) > 1 - Q, (model, layer)


def test_observation1_and_3_shares_recomputed_from_the_csv_rows(study):
    rows, result = study["rows"], study["result"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    for s in result.layers:
        mine = [r for r in rows if (r["model"], r["layer"]) == (s["model"], s["layer"])]
        for metric in ("kendall_tau", "overlap", "clip_delta"):
            n = sum(1 for r in mine if r[f"similar_{metric}"] is True)
            assert s[f"share_similar_{metric}"] == pytest.approx(n / len(mine))
            assert s[f"null_{metric}"]["threshold"] == mine[0][f"null_threshold_{metric}"]
    for layer in layers:
        by_model = {m: [r for r in rows if (r["model"], r["layer"]) == (m, layer)] for m in ("B_aligned", "C_aligned")}
        counts = {"all similar": 0, "most similar": 0, "few similar": 0, "all dissimilar": 0}
        for j in range(len(by_model["B_aligned"])):
            similar = sum(1 for m in by_model if by_model[m][j]["similar_kendall_tau"] is True)
            name = "all similar" if similar == 2 else "all dissimilar" if similar == 0 else "most similar"
            counts[name] += 1  # with 2 aligned models one outlier is "most similar" (max_outliers = 2)
            assert by_model["B_aligned"][j]["consensus"] == by_model["C_aligned"][j]["consensus"] == name
        [o3] = [o for o in result.observation3 if o["layer"] == layer]
        total = len(by_model["B_aligned"])
        for name, n in counts.items():
            assert o3[f"share_{name}"] == pytest.approx(n / total), (layer, name)
        assert o3["thresholds"] == {m: by_model[m][0]["null_threshold_kendall_tau"] for m in by_model}


def test_observation2_categories_judge_the_merged_sets_against_their_own_nulls(study):
    rows, probe_result, result = study["rows"], study["probe"], study["result"]
    [merged] = {r["merged_model"] for r in rows if r["model"] == "B_aligned"}
    merged_name = next(m for m in probe_result.models if m.startswith("merged"))
    for layer in probe_result.layers["A"]:
        a, b, m = probe_result["A", layer], probe_result["B_aligned", layer], probe_result[merged_name, layer]
        partners = _partners(a.channels)
        judged = {}
        for key, (x, y) in {"A~B": (a, b), "A~M": (a, m), "B~M": (b, m)}.items():
            values, usable, pool = _null_and_values("kendall_tau", x, y, None, partners)
            t = _threshold("kendall_tau", pool)
            judged[key] = [(v > t) if ok else None for v, ok in zip(values, usable)]
            [o2] = [o for o in result.observation2 if o["layer"] == layer]
            assert o2["nulls"][key]["threshold"] == pytest.approx(t, abs=1e-12), (layer, key)
        mine = [r for r in rows if (r["model"], r["layer"]) == ("B_aligned", layer)]
        for j, r in enumerate(mine):
            ab, am, bm = judged["A~B"][j], judged["A~M"][j], judged["B~M"][j]
            if ab:
                expected = "matched"
            elif ab is None or am is None or bm is None:
                expected = "undefined"
            else:
                expected = "mixed" if am and bm else "A" if am else "B" if bm else "neither"
            assert r["category"] == expected and r["merged_model"] == merged, (layer, j)


def test_correlation_null_from_a_full_matrix_uses_its_off_diagonal_entries(study):
    """With the alignment's full correlation matrix (A's channel j × the aligned model's channel p), the
    correlation gets a null: the 95th percentile of the entries (j, p ≠ j), all of them for C − 1 ≤ 32."""
    probe_result = study["probe"]
    g = np.random.default_rng(0)
    matrices = {layer: g.uniform(-0.2, 0.6, (probe_result["A", layer].channels,) * 2)
                for layer in probe_result.layers["A"]}
    for m in matrices.values():
        np.fill_diagonal(m, 0.9)
    res = compare_models(probe_result, [ComparePair("A", "B_aligned", correlation_matrix=matrices)],
                         layers=["features.2", "features.5"])
    for s in res.layers:
        m = matrices[s["layer"]]
        off = [m[j, p] for j in range(len(m)) for p in range(len(m)) if p != j]
        assert s["null_correlation"]["threshold"] == pytest.approx(float(np.quantile(off, Q)), abs=1e-12)
        assert s["share_similar_correlation"] == 1.0  # 0.9 on the diagonal: beyond every off-diagonal entry
    assert all(r["correlation"] == pytest.approx(0.9) for r in res.rows)
