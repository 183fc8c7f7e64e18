"""``gapcallback evaluate``: the callback's keys for saved model samples."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gapcallback.cli.common import (
    add_data_options,
    add_output_options,
    add_preparation_options,
    add_sample_options,
    apply,
    check_out_folder,
    dimension_method,
    library_version,
    prepared_reference,
    report,
    transforms,
    write_results,
)
from gapcallback.cli.inputs import load_points
from gapcallback.cli.outputs import staged_outputs
from gapcallback.evaluation.offline import evaluate, evaluation_figure
from gapcallback.evaluation.processes import current_processes

__all__ = ["add_parser", "run"]

FIGURE = "gap_figure.png"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="the gap, memorization and dimensions of saved model samples",
        description="Every key GapCallback logs (gap/observed, gap/predicted, gap/ratio, ...) for "
        "samples saved from a model. Prints a table; with --out, writes metrics.json, "
        f"metrics.csv and {FIGURE}. Under `torchrun --nproc-per-node K -m gapcallback evaluate` "
        "the samples are sharded across the K processes (results identical to one process).",
    )
    add_data_options(parser)
    parser.add_argument(
        "--samples", required=True, metavar="S", help="the model's samples (same formats)"
    )
    add_sample_options(parser)
    parser.add_argument(
        "--shard-references",
        action="store_true",
        help="under torchrun, split the references across processes too",
    )
    add_preparation_options(parser)
    add_output_options(parser, out_help="write metrics.json, metrics.csv and the figure here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_out_folder(args)
    transform, sample_transform = transforms(args)
    samples = load_points(args.samples, option="--samples")
    samples = apply(sample_transform, samples, "--sample-transform", "--samples")
    samples = apply(transform, samples, "--transform", "--samples")
    progress = not (args.no_progress or args.json)
    prepared = prepared_reference(
        args, samples={f"--samples {args.samples}": samples}, progress=progress
    )
    values = evaluate(
        prepared,
        samples,
        p=args.p,
        dimension_method=dimension_method(args),
        dimension_points=args.dimension_points,
        memorization_ratio=args.memorization_ratio,
        metrics=tuple(args.metrics),
        seed=args.seed,
        device=args.device,
        shard_references=args.shard_references,
        progress=progress,
        law=not args.no_law,
    )
    processes = current_processes()
    payload: dict[str, Any] = {
        "metrics": values,
        "n_samples": int(samples.shape[0]),
        "n_reference": int(prepared.reference.shape[0]),
        "n_train": prepared.n_train,
        "inputs": {"reference": args.reference, "train": args.train, "samples": args.samples},
        "options": {
            "p": args.p,
            "dimension_method": dimension_method(args),
            "dimension_points": args.dimension_points,
            "memorization_ratio": args.memorization_ratio,
            "metrics": list(args.metrics),
            "seed": args.seed,
            "law": prepared.law is not None,
        },
        "processes": processes.world,
        "gapcallback_version": library_version(),
    }
    rows = [{"key": key, "value": value} for key, value in values.items()]
    if args.out and processes.rank == 0:
        with staged_outputs(args.out) as folder:
            write_results(folder, "metrics", payload, [values])
            if not args.no_figure:
                _figure(values, prepared, folder / FIGURE, _title(args, payload))
    report(args, payload, rows, ["key", "value"], title=_title(args, payload))
    return 0


def _figure(values: dict[str, float], prepared: Any, path: Path, title: str) -> None:
    try:
        evaluation_figure(values, prepared, path=path, title=title)
    except ImportError as err:  # matplotlib is an optional extra
        import sys

        print(f"gapcallback: no figure ({err})", file=sys.stderr)


def _title(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    train = f", {payload['n_train']} training" if payload["n_train"] else ""
    return (
        f"{payload['n_samples']} samples ({args.samples}) against {payload['n_reference']} "
        f"reference{train} points"
    )
