"""Runs are folders: a manifest (config, versions, seeds, hashes), checkpoints, results, figures, a report.

The manifest hashes every file it vouches for, and a study that reads a run folder checks the hashes of what it
reads first (:func:`verify_files`): a file changed after its run is named, not used. How a folder is written —
as a whole, never over a finished run without ``--overwrite`` — is :mod:`mergescope.runs.transaction`.
"""
from __future__ import annotations

import os
import json
import platform
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .jsonio import package_version, write_json
from ..data.cache import file_sha256
from ..errors import MergescopeError

MANIFEST = "manifest.json"
RESULTS = "results.json"


def environment() -> dict[str, str]:
    """Versions of everything that can change a number."""
    import torchvision

    return {
        "mergescope": package_version(), "python": sys.version.split()[0], "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "threads": str(torch.get_num_threads()),
    }


def write_manifest(run_dir: Path, config: dict[str, Any], files: Iterable[str | os.PathLike] = (),
                   **extra: Any) -> Path:
    """Write ``manifest.json`` last, so its presence means the run finished.

    Args:
        config: the resolved configuration of the run (seeds included).
        files: files of the run to fingerprint (sha256), relative to ``run_dir`` in the manifest.
        extra: further JSON-able entries (dataset fingerprints, timings...).
    """
    record = {"created": _now(), "command": " ".join(sys.argv), "config": config, "environment": environment(),
              "sha256": file_hashes(run_dir, files), **extra}
    return write_json(run_dir / MANIFEST, record)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def file_hashes(run_dir: Path, files: Iterable[str | os.PathLike]) -> dict[str, str]:
    """sha256 of each file, keyed by its path relative to ``run_dir``."""
    return {str(Path(f).resolve().relative_to(run_dir.resolve())): file_sha256(f) for f in files}


def load_run(run_dir: str | os.PathLike) -> tuple[dict, dict]:
    """``results.json`` and ``manifest.json`` of a finished run folder (a one-line error if it is not one)."""
    run_dir = Path(run_dir)
    results_path, manifest_path = run_dir / RESULTS, run_dir / MANIFEST
    if not results_path.is_file() or not manifest_path.is_file():
        raise MergescopeError(f"{run_dir} is not a finished mergescope run folder (no results.json/manifest.json)")
    return _read_record(results_path), _read_record(manifest_path)


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergescopeError(f"{path} is not valid JSON ({e}): the file is damaged; "
                              "redo the run that wrote it") from None
    if not isinstance(record, dict):
        raise MergescopeError(f"{path} does not hold a JSON object: the file is damaged; redo the run that wrote it")
    return record


def add_to_run(run_dir: Path, results: dict, manifest: dict, section: dict, files: Iterable[str | os.PathLike],
               key: str, record: dict[str, Any]) -> list[Path]:
    """Add a study to a finished run: its report section (replacing one of the same title), ``results.json``,
    a re-rendered ``report.html``, and in the manifest the hashes of ``files`` plus ``record`` under ``key``.

    Returns:
        Every file written or fingerprinted.
    """
    from ..report import render_report

    results["sections"] = [s for s in results.get("sections", []) if s.get("title") != section["title"]]
    results["sections"].append(section)
    files = [Path(f) for f in files] + [write_json(run_dir / RESULTS, results), render_report(run_dir, results)]
    manifest["sha256"] = {**manifest.get("sha256", {}), **file_hashes(run_dir, files)}
    manifest[key] = {"created": _now(), **record}
    write_json(run_dir / MANIFEST, manifest)
    return files


def verify_files(run_dir: str | os.PathLike, manifest: Mapping, names: Iterable[str]) -> None:
    """Check the files ``names`` (relative to ``run_dir``) against the sha256 the manifest recorded for them, before
    a later study reads them: a file that changed or vanished after the run that wrote it is refused in one line
    naming it (a file the manifest does not list, e.g. from an older mergescope, is not checked)."""
    run_dir = Path(run_dir)
    recorded = manifest.get("sha256", {})
    for name in names:
        want = recorded.get(name)
        if want is None:
            continue
        path = run_dir / name
        if not path.is_file():
            raise MergescopeError(f"{path} is missing, though {run_dir / MANIFEST} lists it: redo the run that wrote it")
        if file_sha256(path) != want:
            raise MergescopeError(f"{path} changed after the run that wrote it (its sha256 differs from the one in "
                                  f"{run_dir / MANIFEST}): redo that run")


RENDERED = (".html", ".png", ".jpg", ".jpeg", ".webp", ".svg")  # pages and figures: made again from the data


def verify_inputs(run_dir: str | os.PathLike, manifest: Mapping) -> None:
    """:func:`verify_files` for every file the manifest lists except the rendered pages and figures
    (:data:`RENDERED`), which ``mergescope report`` makes again from the others."""
    verify_files(run_dir, manifest, [n for n in manifest.get("sha256", {}) if not n.lower().endswith(RENDERED)])


def refresh_hashes(run_dir: str | os.PathLike, files: Iterable[str | os.PathLike]) -> Path | None:
    """After a re-render: the manifest's sha256 of every file of ``files`` it already lists, recomputed (files it
    does not list stay out). Returns the manifest's path, or None when the folder has no manifest."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    listed = manifest.get("sha256", {})
    fresh = {k: v for k, v in file_hashes(run_dir, files).items() if k in listed}
    if any(listed[k] != v for k, v in fresh.items()):
        manifest["sha256"] = {**listed, **fresh}
        write_json(path, manifest)
    return path


def run_checkpoints(run_dir: str | os.PathLike, manifest: dict, tags: Iterable[str]) -> dict[str, Path]:
    """tag -> checkpoint of a run folder: ``mergescope probe`` lists them in the manifest (A, B, C… in order); the
    demo keeps them as ``checkpoints/model_<tag>.safetensors``."""
    listed = manifest.get("config", {}).get("checkpoints")
    if listed:
        return {chr(ord("A") + i): Path(p) for i, p in enumerate(listed)}
    return {t: Path(run_dir) / "checkpoints" / f"model_{t}.safetensors" for t in tags}


def run_arch(manifest: Mapping) -> dict[str, Any]:
    """``arch``/``arch_kwargs`` the run's checkpoints were loaded with (``{}``: their sidecars), for
    :func:`mergescope.train.load_checkpoint`."""
    cfg = manifest.get("config", {})
    return {"arch": cfg["arch"], "arch_kwargs": cfg.get("arch_kwargs") or None} if cfg.get("arch") else {}
