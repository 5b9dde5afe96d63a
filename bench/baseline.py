"""An earlier commit's ``src/``, for the benchmarks that run it side by side with this checkout (``--baseline``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_src(rev: str, dest: Path) -> Path:
    """``git archive <rev> src`` of this repository extracted into ``dest``; returns that ``src`` folder (for
    ``PYTHONPATH`` of a child process). Exits with a one-line error naming ``--baseline`` where git has no ``rev``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=False)
    if archive.returncode:
        sys.exit(f"{Path(sys.argv[0]).name}: --baseline {rev}: {archive.stderr.decode().strip()}")
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"
