"""The command line: every command is a thin call of a study (:mod:`mergescope.studies`).

    mergescope demo [--out DIR]                      the whole study on the embedded digits, with a report
    mergescope train --arch NAME --data SPEC --out CKPT [--seed S] [--epochs N] [--part a|b]
    mergescope sweep CKPT_A CKPT_B --data SPEC --out DIR   align two models, merge along α with every method
    mergescope merge CKPT_0 CKPT_1 [CKPT ...] --data SPEC --out DIR   N models into one with every method
    mergescope probe CKPT_A CKPT_B [CKPT ...] --data SPEC --out DIR   top-k images of every channel, aligned to A
    mergescope compare RUN_DIR                       τ, δ, overlap, correlation per channel pair; Observations 1-3
    mergescope regress RUN_DIR                       A's channels as (sparse) linear maps of B's: R², recovered top-k
    mergescope report RUN_DIR                        re-render report.html (and feature pages) from stored results
    mergescope layers --arch NAME | --checkpoint CKPT   the observable layers and permutation groups
    mergescope methods                               every merge method: family, paper, hyperparameters
    mergescope bench-merge --data SPEC --out DIR     every method on workloads made for each family: one table

Checkpoints can be mergescope's (safetensors + JSON sidecar) or any state-dict file with ``--arch NAME``
(zoo names, ``tv_*`` torchvision, ``timm:NAME``). Every option can also come from ``--config FILE`` (TOML or
YAML; keys are the option names), the command line overriding it.

Building the parser imports neither torch nor the studies, so ``mergescope --help`` answers at once; the
command's function imports what it needs. Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY``
is set before torch loads: on a loaded machine spinning threads fight for the cores and 2-thread torch runs
2-5x slower); a user's own setting wins.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..errors import MergescopeError  # noqa: E402  (after the environment is set)
from .config import resolve  # noqa: E402
from .parser import build_parser  # noqa: E402

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input ends in one line ``error: ...`` and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        resolve(parser, args, argv)
        if hasattr(args, "workers"):  # --workers, --decode: the process's decoding (every data pass)
            from .._argtypes import resolve_device
            from ..data import set_decode_device, set_workers
            set_workers(args.workers)
            set_decode_device(resolve_device(args.device) if args.decode == "device" else None)
        if os.environ.get("WORLD_SIZE", "1") != "1":  # under torchrun: every pass sharded; rank 0 prints
            from ..distributed import init_from_env, world
            if init_from_env() and world()[0] != 0:
                sys.stdout = open(os.devnull, "w")
        args.func(args)
    except MergescopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written (disk full, permissions...): the OS's reason
        from ..runs.transaction import describe_os_error

        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `mergescope methods | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
