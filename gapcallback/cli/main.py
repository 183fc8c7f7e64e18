"""The ``gapcallback`` command line: ``evaluate``, ``plan``, ``checkpoints``, ``reference``.

Exit codes: 0 success; 1 the work failed (a law that cannot be fitted, a checkpoint whose
sampler failed, an unexpected error); 2 bad input or usage (a missing file, an unknown
extension, mismatched shapes, NaN rows, an option out of range), with one line on stderr naming
the file or option and the fix, and no outputs written.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the command joins a process group
(gloo on CPU, NCCL with ``--device cuda``); only process zero prints and writes files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist

from gapcallback.cli import (
    checkpoints_command,
    evaluate_command,
    plan_command,
    reference_command,
)
from gapcallback.cli.common import environment_world, library_version
from gapcallback.cli.inputs import InputError

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gapcallback",
        description="Representation gap, intrinsic dimension and the gap law, offline: over "
        "saved samples (evaluate), a run's checkpoints (checkpoints), or the data alone "
        "(plan, reference). See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"gapcallback {library_version()}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (evaluate_command, plan_command, checkpoints_command, reference_command):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    logging.basicConfig(level=logging.WARNING, format="gapcallback: %(message)s")
    joined = _join_process_group(args)
    try:
        return int(args.run(args))
    except (InputError, ValueError, TypeError, FileNotFoundError) as err:
        if args.traceback:
            raise
        _error(err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_FAILED
    except Exception as err:
        if args.traceback:
            raise
        _error(f"{type(err).__name__}: {err} (rerun with --traceback for details)")
        return EXIT_FAILED
    finally:
        if joined:
            dist.destroy_process_group()


def _error(err: object) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        message = " ".join(str(err).split())
        print(f"gapcallback: error: {message}", file=sys.stderr)


def _join_process_group(args: argparse.Namespace) -> bool:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU); ``False`` when not launched
    by torchrun or already joined."""
    if environment_world() <= 1 or dist.is_initialized():
        return False
    device = getattr(args, "device", None)
    use_cuda = device is not None and str(device).startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        args.device = f"cuda:{torch.cuda.current_device()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return True
