"""The channel comparison end to end: a model against permuted copies of itself through feature_study and
channel_comparison (τ = 1, overlap = 1, δ = 0 on every channel; one CSV row per pair × layer × channel), partial
merging at its endpoints and its random baseline, ``mergescope compare`` on a tiny run folder (with and without
stored D′ activations), and a dead channel flagged rather than NaN."""
import csv
import json

import numpy as np
import pytest
import torch

from mergescope.align import match_many
from mergescope.cli import main
from mergescope.compare import (
    COLUMNS,
    ComparePair,
    compare_models,
    read_compare_csv,
    write_compare_csv,
)
from mergescope.report.feature_data import read_page_data
from mergescope.studies.compare import CompareConfig, make_embedder
from mergescope.studies.compare import run as channel_comparison
from mergescope.data import iter_batches, load_digits, stratified_subset, subset_per_class
from mergescope.embed import EmbeddingCache
from mergescope.evaluate import evaluate_models
from mergescope.studies.probe import run as feature_study
from mergescope.merge import (
    interpolate_model,
    interpolate_state,
    partial_merge_curves,
    partial_merge_model,
    partial_merge_state,
    select_channels,
)
from mergescope.models import create_model
from mergescope.perm import build_spec, invert, permute_model, random_perms
from mergescope.probe import load_probe, probe, save_probe
from mergescope.train import save_checkpoint

CHANNELS = {"features.2": 8, "features.5": 16, "features.9": 32}  # cnn_digits, width 8


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


@pytest.fixture(scope="module")
def permuted_study(tmp_path_factory, digits):
    """A, and B and C = A with its channels randomly permuted, through the whole study: activation matching,
    the feature study's probe (default D′), the comparison with the fallback embedder and its pages."""
    run = tmp_path_factory.mktemp("permuted")
    a = create_model("cnn_digits", width=8, seed=0)
    spec = build_spec(a, torch.zeros(2, 1, 8, 8))
    b, c = (permute_model(a, spec, random_perms(spec, torch.Generator().manual_seed(s))) for s in (1, 2))
    matches = match_many(a, [b, c], spec, iter_batches(digits, 512))
    merged = {"merged (α=0.5)": interpolate_model(a, permute_model(b, spec, matches[0].perms), 0.5)}
    probed, _, recipes = feature_study(run, digits, {"A": a, "B": b, "C": c}, matches=dict(zip("BC", matches)),
                                       merged=merged, spec=spec, batch_size=512)
    cfg = CompareConfig()
    out = channel_comparison(run, digits, probed, recipes, cfg, embedder=make_embedder(cfg, a, digits))
    return run, out, probed, recipes


def test_model_vs_permuted_copies_is_identical_on_every_channel(permuted_study, digits):
    run, out, probed, _ = permuted_study
    assert torch.equal(probed.subset_ids, torch.from_numpy(stratified_subset(digits.targets, 5000, seed=0)))
    rows = read_compare_csv(run / "compare.csv")
    assert len(rows) == 2 * sum(CHANNELS.values())  # pairs × layers × channels
    keys = {(r["model"], r["layer"], r["channel"]) for r in rows}
    assert keys == {(m, layer, ch) for m in ("B_aligned", "C_aligned") for layer, n in CHANNELS.items()
                    for ch in range(n)}
    assert all(r["reference"] == "A" for r in rows)
    for r in rows:
        where = (r["model"], r["layer"], r["channel"])
        # B_aligned's activations are B's (its probe is derived from B's), and B sums A's inputs in another order:
        # float32 values 1e-7 apart can tie or untie once D′ is stored in float16
        assert r["kendall_defined"] and r["kendall_tau"] == pytest.approx(1.0, abs=1e-5), where
        assert r["overlap"] == 1.0, where
        assert r["clip_delta_defined"] and r["clip_delta"] < 0, where  # thesis: identical sets, −(1 − S)/(k·b)
        assert r["clip_delta_distinct_images_defined"] and abs(r["clip_delta_distinct_images"]) < 1e-12, where
        assert r["correlation"] == pytest.approx(1.0, abs=1e-3), where  # float32 statistics: 1 ± 2e-4
        assert not r["dead"] and r["consensus"] == "all similar", where
        assert r["consensus_fixed_threshold"] == "all similar", where
        assert r["embedder_kind"] == "fallback" and r["embedder"].endswith("not CLIP"), where
        assert r["category"] == ("matched" if r["model"] == "B_aligned" else ""), where
        assert r["category_id_overlap"] == r["category_embedding"] == r["category"], where  # every rule ran
        # beyond the null of unmatched channels by every metric, the correlation's from the stored alignment
        assert (r["similar_kendall_tau"], r["similar_clip_delta"], r["similar_overlap"],
                r["similar_correlation"]) == (True, True, True, True), where
        assert r["null_threshold_kendall_tau"] < 1 and r["null_threshold_overlap"] < 1, where
        assert r["null_threshold_correlation"] < 0.99, where
        assert r["null_quantile"] == 0.95, where
    assert [o["share_all similar"] for o in out.result.observation3] == [1.0] * len(CHANNELS)
    assert [o["fixed_threshold"]["share_all similar"] for o in out.result.observation3] == [1.0] * len(CHANNELS)
    assert {o["layer"]: o["matched"] for o in out.result.observation2} == CHANNELS
    assert {o["layer"]: o["id_overlap"]["matched"] for o in out.result.observation2} == CHANNELS
    assert {o["layer"]: o["embedding"]["matched"] for o in out.result.observation2} == CHANNELS
    assert out.result.rules["observation2_embedding"]["close_min"] == 1.1
    for s in out.result.layers:  # Observation 1: every matched channel is similar, with the threshold stated
        assert s["share_similar_kendall_tau"] == s["share_similar_overlap"] == s["share_similar_clip_delta"] == 1.0
        assert s["null_kendall_tau"]["size"] == s["channels"] * (s["channels"] - 1)  # all unmatched pairs (C ≤ 33)
        assert s["share_similar_correlation"] == 1.0


def test_compare_csv_round_trips_the_embedding_category_and_reads_older_files(permuted_study, tmp_path):
    _, out, _, _ = permuted_study
    rows = [dict(r, category_embedding=cat, similar_overlap=sim) for r, cat, sim in
            zip(out.result.rows, ["A", "B", "mixed", "neither"] * 9999, [True, False, None] * 9999)]
    path = write_compare_csv(tmp_path / "c.csv", rows)
    assert read_compare_csv(path) == rows  # including the three states of similar_*
    with open(path, newline="") as f:  # a file written before the newer columns existed
        table = list(csv.reader(f))
    newer = {"category_embedding", "clip_delta_distinct_images", "clip_delta_distinct_images_defined",
             "null_quantile", "category_id_overlap", "consensus_fixed_threshold",
             *(c for c in COLUMNS if c.startswith(("similar_", "null_threshold_")))}
    keep = [i for i, c in enumerate(table[0]) if c not in newer]
    old = tmp_path / "old.csv"
    with open(old, "w", newline="") as f:
        csv.writer(f).writerows([[line[i] for i in keep] for line in table])
    back = read_compare_csv(old)
    assert [r["category_embedding"] for r in back] == [""] * len(rows)
    assert all(r["similar_kendall_tau"] is None and r["null_threshold_kendall_tau"] is None for r in back)


def test_comparison_pages_show_the_metrics_and_link_every_channel(permuted_study):
    run, out, _, _ = permuted_study
    table = (run / "features" / "table_features.5.html").read_text()
    assert '"page":"pair_features.5.html"' in table and '"page":"many_features.5.html"' in table  # every row's links
    assert "fallback-δ B" in table and "CLIP-δ" not in table.split("<table")[1]  # never called CLIP
    shown = read_page_data(run / "features" / "pair_features.5.html")
    assert 3 in shown["order"] and 1.0 in shown["info"]["τ B"] and 1.0 in shown["info"]["overlap B"]
    assert "fallback-δ C" in (run / "features" / "many_features.2.html").read_text()
    for layer in CHANNELS:
        assert (run / "figures" / f"compare_{layer}.svg").stat().st_size > 1000
    assert out.section["title"] == "Channel comparison" and "not CLIP" in out.section["html"]
    assert "by fallback embedding similarity" in out.section["html"]
    assert "CLIP embedding" not in out.section["html"]  # the fallback is never called CLIP
    assert "category by fallback embedding B" in table
    assert "5–10%" in out.section["html"]  # the thesis's Observation 3 figures beside ours


def test_clip_embedder_from_a_local_weights_file_is_called_clip(permuted_study, digits, tmp_path):
    """The real open_clip loading path (a tiny randomly initialised CLIP saved to a file): δ is CLIP-δ."""
    open_clip = pytest.importorskip("open_clip")
    config = tmp_path / "mergescope-tiny-compare.json"
    config.write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("mergescope-tiny-compare").state_dict(), tmp_path / "tiny.pt")
    _, _, probed, recipes = permuted_study
    cfg = CompareConfig(clip_model="mergescope-tiny-compare", clip_weights=str(tmp_path / "tiny.pt"))
    assert cfg.embedder_kind == "clip"
    run = tmp_path / "run"
    out = channel_comparison(run, digits, probed, recipes, cfg, embedder=make_embedder(cfg, None, digits))
    assert {(r["embedder_kind"], r["clip_delta_defined"], r["clip_delta"] < 0,
             abs(r["clip_delta_distinct_images"]) < 1e-12) for r in out.result.rows} == {("clip", True, True, True)}
    # identical sets: thesis δ < 0, the distinct-images variant 0
    assert "CLIP-δ B" in (run / "features" / "table_features.2.html").read_text()
    assert "fallback" not in out.section["html"]


@pytest.mark.parametrize("arch", ["cnn_digits", "resnet20"])
def test_partial_merge_endpoints_and_channel_ownership(arch, zoo, helpers):
    a = zoo(arch)
    b = helpers.randomize_batchnorm(create_model(arch, seed=1), seed=2).eval()
    x = helpers.random_images(arch, 6)
    spec = build_spec(a, x[:2])
    none = {g: torch.zeros(p.size, dtype=torch.bool) for g, p in spec.groups.items()}
    every = {g: torch.ones(p.size, dtype=torch.bool) for g, p in spec.groups.items()}
    full = interpolate_model(a, b, 0.5)
    with torch.inference_mode():
        assert torch.equal(partial_merge_model(a, b, spec, every, 0.5)(x), full(x))
        assert torch.equal(partial_merge_model(a, b, spec, none, 0.5)(x), a(x))
        assert torch.equal(partial_merge_model(a, b, spec, {}, 0.5)(x), a(x))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(v, sa[k]) for k, v in partial_merge_state(sa, sb, spec, none).items())
    # half of the group the classifier reads is merged (ResNet: the last residual stream, written by many convs,
    # BNs and a shortcut): those channels' output rows and classifier columns are interpolated, all else is A's
    g = next(name for name, p in spec.groups.items() if any(spec.param_axes[ax.param][0] is None for ax in p.axes))
    sel = {**none, g: torch.arange(spec.groups[g].size) % 2 == 0}
    mixed, interp = partial_merge_state(sa, sb, spec, sel, 0.5), interpolate_state(sa, sb, 0.5)
    blocks = {(ax.param, ax.axis): ax.block for ax in spec.groups[g].axes}
    checked = set()
    for key, t in mixed.items():
        axes = spec.param_axes.get(key, ())
        if axes and axes[0] == g:  # rule 1: channel c's output row
            assert torch.equal(t[0::2], interp[key][0::2]) and torch.equal(t[1::2], sa[key][1::2]), key
        elif axes and axes[0] is None and g in axes:  # rule 2: the classifier's columns, a block per channel
            assert axes.index(g) == 1 and t.ndim == 2, key  # a linear layer's input axis
            cols = (t.shape[0], spec.groups[g].size, blocks[key, 1])  # [out, C, block]
            assert torch.equal(t.view(cols)[:, 0::2], interp[key].view(cols)[:, 0::2]), key
            assert torch.equal(t.view(cols)[:, 1::2], sa[key].view(cols)[:, 1::2]), key
        else:  # another group's rows (incl. layers reading g), or no channel's (classifier bias): A's
            assert torch.equal(t, sa[key]), key
        checked.add("rows" if axes and axes[0] == g else "columns" if axes and g in axes and axes[0] is None
                    else "A")
    assert checked == {"rows", "columns", "A"}
    if arch == "resnet20":
        assert sum(ax.axis == 0 and ax.param.endswith("conv2.weight") for ax in spec.groups[g].axes) >= 3


def test_partial_merge_curves_endpoints_and_deterministic_random_baseline(digits):
    a, b = (create_model("cnn_digits", width=8, seed=s).eval() for s in (0, 1))
    spec = build_spec(a, torch.zeros(2, 1, 8, 8))
    g = torch.Generator().manual_seed(0)
    scores = {"kendall_tau": {name: torch.rand(p.size, generator=g) for name, p in spec.groups.items()}}
    ids = torch.arange(200)

    def run(seeds):
        return partial_merge_curves(a, b, spec, scores, iter_batches(digits, 100, ids=ids),
                                    fractions=(0.0, 0.3, 1.0), seeds=seeds)

    first, again = run((0, 1)), run((0, 1))
    assert first == again  # the random baseline with fixed seeds is deterministic
    random = {(r["seed"], r["fraction"]): r for r in first if r["metric"] == "random"}
    assert random[0, 0.3]["channels"] == random[1, 0.3]["channels"] == round(0.3 * 8) + round(0.3 * 16) + round(0.3 * 32)
    ref = evaluate_models({"A": a, "full": interpolate_model(a, b, 0.5)}, iter_batches(digits, 100, ids=ids))
    for r in first:
        if r["fraction"] == 0.0:
            assert (r["accuracy"], r["loss"]) == pytest.approx((ref["A"]["accuracy"], ref["A"]["loss"]))
        if r["fraction"] == 1.0:
            assert (r["accuracy"], r["loss"]) == pytest.approx((ref["full"]["accuracy"], ref["full"]["loss"]))
    sel0 = select_channels(torch.zeros(40), 0.5, "random", generator=torch.Generator().manual_seed(0))
    sel1 = select_channels(torch.zeros(40), 0.5, "random", generator=torch.Generator().manual_seed(1))
    assert int(sel0.sum()) == 20 and not torch.equal(sel0, sel1)
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    ok = torch.tensor([True, True, True, False, True])  # channel 3 undefined: merged last either way
    assert select_channels(s, 0.4, "top", defined=ok).nonzero().ravel().tolist() == [1, 2]
    assert select_channels(s, 0.4, "bottom", defined=ok).nonzero().ravel().tolist() == [0, 4]
    assert select_channels(s, 0.4, "top", defined=ok, higher_is_similar=False).nonzero().ravel().tolist() == [0, 4]
    assert select_channels(s, 1.0, "bottom", defined=ok).all()


def test_dead_channel_is_flagged_not_nan(digits, tmp_path):
    a = create_model("cnn_digits", width=8, seed=0).eval()
    with torch.no_grad():
        a.features[1].bias[3] = -1e4  # BatchNorm shift: channel 3 of features.2 is 0 after ReLU on every image
    spec = build_spec(a, torch.zeros(2, 1, 8, 8))
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    aligned = permute_model(permute_model(a, spec, perms), spec, {g: invert(p) for g, p in perms.items()})
    result = probe({"A": a, "B_aligned": aligned}, digits, subset_ids=subset_per_class(digits.targets, 5),
                   batch_size=512, progress=False)
    cache = EmbeddingCache(make_embedder(CompareConfig(), a, digits))
    res = compare_models(result, [ComparePair("A", "B_aligned")], embed=lambda ids: cache.get(ids, digits),
                         embedder_name=cache.name, embedder_kind="fallback")
    path = write_compare_csv(tmp_path / "compare.csv", res.rows)
    text = path.read_text()
    assert "nan" not in text.lower() and text.splitlines()[0] == ",".join(COLUMNS)
    [dead] = [r for r in read_compare_csv(path) if r["dead"]]
    assert (dead["layer"], dead["channel"]) == ("features.2", 3)
    assert dead["kendall_tau"] == 0.0 and not dead["kendall_defined"]
    assert dead["correlation"] is None  # no alignment was given: empty cell, not NaN
    assert all(np.isfinite(r[m]) for r in res.rows for m in ("kendall_tau", "clip_delta", "overlap"))
    summary = next(s for s in res.layers if s["layer"] == "features.2")
    assert summary["dead"] == 1 and summary["usable_kendall_tau"] == 7 and summary["mean_kendall_tau"] == 1.0
    values, usable = res.values("A", "B_aligned", "features.2", "kendall_tau")
    assert not usable[3] and usable.sum() == 7
    # partial merging ranks it last in both directions
    for direction in ("top", "bottom"):
        sel = select_channels(torch.from_numpy(values), 7 / 8, direction, defined=torch.from_numpy(usable))
        assert not sel[3]


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_compare_cli_on_a_probe_run_folder(tmp_path, capsys, monkeypatch):
    ckpts = []
    for seed in (0, 1, 2):
        ckpts.append(tmp_path / f"m{seed}.safetensors")
        save_checkpoint(ckpts[-1], create_model("cnn_digits", width=8, seed=seed))
    run = tmp_path / "run"
    assert main(["probe", *map(str, ckpts), "--data", "digits", "--out", str(run), "--alpha", "0.5", "--quiet",
                 "--batch-size", "512"]) == 0
    assert (run / "alignment.safetensors").is_file()
    import mergescope.align

    def no_matching(*args, **kwargs):
        raise AssertionError("compare matched the models again instead of reading the run's alignment")

    with monkeypatch.context() as patched:  # the stored alignment serves the partial merges: no matching pass
        patched.setattr(mergescope.align, "match_many", no_matching)
        patched.setattr(mergescope.align, "weight_matching", no_matching)
        assert main(["compare", str(run), "--partial-merge", "--quiet", "--seeds", "0", "1"]) == 0
    rows = read_compare_csv(run / "compare.csv")
    assert len(rows) == 2 * sum(CHANNELS.values())
    assert {r["category"] for r in rows if r["model"] == "B_aligned"} <= {"matched", "A", "B", "mixed", "neither"}
    assert all(r["category"] == "" for r in rows if r["model"] == "C_aligned")  # no merge of A and C
    assert all(r["correlation"] is not None for r in rows)  # from the stored alignment
    results = json.loads((run / "results.json").read_text())
    assert [s["title"] for s in results["sections"]] == ["Feature visualization", "Channel comparison"]
    assert "Channel comparison" in (run / "report.html").read_text()
    partial = results["compare"]["partial_merge"]
    assert {r["seed"] for r in partial if r["metric"] == "random"} == {0, 1}
    assert (run / "figures" / "partial_merge.svg").is_file() and (run / "partial_merge.csv").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["compare"]["embedder"]["kind"] == "fallback" and "compare.csv" in manifest["sha256"]
    stages = manifest["compare"]["time_by_stage"]["stages"]  # the metrics: the comparison's own stage
    assert stages.get("analysis", 0) > 0, stages  # (statistics: the partial merges' evaluation passes)
    assert main(["compare", str(run), "--quiet"]) == 2
    _one_line_error(capsys, "already holds a comparison", "--overwrite")

    # an older probe that kept no D′ activations (and whose manifest hashed no probe tensors): A and the models aligned
    # by the stored alignment (never matched again; checked against the stored weights' hashes) are probed again
    # with D′ into probe_subset/ — the same τ comes out
    stored = load_probe(run / "probe")
    for layers in stored.probes.values():
        for lp in layers.values():
            lp.subset = None
    stored.subset_ids = None
    save_probe(stored, run / "probe")
    manifest = json.loads((run / "manifest.json").read_text())  # an older folder: its manifest hashed no probe
    del manifest["sha256"]["probe/probe.safetensors"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["compare", str(run), "--quiet", "--overwrite"]) == 0
    assert (run / "probe_subset" / "probe.safetensors").is_file()
    again = read_compare_csv(run / "compare.csv")
    assert [r["kendall_tau"] for r in again] == [r["kendall_tau"] for r in rows]
    assert [s["title"] for s in json.loads((run / "results.json").read_text())["sections"]].count(
        "Channel comparison") == 1
    assert main(["compare", str(tmp_path / "nowhere"), "--quiet"]) == 2
    _one_line_error(capsys, "not a finished mergescope run folder")
    # an older run folder without a stored alignment: refused in one line, never matched again
    (run / "alignment.safetensors").unlink()
    assert main(["compare", str(run), "--quiet", "--overwrite"]) == 2
    _one_line_error(capsys, "alignment.safetensors is missing", "redo the run")
