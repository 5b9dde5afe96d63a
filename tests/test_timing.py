"""Time by stage (issue 14, item 5): exclusive nested stages, scopes, the data pass's four stages, and every
command's end line and manifest record."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch

from mergescope import timing
from mergescope.cli import main
from mergescope.probe import run_pass


class Clock:
    """A perf_counter that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", c)
    return c


def test_nested_stages_are_exclusive_and_scopes_add_up(clock):
    with timing.timed() as outer:
        with timing.timed() as times:
            with timing.stage("assignment"):
                clock.now += 1.0
                with timing.stage("forward"):
                    clock.now += 2.0
                clock.now += 0.5
                with timing.stage("assignment"):  # the same stage again inside: counted once
                    clock.now += 0.25
            clock.now += 4.0  # in no stage
        assert times.record() == {"total_s": 7.75, "stages": {"forward": 2.0, "assignment": 1.75}, "other_s": 4.0}
        mark = timing.since_here()
        with timing.stage("writing"):
            clock.now += 3.0
        assert timing.record_since(mark) == {"total_s": 3.0, "stages": {"writing": 3.0}, "other_s": 0.0}
    assert outer.record()["stages"] == {"forward": 2.0, "assignment": 1.75, "writing": 3.0}
    assert outer.line() == ("time 10.8 s: forward 2.0 s (19%) · assignment 1.8 s (16%) · writing 3.0 s (28%) · "
                            "other 4.0 s")


def test_a_record_adds_up_to_its_total_after_rounding(clock):
    """Each stage is rounded to ms; the rest is what they leave of the rounded total, so the parts never sum above
    it (0.5 ms of rounding per stage once did: a CI failure)."""
    with timing.timed() as times:
        for name in ("forward", "statistics"):
            with timing.stage(name):
                clock.now += 1.0006
        clock.now += 0.9988
    record = times.record()
    assert record == {"total_s": 3.0, "stages": {"forward": 1.001, "statistics": 1.001}, "other_s": 0.998}
    assert sum(record["stages"].values()) + record["other_s"] == pytest.approx(record["total_s"], abs=1e-12)


def test_a_data_pass_charges_decode_transfer_forward_and_statistics():
    nap = {"decode": 0.03, "forward": 0.02, "statistics": 0.04}

    def batches():
        for _ in range(3):
            time.sleep(nap["decode"])
            yield SimpleNamespace(x=torch.zeros(2, 3))

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(nap["forward"])
            return x

    with timing.timed() as times:
        assert run_pass({"m": Slow()}, batches(), lambda batch, x, out: time.sleep(nap["statistics"])) == 3
    stages = times.record()["stages"]
    assert list(stages) == ["decode", "transfer", "forward", "statistics"]
    for name, s in nap.items():
        assert 3 * s <= stages[name] < 3 * s + 0.05, (name, stages)
    assert stages["transfer"] < 0.01


def test_every_command_prints_and_records_where_its_time_went(tmp_path, capsys):
    ckpt = tmp_path / "a.safetensors"
    assert main(["train", "--arch", "cnn_digits", "--data", "digits", "--out", str(ckpt), "--epochs", "1",
                 "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("time ") and "training" in line and "writing" in line
    sidecar = json.loads(ckpt.with_suffix(".json").read_text())["meta"]["time_by_stage"]
    assert sidecar["stages"]["training"] > 0
    other = tmp_path / "b.safetensors"
    assert main(["train", "--arch", "cnn_digits", "--data", "digits", "--out", str(other), "--epochs", "1",
                 "--seed", "1", "--quiet"]) == 0
    capsys.readouterr()
    run = tmp_path / "probe"
    assert main(["probe", str(ckpt), str(other), "--data", "digits", "--out", str(run), "--quiet",
                 "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    record = json.loads((run / "manifest.json").read_text())["time_by_stage"]
    want = ["decode", "transfer", "forward", "statistics", "top-k", "assignment", "rendering", "writing"]
    assert list(record["stages"]) == want, record
    assert all(f" {name} " in f" {line} " for name in want), line
    parts = sum(record["stages"].values())
    if record["other_s"] > 0:  # the rest is what the rounded stages leave of the rounded total
        assert parts + record["other_s"] == pytest.approx(record["total_s"], abs=1e-9)
    else:  # nothing outside the stages: only their rounding (0.5 ms each) can put them above the total
        assert 0 < parts <= record["total_s"] + 5e-4 * (len(record["stages"]) + 1)
    assert record["stages"]["rendering"] > 0 and record["stages"]["forward"] > 0


def test_opening_a_dataset_is_charged_to_decode():
    """A pack or a small tree is decoded when opened: that time is ``decode``, not ``other``."""
    from mergescope.data import open_dataset

    with timing.timed() as times:
        open_dataset("digits", split="train")
    assert times.seconds.get("decode", 0.0) > 0.0
    assert times.seconds["decode"] >= 0.9 * (time.perf_counter() - times.started)
