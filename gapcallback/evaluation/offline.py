r"""``gc.evaluate``: the callback's keys for samples you already have, in one call.

The same measurement (:class:`~gapcallback.evaluation.measurement.SampleMeasurement`) and the
same derivation (:func:`~gapcallback.evaluation.values.measured_values`) as
:class:`~gapcallback.GapCallback`, over given samples instead of samples drawn during training:
the same samples, reference, training set and options give the same values, key for key.

Inside a ``torch.distributed`` process group (``torchrun``) the samples are sharded across the
processes (process :math:`r` of :math:`K` takes rows :func:`~.processes.shard_rows`), and with
``shard_references=True`` the references too; the results are identical to one process. Per
process, with :math:`m` references, :math:`n` samples, :math:`t` training points of
:math:`D` values:

* samples sharded: memory :math:`(m + n/K + t) D` values; communication :math:`m` float64
  minima (one all-reduce), the dimension reservoir (:math:`\le` ``dimension_points`` points,
  one all-gather) and a few counts;
* references sharded too: memory :math:`(m/K + n + t) D`; communication :math:`m/K` minima
  per process (one all-gather), the reservoir and the counts.

The data-only preparation (the law, the memorization line, ``id/data``) runs on process zero
and its summary (a few kB) is broadcast; pass a prepared reference to skip it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gapcallback.evaluation.measurement import MEASURE_BLOCK_VALUES, SampleMeasurement
from gapcallback.evaluation.prepared import (
    GapEvaluationWarning,
    OnError,
    PreparedReference,
    check_law_options,
    prepare_reference,
)
from gapcallback.evaluation.processes import (
    Processes,
    agree,
    broadcast_from_zero,
    current_processes,
    gather_rows,
    shard_rows,
    sum_over_processes,
)
from gapcallback.evaluation.sample_metrics import check_sample_metrics
from gapcallback.evaluation.values import EVALUATION_KEYS, measured_values
from gapcallback.functional.dimension import check_dimension_method
from gapcallback.functional.gap import gap_value
from gapcallback.functional.memorized import check_memorization_ratio
from gapcallback.law import GapLaw
from gapcallback.metrics.representation_gap import RepresentationGap
from gapcallback.symmetry.base import Symmetry
from gapcallback.utils.checks import check_bool, check_exponent, check_positive_int
from gapcallback.utils.data import Transform, batch_to_tensor, check_data_source
from gapcallback.utils.value_range import FeatureStats, scale_mismatch

__all__ = ["evaluate", "evaluation_figure"]

Samples = Tensor | np.ndarray | Iterable[Any]


def evaluate(
    reference: Tensor | Iterable[Any] | PreparedReference,
    samples: Samples,
    *,
    train: Tensor | Iterable[Any] | None = None,
    p: float = 2.0,
    symmetry: Symmetry | None = None,
    law: bool | GapLaw = True,
    law_options: Mapping[str, Any] | None = None,
    dimension_method: str | None = "calibrated",
    dimension_points: int = 2000,
    memorization_ratio: float = 1.0 / 3.0,
    metrics: Sequence[str] = (),
    seed: int = 0,
    transform: Transform | None = None,
    sample_transform: Transform | None = None,
    input_key: int | str = 0,
    max_points: int | None = None,
    device: torch.device | str | None = None,
    shard_samples: bool = True,
    shard_references: bool = False,
    figure: str | Path | None = None,
    on_error: OnError = "warn",
    progress: bool = False,
) -> dict[str, float]:
    r"""Every key :class:`~gapcallback.GapCallback` logs, for samples you already have.

    .. math:: \text{gap/observed} = \frac1m \sum_i \min_j \lVert y_i - z_j \rVert^p

    and, with ``train``: ``gap/memorization`` (the same with the training set in place of the
    samples), ``gap/predicted`` (the law :math:`J n^{-p/d}` at :math:`n` = the training-set
    size), ``gap/ratio``, ``gap/effective_n``, ``gap/memorized_fraction``, ``id/law``; and
    ``id/data``, ``id/samples`` (see :mod:`gapcallback.callbacks.gap_callback` for each key's
    meaning). Absent inputs give absent keys; an optional part that fails is left out with a
    :class:`GapEvaluationWarning`.

    Args:
        reference: held-out points ``[m, *dims]`` (tensor, numpy array, DataLoader / iterable of
            batches), or a :class:`PreparedReference` (:func:`gapcallback.load_reference`,
            :func:`gapcallback.prepare_reference`), which skips the data-only preparation; its
            options (``p``, ``symmetry``, ``dimension_method``, ``law_options``) must match.
        samples: the model's samples ``[n, *dims]``, or an iterable of sample batches.
        train: the training set (same forms as ``reference``); not with a prepared reference.
        p: loss exponent of the gap.
        symmetry: orbit distances under this :class:`~gapcallback.symmetry.Symmetry`.
        law: ``True`` fits the law on ``train`` vs ``reference``; a fitted ``GapLaw`` is used as
            given; ``False``: no prediction.
        law_options: keyword arguments of :meth:`GapLaw.fit`.
        dimension_method: estimator of ``id/data`` and ``id/samples`` (``None``: neither).
        dimension_points: at most this many points enter each dimension estimate.
        memorization_ratio: threshold of the memorization test :math:`d_1 < r\, d_2`.
        metrics: the k-NN family to compute too (``"precision"``, ``"recall"``, ``"density"``,
            ``"coverage"``, ``"authenticity"``; keys ``knn/<name>``).
        seed: the seed of the law's fit and of the subsampling (the callback's ``seed``).
        transform: applied to every batch of reference, train and samples (e.g. a flatten).
        sample_transform: applied to the samples only, before ``transform`` (e.g.
            ``lambda z: (z + 1) / 2`` for samples in :math:`[-1, 1]` and data in :math:`[0, 1]`).
        input_key: index/key of the input tensor in tuple/list/dict batches.
        max_points: cap on the points taken from ``reference`` and ``train`` loaders.
        device: where the measurements run (default: CPU, or this process's GPU under NCCL).
        shard_samples: in a process group, split ``samples`` across the processes (``True``,
            every process passes the same samples); ``False``: each process passes its own
            samples (drawn on it), which are not split again.
        shard_references: in a process group, split the references across processes too.
        figure: save the figure (law and this evaluation) as a PNG at this path (matplotlib).
        on_error: ``"warn"`` (default) or ``"raise"`` on a failing optional part.
        progress: a progress bar over the sample blocks (process zero).

    Returns:
        ``{key: float}`` for the keys of :data:`~gapcallback.evaluation.values.EVALUATION_KEYS`
        that apply, in that order.

    Raises:
        ValueError, TypeError: bad options (before any work), bad samples (NaN/Inf, shapes that
            do not match the references), naming the argument.

    Example:
        >>> import torch, gapcallback as gc
        >>> g = torch.Generator().manual_seed(0)
        >>> reference, samples = torch.rand(100, 2, generator=g), torch.rand(500, 2, generator=g)
        >>> values = gc.evaluate(reference, samples, dimension_method=None)
        >>> list(values)
        ['gap/observed']
    """
    p = check_exponent(p)
    ratio = check_memorization_ratio(memorization_ratio)
    has_train = (
        reference.train is not None
        if isinstance(reference, PreparedReference)
        else train is not None
    )
    metrics = check_sample_metrics(metrics, has_train=has_train)
    if dimension_method is not None:
        check_dimension_method(dimension_method, name="dimension_method")
    dimension_points = check_positive_int(dimension_points, "dimension_points", minimum=3)
    seed = check_positive_int(seed, "seed", minimum=0)
    check_bool(shard_samples, "shard_samples")
    check_bool(shard_references, "shard_references")
    if shard_references and not shard_samples:
        raise ValueError(
            "`shard_references=True` needs every process to see every sample: it cannot be "
            "combined with `shard_samples=False` (each process's own samples)."
        )
    check_bool(progress, "progress")
    if on_error not in ("warn", "raise"):
        raise ValueError(f"`on_error` must be 'warn' or 'raise', got {on_error!r}.")
    for name, fn in (("transform", transform), ("sample_transform", sample_transform)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be a callable Tensor -> Tensor, got {fn!r}.")
    if isinstance(samples, (str, bytes)) or not isinstance(samples, (Tensor, np.ndarray, Iterable)):
        raise TypeError(
            "`samples` must be a tensor or numpy array [n, *dims], or an iterable of sample "
            f"batches, got {type(samples).__name__}."
        )
    if figure is not None and not isinstance(figure, (str, Path)):
        raise TypeError(f"`figure` must be a file path for the PNG, got {figure!r}.")
    refused = _refuse_samples(samples, reference, transform, sample_transform)
    if not agree(refused is None, device=torch.device(device) if device else _default_device()):
        raise refused or ValueError("`samples` were refused on another process (see its error).")
    if isinstance(reference, PreparedReference):
        reference.check_use(
            "given as `reference`",
            train=train,
            law=law,
            p=p,
            symmetry=symmetry,
            dimension_method=dimension_method,
            law_options=law_options,
        )
        prepared = reference
        if law is False and prepared.law is not None:
            prepared = _without_law(prepared)
    else:
        check_law_options(law_options, "evaluate")
        check_data_source(reference, "reference", max_points)
        if train is not None:
            check_data_source(train, "train", max_points)
        prepared = _prepare_on_zero(
            reference,
            train,
            p=p,
            symmetry=symmetry,
            law=law,
            law_options=law_options,
            dimension_method=dimension_method,
            dimension_points=dimension_points,
            seed=seed,
            transform=transform,
            input_key=input_key,
            max_points=max_points,
            on_error=on_error,
        )
    processes = current_processes()
    device = torch.device(device) if device is not None else _default_device()
    reference_rows = None
    if shard_references and processes.world > 1:
        reference_rows = shard_rows(int(prepared.reference.shape[0]), *processes)
    measurement = SampleMeasurement.of(
        prepared,
        device=device,
        memorization_ratio=ratio,
        dimension_method=dimension_method,
        dimension_points=dimension_points,
        seed=seed,
        stats=processes.rank == 0,
        reference_rows=reference_rows,
        metrics=metrics,
    )
    expected = tuple(prepared.reference.shape[1:])
    error: BaseException | None = None
    try:
        with torch.no_grad():
            for all_rows, own in _sample_blocks(
                samples,
                expected,
                sample_transform,
                transform,
                input_key,
                device,
                processes if shard_samples else Processes(0, 1),
                all_rows_needed=reference_rows is not None,
                progress=progress and processes.rank == 0,
            ):
                if all_rows is not None:
                    measurement.update_gap(all_rows)
                if own is not None:
                    if all_rows is None:
                        measurement.update_gap(own)
                    measurement.update_others(own)
        if measurement.drawn == 0 and processes.world == 1:
            raise ValueError("`samples` is empty; pass at least one sample.")
    except (ValueError, TypeError) as err:
        error = err
    if not agree(error is None, device=device):
        if error is not None:
            raise error
        raise ValueError("`samples`: the evaluation failed on another process (see its error).")
    observe = None
    if reference_rows is not None:
        observe = _gathered_gap
    measured = measurement.finish(sum_over_processes, observe)
    if measured.counts is not None and measured.counts.drawn == 0:
        raise ValueError("`samples` is empty; pass at least one sample.")
    values = measured_values(prepared, measured)
    if processes.rank == 0 and measurement.stats is not None:
        _warn_scale(prepared.reference, measurement.stats)
    if measured.failed:
        detail = "; ".join(f"{part}: {reason}" for part, reason in measured.failed.items())
        if on_error == "raise":
            raise RuntimeError(f"gapcallback.evaluate: {detail}")
        warnings.warn(
            f"gapcallback.evaluate left out {', '.join(measured.failed)} ({detail}); every other "
            "key was computed.",
            GapEvaluationWarning,
            stacklevel=2,
        )
    ordered = {key: values[key] for key in EVALUATION_KEYS if key in values}
    if figure is not None and processes.rank == 0:
        evaluation_figure(ordered, prepared, path=figure)
    return ordered


def evaluation_figure(
    values: Mapping[str, float],
    prepared: PreparedReference,
    path: str | Path | None = None,
    title: str = "",
) -> Any:
    """The figure of one evaluation (:func:`gapcallback.plotting.evaluation_values_figure`): the
    law with the model's gap at its effective size, and the values; saved as PNG at ``path``.

    Returns the matplotlib ``Figure``.
    """
    from gapcallback.plotting import evaluation_values_figure, render_rgb, save_png

    fig = evaluation_values_figure(
        dict(values),
        law=prepared.law,
        n_train=prepared.n_train,
        memorization_gap=prepared.memorization_gap,
        title=title,
    )
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_png(render_rgb(fig), path)
    return fig


def _default_device() -> torch.device:
    import torch.distributed as dist

    if (
        dist.is_available()
        and dist.is_initialized()
        and dist.get_backend() == "nccl"
        and torch.cuda.is_available()
    ):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _prepare_on_zero(reference: Any, train: Any, **options: Any) -> PreparedReference:
    """:func:`prepare_reference` on process zero; the others collect their own points and take
    zero's summary (or its error)."""
    processes = current_processes()
    if processes.world == 1:
        return prepare_reference(reference, train, **options)
    outcome: tuple[str, Any]
    prepared = None
    if processes.rank == 0:
        try:
            prepared = prepare_reference(reference, train, **options)
            outcome = ("ok", prepared.summary())
        except (ValueError, TypeError, RuntimeError) as err:
            outcome = ("error", (type(err).__name__, str(err)))
    else:
        outcome = ("", None)
    outcome = broadcast_from_zero(outcome)
    if outcome[0] == "error":
        kind, message = outcome[1]
        raise {"TypeError": TypeError, "RuntimeError": RuntimeError}.get(kind, ValueError)(message)
    if prepared is not None:
        return prepared
    points = prepare_reference(
        reference,
        train,
        p=options["p"],
        symmetry=options["symmetry"],
        law=False,
        dimension_method=None,
        transform=options["transform"],
        input_key=options["input_key"],
        max_points=options["max_points"],
    )
    return PreparedReference.from_summary(
        points.reference, points.train, outcome[1], options["symmetry"]
    )


def _without_law(prepared: PreparedReference) -> PreparedReference:
    import dataclasses

    return dataclasses.replace(prepared, law=None)


def _gathered_gap(gap: RepresentationGap) -> float:
    """The gap of every reference from each process's minima of its own reference rows."""
    minima = gather_rows(gap.nearest_sq_dists)
    if bool(torch.isinf(minima).any()):
        raise RuntimeError("`samples`: no sample was seen on any process.")
    return float(gap_value(minima, gap.p, gap.gap_dtype, ("reference", "samples")))


def _sample_blocks(
    samples: Samples,
    expected: tuple[int, ...],
    sample_transform: Transform | None,
    transform: Transform | None,
    input_key: int | str,
    device: torch.device,
    processes: Any,
    *,
    all_rows_needed: bool,
    progress: bool,
) -> Iterator[tuple[Tensor | None, Tensor | None]]:
    """Blocks of samples in task space, as ``(all_rows, own_rows)``.

    A tensor is cut into blocks of :data:`MEASURE_BLOCK_VALUES` values; this process's own rows
    are its :func:`shard_rows`; an iterable's batches go to the processes in turn. ``all_rows``
    is every process's rows of the block (only when the references are sharded), else ``None``.
    """
    rank, world = processes
    if isinstance(samples, np.ndarray):
        samples = batch_to_tensor(samples, input_key, "samples")
    if isinstance(samples, Tensor):
        if samples.ndim < 1 or samples.shape[0] == 0:
            raise ValueError(f"`samples` is empty (shape {tuple(samples.shape)}); pass samples.")
        own = shard_rows(int(samples.shape[0]), rank, world)
        per_row = max(1, math.prod(samples.shape[1:]))
        step = max(1, MEASURE_BLOCK_VALUES // per_row)
        if all_rows_needed:
            starts = range(0, samples.shape[0], step)
            for start in _bar(starts, progress, len(starts)):
                block = _to_task_space(
                    samples[start : start + step], expected, sample_transform, transform, device
                )
                lo, hi = max(own.start - start, 0), min(own.stop - start, block.shape[0])
                yield block, block[lo:hi] if hi > lo else None
            return
        starts = range(own.start, own.stop, step)
        for start in _bar(starts, progress, len(starts)):
            block = samples[start : min(start + step, own.stop)]
            yield None, _to_task_space(block, expected, sample_transform, transform, device)
        return
    for index, batch in enumerate(_bar(samples, progress, None)):
        mine = index % world == rank
        if not (mine or all_rows_needed):
            continue
        block = _to_task_space(
            batch_to_tensor(batch, input_key, "samples"),
            expected,
            sample_transform,
            transform,
            device,
        )
        yield (block if all_rows_needed else None), (block if mine else None)


def _to_task_space(
    block: Tensor,
    expected: tuple[int, ...],
    sample_transform: Transform | None,
    transform: Transform | None,
    device: torch.device,
) -> Tensor:
    block = block.detach()
    for name, fn in (("sample_transform", sample_transform), ("transform", transform)):
        if fn is None:
            continue
        block = fn(block)
        if not isinstance(block, Tensor):
            raise TypeError(f"`{name}` must return a tensor, got {type(block).__name__}.")
    if not block.is_floating_point():
        if block.dtype == torch.bool or block.is_complex():
            raise TypeError(
                f"`samples` have dtype {block.dtype}; pass real floating-point samples."
            )
        block = block.float()
    if tuple(block.shape[1:]) != expected:
        raise ValueError(
            f"`samples` have per-point shape {tuple(block.shape[1:])} but the references "
            f"{expected}; pass samples of the references' space (or the same `transform`)."
        )
    return block.to(device)


def _refuse_samples(
    samples: Samples, reference: Any, transform: Any, sample_transform: Any
) -> ValueError | None:
    """The error for empty, mis-shaped or non-finite samples, found before the preparation (the
    law's fit); what depends on the transforms is checked block by block as they are measured."""
    if not isinstance(samples, (Tensor, np.ndarray)):
        if isinstance(samples, Sized) and len(samples) == 0:
            return ValueError("`samples` is empty (no batches); pass at least one sample.")
        return None
    shape = tuple(samples.shape)
    if len(shape) < 1 or shape[0] == 0:
        return ValueError(f"`samples` is empty (shape {shape}); pass samples.")
    if transform is not None or sample_transform is not None:
        return None
    points = reference.reference if isinstance(reference, PreparedReference) else reference
    if isinstance(points, (Tensor, np.ndarray)) and tuple(points.shape[1:]) != shape[1:]:
        return ValueError(
            f"`samples` have per-point shape {shape[1:]} but the references "
            f"{tuple(points.shape[1:])}; pass samples of the references' space (or the same "
            "`transform`)."
        )
    values = batch_to_tensor(samples, 0, "samples")
    if not values.is_floating_point():
        return None
    step = max(1, MEASURE_BLOCK_VALUES // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        finite = torch.isfinite(values[start : start + step])
        if not bool(finite.all()):
            bad = (~finite.reshape(finite.shape[0], -1)).any(dim=1)
            first = start + int(bad.nonzero()[0, 0])
            return ValueError(
                f"`samples` contain NaN or Inf (first: row {first}); remove or repair those "
                "samples."
            )
    return None


def _bar(items: Iterable[Any], show: bool, total: int | None) -> Iterable[Any]:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(
        items, total=total, desc="gapcallback evaluate", unit="block", leave=False, delay=2.0
    )


def _warn_scale(reference: Tensor, sample_stats: FeatureStats) -> None:
    reference_stats = FeatureStats()
    reference_stats.update(reference)
    message = scale_mismatch(reference_stats, sample_stats)
    if message is not None:
        warnings.warn(
            "gapcallback.evaluate: the samples and the reference points look like they are on "
            f"different scales ({message}). Distances between them, and so every gap/* value, "
            "are not meaningful until they are.",
            GapEvaluationWarning,
            stacklevel=3,
        )
