"""A run folder changes as a whole or not at all (issue 12): every long command killed at a random moment leaves the
previous run byte for byte, or the new one complete; its rerun gives the uninterrupted run's results; a second
writer is refused in one line; a full disk ends in one line "disk full" with the old run intact; a file changed
after its run is named when a later command reads it."""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mergescope.cli import main
from mergescope.models import create_model
from mergescope.train import save_checkpoint
from run_bytes import every_byte, stored_results, strip_timings

QUIET = ["--quiet"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1, 2):
        paths.append(str(root / f"m{seed}.safetensors"))
        save_checkpoint(paths[-1], create_model("cnn_digits", width=4, seed=seed))
    return paths


@pytest.fixture(scope="module")
def probed(ckpts, tmp_path_factory):
    """A finished probe run of A and B that compare and regress add to."""
    out = tmp_path_factory.mktemp("probed") / "run"
    assert main(["probe", *ckpts[:2], "--data", "digits", "--k", "3", "--subset-images", "50", "--out", str(out),
                 *QUIET]) == 0
    return out


def command(name: str, ckpts: list[str], out: Path, old: bool = False) -> list[str]:
    """The command line of ``name`` writing ``out`` (``old``: the variant whose run is there before)."""
    data = ["--data", "digits"]
    return {
        "train": ["train", "--arch", "cnn_digits", "--arch-kwargs", '{"width": 4}', *data, "--epochs", "2",
                  "--seed", "1" if old else "0", "--out", str(out)],
        "sweep": ["sweep", *ckpts[:2], *data, "--alpha-step", "0.5" if old else "0.25", "--out", str(out)],
        "merge": ["merge", *ckpts, *data, "--out", str(out), *(["--methods", "naive"] if old else [])],
        "probe": ["probe", *ckpts[:2], *data, "--k", "2" if old else "3", "--subset-images", "50",
                  "--out", str(out)],
        "compare": ["compare", str(out), "--threshold", "0.5" if old else "0.3"],
        "regress": ["regress", str(out), "--k", "5" if old else "10"],
    }[name] + QUIET


def _setup(name: str, ckpts, probed: Path, out: Path, old: bool) -> None:
    """Write the folder (or checkpoint) ``out`` as it is before the command: the old variant's run."""
    if name in ("compare", "regress") and not out.exists():
        shutil.copytree(probed, out)
    if old:
        assert main(command(name, ckpts, out, old=True)) == 0


def _contents(name: str, out: Path) -> dict[str, bytes]:
    if name == "train":
        return {p.name: p.read_bytes() for p in (out, out.with_suffix(".json")) if p.exists()}
    return every_byte(out)


def _results(name: str, out: Path) -> dict[str, bytes]:
    if name == "train":  # the weights, and the sidecar's record of how they were made (no timings)
        meta = strip_timings(json.loads(out.with_suffix(".json").read_text()))
        meta.pop("weights")  # the file's own name
        meta["meta"].pop("options")  # --out and --overwrite
        return {"weights": out.read_bytes(), "meta": json.dumps(meta, sort_keys=True).encode()}
    return stored_results(out)


def _child(argv: list[str], cwd: str) -> None:
    os.chdir(cwd)
    os._exit(main(argv))


@pytest.fixture(scope="module")
def forks():
    """Processes forked from a server that has imported torch and mergescope once (a fresh interpreter per kill
    would spend most of each test importing)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "mergescope.cli", "mergescope.studies.sweep", "mergescope.studies.probe",
                                "mergescope.studies.compare", "mergescope.studies.regress",
                                "mergescope.studies.merge", "mergescope.studies.train"])
    return ctx


def _sign_of_work(name: str, out: Path) -> Path:
    """What appears once the command is past its checks and computing: its lock beside the folder or file."""
    return out.parent / f".{out.name}.lock"


@pytest.mark.parametrize("name", ["train", "sweep", "merge", "probe", "compare", "regress"])
def test_a_killed_command_leaves_the_old_run_or_the_new_one_and_reruns_to_the_same_results(
        name, ckpts, probed, tmp_path, forks):
    rng = random.Random()
    want_out = tmp_path / ("want.safetensors" if name == "train" else "want")
    _setup(name, ckpts, probed, want_out, old=False)
    start = time.perf_counter()
    assert main(command(name, ckpts, want_out)) == 0
    seconds = time.perf_counter() - start
    want = _results(name, want_out)

    out = tmp_path / ("run.safetensors" if name == "train" else "run")
    _setup(name, ckpts, probed, out, old=True)
    before = _contents(name, out)
    argv = command(name, ckpts, out) + ["--overwrite"]
    proc = forks.Process(target=_child, args=(argv, str(tmp_path)))
    proc.start()
    sign, waited = _sign_of_work(name, out), time.perf_counter()
    while not sign.exists() and proc.is_alive() and time.perf_counter() - waited < 60:
        time.sleep(0.01)
    delay = rng.uniform(0, 1.2 * seconds)
    proc.join(delay)
    killed = proc.is_alive()
    if killed:
        proc.kill()
    proc.join()
    where = f"{name} killed {delay:.2f} s into its work" if killed else f"{name} finished before the kill"

    after = _contents(name, out)
    if after != before:  # not the old run: then the new one, complete
        if name == "train" and _interrupted(out):
            pass  # killed between the weights and their sidecar: the pair says so, and the rerun writes it again
        else:
            assert _results(name, out) == want, f"{where}: neither the old run nor the new one"
    assert main(argv) == 0, where
    assert _results(name, out) == want, where
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}."))
    assert not left, f"{where}: {left} left beside the run"


def _interrupted(path: Path) -> bool:
    from mergescope.train.checkpoint import interrupted_write

    return interrupted_write(path)


def test_a_second_writer_is_refused_in_one_line(ckpts, tmp_path, forks, capsys):
    out = tmp_path / "run"
    argv = command("sweep", ckpts, out)
    proc = forks.Process(target=_child, args=(argv, str(tmp_path)))
    proc.start()
    lock = tmp_path / ".run.lock"
    while not lock.exists() and proc.is_alive():
        time.sleep(0.01)
    try:
        assert proc.is_alive(), "the first sweep ended before the second could start"
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "being written by another mergescope" in err, err
    finally:
        proc.join()
    assert proc.exitcode == 0
    assert main(argv + ["--overwrite"]) == 0  # the lock went with its writer


def test_a_lock_left_by_a_dead_process_is_taken_over(ckpts, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".run.lock").write_text(str(dead.pid))
    assert main(command("sweep", ckpts, tmp_path / "run")) == 0
    assert not (tmp_path / ".run.lock").exists()


def _tiny_disk(tmp_path: Path, monkeypatch, size_kb: int) -> Path:
    """A folder on a ``size_kb`` tmpfs where the machine lets us mount one (root); else one where every atomic
    write past ``size_kb`` of output fails with ENOSPC, as on a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                          capture_output=True).returncode == 0:
            return disk
    except OSError:  # no mount command
        pass
    import mergescope.runs.atomic as atomic

    real, written = atomic.os.replace, [0]

    def replace(src, dst):
        written[0] += os.path.getsize(src)
        if written[0] > size_kb * 1024 and Path(dst).is_relative_to(disk):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    return disk


def test_a_full_disk_is_one_line_and_leaves_the_old_run(ckpts, tmp_path, monkeypatch, capsys):
    disk = _tiny_disk(tmp_path, monkeypatch, 300)
    try:
        out = disk / "run"
        assert main(command("sweep", ckpts, out)) == 0  # ~150 KB: fits
        before = every_byte(out)
        capsys.readouterr()
        # a probe's folder with the activations of all 1,437 images (~600 KB) does not
        probe = ["probe", *ckpts[:2], "--data", "digits", "--k", "3", "--out", str(out), "--overwrite", *QUIET]
        assert main(probe) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: disk full while writing") and "\n" not in err, err
        assert str(out) in err and ".staging" not in err, err
        assert every_byte(out) == before
        assert sorted(p.name for p in disk.iterdir() if p.name != "lost+found") == ["run"]
    finally:
        if os.path.ismount(disk):
            subprocess.run(["umount", str(disk)], capture_output=True)


DAMAGES = [(reader, damage) for reader in ("compare", "regress", "report")
           for damage in ("edited", "truncated results.json", "truncated manifest.json", "unlisted garbage")
           if not (reader == "regress" and damage == "unlisted garbage")]  # regress does not read the probe


@pytest.mark.parametrize("reader, damage", DAMAGES)
def test_a_run_folder_damaged_after_its_run_is_named_by_the_command_that_reads_it(
        probed, tmp_path, capsys, damage, reader):
    out = tmp_path / "run"
    shutil.copytree(probed, out)
    if damage == "edited":  # one top-k value changed in the probe's tensors
        path = out / "probe" / "probe.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 1
        path.write_bytes(bytes(data))
        words = ["probe.safetensors", "changed after the run"]
    elif damage == "unlisted garbage":  # a garbage probe header the manifest does not vouch for (older runs)
        manifest = json.loads((out / "manifest.json").read_text())
        del manifest["sha256"]["probe/probe.safetensors"]
        (out / "manifest.json").write_text(json.dumps(manifest))
        (out / "probe" / "probe.safetensors").write_bytes(b"\x10" + bytes(7) + b"{garbage header}")
        words = [str(out / "probe" / "probe.safetensors"), "not a readable safetensors file"]
    else:
        path = out / damage.split()[1]
        path.write_bytes(path.read_bytes()[:50])
        words = [path.name, "not valid JSON"]
    before = every_byte(out)
    capsys.readouterr()
    argv = {"compare": ["compare", str(out), *QUIET], "regress": ["regress", str(out), *QUIET],
            "report": ["report", str(out)]}[reader]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err and ".staging" not in err, err
    for w in words:
        assert w in err, err
    assert every_byte(out) == before


def test_report_renders_again_what_the_run_stored(probed, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(probed, out)
    (out / "report.html").write_text("damaged")
    assert main(["report", str(out)]) == 0
    assert "damaged" not in (out / "report.html").read_text()
    assert stored_results(out) == stored_results(probed)
    from mergescope.runs import load_run, verify_files

    _, manifest = load_run(out)
    verify_files(out, manifest, list(manifest["sha256"]))  # the manifest vouches for the new pages


def test_no_file_of_a_run_names_its_staging_folder(probed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(probed, out)
    assert main(["compare", str(out), *QUIET]) == 0
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".html", ".csv"):
            assert ".staging" not in path.read_text(), path


def test_a_folder_that_is_not_a_run_is_never_replaced(ckpts, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(command("sweep", ckpts, out) + ["--overwrite"]) == 2
    assert "holds files but no mergescope run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def test_train_writes_again_over_what_a_kill_between_its_two_files_left(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    argv = ["train", "--arch", "cnn_digits", "--arch-kwargs", '{"width": 4}', "--data", "digits", "--epochs", "1",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    want = out.read_bytes()
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, create_model("cnn_digits", width=4, seed=5))
    shutil.copy(other, out)  # other weights beside the old sidecar: what a kill between the two writes leaves
    from mergescope.errors import CheckpointError
    from mergescope.train import load_checkpoint

    with pytest.raises(CheckpointError, match="pair is incomplete"):
        load_checkpoint(out)
    capsys.readouterr()
    assert main(argv) == 0  # no --overwrite needed for the remains of an interrupted write
    assert "interrupted write" in capsys.readouterr().err
    assert out.read_bytes() == want
    assert main(argv) == 2  # a complete checkpoint is another matter
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_image_edited_in_place_changes_the_dataset_fingerprint(tmp_path, in_memory):
    """Same name, same file size (BMP), other pixels: a stored pass of the old images must not pass for the new."""
    import numpy as np
    from PIL import Image

    from mergescope.data.folder import ImageFolderDataset

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.bmp")
    before = ImageFolderDataset(tmp_path, in_memory=in_memory, workers=0).fingerprint
    path = tmp_path / "a" / "1.bmp"
    size, stat = path.stat().st_size, path.stat()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
    assert path.stat().st_size == size
    assert ImageFolderDataset(tmp_path, in_memory=in_memory, workers=0).fingerprint != before
    if in_memory:  # the pixels are seen even when the file's time is put back
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert ImageFolderDataset(tmp_path, in_memory=True, workers=0).fingerprint != before


def test_an_interrupted_probe_resumes_from_its_last_pass_checkpoint(ckpts, tmp_path, monkeypatch):
    """The probe's pass checkpoints outlive the staging folder (``.OUT.resume``): the rerun continues after the
    last checkpointed batch and ends with the uninterrupted run's results."""
    import importlib

    import mergescope.studies.probe as study

    engine = importlib.import_module("mergescope.probe.probe")  # the module (the package re-exports its function)
    from mergescope.probe.state import ProbeState

    real_probe, real_write = engine.probe, engine.write

    def often(*args, **kw):  # a checkpoint after every batch of 100 images
        return real_probe(*args, **{**kw, "checkpoint_every": 1, "batch_size": 100})

    monkeypatch.setattr(study, "probe", often)
    argv = ["probe", *ckpts[:2], "--data", "digits", "--k", "3", "--subset-images", "50", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "want")]) == 0
    writes = []

    def interrupted(path, tensors, meta):
        real_write(path, tensors, meta)
        writes.append(path)
        if len(writes) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "write", interrupted)
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 130
    assert not out.exists() and (tmp_path / ".run.resume" / "probe" / "probe.partial.safetensors").is_file()
    monkeypatch.setattr(engine, "write", real_write)
    resumed = []
    real_restore = ProbeState.restore
    monkeypatch.setattr(ProbeState, "restore", lambda self, p, done, seen: (resumed.append(done),
                                                                            real_restore(self, p, done, seen)))
    assert main([*argv, "--out", str(out)]) == 0
    assert resumed == [3]
    assert stored_results(out) == stored_results(tmp_path / "want")
    assert not (tmp_path / ".run.resume").exists()
