"""``mergescope study``: the digits study from its example config (made smaller: width 8, 2 epochs, a coarser α grid)
is stored stage by stage — killed at a random moment and rerun it ends with every stored result byte-identical to an
uninterrupted run, a second rerun runs no stage, and a changed parameter reruns its stage and the stages that read
it, nothing else."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergescope.cli import main
from run_bytes import stored_results

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "digits.toml"
def _small_config(folder: Path, **edits: str) -> Path:
    """examples/digits.toml with smaller models and grid (and ``edits``: 'old text' -> 'new text'), out = study."""
    text = EXAMPLE.read_text()
    for old, new in {"width = 16": "width = 8", "epochs = 6": "epochs = 2", "alpha_step = 0.05": "alpha_step = 0.25",
                     'out = "runs/digits_study"': 'out = "study"', **edits}.items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / "study.toml"
    path.write_text(text)
    return path


def _run(cwd: Path, config: Path, *extra: str, monkeypatch) -> int:
    monkeypatch.chdir(cwd)
    return main(["study", str(config), "--quiet", *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the small digits study and what it stored."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    config = _small_config(cwd)
    mp = pytest.MonkeyPatch()
    try:
        start = time.perf_counter()
        assert _run(cwd, config, monkeypatch=mp) == 0
        seconds = time.perf_counter() - start
    finally:
        mp.undo()
    return cwd, config, stored_results(cwd / "study"), seconds


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_is_valid_as_written(example):
    from mergescope.cli import build_parser
    from mergescope.cli.study import study_config
    from mergescope.models import create_model

    parser = build_parser()
    cfg = study_config(parser, parser.parse_args(["study", str(example)]))
    assert {"sweep", "features", "compare", "regress"} <= set(cfg.enabled())
    if cfg.models.train is not None:  # the architecture it trains exists with these arguments
        create_model(cfg.models.train.arch, **cfg.models.train.arch_kwargs)
        assert len(cfg.models.seeds) >= 2
    else:
        assert cfg.models.arch and len(cfg.models.checkpoints) >= 2
    if example == EXAMPLE:
        assert cfg.enabled() == ["train", "sweep", "features", "compare", "regress", "merge"]
        assert list(cfg.models.seeds) == [0, 1, 2] and cfg.models.train.arch == "cnn_digits"


def test_the_demo_is_the_digits_example():
    from mergescope.cli import build_parser
    from mergescope.cli.study import study_config
    from mergescope.studies.demo import study_config as demo_config

    parser = build_parser()
    example = study_config(parser, parser.parse_args(["study", str(EXAMPLE), "--out", "x", "--device", "cpu"]))
    demo = demo_config("x")
    for name in ("data", "split", "eval_splits", "device", "models", "sweep", "features", "compare", "regress",
                 "merge"):
        assert getattr(example, name) == getattr(demo, name), name


def test_a_killed_study_reruns_to_the_same_results_and_a_second_rerun_runs_nothing(reference, tmp_path,
                                                                                     monkeypatch, capsys):
    _, _, want, seconds = reference
    config = _small_config(tmp_path)
    delay = random.Random().uniform(0.5, max(1.0, 0.9 * seconds))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "mergescope.cli", "study", str(config), "--quiet"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _run(tmp_path, config, monkeypatch=monkeypatch) == 0, f"rerun after a kill at {delay:.1f} s failed"
    got = stored_results(tmp_path / "study")
    assert sorted(got) == sorted(want), f"killed at {delay:.1f} s"
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"killed at {delay:.1f} s: {differ}"

    import mergescope.studies.study as engine

    def no_stage(*args, **kw):
        raise AssertionError("a stage ran again")

    monkeypatch.setattr(engine, "_run_stage", no_stage)
    capsys.readouterr()
    assert _run(tmp_path, config, monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert out.count("stored result still valid") == 6 and "Observation 3:" in out and "report:" in out


def test_a_changed_parameter_reruns_its_stage_and_the_stages_that_read_it(reference, tmp_path, monkeypatch):
    import shutil

    import mergescope.studies.study as engine

    cwd, _, _, _ = reference
    shutil.copytree(cwd / "study", tmp_path / "study")
    ran: list[str] = []
    real = engine._run_stage

    def counting(stage, *args, **kw):
        ran.append(stage)
        return real(stage, *args, **kw)

    monkeypatch.setattr(engine, "_run_stage", counting)
    config = _small_config(tmp_path, **{"partial_merge = true": "partial_merge = true\nnull_quantile = 0.9"})
    assert _run(tmp_path, config, monkeypatch=monkeypatch) == 0
    assert ran == ["compare"]
    ran.clear()
    config = _small_config(tmp_path, **{"k = 10\nalpha = 0.5": "k = 5\nalpha = 0.5",
                                        "partial_merge = true": "partial_merge = true\nnull_quantile = 0.9"})
    assert _run(tmp_path, config, monkeypatch=monkeypatch) == 0
    assert ran == ["features", "compare", "regress"]
    ran.clear()
    assert _run(tmp_path, config, "--only", "sweep", monkeypatch=monkeypatch) == 0
    assert ran == ["sweep"]


@pytest.mark.parametrize("text, words", [
    ('out = "s"\ndata = "digits"\n[models]\narch = "cnn_digits"\nseeds = [0, 1]\n[sweep]\nalpha_stp = 0.5\n',
     ["unknown key 'alpha_stp' in [sweep]", "alpha_step"]),
    ('out = "s"\ndata = "digits"\n[models]\narch = "cnn_digits"\nseeds = [0, 1]\n[sweep]\nmatching = "x"\n',
     ["[sweep] matching", "activation"]),
    ('out = "s"\ndata = "digits"\n[models]\narch = "cnn_digits"\nseeds = [0, "1"]\n', ["seeds", "list of ints"]),
    ('out = "s"\ndata = "digits"\n[models]\narch = "cnn_digits"\nseeds = [0]\n', ["at least two models"]),
    ('out = "s"\ndata = "digits"\nfeatures = 1\n[models]\narch = "cnn_digits"\nseeds = [0, 1]\n', ["[features]"]),
    ('out = "s"\ndata = "digits"\n[models]\narch = "cnn_digits"\nseeds = [0, 1]\n[compare]\n', ["[compare] needs"]),
    ('data = "digits"\n[models]\narch = "cnn_digits"\nseeds = [0, 1]\n', ["'out' is required"]),
])
def test_a_bad_study_config_gets_one_line(tmp_path, monkeypatch, capsys, text, words):
    (tmp_path / "bad.toml").write_text(text)
    assert _run(tmp_path, tmp_path / "bad.toml", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and all(w in err for w in words), err
    assert not (tmp_path / "s").exists()
