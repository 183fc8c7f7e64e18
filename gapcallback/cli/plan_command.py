r"""``gapcallback plan``: what the data alone predicts, before any training.

From the training set and the references only: the intrinsic dimension of the data (with its
standard error), the law :math:`R_n = J n^{-p/d}` fitted on them, the gap it predicts at the
sizes asked (with the band of :meth:`GapLaw.predict_interval`) and, for a target gap, the
training-set size that reaches it (:meth:`GapLaw.samples_for`, with the range of
:meth:`GapLaw.samples_for_interval`).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from gapcallback.cli.common import (
    add_data_options,
    add_output_options,
    add_preparation_options,
    check_out_folder,
    library_version,
    prepared_reference,
    report,
    write_results,
)
from gapcallback.cli.inputs import InputError
from gapcallback.cli.outputs import staged_outputs
from gapcallback.evaluation.processes import current_processes

__all__ = ["add_parser", "run"]

FIGURE = "law.png"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "plan",
        help="predict the gap from the data alone: dimension, law, sizes needed",
        description="Fit the gap law on the training set against the references and predict: "
        "the gap at the training-set sizes given (--at), and the size needed for a target gap "
        f"(--target-gap), with intervals. With --out, writes plan.json, plan.csv and {FIGURE}.",
    )
    add_data_options(parser, train_required=False)
    parser.add_argument(
        "--at",
        type=float,
        nargs="+",
        metavar="N",
        help="training-set sizes to predict the gap at (default: 1, 2, 4 and 10 times the "
        "training set)",
    )
    parser.add_argument(
        "--target-gap",
        type=float,
        nargs="+",
        metavar="G",
        help="gap(s) to reach: the training-set size needed for each",
    )
    parser.add_argument(
        "--level", type=float, default=0.9, help="probability of the intervals (0.9)"
    )
    add_preparation_options(parser)
    add_output_options(parser, out_help="write plan.json, plan.csv and the law figure here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out_folder(args)
    if not 0 < args.level < 1:
        raise InputError(f"--level {args.level}: must be a probability in (0, 1), e.g. 0.9")
    for option, values in (("--at", args.at), ("--target-gap", args.target_gap)):
        for value in values or ():
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{option} {value:g}: must be a positive number")
    if args.train is None and not args.reference.lower().endswith(".gapref"):
        raise InputError(
            "--train: plan needs the training set (the law is fitted on it against the "
            "references); pass --train T, or a reference file as --reference"
        )
    if args.no_law:
        raise InputError("--no-law: plan is the law's prediction; leave --no-law out")
    prepared = prepared_reference(args, progress=not (args.no_progress or args.json))
    law = prepared.law
    if law is None:
        reason = prepared.failures.get("gap/predicted", "no training set")
        print(f"gapcallback: error: the gap law could not be fitted ({reason})", file=sys.stderr)
        return 1
    n_train = prepared.n_train or law.n_train
    sizes = args.at or [float(n_train * f) for f in (1, 2, 4, 10)]
    rows: list[dict[str, Any]] = []
    for n in sizes:
        low, high = law.predict_interval(float(n), args.level)
        rows.append(
            {
                "kind": "gap at size",
                "n": float(n),
                "gap": float(law.predict(float(n))),
                "low": float(low),
                "high": float(high),
            }
        )
    for target in args.target_gap or ():
        optimistic, pessimistic = law.samples_for_interval(float(target), args.level)
        rows.append(
            {
                "kind": "size for gap",
                "n": float(law.samples_for(float(target))),
                "gap": float(target),
                "low": optimistic,
                "high": pessimistic,
            }
        )
    payload = {
        "law": {
            "dimension": law.dimension,
            "dimension_std": law.dimension_std,
            "constant": law.constant,
            "constant_std": law.constant_std,
            "p": law.p,
            "n_train": n_train,
            "sizes": law.sizes.tolist(),
            "gaps": law.gaps.tolist(),
        },
        "id/data": prepared.data_dimension,
        "id/data_std": prepared.data_dimension_std,
        "gap/memorization": prepared.memorization_gap,
        "level": args.level,
        "predictions": rows,
        "inputs": {"reference": args.reference, "train": args.train},
        "gapcallback_version": library_version(),
    }
    if args.out and current_processes().rank == 0:
        with staged_outputs(args.out) as folder:
            write_results(folder, "plan", payload, rows)
            if not args.no_figure:
                _figure(law, folder / FIGURE, args.level, sizes)
    dim = f"{law.dimension:.3g} ± {law.dimension_std:.2g}"
    data_dim = (
        "-"
        if prepared.data_dimension is None
        else f"{prepared.data_dimension:.3g} ± {prepared.data_dimension_std or 0:.2g}"
    )
    title = (
        f"law R_n = J n^(-p/d): d = {dim}, J = {law.constant:.4g} ± {law.constant_std:.2g}, "
        f"p = {law.p:g}, fitted on {len(law.sizes)} sizes up to n = {n_train}; id/data = "
        f"{data_dim}; intervals at {args.level:g}"
    )
    report(args, payload, rows, ["kind", "n", "gap", "low", "high"], title=title)
    return 0


def _figure(law: Any, path: Any, level: float, sizes: list[float]) -> None:
    try:
        from gapcallback.plotting import plot_law, render_rgb, save_png

        fig, _ = plot_law(law, n_max=max([*sizes, float(law.sizes.max()) * 4]), level=level)
        save_png(render_rgb(fig), path)
    except ImportError as err:
        print(f"gapcallback: no figure ({err})", file=sys.stderr)
