"""What a run folder holds, as bytes, for the tests that compare runs (a killed and rerun command, or study, with an
uninterrupted one; a failed command with the folder it left)."""
from __future__ import annotations

import json
from pathlib import Path

TIMING_KEYS = {"timings", "runtime", "seconds", "train_seconds", "finished", "created", "time_by_stage"}


def strip_timings(obj):
    """``obj`` (parsed JSON) without the entries that time the run."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def stored_results(folder: Path) -> dict[str, bytes]:
    """Every result stored under ``folder``: tables, tensors, figures, stored JSON (timings left out; HTML pages,
    manifests, the study's stage record and lock files describe the run, not its results)."""
    out = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if path.suffix == ".html" or path.name in ("manifest.json", "stages.json") or path.name.endswith(".lock"):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            data = json.dumps(strip_timings(json.loads(data)), sort_keys=True).encode()
        out[rel] = data
    return out


def every_byte(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, byte for byte (what "left as it was" means)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
