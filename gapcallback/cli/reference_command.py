"""``gapcallback reference``: prepare the data once, write a reference file to reuse everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gapcallback.cli.common import (
    add_data_options,
    add_preparation_options,
    prepared_reference,
    report,
)
from gapcallback.cli.inputs import InputError
from gapcallback.evaluation.processes import current_processes
from gapcallback.evaluation.reference_file import SUFFIX, save_reference

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "reference",
        help=f"write a reference file ({SUFFIX}): points, law, id/data, memorization line",
        description="Prepare the data-only quantities (the law fitted on the training set "
        "against the references, id/data, the memorization line) once and write them with the "
        f"points to a reference file ({SUFFIX}, an npz with JSON metadata: no pickle). Pass it "
        "as --reference to evaluate/plan/checkpoints, or gc.load_reference(path) to "
        "GapCallback(reference=...).",
    )
    add_data_options(parser)
    parser.add_argument(
        "--out", required=True, metavar="FILE", help=f"the reference file to write (*{SUFFIX})"
    )
    parser.add_argument(
        "--no-train-points",
        action="store_true",
        help="leave the training points out of the file (smaller; no memorized fraction then)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the file's summary as JSON on stdout"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    add_preparation_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() != SUFFIX:
        raise InputError(f"--out {args.out}: a reference file's name ends in {SUFFIX}")
    if out.exists() and out.is_dir():
        raise InputError(f"--out {args.out}: is a folder; give a file name ending in {SUFFIX}")
    if args.reference.lower().endswith(SUFFIX):
        raise InputError(
            f"--reference {args.reference}: is already a reference file; pass the data points"
        )
    prepared = prepared_reference(args, progress=not (args.no_progress or args.json))
    if current_processes().rank == 0:
        save_reference(prepared, out, include_train=not args.no_train_points)
    summary = prepared.summary()
    payload = {"file": str(out), "data_hash": prepared.data_hash, **summary}
    rows = [
        {"quantity": "reference points", "value": summary["n_reference"]},
        {"quantity": "training points", "value": summary["n_train"]},
        {"quantity": "gap/memorization", "value": summary["memorization_gap"]},
        {"quantity": "id/data", "value": summary["data_dimension"]},
        {"quantity": "id/law", "value": None if prepared.law is None else prepared.law.dimension},
    ]
    rows += [
        {"quantity": f"{part} failed", "value": why} for part, why in prepared.failures.items()
    ]
    report(args, payload, rows, ["quantity", "value"], title=f"wrote {out}")
    return 0
