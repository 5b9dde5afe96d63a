"""The one-pass probe: streaming top-k, permutation equivariance, sharding, resume and reuse of stored results."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mergescope.align import match_many
from mergescope.data import iter_batches, load_digits
from mergescope.errors import MergescopeError, NumericsError
from mergescope.models import create_model
from mergescope.perm import build_spec, layer_orders, permute_model, random_perms
from mergescope.probe import StreamingTopK, load_probe, probe, state_sha256
from mergescope.probe.reduce import reduce_activation
from mergescope.probe.store import read_meta
from mergescope.probe.taps import tap_model


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")  # 1,437 images, 1x8x8


def digit_models(n=2, width=8):
    return {f"m{i}": create_model("cnn_digits", width=width, seed=i) for i in range(n)}


class CountingDataset:
    """Delegates to a dataset, counting ``get_batch`` calls; optionally 'dies' (KeyboardInterrupt) after N."""

    def __init__(self, ds, fail_after=None):
        self.ds, self.fail_after, self.calls = ds, fail_after, 0

    def __len__(self):
        return len(self.ds)

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def get_batch(self, ids):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # what a killed job looks like to the loop
        return self.ds.get_batch(ids)


def brute_topk(values, k):
    """values [N, C] with ids 0..N-1 -> (values [C, k], ids [C, k]) by (value desc, id asc), in plain Python."""
    n, c = values.shape
    ids = [sorted(range(n), key=lambda i: (-float(values[i, ch]), i))[:k] for ch in range(c)]
    ids = torch.tensor(ids, dtype=torch.int64)
    return values.T.gather(1, ids), ids


def assert_same_result(a, b, moments_tol=0.0):
    assert a.layers == b.layers and a.num_images == b.num_images and a.k == b.k
    for m, layers in a.probes.items():
        for layer, pa in layers.items():
            pb = b[m, layer]
            assert torch.equal(pa.topk_ids, pb.topk_ids), (m, layer)
            assert torch.equal(pa.topk_values, pb.topk_values), (m, layer)
            assert pa.moments.n == pb.moments.n
            torch.testing.assert_close(pa.mean, pb.mean, rtol=0, atol=moments_tol)
            torch.testing.assert_close(pa.moments.m2, pb.moments.m2, rtol=moments_tol, atol=moments_tol)
            if pa.subset is None:
                assert pb.subset is None
            else:
                assert torch.equal(pa.subset, pb.subset), (m, layer)


# -- streaming top-k --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ties", "continuous"])
def test_streaming_topk_matches_brute_force_for_any_batching(kind):
    g = torch.Generator().manual_seed(0)
    n, c, k = 300, 6, 10
    if kind == "ties":  # ReLU-like: most values exactly 0 (some -0.0), a few small integers
        values = torch.relu(torch.randint(-6, 3, (n, c), generator=g).float())
        values[::7] = -0.0
        values[:, 0] = 0.0  # a dead channel: its top-k are the 10 smallest ids
    else:  # negatives, positives and a few exact repeats
        values = torch.randn(n, c, generator=g)
        values[50:60] = values[0]
    want_values, want_ids = brute_topk(values, k)
    for batch_size in (1, 7, 64, n):
        for seed in range(3):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            topk = StreamingTopK(c, k)
            for chunk in order.split(batch_size):
                topk.update(values[chunk], chunk)
            assert torch.equal(topk.ids, want_ids), (batch_size, seed)
            assert torch.equal(topk.values, want_values + 0.0)
            assert topk.count == n
    if kind == "ties":
        assert want_ids[0].tolist() == list(range(k))


def test_topk_merge_of_shards_equals_one_stream():
    values = torch.relu(torch.randn(200, 5, generator=torch.Generator().manual_seed(1)))
    ids = torch.arange(200)
    whole = StreamingTopK(5, 4)
    whole.update(values, ids)
    parts = [StreamingTopK(5, 4) for _ in range(3)]
    for part, chunk in zip(parts, ids.split(70)):
        part.update(values[chunk], chunk)
    merged = parts[2]
    merged.merge(parts[0])
    merged.merge(parts[1])
    assert torch.equal(merged.keys, whole.keys) and merged.count == 200
    rebuilt = StreamingTopK.from_arrays(whole.values, whole.ids, k=4, count=200)
    assert torch.equal(rebuilt.keys, whole.keys)


def test_topk_rejects_nan_naming_the_layer():
    topk = StreamingTopK(2, 3, name="model 'a', layer 'x'")
    with pytest.raises(NumericsError, match="model 'a', layer 'x'"):
        topk.update(torch.tensor([[1.0, float("nan")]]), torch.tensor([0]))


def test_fewer_images_than_k_keeps_what_was_seen():
    topk = StreamingTopK(3, 10)
    topk.update(torch.ones(4, 3), torch.tensor([9, 2, 5, 0]))
    assert topk.ids.tolist() == [[0, 2, 5, 9]] * 3


# -- the probe --------------------------------------------------------------------------------------------

def test_probe_equals_brute_force_on_the_same_batches(digits):
    model = create_model("cnn_digits", width=8, seed=3)
    result = probe({"a": model}, digits, k=10, batch_size=97, reduction="mean", subset_ids=[1400, 3, 77, 0],
                   progress=False)
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    tapped = tap_model(model, list(spec.layers)).eval()
    feats = {name: [] for name in spec.layers}
    with torch.no_grad():
        for chunk in torch.arange(len(digits)).split(97):  # the probe's batches, so activations match bitwise
            _, out = tapped(digits.get_batch(chunk)[0])
            for name, acts in feats.items():
                acts.append(out[name].flatten(2).mean(2))  # spatial mean, [B, C]
    assert result.reduction == "mean" and result.num_images == len(digits)
    for name, tap in spec.layers.items():
        acts = torch.cat(feats[name])  # [N, C]
        want_values, want_ids = brute_topk(acts, 10)
        p = result["a", name]
        assert p.channels == tap.channels
        assert torch.equal(p.topk_ids, want_ids), name
        assert torch.equal(p.topk_values, want_values), name
        torch.testing.assert_close(p.mean, acts.double().mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(p.std, acts.double().std(0, unbiased=False), rtol=0, atol=1e-6)
        assert p.subset.dtype == torch.float32  # float16 values (the D' kept), handed out as float32
        assert torch.equal(p.subset, acts[[1400, 3, 77, 0]].half().float())


def test_permuted_model_has_permuted_topk(digits):
    model = create_model("cnn_digits", width=8, seed=0)
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    permuted = permute_model(model, spec, perms)
    result = probe({"orig": model, "perm": permuted}, digits, progress=False)
    checked = 0
    for name, tap in spec.layers.items():
        orig, perm = result["orig", name], result["perm", name]
        if tap.group is None:
            assert torch.equal(perm.topk_ids, orig.topk_ids)
            continue
        p = perms[tap.group]
        assert torch.equal(perm.topk_ids, orig.topk_ids[p]), name  # channel i of perm is channel p[i] of orig
        torch.testing.assert_close(perm.topk_values, orig.topk_values[p])
        torch.testing.assert_close(perm.mean, orig.mean[p])
        checked += 1
    assert checked == 3


def test_permuted_models_are_derived_from_their_source_and_equal_their_own_forward(digits, trained_digits):
    """``permuted``: an aligned model is not run; its probe is its unaligned twin's re-indexed. The oracle is the
    aligned model's own forward, on a trained, non-permuted pair aligned by activation matching (ResNet20: block
    outputs share the residual stream's permutation)."""
    a, b = (trained_digits("resnet20", s, in_channels=1, width=1) for s in (0, 1))
    spec = build_spec(a, torch.zeros(2, 1, 8, 8))
    [match] = match_many(a, [b], spec, iter_batches(digits, 256))
    assert sum(not torch.equal(p, torch.arange(len(p))) for p in match.perms.values()) >= 5
    aligned = permute_model(b, spec, match.perms)
    orders = layer_orders(spec, match.perms, list(spec.layers))
    models = {"A": a, "B": b, "B_aligned": aligned}
    kw = {"layers": "all", "subset_ids": list(range(0, 1437, 7)), "batch_size": 200, "progress": False}
    calls = []
    hook = aligned.conv1.register_forward_pre_hook(lambda *_: calls.append(1))
    ran = probe(models, digits, **kw)
    forwards = len(calls)
    derived = probe(models, digits, permuted={"B_aligned": ("B", orders)}, **kw)
    hook.remove()
    assert forwards >= 8 and len(calls) == forwards  # 8 batches (and tracing) in the first pass, none in the second
    assert derived.models == ["A", "B", "B_aligned"] and derived.config == ran.config
    for layer in spec.layers:
        got, want, src, order = derived["B_aligned", layer], ran["B_aligned", layer], derived["B", layer], orders[layer]
        assert torch.equal(got.topk_ids, src.topk_ids[order]), layer  # the definition, written out
        assert torch.equal(got.topk_ids, want.topk_ids), layer  # = the aligned model's own ranking
        torch.testing.assert_close(got.topk_values, want.topk_values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.std, want.std, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.subset, want.subset, rtol=2**-10, atol=1e-4)  # float16 steps apart at most
        assert got.moments.n == want.moments.n == len(digits)
        for m in ("A", "B"):
            assert torch.equal(derived[m, layer].topk_ids, ran[m, layer].topk_ids)


def test_permuted_models_resume_and_reuse_like_run_ones(digits, tmp_path):
    model = create_model("cnn_digits", width=8, seed=0)
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    perms = random_perms(spec, torch.Generator().manual_seed(3))
    models = {"m": model, "p": permute_model(model, spec, perms)}
    permuted = {"p": ("m", layer_orders(spec, perms, list(spec.layers)))}
    kw = {"batch_size": 100, "subset_ids": [0, 9, 700], "progress": False}
    clean = probe(models, digits, permuted=permuted, **kw)
    with pytest.raises(KeyboardInterrupt):
        probe(models, CountingDataset(digits, fail_after=5), run_dir=tmp_path, checkpoint_every=2, permuted=permuted, **kw)
    assert read_meta(tmp_path / "probe.partial.safetensors")["layers"].keys() == {"m"}  # what the pass holds
    again = CountingDataset(digits)
    assert_same_result(probe(models, again, run_dir=tmp_path, checkpoint_every=2, permuted=permuted, **kw), clean)
    assert again.calls == 15 - 4
    counting = CountingDataset(digits)  # the stored result is the one a pass running "p" would make: reused
    assert_same_result(probe(models, counting, run_dir=tmp_path, **kw), clean)
    assert counting.calls == 0


def test_permuted_rejects_what_is_not_a_permutation_of_a_run_model(digits):
    model = create_model("cnn_digits", width=4, seed=0)
    spec = build_spec(model, torch.zeros(2, 1, 8, 8))
    orders = layer_orders(spec, random_perms(spec), list(spec.layers))
    models = {"m": model, "p": model, "q": model}

    def bad(permuted, match, layers="conv"):
        with pytest.raises(MergescopeError, match=match):
            probe(models, digits, layers=layers, permuted=permuted, progress=False)

    bad({"x": ("m", orders)}, "'x', which is not one of the probed models")
    bad({"p": ("z", orders)}, "derived from 'z'")
    bad({"p": ("q", orders), "q": ("m", orders)}, "derived from 'q'")
    bad({"p": ("m", {})}, "no channel order for layer 'features.2'")
    bad({"p": ("m", {**orders, "features.5": torch.zeros(8, dtype=torch.long)})}, "permutation of its 8 channels")
    bad({"p": ("m", {**orders, "features.5": torch.arange(7)})}, "permutation of its 8 channels")
    bad({"p": ("m", orders)}, "layers of its source",
        layers={"m": ["features.2"], "p": ["features.5"], "q": "conv"})
    assert layer_orders(spec, {}, ["features.2", "no.such.layer"]) is None
    assert torch.equal(layer_orders(spec, {}, ["features.5"])["features.5"], torch.arange(8))


def test_probe_nan_activations_name_model_and_layer(digits):
    model = create_model("cnn_digits", width=4, seed=0)
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericsError, match="model 'bad', layer 'features.5'"):
        probe({"ok": create_model("cnn_digits", width=4, seed=1), "bad": model}, digits, progress=False)


def test_probe_restores_train_mode_and_rejects_bad_arguments(digits):
    model = create_model("cnn_digits", width=4, seed=0).train()
    probe({"a": model}, digits, layers=["features.2"], batch_size=512, progress=False)
    assert all(m.training for m in model.modules())
    with pytest.raises(MergescopeError, match="reduction"):
        probe({"a": model}, digits, reduction="median", progress=False)
    with pytest.raises(MergescopeError, match="'/'"):
        probe({"a/b": model}, digits, progress=False)
    with pytest.raises(MergescopeError, match="repeated"):
        probe({"a": model}, digits, subset_ids=[1, 1], progress=False)


# -- distributed ------------------------------------------------------------------------------------------

def _distributed_worker(rank, world_size, init_file, run_dir, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = probe(digit_models(), load_digits("train"), batch_size=100, subset_ids=[5, 1436, 700, 2],
                       progress=False, run_dir=run_dir)
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_run_equals_one_process(digits, tmp_path):
    run_dir = tmp_path / "run"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(run_dir), str(tmp_path)), nprocs=2,
             join=True)
    single = probe(digit_models(), digits, batch_size=100, subset_ids=[5, 1436, 700, 2], progress=False)
    for rank in range(2):
        sharded = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert_same_result(sharded, single, moments_tol=1e-12)
    assert_same_result(load_probe(run_dir), single, moments_tol=1e-12)
    assert sorted(p.name for p in run_dir.iterdir()) == ["probe.json", "probe.safetensors"]  # no partials left


# -- storage, resume, reuse -------------------------------------------------------------------------------

def test_interrupted_pass_resumes_and_equals_a_clean_run(digits, tmp_path):
    models = digit_models()
    kw = {"batch_size": 100, "subset_ids": list(range(0, 1437, 50)), "progress": False}  # 15 batches
    clean = probe(models, digits, **kw)
    dying = CountingDataset(digits, fail_after=8)  # checkpoints after batches 3 and 6, dies reading batch 9
    with pytest.raises(KeyboardInterrupt):
        probe(models, dying, run_dir=tmp_path, checkpoint_every=3, **kw)
    assert not (tmp_path / "probe.safetensors").exists()
    partial = read_meta(tmp_path / "probe.partial.safetensors")
    assert partial["kind"] == "partial" and partial["pass"]["batches_done"] == 6
    assert partial["num_images"] == 600

    with pytest.raises(MergescopeError, match="batch_size"):  # a different pass must not continue it
        probe(models, digits, run_dir=tmp_path, checkpoint_every=3, **{**kw, "batch_size": 50})

    again = CountingDataset(digits)
    resumed = probe(models, again, run_dir=tmp_path, checkpoint_every=3, **kw)
    assert again.calls == 15 - 6
    assert_same_result(resumed, clean)  # bitwise, moments included
    assert not (tmp_path / "probe.partial.safetensors").exists()
    assert not (tmp_path / "probe.partial.json").exists()


def test_finished_pass_is_loaded_not_recomputed(digits, tmp_path):
    models = digit_models()
    first = probe(models, digits, k=5, batch_size=300, subset_ids=[3, 1], run_dir=tmp_path, progress=False)
    assert first.path == tmp_path / "probe.safetensors"
    counting = CountingDataset(digits)
    second = probe(models, counting, k=5, batch_size=300, subset_ids=[3, 1], run_dir=tmp_path, progress=False)
    assert counting.calls == 0
    assert_same_result(second, first)
    assert torch.equal(second.subset_ids, torch.tensor([3, 1]))

    sidecar = json.loads((tmp_path / "probe.json").read_text())
    assert sidecar["format"] == "mergescope.probe/1" and sidecar["kind"] == "result"
    assert sidecar["k"] == 5 and sidecar["reduction"] == "max" and sidecar["num_images"] == len(digits)
    assert sidecar["dataset"] == {"name": "digits", "fingerprint": digits.fingerprint, "size": len(digits)}
    assert sidecar["layers"]["m0"] == ["features.2", "features.5", "features.9"]
    assert sidecar["channels"]["m1"] == {"features.2": 8, "features.5": 16, "features.9": 32}
    assert {m: v["state_sha256"] for m, v in sidecar["models"].items()} == {m: state_sha256(v) for m, v in models.items()}

    with pytest.raises(MergescopeError, match="k: stored 5, now 10"):
        probe(models, counting, k=10, batch_size=300, subset_ids=[3, 1], run_dir=tmp_path, progress=False)
    changed = {"m0": models["m0"], "m1": create_model("cnn_digits", width=8, seed=7)}
    with pytest.raises(MergescopeError, match="state_sha256"):
        probe(changed, counting, k=5, batch_size=300, subset_ids=[3, 1], run_dir=tmp_path, progress=False)
    assert counting.calls == 0
    redone = probe(models, counting, k=10, batch_size=300, run_dir=tmp_path, resume=False, progress=False)
    assert counting.calls == 5 and load_probe(tmp_path).k == 10 and redone.subset_ids is None


def test_state_sha256_tells_weights_apart_not_copies():
    model = create_model("cnn_digits", width=8, seed=0)
    same = create_model("cnn_digits", width=8, seed=0)
    assert state_sha256(model) == state_sha256(same)
    with torch.no_grad():
        same.features[0].weight[0, 0, 0, 0] += 1e-6
    assert state_sha256(model) != state_sha256(same)
    spec = build_spec(model)
    permuted = permute_model(model, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    assert state_sha256(permuted) != state_sha256(model)  # the same function, other weights


def test_reduce_activation_max_and_mean():
    t = torch.arange(24, dtype=torch.float32).view(2, 3, 2, 2)  # (B, C, H, W)
    assert reduce_activation(t, 1, "max").tolist() == [[3, 7, 11], [15, 19, 23]]
    assert reduce_activation(t, 1, "mean").tolist() == [[1.5, 5.5, 9.5], [13.5, 17.5, 21.5]]
    assert torch.equal(reduce_activation(t.movedim(1, -1), -1, "max"), reduce_activation(t, 1, "max"))


def test_bfloat16_probe_runs_the_forward_in_bfloat16_and_is_stored_apart(digits, tmp_path):
    """precision="bfloat16" runs the models under bfloat16 autocast: every spatial max is a bfloat16 value (a float32
    forward's almost never are), the moments stay close to the float32 probe's, and a stored probe of the other
    precision is neither reused nor overwritten; a file from before the option counts as float32."""
    models = digit_models()
    full = probe(models, digits, k=5, batch_size=300, run_dir=tmp_path, progress=False)
    counting = CountingDataset(digits)
    with pytest.raises(MergescopeError, match='precision: stored "float32", now "bfloat16"'):
        probe(models, counting, k=5, batch_size=300, run_dir=tmp_path, progress=False, precision="bfloat16")
    assert counting.calls == 0
    half = probe(models, digits, k=5, batch_size=300, progress=False, precision="bfloat16")
    assert half.config["precision"] == "bfloat16" and full.config["precision"] == "float32"
    for m, layer in [(m, layer) for m in models for layer in full.layers[m]]:
        v16, v32 = half[m, layer].topk_values, full[m, layer].topk_values
        assert torch.equal(v16, v16.bfloat16().float()), (m, layer)
        assert not torch.equal(v32, v32.bfloat16().float()), (m, layer)
        scale = full[m, layer].std.max()
        torch.testing.assert_close(half[m, layer].mean, full[m, layer].mean, rtol=0, atol=0.05 * float(scale))

    sidecar = json.loads((tmp_path / "probe.json").read_text())
    assert sidecar["precision"] == "float32"
    del sidecar["precision"]  # a probe stored before the option
    (tmp_path / "probe.json").write_text(json.dumps(sidecar))
    again = probe(models, counting, k=5, batch_size=300, run_dir=tmp_path, progress=False)
    assert counting.calls == 0 and again.config["precision"] == "float32"
    with pytest.raises(MergescopeError, match="precision must be one of float32, bfloat16, got 'float16'"):
        probe(models, digits, k=5, progress=False, precision="float16")
