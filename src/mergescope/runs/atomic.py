"""Atomic file writes: build the file beside its destination, then ``os.replace`` it into place.

A write that fails raises :class:`OSError` naming the destination (the OS names none for a failed ``write``), so
the command line can say in one line which file could not be written and why (e.g. "disk full").
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it replaces ``path`` only if the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None or str(e.filename) == str(tmp):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file at ``path`` atomically; an I/O failure is an :class:`OSError`
    (safetensors reports it as its own error type, with the OS's code in the text)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        except SafetensorError as e:
            found = re.search(r"os error (\d+)", str(e))
            if not found:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code) if code else str(e), str(path)) from None
    return Path(path)


__all__ = ["atomic_path", "atomic_save_tensors", "atomic_write_text"]
