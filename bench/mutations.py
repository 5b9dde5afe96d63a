"""Mutation check: plant known bugs in a scratch copy of the library, one at a time, and see whether the tests fail.

Each mutant is one exact text edit of one library file (the bug an independent review planted, or one an oracle
test was written to catch) and the tests that should catch it. For every mutant the script copies ``src/`` and
``tests/`` into a scratch folder, applies the edit there (the working tree is never touched), runs the named
tests against the scratch copy and counts the mutant as *killed* when they fail. The unmutated tests are run
once first: a mutant can only be killed by tests that pass without it.

    python bench/mutations.py              # every mutant; last line: "killed K / N"
    python bench/mutations.py --list       # the mutants and the tests that should catch them
    python bench/mutations.py --only cca_no_whitening ot_column_sums

An edit that no longer applies (its text is gone from the file, or appears twice) is an error, not a pass: the
mutant must be updated with the code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/mergescope
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest node ids (files or file::test)
    why: str  # the bug in words


MUTANTS: tuple[Mutant, ...] = (
)


def _mutated(root: Path, m: Mutant) -> str:
    """The text of ``m.file`` under ``root`` with the mutant's edit; an edit that does not apply once is an error."""
    text = (root / "src" / "mergescope" / m.file).read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"error: mutant '{m.name}' no longer applies: its text occurs {count} times in {m.file}")
    return text.replace(m.old, m.new)


def _run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, float]:
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_WAIT_POLICY="PASSIVE")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        passed = proc.returncode == 0
    except subprocess.TimeoutExpired:
        passed = False  # a mutant that hangs the tests is caught (by the timeout)
    return passed, time.perf_counter() - start


def _scratch(base: Path) -> Path:
    root = Path(tempfile.mkdtemp(dir=base))
    for part in ("src", "tests"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per test run (default 900)")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        known = ", ".join(m.name for m in MUTANTS)
        raise SystemExit(f"error: unknown mutant in --only; known: {known}")
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.file}: {m.why}\n{'':32s} caught by {' '.join(m.tests)}")
        return
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        base = Path(tmp)
        for m in mutants:  # every edit must apply to today's code before anything runs
            _mutated(ROOT, m)
        clean = _scratch(base)
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        ok, secs = _run_tests(clean, tests, args.timeout)
        print(f"unmutated: {'pass' if ok else 'FAIL'} ({len(tests)} test targets, {secs:.0f} s)", flush=True)
        if not ok:
            raise SystemExit("error: the tests fail without any mutant; fix them first")
        killed = 0
        for m in mutants:
            root = _scratch(base)
            (root / "src" / "mergescope" / m.file).write_text(_mutated(root, m))
            passed, secs = _run_tests(root, m.tests, args.timeout)
            killed += not passed
            print(f"{'killed ' if not passed else 'SURVIVED'} {m.name:32s} {secs:6.0f} s  {m.why}", flush=True)
            shutil.rmtree(root)
    print(f"killed {killed} / {len(mutants)}")


if __name__ == "__main__":
    main()
