r"""Reference data prepared once: the points and every quantity that depends on the data only.

A gap evaluation needs, besides the model's samples, things that depend on the data alone: the
fitted law :math:`R_n = J n^{-p/d}` of the training set against the references, the memorization
line (the references' gap to the training set) and the data's intrinsic dimension. They cost
more than an evaluation (the law is a dozen searches), so they are computed once, by
:func:`prepare_reference`, and held in a :class:`PreparedReference`: what
:class:`~gapcallback.GapCallback` computes at the start of fitting, what
:func:`~gapcallback.evaluate` uses, and what a reference file (:mod:`.reference_file`) stores.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from gapcallback.functional.dimension import (
    check_dimension_method,
    intrinsic_dimension_estimate,
)
from gapcallback.functional.gap import gap_value, representation_gap
from gapcallback.law import GapLaw
from gapcallback.symmetry.base import Symmetry
from gapcallback.utils.checks import check_exponent, check_positive_int, compute_dtype
from gapcallback.utils.data import Transform, check_data_source, collect_points
from gapcallback.utils.rng import derive_seed, isolated_rng

__all__ = [
    "DATA_SEED",
    "GapEvaluationWarning",
    "PreparedReference",
    "check_law_options",
    "data_hash",
    "preparation_stages",
    "prepare_reference",
    "stage_progress",
    "symmetry_name",
]

DATA_SEED = 0xDA7A
"""Mixed into the seed for the preparation's random streams (subsampling, the law's fit)."""

OnError = Literal["warn", "raise"]


class GapEvaluationWarning(UserWarning):
    """A gap evaluation was skipped or a part of it failed (failing sampler, NaN samples, samples
    on another scale than the references, a law that could not be fitted, ...)."""


def symmetry_name(symmetry: Symmetry | None) -> str | None:
    """The symmetry as its ``repr`` (``"CyclicShifts(dims=(-1,))"``), the form options compare."""
    return None if symmetry is None else repr(symmetry)


def data_hash(reference: Tensor, train: Tensor | None = None) -> str:
    """SHA-256 (hex) of the points' dtypes, shapes and bytes: reference, then train if given."""
    digest = hashlib.sha256()
    for name, points in (("reference", reference), ("train", train)):
        if points is None:
            continue
        points = points.detach().cpu().contiguous()
        digest.update(f"{name}:{points.dtype}:{tuple(points.shape)};".encode())
        digest.update(points.view(torch.uint8).numpy().tobytes() if points.numel() else b"")
    return digest.hexdigest()


def check_law_options(options: object, owner: str = "prepare_reference") -> dict[str, Any]:
    """``law_options`` as a dict of checked :meth:`GapLaw.fit` options (:attr:`GapLaw.FIT_OPTIONS`;
    ``train``, ``reference``, ``p``, ``symmetry`` and ``seed`` are passed by the caller itself)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"`law_options` must be a dict of GapLaw.fit keyword arguments, got "
            f"{type(options).__name__}."
        )
    own = sorted(k for k in options if k in ("train", "reference", "p", "symmetry", "seed"))
    if own:
        raise TypeError(
            f"`law_options` has key(s) {own}: those are {owner}'s own arguments; pass them to "
            f"{owner} itself. `law_options` takes {list(GapLaw.FIT_OPTIONS)}."
        )
    try:
        return GapLaw.check_fit_options(dict(options))
    except (TypeError, ValueError) as err:
        raise type(err)(f"`law_options`: {err}") from None


@dataclass(frozen=True, eq=False)
class PreparedReference:
    r"""Reference (and training) points with their data-only quantities, computed once.

    Build with :func:`prepare_reference`, or read a reference file with
    :func:`~gapcallback.load_reference`; pass as ``reference=`` to
    :class:`~gapcallback.GapCallback` or :func:`~gapcallback.evaluate` to skip the preparation.

    Attributes:
        reference: ``[m, *dims]`` held-out points, as measured (after any ``transform``).
        train: ``[n, *dims]`` training points, or ``None`` (no memorization test, no law).
        p: the gap's loss exponent.
        symmetry: the symmetry all distances were taken under, or ``None``.
        law: the fitted :class:`~gapcallback.GapLaw` (``None`` without train, when disabled or
            when it could not be fitted: see ``failures``).
        memorization_gap: the references' gap to the training set :math:`R_\text{mem}`.
        data_dimension: intrinsic dimension of the training set (of the references without it).
        data_dimension_std: its standard error.
        failures: data-only parts that could not be computed (``"gap/predicted"``,
            ``"id/data"``) -> reason.
        options: the options it was prepared with: ``law`` (``"fit"``, ``"given"`` or
            ``"off"``), ``law_options``, ``dimension_method``, ``dimension_points``, ``seed``.
        n_train: number of training points (``None`` without train).
    """

    reference: Tensor
    train: Tensor | None
    p: float
    symmetry: Symmetry | None
    law: GapLaw | None
    memorization_gap: float | None
    data_dimension: float | None
    data_dimension_std: float | None
    failures: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int | None:
        return None if self.train is None else int(self.train.shape[0])

    @property
    def data_hash(self) -> str:
        """:func:`data_hash` of the reference and training points."""
        return data_hash(self.reference, self.train)

    def summary(self) -> dict[str, Any]:
        """The data-only quantities as plain Python (JSON-able): what a reference file stores
        besides the points."""
        return {
            "p": self.p,
            "symmetry": symmetry_name(self.symmetry),
            "n_reference": int(self.reference.shape[0]),
            "n_train": self.n_train,
            "point_shape": list(self.reference.shape[1:]),
            "law": None if self.law is None else self.law.state_dict(),
            "memorization_gap": self.memorization_gap,
            "data_dimension": self.data_dimension,
            "data_dimension_std": self.data_dimension_std,
            "failures": dict(self.failures),
            "options": dict(self.options),
        }

    @classmethod
    def from_summary(
        cls,
        reference: Tensor,
        train: Tensor | None,
        summary: Mapping[str, Any],
        symmetry: Symmetry | None = None,
    ) -> PreparedReference:
        """Rebuild from the points and :meth:`summary` (the symmetry object itself is not in
        the summary, only its name: pass it when the summary names one)."""
        if summary.get("symmetry") != symmetry_name(symmetry):
            raise ValueError(
                f"The summary was prepared with symmetry={summary.get('symmetry')!r}, but "
                f"symmetry={symmetry_name(symmetry)!r} is given; pass the same symmetry."
            )
        law_state = summary.get("law")
        return cls(
            reference=reference,
            train=train,
            p=float(summary["p"]),
            symmetry=symmetry,
            law=None if law_state is None else GapLaw.from_state_dict(dict(law_state)),
            memorization_gap=summary.get("memorization_gap"),
            data_dimension=summary.get("data_dimension"),
            data_dimension_std=summary.get("data_dimension_std"),
            failures=dict(summary.get("failures") or {}),
            options=dict(summary.get("options") or {}),
        )

    def check_use(
        self, where: str, *, train: object = None, law: object = True, **asked: Any
    ) -> None:
        """Check that this prepared reference can stand for a caller's ``reference`` given its
        ``train`` (must be ``None``: the prepared reference holds its own), ``law`` (not a fitted
        ``GapLaw``: it holds its own) and options ``asked`` (:meth:`check_options`)."""
        if train is not None:
            raise ValueError(
                f"The prepared reference {where} holds its own training set: leave `train=None` "
                "(or pass the raw reference points with `train=`)."
            )
        if isinstance(law, GapLaw):
            raise ValueError(
                f"The prepared reference {where} holds its own law: pass `law=True` to use it or "
                "`law=False` for no prediction."
            )
        self.check_options(where, **asked)

    def check_options(self, where: str, **asked: Any) -> None:
        """Raise ``ValueError`` naming every option of ``asked`` that differs from the ones this
        reference was prepared with (``p``, ``symmetry``, ``dimension_method``, ...).

        ``where`` names the prepared reference in the message (e.g. ``"ref.gapref"``). Options
        given as ``None`` are not compared.
        """
        prepared = {"p": self.p, "symmetry": symmetry_name(self.symmetry), **self.options}
        differ = []
        for name, value in asked.items():
            if value is None or name not in prepared:
                continue
            if name == "symmetry":
                value = symmetry_name(value)
            elif name == "law_options":
                value = check_law_options(value)
            if not _same(prepared[name], value):
                differ.append(f"{name}={prepared[name]!r} there, {value!r} asked")
        if differ:
            raise ValueError(
                f"The prepared reference {where} was built with other options than asked: "
                f"{'; '.join(differ)}. Rebuild it with these options (gapcallback reference ... / "
                "gc.prepare_reference) or ask for the ones it was built with."
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)):
        return a == b or (math.isnan(a) and math.isnan(float(b)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def preparation_stages(
    with_train: bool, law: bool | GapLaw, dimension_method: str | None
) -> list[str]:
    """Names of the stages :func:`prepare_reference` runs, in order."""
    stages = []
    if with_train:
        if law is True:  # first: its curve holds the memorization line's distances
            stages.append("gap law")
        stages.append("gap/memorization")
    if dimension_method is not None:
        stages.append("id/data")
    return stages


@contextmanager
def stage_progress(stages: list[str], *, desc: str, show: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar over the stages of :func:`prepare_reference` that appears after 2 seconds
    (``show=False``: a no-op); yields the ``on_stage`` hook to pass it."""
    from tqdm.auto import tqdm

    with tqdm(
        total=len(stages), desc=desc, unit="stage", leave=False, delay=2.0,
        disable=not (show and stages),
    ) as bar:  # fmt: skip

        def on_stage(name: str) -> None:
            if name != stages[0]:
                bar.update(1)
            bar.set_postfix_str(name)

        yield on_stage
        bar.update(bar.total - bar.n)


def prepare_reference(
    reference: Tensor | Iterable[Any],
    train: Tensor | Iterable[Any] | None = None,
    *,
    p: float = 2.0,
    symmetry: Symmetry | None = None,
    law: bool | GapLaw = True,
    law_options: Mapping[str, Any] | None = None,
    dimension_method: str | None = "calibrated",
    dimension_points: int = 2000,
    seed: int = 0,
    transform: Transform | None = None,
    input_key: int | str = 0,
    max_points: int | None = None,
    on_error: OnError = "warn",
    on_stage: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> PreparedReference:
    r"""Collect the reference (and training) points and compute the data-only quantities.

    In this order: the law :math:`R_n = J n^{-p/d}` fitted on ``train`` vs ``reference``
    (:meth:`GapLaw.fit`, when ``law=True`` and ``train`` is given), the memorization line
    :math:`R_\text{mem} = \frac1m\sum_i \min_j \lVert y_i - x_j\rVert^p` (read off the law's
    measured curve when the law was fitted here, else one search) and the intrinsic dimension of
    ``train`` (``reference`` without it) on at most ``dimension_points`` points chosen with
    ``seed``. Runs with its own seeded random streams and leaves the global ones untouched.

    Args:
        reference: held-out points ``[m, *dims]`` (tensor, numpy array, or a DataLoader /
            iterable of batches).
        train: the training set, same forms (``None``: no law, no memorization line).
        p: the gap's loss exponent.
        symmetry: orbit distances under this :class:`~gapcallback.symmetry.Symmetry`.
        law: ``True`` fits the law, a fitted ``GapLaw`` is used as given, ``False`` disables it.
        law_options: keyword arguments of :meth:`GapLaw.fit` (``sizes``, ``repeats``, ``k``...).
        dimension_method: estimator of ``id/data`` (``None`` disables it).
        dimension_points: at most this many points enter the dimension estimate (>= 3).
        seed: seed of the law's fit and of the subsampling.
        transform, input_key, max_points: how points are collected from batches
            (:func:`gapcallback.utils.data.collect_points`); the points are collected inside
            the preparation's seeded streams, so a shuffled loader gives the same points on
            every run.
        on_error: ``"warn"``: a law or dimension that cannot be computed is recorded in
            ``failures`` with a :class:`GapEvaluationWarning`; ``"raise"``: raise.
        on_stage: called with each stage's name before it runs (for progress reporting).
        warn: how failures are reported (default: ``warnings.warn`` with
            :class:`GapEvaluationWarning`).

    Returns:
        a :class:`PreparedReference`.
    """
    p = check_exponent(p)
    if symmetry is not None and not isinstance(symmetry, Symmetry):
        raise TypeError(
            f"`symmetry` must be a gapcallback.symmetry object, got {type(symmetry).__name__}."
        )
    if not isinstance(law, (bool, GapLaw)):
        raise TypeError(f"`law` must be a bool or a fitted GapLaw, got {type(law).__name__}.")
    options = check_law_options(law_options)
    if dimension_method is not None:
        check_dimension_method(dimension_method, name="dimension_method")
    dimension_points = check_positive_int(dimension_points, "dimension_points", minimum=3)
    seed = check_positive_int(seed, "seed", minimum=0)
    if on_error not in ("warn", "raise"):
        raise ValueError(f"`on_error` must be 'warn' or 'raise', got {on_error!r}.")
    report = warn or _warn
    stage = on_stage or (lambda name: None)

    failures: dict[str, str] = {}
    fitted: GapLaw | None = law if isinstance(law, GapLaw) else None
    memorization_gap = dimension = dimension_std = None
    with isolated_rng(derive_seed(seed, DATA_SEED)):
        check_data_source(reference, "reference", max_points)
        ref = collect_points(
            reference, "reference", transform=transform, input_key=input_key, max_points=max_points
        )
        tr = None
        if train is not None:
            check_data_source(train, "train", max_points)
            tr = collect_points(
                train, "train", transform=transform, input_key=input_key, max_points=max_points
            )
            if tr.shape[1:] != ref.shape[1:]:
                raise ValueError(
                    f"`train` points have shape {tuple(tr.shape[1:])} but `reference` points "
                    f"{tuple(ref.shape[1:])}; pass data from the same space (or the same `transform`)."
                )
        todo = preparation_stages(tr is not None, law, dimension_method)
        if "gap law" in todo:
            stage("gap law")
            try:
                fitted = GapLaw.fit(tr, ref, p=p, symmetry=symmetry, seed=seed, **options)
            except (ValueError, RuntimeError) as err:
                if on_error == "raise":
                    raise
                failures["gap/predicted"] = str(err)
                report(
                    f"could not fit the gap law ({err}); `gap/predicted`, `gap/ratio` against "
                    "the law, `gap/effective_n` and `id/law` are left out."
                )
        if "gap/memorization" in todo:
            stage("gap/memorization")
            curve = fitted.curve if fitted is not None and law is True else None
            if (
                curve is not None and tr is not None
            ):  # the law's search found every reference's nearest train point
                memorization_gap = float(
                    gap_value(
                        curve.reference_sq_dists, p, compute_dtype(ref, tr), ("reference", "train")
                    )
                )
            elif tr is not None:
                memorization_gap = float(representation_gap(ref, tr, p=p, symmetry=symmetry))
        if "id/data" in todo:
            stage("id/data")
            data = tr if tr is not None else ref
            assert dimension_method is not None
            if data.shape[0] > dimension_points:
                g = torch.Generator().manual_seed(seed)
                data = data[torch.randperm(data.shape[0], generator=g)[:dimension_points]]
            try:
                estimate = intrinsic_dimension_estimate(data, dimension_method)
                dimension, dimension_std = float(estimate.dimension), float(estimate.std)
            except (ValueError, RuntimeError) as err:
                if on_error == "raise":
                    raise
                failures["id/data"] = str(err)
                report(f"could not estimate id/data ({err}).")
    return PreparedReference(
        reference=ref,
        train=tr,
        p=p,
        symmetry=symmetry,
        law=fitted,
        memorization_gap=memorization_gap,
        data_dimension=dimension,
        data_dimension_std=dimension_std,
        failures=failures,
        options={
            "law": "fit" if law is True else "given" if isinstance(law, GapLaw) else "off",
            "law_options": options,
            "dimension_method": dimension_method,
            "dimension_points": dimension_points,
            "seed": seed,
        },
    )


def _warn(message: str) -> None:
    warnings.warn(f"gapcallback: {message}", GapEvaluationWarning, stacklevel=3)
