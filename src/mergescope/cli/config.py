"""``--config FILE``: options from a TOML (the standard library's ``tomllib``) or YAML file, under the command line.

The file's keys are the command's option names (``batch_size`` or ``batch-size``; positionals by their name:
``checkpoints``, ``run_dir``); each value is checked by the option's own type and choices, so a wrong one gets the
same one line as on the command line. Options given on the command line win; the resolved options are what the
study records in its manifest.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import _argtypes as T
from ..errors import MergescopeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

_INTERNAL = {"help", "func", "command", "config", "_required"}
_UNSET = object()


def read_config(path: str) -> dict[str, Any]:
    """The key -> value table of a TOML or YAML file (one-line errors for a missing or malformed file)."""
    file = Path(path)
    if not file.is_file():
        raise MergescopeError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise MergescopeError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or write TOML") from None
            data = yaml.safe_load(text) or {}
        elif file.suffix.lower() == ".toml":
            if tomllib is None:
                raise MergescopeError(f"--config {path}: TOML needs Python 3.11 (tomllib); or write YAML")
            data = tomllib.loads(text)
        else:
            raise MergescopeError(f"--config {path}: the file must end in .toml, .yaml or .yml")
    except MergescopeError:
        raise
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError: the parser's own message, first line
        raise MergescopeError(f"--config {path} is not valid {file.suffix[1:].upper()}: "
                              f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MergescopeError(f"--config {path}: expected a table of options at the top level")
    return data


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in sub._actions if a.dest not in _INTERNAL and a.dest != argparse.SUPPRESS}


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _given(sub: argparse.ArgumentParser, tail: list[str]) -> set[str]:
    """The options given on the command line (parsed again with every default unset)."""
    names = _options(sub)
    ns = argparse.Namespace(**{d: _UNSET for d in names})
    sub.parse_known_args(tail, namespace=ns)
    return {d for d in names if getattr(ns, d) is not _UNSET and getattr(ns, d) != []}


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config value through the option's own checks."""
    where = f"--config {path}: {key}"
    if action.nargs == 0:  # a flag (store_true)
        if not isinstance(value, bool):
            raise MergescopeError(f"{where} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many and not isinstance(value, list):
        value = [value]
    table = action.type is T.json_object  # --arch-kwargs: a TOML/YAML table is its JSON object

    def one(v):
        if isinstance(v, (list, dict)) and not table:
            raise MergescopeError(f"{where} must be a single value, got {v!r}")
        if isinstance(v, bool):
            raise MergescopeError(f"{where}: {v!r} is not a valid value")
        if action.type is None and not isinstance(v, str):
            raise MergescopeError(f"{where}: {v!r} is not a string")
        text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
        try:
            out = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise MergescopeError(f"{where}: {e}") from None
        if action.choices is not None and out not in action.choices:
            raise MergescopeError(f"{where}: {v!r} is not one of {', '.join(map(str, action.choices))}")
        return out

    return [one(v) for v in value] if many else one(value)


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Fill ``args`` from ``--config`` (command line first), then check the command's required options.

    Raises:
        MergescopeError: an unknown key (the valid ones are listed), a value its option refuses, or a required
            option given nowhere.
    """
    sub = _subparser(parser, args.command)
    options = _options(sub)
    if getattr(args, "config", None):
        data = read_config(args.config)
        tail = argv[argv.index(args.command) + 1:]
        given = _given(sub, tail)
        for key, value in data.items():
            dest = str(key).replace("-", "_")
            if dest not in options:
                raise MergescopeError(f"--config {args.config}: unknown key '{key}' for `mergescope {args.command}`; "
                                      f"valid keys: {', '.join(sorted(options))}")
            if dest not in given:
                setattr(args, dest, _convert(options[dest], str(key), value, args.config))
    for dest in getattr(args, "_required", ()):
        if getattr(args, dest, None) in (None, [], ""):
            flag = _flag(options[dest])
            what = f"'{dest}'" if not options[dest].option_strings else flag
            raise MergescopeError(f"{args.command}: {what} is required (on the command line or as '{dest}' in "
                                  "--config FILE)")
    return args


def resolved_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options a run used, as the manifest records them (the config file's path left out)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _INTERNAL}
