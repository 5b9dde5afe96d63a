"""A run folder changes as a whole or not at all.

A command that writes a run folder ``OUT`` writes everything into a staging folder beside it
(``.OUT.staging``; a hard-linked copy of ``OUT`` when the command adds to a finished run — every file is written
through a temporary file and a rename, so a linked original is never touched) and then puts it in place with one
rename: on Linux one ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically, elsewhere two renames
whose interruption the next writer undoes. A failure or a kill at any moment leaves the previous ``OUT`` intact,
complete and consistent with its manifest; the next writer clears what the killed one left.

While a command writes, ``.OUT.lock`` (beside ``OUT``) holds its pid: a second writer is refused in one line, a
lock whose process is gone is taken over. Pass checkpoints that must outlive a kill (the probe's) go to
``.OUT.resume``, removed once the run is in place.

Inside a ``torch.distributed`` process group only rank 0 writes ``OUT``; the other ranks run the same code into a
throwaway folder, so every collective pass runs on every rank.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergescopeError

MANIFEST = "manifest.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class Staging:
    """Where a command writes its run folder.

    Attributes:
        final: the run folder the user named (``--out``).
        path: the folder to write into; it becomes ``final`` when the command succeeds.
        resume: a folder for pass checkpoints that outlive a kill (same for every rank).
    """

    final: Path
    path: Path
    resume: Path


def sibling(final: Path, kind: str) -> Path:
    """``.NAME.kind`` beside ``final``: its lock, staging, resume or old folder."""
    return final.parent / f".{final.name}.{kind}"


class RunLock:
    """A lock file holding the writer's pid; a second writer is refused in one line, the lock of a process that
    is gone is taken over."""

    def __init__(self, path: Path, what: Path):
        self.path, self.what = path, what

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid and pid != os.getpid() and _alive(pid):
                    raise MergescopeError(f"{self.what} is being written by another mergescope (pid {pid}); wait for "
                                          f"it, or remove {self.path} if that process is gone") from None
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return self
        raise MergescopeError(f"cannot lock {self.what}: {self.path} keeps reappearing")

    def __exit__(self, *exc) -> None:
        if _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text() or "0")
    except (OSError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group():
    """``torch.distributed`` when a process group is running (the command was launched by torchrun), else None."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _agree(error: str | None) -> None:
    """Every rank raises rank 0's error (so no rank goes on into a collective pass the others left)."""
    dist = _group()
    if dist is not None:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise MergescopeError(error)


def _inside(name: object, folder: Path) -> bool:
    return isinstance(name, (str, os.PathLike)) and Path(os.path.abspath(name)).is_relative_to(folder.absolute())


def describe_os_error(e: OSError, staging: Path | None = None, final: Path | None = None) -> str:
    """One line for a failed file operation: "disk full" when it is, else the OS's reason, with the file — for a
    write into ``staging``, named as it would have been in ``final``, and said to have left ``final`` as it was."""
    name = e.filename
    if staging is not None and final is not None and _inside(name, staging):
        name = final / Path(os.path.abspath(name)).relative_to(staging.absolute())
    what = f" {name}" if name else ""
    kept = f"; {final} is as it was" if final is not None else ""
    if e.errno in DISK_FULL:
        return f"disk full while writing{what} ({e.strerror}){kept}: free space and rerun"
    if staging is not None:
        return f"cannot write{what}: {e.strerror or e}{kept}"
    return f"{e.strerror or e}:{what}" if what else str(e)


@contextmanager
def write_run(out: str | os.PathLike, *, overwrite: bool = False, adds: bool = False) -> Iterator[Staging]:
    """Write the run folder ``out`` as a whole: yield a :class:`Staging`, put its folder in place when the block
    succeeds, drop it when the block fails (the old ``out`` untouched either way).

    Args:
        overwrite: a new run may replace a finished one (a folder holding ``manifest.json``).
        adds: the command adds to the finished run in ``out`` (compare, regress, report): the staging folder
            starts as a hard-linked copy of it.

    Raises:
        MergescopeError: ``out`` is being written by another process; holds a finished run and ``overwrite`` is
            not set; holds files that are not a mergescope run; or a write failed (disk full: said so).
    """
    final = Path(out)
    if final.name in ("", ".", ".."):  # "." or "..": the folder by its own name, so its siblings have one
        final = Path(os.path.abspath(final))
        if not final.name:
            raise MergescopeError(f"--out {out}: the root folder cannot be a run folder")
    resume = sibling(final, "resume")
    dist = _group()
    if dist is not None and dist.get_rank() != 0:
        _agree(None)  # rank 0's lock and checks
        scratch = Path(tempfile.mkdtemp(prefix="mergescope-rank-"))
        try:
            path = scratch / "run"
            _fill(path, final if adds else None)
            yield Staging(final, path, resume)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    lock, error = RunLock(sibling(final, "lock"), final), None
    try:
        lock.__enter__()
        try:
            _recover(final)
            if not adds:
                _check_replaceable(final, overwrite)
        except MergescopeError:
            lock.__exit__()
            raise
    except MergescopeError as e:
        error = str(e)
    _agree(error)  # every rank stops here when rank 0 cannot write the folder
    staging = sibling(final, "staging")
    try:
        _fill(staging, final if adds else None)
        yield Staging(final, staging, resume)
        _commit(staging, final)
    except OSError as e:
        if e.errno in DISK_FULL or _inside(e.filename, staging):
            raise MergescopeError(describe_os_error(e, staging, final)) from None
        raise
    except MergescopeError as e:  # a file of the run is named where the user knows it, not in the staging folder
        e.args = tuple(str(a).replace(str(staging), str(final)) for a in e.args)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.__exit__()
    shutil.rmtree(resume, ignore_errors=True)


def _check_replaceable(final: Path, overwrite: bool) -> None:
    if (final / MANIFEST).exists():
        if not overwrite:
            raise MergescopeError(f"{final} already holds a run (manifest.json); pass --overwrite or choose another "
                                  "--out")
    elif final.is_dir() and any(final.iterdir()):
        raise MergescopeError(f"{final} holds files but no mergescope run (no manifest.json); choose an empty or new "
                              "--out")
    elif final.exists() and not final.is_dir():
        raise MergescopeError(f"--out {final} is a file; a run is a folder")


def _recover(final: Path) -> None:
    """Undo what a killed writer left: a half-done two-rename swap is put back, a staging folder removed."""
    old = sibling(final, "old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)
    shutil.rmtree(sibling(final, "staging"), ignore_errors=True)


def _fill(staging: Path, base: Path | None) -> None:
    """A fresh staging folder: empty, or a hard-linked copy of ``base`` (copied where links are not possible)."""
    shutil.rmtree(staging, ignore_errors=True)
    if base is None or not base.is_dir():
        staging.mkdir(parents=True)
        return
    shutil.copytree(base, staging, copy_function=_link_or_copy, symlinks=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _commit(staging: Path, final: Path) -> None:
    """Put ``staging`` in place of ``final`` with one rename (an atomic exchange where the OS has one)."""
    if not final.exists():
        os.rename(staging, final)
        return
    if _exchange(staging, final):
        return  # staging now holds the old run; the caller removes it
    old = sibling(final, "old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux ``renameat2``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
