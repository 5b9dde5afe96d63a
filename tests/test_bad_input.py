"""Bad values at the command line's edge: each ends in one line ``error: ...`` naming the option and what is
allowed, exit status 2, before anything is read or written (the run folder stays as it was)."""
import pytest
import torch

from mergescope.cli import main
from mergescope.models import create_model
from mergescope.train import save_checkpoint


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1):
        paths.append(str(root / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], create_model("cnn_digits", width=4, seed=seed))
    return paths


CASES = [  # (command tail after the checkpoints / run folder, words the one line must hold)
    ("sweep", ["--batch-size", "0"], ["--batch-size", "at least 1"]),
    ("sweep", ["--alpha-step", "0"], ["--alpha-step", "1/n"]),
    ("sweep", ["--alpha-step", "2"], ["--alpha-step", "1/n"]),
    ("sweep", ["--alpha-step", "-0.1"], ["--alpha-step"]),
    ("sweep", ["--alpha-step", "0.3"], ["--alpha-step", "1/n"]),
    ("sweep", ["--stats-images", "-5"], ["--stats-images", "at least 1"]),
    ("sweep", ["--device", "bogus"], ["--device", "bogus"]),
    ("merge", ["--batch-size", "0"], ["--batch-size"]),
    ("probe", ["--batch-size", "0"], ["--batch-size"]),
    ("probe", ["--alpha", "2"], ["--alpha", "between 0 and 1"]),
    ("probe", ["--k", "0"], ["--k"]),
    ("compare", ["--alpha", "-0.5"], ["--alpha", "between 0 and 1"]),
    ("compare", ["--alpha", "2"], ["--alpha"]),
    ("compare", ["--threshold", "nan"], ["--threshold", "finite"]),
    ("compare", ["--batch-size", "0", "--partial-merge"], ["--batch-size"]),
    ("regress", ["--k", "0"], ["--k"]),
    ("regress", ["--k", "-1"], ["--k"]),
    ("regress", ["--ridge", "-1"], ["--ridge", ">= 0"]),
    ("regress", ["--fit-images", "0"], ["--fit-images"]),
    ("compare", ["--seeds", "0", "-1", "--partial-merge"], ["--seeds", ">= 0"]),
    ("compare", ["--null-partners", "0"], ["--null-partners"]),
    ("compare", ["--null-quantile", "1.5"], ["--null-quantile"]),
    ("regress", ["--per-class", "0"], ["--per-class"]),
]


@pytest.mark.parametrize("command, tail, words", CASES, ids=[f"{c}{' '.join(t)}" for c, t, _ in CASES])
def test_a_bad_value_is_one_line_naming_the_option(tmp_path, ckpts, capsys, command, tail, words):
    out = tmp_path / "run"
    if command in ("sweep", "probe", "merge"):
        argv = [command, *ckpts, "--data", "digits", "--out", str(out), "--quiet", *tail]
    else:  # compare / regress read a run folder: the value is refused before the folder is looked at
        out.mkdir()
        argv = [command, str(out), "--quiet", *tail]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("kwargs, words", [("{width: 4}", ["--arch-kwargs", "not JSON"]),
                                            ("[4]", ["--arch-kwargs", "JSON object"]),
                                            ('{"width": "4"}', ["width", "number > 0"]),
                                            ('{"widht": 4}', ["widht", "takes"])])
def test_bad_arch_kwargs_are_one_line(tmp_path, capsys, kwargs, words):
    argv = ["train", "--arch", "cnn_digits", "--arch-kwargs", kwargs, "--data", "digits", "--epochs", "1",
            "--out", str(tmp_path / "m.safetensors"), "--quiet"]
    try:
        code = main(argv)
    except SystemExit as e:  # refused by the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "m.safetensors").exists()


def test_a_model_that_does_not_fit_the_images_is_named_before_the_pass(tmp_path, capsys):
    paths = []
    for seed in (0, 1):  # a CIFAR-sized model given the 8x8 digits
        paths.append(str(tmp_path / f"v{seed}.safetensors"))
        save_checkpoint(paths[-1], create_model("alexnet_cifar", width=0.125, in_channels=1, seed=seed))
    assert main(["sweep", *paths, "--data", "digits", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "v0.safetensors" in err and "1×8×8" in err
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("weights", [["0.3", "0.3"], ["0.5", "0.25", "0.25"]])
def test_merge_weights_that_do_not_fit_are_refused_before_the_folder_is_made(tmp_path, ckpts, capsys, weights):
    out = tmp_path / "run"
    assert main(["merge", *ckpts, "--data", "digits", "--out", str(out), "--quiet", "--weights", *weights]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "--weights must be 2" in err, err
    assert not out.exists()


def test_a_truncated_pass_checkpoint_is_set_aside_and_the_probe_starts_over(tmp_path, ckpts, capsys):
    """A kill during the checkpoint's write leaves it cut short: the rerun sets it aside and gives the result of an
    uninterrupted run."""
    want, out = tmp_path / "clean", tmp_path / "run"
    common = ["--data", "digits", "--k", "3", "--subset-images", "50", "--quiet"]
    assert main(["probe", *ckpts, "--out", str(want), *common]) == 0
    resume = tmp_path / ".run.resume" / "probe"  # where a killed probe of --out run left its pass checkpoint
    resume.mkdir(parents=True)
    partial = resume / "probe.partial.safetensors"
    partial.write_bytes((want / "probe" / "probe.safetensors").read_bytes()[:1000])  # cut short
    capsys.readouterr()
    assert main(["probe", *ckpts, "--out", str(out), *common]) == 0
    assert "set aside" in capsys.readouterr().err
    assert not partial.exists() and not resume.exists()  # set aside, and removed with the rest once the run is in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "run"]  # no lock, staging or resume folder left
    from mergescope.probe import load_probe

    a, b = load_probe(want / "probe"), load_probe(out / "probe")
    for model, layers in a.layers.items():
        for layer in layers:
            assert torch.equal(a[model, layer].topk_ids, b[model, layer].topk_ids)


def test_probe_overwrite_with_another_k_starts_over(tmp_path, ckpts):
    out = tmp_path / "run"
    common = ["--data", "digits", "--subset-images", "50", "--quiet", "--out", str(out)]
    assert main(["probe", *ckpts, "--k", "3", *common]) == 0
    assert main(["probe", *ckpts, "--k", "5", "--overwrite", *common]) == 0
    from mergescope.probe import load_probe

    assert load_probe(out / "probe").k == 5


# -- the cases that ended well before issue 12, kept so: one line, exit 2, an earlier run byte for byte as it was


def _pickle_exploit(path, marker):
    """A .pt whose unpickling would create ``marker`` (weights_only=True must refuse to run it)."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"state_dict": Exploit()}))


@pytest.fixture
def earlier_run(tmp_path, ckpts):
    """A finished sweep in ``tmp/run`` that every bad command below is pointed at (with --overwrite)."""
    out = tmp_path / "run"
    assert main(["sweep", *ckpts[:2], "--data", "digits", "--alpha-step", "0.5", "--out", str(out), "--quiet"]) == 0
    return out


def _bad_folder(tmp_path, kind):
    root = tmp_path / f"images_{kind}"
    import numpy as np
    from PIL import Image

    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    bad = root / "b" / "9.png"
    bad.write_bytes(b"" if kind == "zero-byte" else b"GIF89a but not really an image")
    return root, bad


BROKEN = ["wider model", "truncated checkpoint", "random checkpoint", "pickle exploit", "zero-byte image",
          "non-image file", "unknown method", "unknown arch", "no --overwrite", "NaN weights", "missing data",
          "not a run folder", "eval without a test split", "odd first image"]


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_input_is_one_line_and_leaves_earlier_results(tmp_path, ckpts, earlier_run, capsys, case):
    from run_bytes import every_byte

    before = every_byte(earlier_run)
    a, b = ckpts[:2]
    data, words = "digits", []
    if case == "wider model":
        b = str(tmp_path / "wide.safetensors")
        save_checkpoint(b, create_model("cnn_digits", width=8, seed=1))
        words = ["wide.safetensors", "differ"]
    elif case in ("truncated checkpoint", "random checkpoint"):
        b = tmp_path / "bad.safetensors"
        good = open(ckpts[1], "rb").read()
        b.write_bytes(good[: len(good) // 2] if case.startswith("truncated") else bytes(range(256)) * 8)
        (tmp_path / "bad.json").write_bytes(open(ckpts[1].replace(".safetensors", ".json"), "rb").read())
        b, words = str(b), ["bad.safetensors"]
    elif case == "pickle exploit":
        marker = tmp_path / "pwned"
        b = tmp_path / "evil.pt"
        _pickle_exploit(b, marker)
        b, words = str(b), ["evil.pt"]
    elif case in ("zero-byte image", "non-image file"):
        root, bad = _bad_folder(tmp_path, case.split()[0])
        data, words = str(root), [bad.name]
        a = str(tmp_path / "rgb0.safetensors")
        b = str(tmp_path / "rgb1.safetensors")
        for seed, p in ((0, a), (1, b)):
            save_checkpoint(p, create_model("cnn_digits", width=4, in_channels=3, num_classes=2, seed=seed))
    if case == "odd first image":  # an ImageNet-style tree whose first file is 1x1: that file is named
        import numpy as np
        from PIL import Image

        root, bad = _bad_folder(tmp_path, "zero-byte")
        for p in root.rglob("*.png"):
            Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(p)
        Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "a" / "0.png")
        bad.unlink()
        data, words = str(root), ["a/0.png", "sets the size", "40x30"]
    elif case == "NaN weights":
        model = create_model("cnn_digits", width=4, seed=1)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        b = str(tmp_path / "nan.safetensors")
        save_checkpoint(b, model)
        words = ["NaN"]
    elif case == "missing data":
        data, words = str(tmp_path / "nowhere"), ["nowhere"]
    argv = ["sweep", a, b, "--data", data, "--out", str(earlier_run), "--overwrite", "--quiet",
            *(["--arch", "cnn_digits"] if case == "pickle exploit" else [])]
    if case == "unknown method":
        argv += ["--methods", "permuted,telepathy"]
        words = ["telepathy"]
    elif case == "unknown arch":
        argv = ["train", "--arch", "resnet9000", "--data", "digits", "--out", str(tmp_path / "m.safetensors")]
        words = ["resnet9000"]
    elif case == "no --overwrite":
        argv.remove("--overwrite")
        words = ["already holds a run", "--overwrite"]
    elif case == "not a run folder":
        argv = ["compare", str(tmp_path / "nowhere"), "--quiet"]
        words = ["nowhere"]
    elif case == "eval without a test split":
        root, bad = _bad_folder(tmp_path, "zero-byte")
        bad.unlink()
        argv = ["train", "--arch", "cnn_digits", "--data", str(root), "--eval", "--out", str(tmp_path / "m.pt")]
        words = ["--eval", "test split"]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # refused by the parser
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert every_byte(earlier_run) == before
    assert not (tmp_path / "pwned").exists()


def test_a_compare_that_fails_leaves_no_orphan_and_a_retry_works(tmp_path, ckpts, monkeypatch, capsys):
    """A failure after the comparison wrote compare.csv (NaN, disk full, a bug): the folder is as it was, and the
    retry is not refused with "already holds a comparison"."""
    from run_bytes import every_byte

    import mergescope.studies.compare as compare
    from mergescope.errors import MergescopeError

    out = tmp_path / "run"
    assert main(["probe", *ckpts[:2], "--data", "digits", "--k", "3", "--subset-images", "50", "--out", str(out),
                 "--quiet"]) == 0
    before = every_byte(out)
    real = compare.run

    def fails_late(run_dir, *args, **kw):
        real(run_dir, *args, **kw)
        assert (run_dir / "compare.csv").is_file()
        raise MergescopeError("failed after writing compare.csv")

    monkeypatch.setattr(compare, "run", fails_late)
    assert main(["compare", str(out), "--quiet"]) == 2
    assert every_byte(out) == before
    monkeypatch.setattr(compare, "run", real)
    assert main(["compare", str(out), "--quiet"]) == 0
    assert (out / "compare.csv").is_file()
