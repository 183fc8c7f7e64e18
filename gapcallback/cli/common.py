"""What the commands share: their common options, reading the data, reporting the results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gapcallback.cli.inputs import InputError, check_same_features, load_callable, load_points
from gapcallback.cli.outputs import format_table, write_csv, write_json
from gapcallback.evaluation.prepared import (
    PreparedReference,
    preparation_stages,
    prepare_reference,
    stage_progress,
)
from gapcallback.evaluation.processes import current_processes
from gapcallback.evaluation.reference_file import SUFFIX, library_version, load_reference
from gapcallback.evaluation.sample_metrics import SAMPLE_METRICS

__all__ = [
    "add_data_options",
    "add_output_options",
    "add_preparation_options",
    "check_out_folder",
    "is_reference_file",
    "law_options",
    "library_version",
    "prepared_reference",
    "report",
    "transforms",
]


def add_data_options(parser: argparse.ArgumentParser, *, train_required: bool = False) -> None:
    """``--reference``, ``--train``, ``--transform``, ``--input-key`` (not used for files)."""
    parser.add_argument(
        "--reference",
        required=True,
        metavar="R",
        help=f"held-out data points (.npy, .npz[:name], .pt[:name], .safetensors[:name], a folder "
        f"of PNG/JPEG images), or a reference file ({SUFFIX}) written by `gapcallback reference`",
    )
    parser.add_argument(
        "--train",
        required=train_required,
        metavar="T",
        help="the training set (same formats); enables the law, the memorization line and the "
        "memorized fraction. Not with a reference file, which holds its own.",
    )
    parser.add_argument(
        "--transform",
        metavar="MODULE:FUNCTION",
        help="a function Tensor -> Tensor applied to every batch of reference, train and "
        "samples (e.g. a feature extractor); with a reference file, to the samples only",
    )


def add_sample_options(parser: argparse.ArgumentParser) -> None:
    """What is measured on the samples: ``--sample-transform``, ``--memorization-ratio``,
    ``--metrics``."""
    parser.add_argument(
        "--sample-transform",
        metavar="MODULE:FUNCTION",
        help="applied to the samples only, before --transform (e.g. map [-1, 1] to [0, 1])",
    )
    parser.add_argument(
        "--memorization-ratio",
        type=float,
        default=1.0 / 3.0,
        metavar="R",
        help="a sample copies a training point when d1 < R d2 (1/3)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=[],
        choices=SAMPLE_METRICS,
        metavar="NAME",
        help="the k-NN family too: precision recall density coverage authenticity (keys knn/*;"
        " authenticity needs the training set)",
    )


def add_preparation_options(parser: argparse.ArgumentParser) -> None:
    """The options of the data-only preparation (law, id/data)."""
    parser.add_argument("--p", type=float, default=2.0, help="loss exponent of the gap (2)")
    parser.add_argument(
        "--no-law", action="store_true", help="do not fit the gap law (no gap/predicted)"
    )
    parser.add_argument(
        "--law-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a GapLaw.fit option, VALUE as JSON (e.g. --law-option repeats=3 --law-option "
        "'sizes=[100,200,400]'); repeatable",
    )
    parser.add_argument(
        "--dimension-method",
        default="calibrated",
        metavar="METHOD",
        help="estimator of id/data and id/samples: calibrated (default), twonn, mle, gap, or none",
    )
    parser.add_argument(
        "--dimension-points",
        type=int,
        default=2000,
        metavar="N",
        help="at most N points enter each intrinsic-dimension estimate (2000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of all randomness (0)")


def add_output_options(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """``--out``, ``--json``, ``--no-figure``, ``--no-progress``, ``--device``."""
    parser.add_argument("--out", metavar="DIR", help=out_help)
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout (nothing else)"
    )
    parser.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--device",
        metavar="DEVICE",
        help="where the searches run: cpu (default) or cuda[:i] (under torchrun: the process's "
        "GPU with NCCL)",
    )


def check_out_folder(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` (an output folder) that exists and is not a folder, before any work."""
    out = getattr(args, "out", None)
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise InputError(
            f"--out {out}: exists and is not a folder; pass a folder path (created if needed)"
        )


def dimension_method(args: argparse.Namespace) -> str | None:
    value = args.dimension_method
    return None if value is None or str(value).lower() == "none" else str(value)


def law_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["repeats=3", "sizes=[100,200]"]`` -> ``{"repeats": 3, "sizes": [100, 200]}``."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InputError(
                f"--law-option {pair!r}: expected KEY=VALUE (e.g. --law-option repeats=3)"
            )
        try:
            options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.strip()] = raw
    return options


def is_reference_file(spec: str) -> bool:
    return spec.lower().endswith(SUFFIX)


def transforms(args: argparse.Namespace) -> tuple[Callable[..., Any] | None, ...]:
    """``(transform, sample_transform)`` loaded from their ``MODULE:FUNCTION`` options."""
    out = []
    for option in ("transform", "sample_transform"):
        spec = getattr(args, option, None)
        flag = "--" + option.replace("_", "-")
        out.append(None if spec is None else load_callable(spec, option=flag))
    return tuple(out)


def apply(transform: Callable[..., Any] | None, points: Tensor, option: str, what: str) -> Tensor:
    """``transform(points)`` with an error naming the option and the data."""
    if transform is None:
        return points
    try:
        with torch.no_grad():
            out = transform(points)
    except Exception as err:
        raise InputError(
            f"{option}: raised {type(err).__name__} on {what}: {err}; check the function"
        ) from None
    if not isinstance(out, Tensor):
        raise InputError(f"{option}: returned {type(out).__name__} on {what}, not a tensor")
    return out


def prepared_reference(
    args: argparse.Namespace,
    *,
    samples: dict[str, Tensor] | None = None,
    progress: bool = True,
) -> PreparedReference:
    """The prepared reference of the command: a reference file as it is, or the reference (and
    train) files loaded, transformed and prepared (:func:`prepare_reference`).

    ``samples`` (label -> tensor, already in task space) join the per-point shape check.
    """
    transform, _ = transforms(args)
    options = {
        "p": args.p,
        "dimension_method": dimension_method(args),
        "law_options": law_options(args.law_option) if args.law_option else None,
    }
    if is_reference_file(args.reference):
        if args.train is not None:
            raise InputError(
                f"--train {args.train}: a reference file ({args.reference}) holds its own "
                "training set; leave --train out"
            )
        path = Path(args.reference).expanduser()
        if not path.is_file():
            raise InputError(
                f"--reference {args.reference}: no such file; write one with `gapcallback "
                "reference --reference R --train T --out FILE`"
            )
        try:
            prepared = load_reference(path)
            prepared.check_options(
                str(args.reference), **{k: v for k, v in options.items() if v is not None}
            )
        except ValueError as err:
            raise InputError(f"--reference {args.reference}: {err}") from None
        if getattr(args, "no_law", False) and prepared.law is not None:
            import dataclasses

            prepared = dataclasses.replace(prepared, law=None)
        if samples:
            check_same_features({f"--reference {args.reference}": prepared.reference, **samples})
        return prepared
    reference = apply(
        transform, load_points(args.reference, option="--reference"), "--transform", "--reference"
    )
    named = {f"--reference {args.reference}": reference}
    train = None
    if args.train is not None:
        train = apply(
            transform, load_points(args.train, option="--train"), "--transform", "--train"
        )
        named[f"--train {args.train}"] = train
    check_same_features({**named, **(samples or {})})
    law = not args.no_law
    method = options["dimension_method"]
    stages = preparation_stages(train is not None, law, method)
    show = progress and current_processes().rank == 0
    with stage_progress(stages, desc="gapcallback preparing", show=show) as on_stage:
        return prepare_reference(
            reference,
            train,
            p=args.p,
            law=law,
            law_options=options["law_options"],
            dimension_method=method,
            dimension_points=args.dimension_points,
            seed=args.seed,
            on_stage=on_stage,
        )


def report(
    args: argparse.Namespace,
    payload: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Print the result: JSON on stdout with ``--json``, else a title and a table (process zero
    only)."""
    if current_processes().rank != 0:
        return
    if args.json:
        json.dump(_strict(payload), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if title:
            print(title)
        print(format_table(list(rows), list(columns) if columns else None))
    sys.stdout.flush()


def write_results(
    folder: Path, stem: str, payload: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]
) -> list[Path]:
    """``{stem}.json`` (the payload) and ``{stem}.csv`` (the rows) in ``folder``."""
    write_json(folder / f"{stem}.json", payload)
    write_csv(folder / f"{stem}.csv", rows)
    return [folder / f"{stem}.json", folder / f"{stem}.csv"]


def _strict(obj: Any) -> Any:
    """NaN/inf -> None, so stdout is strict JSON like the files."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Mapping):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def environment_world() -> int:
    """``WORLD_SIZE`` set by torchrun (1 without it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1
