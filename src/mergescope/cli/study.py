"""``mergescope study CONFIG``: a study config file (TOML or YAML) into a :class:`~mergescope.studies.study.StudyConfig`.

The file speaks the commands' own vocabulary: top-level ``out``, ``data``, ``split``, ``eval_splits``, ``device``;
a ``[models]`` table (the options of ``mergescope train`` plus ``seeds``, ``parts`` — or ``checkpoints`` with
``arch``/``arch_kwargs`` — ); and one table per analysis, holding that command's options: ``[sweep]``,
``[features]`` (``mergescope probe``), ``[compare]``, ``[regress]``, ``[merge]``. An analysis runs when its table
is there. Every value is checked by the option's own type and choices; an unknown key gets one line with the
valid ones.
"""
from __future__ import annotations

import argparse
from typing import Any

from .._argtypes import resolve_device
from ..errors import MergescopeError
from .config import _convert, _options, _subparser, read_config, resolved_options

TOP = ("out", "data", "split", "eval_splits", "device")
SECTIONS = {"models": "train", "sweep": "sweep", "features": "probe", "compare": "compare", "regress": "regress",
            "merge": "merge"}
SET_BY_STUDY = {"checkpoints", "out", "overwrite", "quiet", "config", "run_dir", "data", "split", "eval_splits",
                "device"}  # options the study fills in itself (or takes from the top level)
MODEL_KEYS = {"seeds", "parts", "checkpoints"}


def _section(parser: argparse.ArgumentParser, name: str, values: Any, top: dict, path: str) -> argparse.Namespace:
    """A section's options as its command would parse them: defaults, then the file's values, checked."""
    if not isinstance(values, dict):
        raise MergescopeError(f"--config {path}: [{name}] must be a table of options")
    command = SECTIONS[name]
    sub = _subparser(parser, command)
    options = _options(sub)
    allowed = {d for d in options if d not in SET_BY_STUDY} | ({"arch", "arch_kwargs"} if name == "models" else set())
    args = sub.parse_args([])
    for dest in TOP:
        if dest in options and dest in top:
            setattr(args, dest, top[dest])
    if name == "compare":  # partial merging is evaluated on one split: the first evaluation split
        args.eval_splits = list(top.get("eval_splits", ["test"]))[:1]
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if name == "models" and dest in MODEL_KEYS:
            continue
        if dest not in allowed:
            valid = sorted(allowed | (MODEL_KEYS if name == "models" else set()))
            raise MergescopeError(f"--config {path}: unknown key '{key}' in [{name}]; valid keys: {', '.join(valid)}")
        setattr(args, dest, _convert(options[dest], f"[{name}] {key}", value, path))
    return args


def _list(values: dict, key: str, kind: type, path: str) -> list:
    got = values.get(key, [])
    if not isinstance(got, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in got):
        raise MergescopeError(f"--config {path}: [models] {key} must be a list of {kind.__name__}s, got {got!r}")
    return got


def study_config(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The :class:`~mergescope.studies.study.StudyConfig` of ``args.study_config``, the command line's ``--out``,
    ``--data`` and ``--device`` overriding the file's."""
    from ..studies.study import ModelsConfig, StudyConfig
    from . import commands as C

    path = args.study_config
    data = read_config(path)
    unknown = [k for k in data if k not in TOP and k not in SECTIONS]
    if unknown:
        raise MergescopeError(f"--config {path}: unknown key '{unknown[0]}'; valid keys: "
                              f"{', '.join([*TOP, *(f'[{s}]' for s in SECTIONS)])}")
    sub = _subparser(parser, "study")
    top = {k: data[k] for k in TOP if k in data}
    for dest in TOP:  # the top level through the study command's own options (types, choices)
        if dest in top:
            top[dest] = _convert(_options(sub)[dest], dest, top[dest], path)
        if getattr(args, dest, None) not in (None, []):
            top[dest] = getattr(args, dest)
    for dest in ("out", "data"):
        if not top.get(dest):
            raise MergescopeError(f"study: '{dest}' is required (in {path} or as --{dest})")
    top.setdefault("split", "train")
    top.setdefault("eval_splits", ["test"])
    top["device"] = resolve_device(top.get("device", "auto"))
    if "models" not in data:
        raise MergescopeError(f"--config {path}: a [models] table is required (seeds to train, or checkpoints)")
    sections = {name: _section(parser, name, data[name], top, path) for name in SECTIONS if name in data}
    m = sections["models"]
    models_table = data["models"]
    checkpoints = _list(models_table, "checkpoints", str, path)
    models = ModelsConfig(train=None if checkpoints else C.train_config(m),
                          seeds=_list(models_table, "seeds", int, path),
                          parts=_list(models_table, "parts", str, path), checkpoints=checkpoints,
                          arch=m.arch if checkpoints else None, arch_kwargs=m.arch_kwargs if checkpoints else {})
    if not checkpoints and not m.arch:
        raise MergescopeError(f"--config {path}: [models] needs arch (to train) or checkpoints (to load)")
    options = {"top": top, **{n: resolved_options(ns) for n, ns in sections.items()}}
    s = sections
    return StudyConfig(
        out=top["out"], data=top["data"], models=models, split=top["split"], eval_splits=list(top["eval_splits"]),
        device=top["device"],
        sweep=(C.sweep_config(s["sweep"]), s["sweep"].stats_images) if "sweep" in s else None,
        features=C.probe_config(s["features"]) if "features" in s else None,
        compare=C.compare_config(s["compare"]) if "compare" in s else None,
        regress=C.regress_config(s["regress"]) if "regress" in s else None,
        merge=(C.merge_config(s["merge"]), s["merge"].stats_images) if "merge" in s else None,
        options=options)
