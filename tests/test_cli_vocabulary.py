"""One CLI vocabulary: shared options from one parent parser, help without torch, ``--config`` files, and later
studies that read the run's stored alignment instead of matching again."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from mergescope.cli import build_parser, main
from mergescope.train import save_checkpoint

SHARED_BY_CHECKPOINT_COMMANDS = {"--arch", "--arch-kwargs", "--device", "--quiet", "--config"}
RETIRED = {"--stats-split", "--eval-split", "--merge"}  # the old, disagreeing names


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_every_command_that_takes_checkpoints_has_the_shared_options():
    commands = _commands()
    with_checkpoints = [n for n, p in commands.items()
                        if any(a.dest in ("checkpoints", "checkpoint") for a in p._actions)]
    assert set(with_checkpoints) >= {"sweep", "merge", "probe", "layers"}
    for name in with_checkpoints:
        missing = SHARED_BY_CHECKPOINT_COMMANDS - _flags(commands[name]) - ({"--device", "--quiet", "--config"}
                                                                          if name == "layers" else set())
        assert not missing, f"{name} lacks {missing}"
    for name, p in commands.items():
        assert not RETIRED & _flags(p), f"{name} still has {RETIRED & _flags(p)}"
        if name not in ("report", "layers", "methods"):  # study: its config file is its argument, no --config
            assert {"--device", "--quiet"} | ({"--config"} if name != "study" else set()) <= _flags(p), name


def test_same_option_means_the_same_thing_everywhere():
    """An option shared by several commands has one help text (one definition in a parent parser)."""
    seen: dict[str, set[str]] = {}
    for name, p in _commands().items():
        if name == "train":  # builds a model (sizes from the data) and writes a checkpoint: its own wording
            continue
        for a in p._actions:
            for s in a.option_strings:
                seen.setdefault(s, set()).add(a.help or "")
    for flag in ("--device", "--quiet", "--config", "--arch-kwargs", "--data", "--matching", "--match-points",
                 "--methods", "--stats-images", "--eval-splits", "--out", "--overwrite"):
        helps = seen[flag]
        if flag == "--methods":  # the sweep lists only the sweepable methods, with the same wording
            assert len({h.split(";")[-1] for h in helps}) == 1, helps
            continue
        if flag == "--overwrite":  # compare and regress replace their part of a run folder
            helps = {h for h in helps if "comparison" not in h and "regression" not in h}
        if flag == "--out":  # the folder the command writes: a run folder, or a study's
            assert helps <= {"run folder", "study folder"}, helps
            continue
        assert len(helps) == 1, (flag, helps)


def test_every_option_has_help_and_shows_its_default():
    for name, p in _commands().items():
        text = p.format_help()
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings[0]} has no help"
            if a.default not in (None, False, {}) and a.nargs != 0:
                shown = " ".join(map(str, a.default)) if isinstance(a.default, list) else str(a.default)
                assert f"(default: {shown})" in " ".join(text.split()), (name, a.option_strings[0])


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["probe", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom mergescope.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint('ok')" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, trained_digits):
    out = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1, 2):
        save_checkpoint(out / f"m{seed}.safetensors", trained_digits("cnn_digits", seed, width=16))
        paths.append(str(out / f"m{seed}.safetensors"))
    return paths


def _stable(manifest: dict) -> dict:
    return {k: manifest[k] for k in ("config", "models", "dataset")}


def test_a_config_file_and_the_same_flags_give_the_same_manifest(tmp_path, checkpoints):
    flags = ["--data", "digits", "--alpha-step", "0.5", "--methods", "naive", "permuted+repair",
             "--batch-size", "300", "--stats-images", "500", "--arch-kwargs", '{"width": 16}']
    assert main(["sweep", *checkpoints[:2], *flags, "--out", str(tmp_path / "flags"), "--quiet"]) == 0
    (tmp_path / "c.toml").write_text(
        f'checkpoints = {json.dumps(checkpoints[:2])}\ndata = "digits"\nalpha_step = 0.5\n'
        'methods = ["naive", "permuted+repair"]\nbatch-size = 300\nstats_images = 500\n'
        f'out = "{tmp_path / "toml"}"\n[arch_kwargs]\nwidth = 16\n')
    (tmp_path / "c.yaml").write_text(
        f'checkpoints: {json.dumps(checkpoints[:2])}\ndata: digits\nalpha_step: 0.5\nmethods: [naive, '
        f'permuted+repair]\nbatch_size: 300\nstats_images: 500\nout: {tmp_path / "yaml"}\narch_kwargs: {{width: 16}}\n')
    assert main(["sweep", "--config", str(tmp_path / "c.toml"), "--quiet"]) == 0
    # a flag overrides the file
    assert main(["sweep", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "yaml2"), "--quiet"]) == 0
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("flags", "toml", "yaml2")]
    for m in manifests:
        m["config"]["options"].pop("out")
        m["config"].pop("out", None)
    assert _stable(manifests[0]) == _stable(manifests[1]) == _stable(manifests[2])
    assert manifests[0]["config"]["options"]["stats_images"] == 500
    assert not (tmp_path / "yaml").exists()
    assert (tmp_path / "flags" / "interpolation.csv").read_bytes() == (tmp_path / "toml" / "interpolation.csv").read_bytes()


@pytest.mark.parametrize("text, words", [
    ("batch_sise = 3\n", ["unknown key 'batch_sise'", "valid keys:", "batch_size"]),
    ('batch_size = "many"\n', ["batch_size", "not an integer"]),
    ("batch_size = 0\n", ["batch_size", "at least 1"]),
    ('matching = "fancy"\n', ["matching", "not one of", "activation"]),
    ('quiet = "yes"\n', ["quiet", "true or false"]),
    ("methods = 3\n", ["methods"]),
    ("this is = not toml\n", ["not valid TOML"]),
])
def test_a_bad_config_gets_one_line_naming_the_key(tmp_path, checkpoints, capsys, text, words):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    code = main(["sweep", *checkpoints[:2], "--data", "digits", "--out", str(tmp_path / "run"), "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_a_required_option_given_nowhere_is_named(tmp_path, capsys, checkpoints):
    assert main(["sweep", *checkpoints[:2], "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--data is required" in err and "\n" not in err


def test_compare_and_regress_never_match_again(tmp_path, checkpoints, monkeypatch):
    """A probe run stores its alignment; compare (with partial merging) and regress read it: any matching call
    fails the test."""
    run = tmp_path / "probe"
    assert main(["probe", *checkpoints, "--data", "digits", "--out", str(run), "--k", "3", "--quiet"]) == 0

    import mergescope.align as align_pkg

    am = sys.modules["mergescope.align.activation_matching"]  # the package's names shadow these modules
    wm = sys.modules["mergescope.align.weight_matching"]

    calls = []

    def refuse(*args, **kw):
        calls.append(args)
        raise AssertionError("matched again")

    for module, name in ((align_pkg, "match_many"), (align_pkg, "weight_matching"), (am, "match_many"),
                         (wm, "weight_matching")):
        monkeypatch.setattr(module, name, refuse)
    assert main(["compare", str(run), "--partial-merge", "--seeds", "0", "--quiet"]) == 0
    assert main(["regress", str(run), "--quiet"]) == 0
    assert not calls


def test_a_swapped_checkpoint_is_refused_by_compare(tmp_path, checkpoints, capsys):
    import shutil

    mine = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for src, dst in zip(checkpoints, mine):
        shutil.copy(src, dst)
        shutil.copy(src.replace(".safetensors", ".json"), dst.with_suffix(".json"))
    run = tmp_path / "probe"
    assert main(["probe", *map(str, mine), "--data", "digits", "--out", str(run), "--k", "3", "--quiet"]) == 0
    shutil.copy(checkpoints[0], mine[1])  # model B replaced after the run
    assert main(["compare", str(run), "--partial-merge", "--seeds", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sha256 differs" in err and "m1.safetensors" in err and "\n" not in err
    assert not (run / "compare.csv").exists()


def test_a_stored_file_changed_after_the_run_is_refused_by_compare_and_regress(tmp_path, checkpoints, capsys):
    """The manifest's sha256 of the probe tensors and the alignment are checked before a later study reads them."""
    run = tmp_path / "probe"
    assert main(["probe", *checkpoints[:2], "--data", "digits", "--out", str(run), "--k", "3", "--quiet"]) == 0
    for name, commands in (("probe/probe.safetensors", (["compare"],)),
                           ("alignment.safetensors", (["compare"], ["regress"]))):
        path = run / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of the last tensor's data
        for command in commands:
            assert main([*command, str(run), "--quiet"]) == 2
            err = capsys.readouterr().err.strip()
            assert "changed after the run" in err and name.split("/")[-1] in err and "\n" not in err, err
        path.write_bytes(original)
    assert not (run / "compare.csv").exists() and not (run / "regression.csv").exists()
    assert main(["compare", str(run), "--quiet"]) == 0  # the original files pass


def test_the_parsers_choices_are_the_librarys_names():
    """The parser restates a few of the library's names (to stay free of torch); they must not drift apart."""
    from mergescope.cli import parser
    from mergescope.perm.spec import MATCH_POINTS
    from mergescope.studies.plan import MATCHINGS
    from mergescope.studies.study import STAGES

    assert parser.MATCHINGS == MATCHINGS and parser.MATCH_POINTS == MATCH_POINTS and parser.STUDY_STAGES == STAGES
