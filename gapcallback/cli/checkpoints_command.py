"""``gapcallback checkpoints``: the gap curve of a finished run, drawn post hoc from its checkpoints.

For each checkpoint (in order of its global step when the file or its name tells it, else of
its name) the user's function loads the model and draws samples,
``function(checkpoint_path: str, n: int) -> Tensor [n, *dims]`` (passed ``generator=`` too
when its signature takes it, seeded per checkpoint and process), and the samples are evaluated
as ``gapcallback evaluate`` does. One row per checkpoint goes to ``checkpoints.csv`` /
``checkpoints.json``, the curve to the figure. A checkpoint whose function fails is reported
and left out; the exit code is then 1. Under ``torchrun`` every process draws its share of the
samples.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

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
from gapcallback.cli.inputs import InputError, load_callable
from gapcallback.cli.outputs import staged_outputs
from gapcallback.evaluation.offline import evaluate
from gapcallback.evaluation.processes import agree, current_processes, shard_rows
from gapcallback.utils.rng import derive_seed, isolated_rng
from gapcallback.utils.signatures import accepts_keyword

__all__ = ["add_parser", "checkpoint_step", "run"]

FIGURE = "gap_checkpoints.png"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "checkpoints",
        help="the gap curve of a finished run, from its checkpoints",
        description="Load each checkpoint through your function, sample from it and evaluate "
        "the samples: one row per checkpoint (checkpoints.csv/.json) and the curve "
        f"({FIGURE}) in --out.",
    )
    parser.add_argument(
        "--sampler",
        required=True,
        metavar="MODULE:FUNCTION",
        help="function(checkpoint_path, n) -> Tensor [n, *dims] (optionally taking generator=)",
    )
    parser.add_argument(
        "--checkpoints",
        required=True,
        metavar="GLOB",
        help="checkpoint files, a glob pattern (quote it: 'ckpts/*.ckpt')",
    )
    add_data_options(parser)
    parser.add_argument(
        "--num-samples", type=int, default=2000, metavar="N", help="samples per checkpoint (2000)"
    )
    add_sample_options(parser)
    add_preparation_options(parser)
    add_output_options(parser, out_help="write checkpoints.json, checkpoints.csv and the figure")
    parser.set_defaults(run=run)


def checkpoint_step(path: Path) -> tuple[int | None, int | None]:
    """``(epoch, global_step)`` of a checkpoint: from the file (read with ``weights_only=True``
    and memory-mapped, so nothing runs and little is read) or from a Lightning-style name
    (``epoch=3-step=400.ckpt``); ``None`` where neither tells."""
    epoch = step = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(state, dict):
            epoch = state.get("epoch") if isinstance(state.get("epoch"), int) else None
            step = state.get("global_step") if isinstance(state.get("global_step"), int) else None
    except Exception:
        pass
    name = path.name
    if epoch is None and (m := re.search(r"epoch=(\d+)", name)):
        epoch = int(m.group(1))
    if step is None and (m := re.search(r"step=(\d+)", name)):
        step = int(m.group(1))
    return epoch, step


def run(args: argparse.Namespace) -> int:
    check_out_folder(args)
    if args.num_samples < 1:
        raise InputError(f"--num-samples {args.num_samples}: must be at least 1")
    sampler = load_callable(args.sampler, option="--sampler")
    paths = sorted(Path(p) for p in glob.glob(str(Path(args.checkpoints).expanduser())))
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise InputError(
            f"--checkpoints {args.checkpoints}: matches no file; check the pattern (quote it so "
            "the shell does not expand it)"
        )
    transform, sample_transform = transforms(args)
    progress = not (args.no_progress or args.json)
    prepared = prepared_reference(args, progress=progress)
    steps = {p: checkpoint_step(p) for p in paths}
    paths.sort(key=lambda p: (steps[p][1] is None, steps[p][1] or 0, p.name))
    processes = current_processes()
    own = shard_rows(args.num_samples, *processes)
    n_local = own.stop - own.start
    takes_generator = accepts_keyword(sampler, "generator")
    rows: list[dict[str, Any]] = []
    failed = 0
    for index, path in enumerate(paths):
        epoch, step = steps[path]
        row: dict[str, Any] = {"checkpoint": str(path), "epoch": epoch, "step": step}
        samples, error = _draw(
            sampler, path, n_local, derive_seed(args.seed, index, processes.rank), takes_generator
        )
        if samples is not None:
            try:
                samples = apply(sample_transform, samples, "--sample-transform", str(path))
                samples = apply(transform, samples, "--transform", str(path))
            except InputError as err:
                samples, error = None, str(err)
        if not agree(samples is not None):
            failed += 1
            row["error"] = error or "the sampler failed on another process"
            if processes.rank == 0:
                print(f"gapcallback: {path}: {row['error']}; left out", file=sys.stderr)
            rows.append(row)
            continue
        assert samples is not None
        try:
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
                shard_samples=False,
                law=not args.no_law,
            )
        except (ValueError, TypeError) as err:  # bad samples of this checkpoint (NaN, shape)
            failed += 1
            row["error"] = str(err)
            if processes.rank == 0:
                print(f"gapcallback: {path}: {err}; left out", file=sys.stderr)
            rows.append(row)
            continue
        row.update(values)
        rows.append(row)
        if progress and processes.rank == 0:
            print(
                f"gapcallback: {index + 1}/{len(paths)} {path.name}: gap/observed = "
                f"{values['gap/observed']:.6g}",
                file=sys.stderr,
            )
    payload = {
        "checkpoints": rows,
        "num_samples": args.num_samples,
        "inputs": {"reference": args.reference, "train": args.train, "sampler": args.sampler},
        "gapcallback_version": library_version(),
    }
    if args.out and processes.rank == 0:
        with staged_outputs(args.out) as folder:
            write_results(folder, "checkpoints", payload, rows)
            done = [r for r in rows if "error" not in r]
            if done and not args.no_figure:
                _figure(done, prepared, folder / FIGURE)
    columns = ["checkpoint", "step", "gap/observed", "gap/ratio", "gap/memorized_fraction"]
    present = [c for c in columns if any(c in r for r in rows)]
    report(args, payload, rows, present, title=f"{len(rows)} checkpoints, {failed} failed")
    return 1 if failed else 0


def _draw(
    sampler: Any, path: Path, n: int, seed: int, takes_generator: bool
) -> tuple[Tensor | None, str | None]:
    """The user's samples of one checkpoint, or the reason they could not be drawn."""
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}
    try:
        with isolated_rng(seed), torch.no_grad():
            samples = sampler(str(path), n, **kwargs)
    except Exception as err:
        return None, f"--sampler raised {type(err).__name__}: {err}"
    if not isinstance(samples, Tensor):
        return None, f"--sampler returned {type(samples).__name__}, not a tensor"
    if samples.ndim < 1 or samples.shape[0] != n:
        return None, f"--sampler returned shape {tuple(samples.shape)}, {n} samples were asked"
    return samples.detach().cpu(), None


def _figure(rows: list[dict[str, Any]], prepared: Any, path: Path) -> None:
    try:
        from gapcallback.plotting import gap_history_figure, render_rgb, save_png
    except ImportError as err:
        print(f"gapcallback: no figure ({err})", file=sys.stderr)
        return
    history = [
        {"evaluation": i, "epoch": r["epoch"] or 0, "step": r["step"] or i, **r}
        for i, r in enumerate(rows)
    ]
    try:
        fig = gap_history_figure(
            history,
            law=prepared.law,
            n_train=prepared.n_train,
            memorization_gap=prepared.memorization_gap,
        )
        save_png(render_rgb(fig), path)
    except ImportError as err:
        print(f"gapcallback: no figure ({err})", file=sys.stderr)
