r"""``GapCallback``: sample from the model during training and log predicted vs observed gap.

Every ``every_n_epochs`` epochs (or ``every_n_train_steps`` steps) the callback draws
``num_samples`` samples from the model (split across DDP ranks), streams them through a
:class:`~gapcallback.metrics.RepresentationGap` against the reference points, and logs through
``pl_module.log`` (so every attached logger, ``EarlyStopping`` and ``ModelCheckpoint`` see it):

================================  ==================================================================
key                               meaning
================================  ==================================================================
``gap/observed``                  :math:`\frac1m\sum_i \min_j \lVert y_i - z_j\rVert^p`, references
                                  :math:`y` to model samples :math:`z`
``gap/memorization``              the same with the training set in place of the samples: the gap
                                  of a model that reproduces its training set (the memorization line)
``gap/predicted``                 the law :math:`J\,n^{-p/d}` at the training-set size ``n``
``gap/ratio``                     ``observed / predicted`` (``observed / memorization`` without a
                                  law): > 1 the model is short of the optimum, ~1 at it, < 1 it
                                  produces points closer to unseen data than its training set is
``gap/effective_n``               training-set size at which the law reaches the observed gap
``gap/memorized_fraction``        fraction of samples with :math:`d_1 < \text{ratio}\,d_2` to the
                                  training set (Gu et al. 2023)
``id/data``                       intrinsic dimension of the training data (references without it)
``id/samples``                    intrinsic dimension of the model samples
``id/law``                        dimension fitted by the law (slope of the gap)
``gap/skipped_evaluations``       number of evaluations skipped because of a fault so far
================================  ==================================================================

Everything that depends only on the data (law fit, ``id/data``, the memorization line) is
computed once at the start of fitting (or by :meth:`GapCallback.prepare_data`) and kept in the
callback's ``state_dict``; the memorization line is read off the law's measured curve (each
reference's distance to the training set) rather than searched again. The logged values are
derived from the reduced states by the pure functions of
:mod:`gapcallback.evaluation.values`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from gapcallback.evaluation.measurement import (
    MEASURE_BLOCK_VALUES,
    MeasuredSamples,
    SampleMeasurement,
    describe_error,
)
from gapcallback.evaluation.prepared import (
    DATA_SEED,
    GapEvaluationWarning,
    PreparedReference,
    check_law_options,
    preparation_stages,
    prepare_reference,
    stage_progress,
)
from gapcallback.evaluation.sample_metrics import SampleMetrics, check_sample_metrics
from gapcallback.evaluation.values import EVALUATION_KEYS, measured_values
from gapcallback.functional.dimension import check_dimension_method
from gapcallback.functional.memorized import check_memorization_ratio
from gapcallback.law import GapLaw
from gapcallback.metrics.intrinsic_dimension import IntrinsicDimension
from gapcallback.metrics.representation_gap import RepresentationGap
from gapcallback.symmetry.base import Symmetry
from gapcallback.utils.checks import (
    check_bool,
    check_exponent,
    check_optional_int,
    check_positive_int,
)
from gapcallback.utils.data import Transform, check_data_source, collect_points
from gapcallback.utils.log import get_logger
from gapcallback.utils.modes import eval_mode
from gapcallback.utils.rng import derive_seed, isolated_rng
from gapcallback.utils.signatures import accepts_keyword
from gapcallback.utils.value_range import FeatureStats, scale_mismatch

__all__ = ["LOGGED_KEYS", "EvaluationFault", "GapCallback", "GapEvaluationWarning"]

_LOG = get_logger("callback")

LOGGED_KEYS = (*EVALUATION_KEYS, "gap/skipped_evaluations")
"""Every key a :class:`GapCallback` may log (each behind the callback's ``prefix``)."""

Sampler = Callable[..., Tensor]


class EvaluationFault(Exception):
    """A fault of the user's sampler (or predictor) or of its output, raised inside an
    evaluation: the evaluation is skipped with a :class:`GapEvaluationWarning` (or, with
    ``on_error="raise"``, re-raised as a ``RuntimeError``) and training goes on."""


_DATA_SEED = DATA_SEED


class GapCallback(Callback):
    r"""Measure the representation gap of a generative model while it trains.

    Args:
        reference: held-out data points :math:`y_i`: a tensor or numpy array ``[m, *dims]``, or a
            DataLoader / iterable of batches (e.g. ``datamodule.val_dataloader()``). An iterable
            without a length (a streaming ``IterableDataset``) needs ``max_points``. Or a
            :class:`~gapcallback.PreparedReference` (:func:`gapcallback.load_reference` of a
            reference file, :func:`gapcallback.prepare_reference`): its points (already in task
            space: ``transform`` then applies to the samples only), training set, law,
            ``id/data`` and memorization line are used as they are and the preparation at the
            start of fitting is skipped; its options (``p``, ``symmetry``,
            ``dimension_method``, ``law_options``) must match the callback's.
        train: the training set (same forms). Enables ``gap/memorization``,
            ``gap/memorized_fraction``, the law (``gap/predicted``) and ``id/data`` on it.
        sampler: ``sampler(pl_module, n) -> Tensor [n, *dims]``; when ``None`` the callback calls
            ``pl_module.sample(n)``. Either is passed ``generator=`` (a seeded
            ``torch.Generator`` on the module's device) if its signature accepts it.
        num_samples: samples per evaluation, split across DDP ranks. The callback's cost is about
            ``num_samples`` times the sampler's cost per sample (the measurements themselves are
            a few exact nearest-neighbour searches).
        every_n_epochs: evaluate at the end of every n-th training epoch (``None``/0: never).
        every_n_train_steps: evaluate every n optimizer steps (``None``: never).
        p: loss exponent of the gap, :math:`\lVert y - z \rVert^p`.
        transform: maps a batch (tensor) to task-space vectors; applied to reference and
            training batches and to samples alike (e.g. a feature extractor or a flatten).
        symmetry: a :class:`gapcallback.symmetry.Symmetry`: all distances become orbit distances.
        sample_transform: applied to the model's samples only, before ``transform``: maps them
            into the data's value range (e.g. ``lambda z: (z + 1) / 2`` for a model working in
            :math:`[-1, 1]` on data in :math:`[0, 1]`). On the first evaluation the callback
            compares the samples' value range with the references' and warns once when they are
            clearly on different scales.
        sample_batch_size: samples drawn per call of the sampler (bounds memory).
        law: ``True`` fits a :class:`~gapcallback.law.GapLaw` on ``train`` vs ``reference`` once;
            a fitted ``GapLaw`` is used as given; ``False`` disables the prediction.
        law_options: keyword arguments for :meth:`GapLaw.fit` (``sizes``, ``num_sizes``,
            ``repeats``, ``k``, ...), checked at construction.
        dimension_method: estimator for ``id/data`` and ``id/samples`` (see
            :func:`gapcallback.functional.dimension.intrinsic_dimension`); ``None``
            disables both.
        dimension_points: at most this many points enter each intrinsic-dimension estimate.
        memorization_ratio: threshold of the memorization test (Gu et al.: 1/3).
        max_points: cap on the points taken from ``reference`` and ``train`` loaders.
        input_key: index/key of the input tensor in tuple/list/dict loader batches.
        seed: seed of all the callback's randomness (sampling, subsampling, the law's fit). The
            training run's RNG streams are never touched.
        on_error: ``"warn"`` (default): a failing sampler, NaN/Inf, wrong shapes or too few samples
            skip the evaluation with a :class:`GapEvaluationWarning`, record it and training goes
            on; a failing optional part (``id/samples``, the memorized fraction, the figure) is
            recorded in the evaluation's ``failed_parts`` and everything else is logged.
            ``"raise"``: raise instead.
        metrics: the k-NN family to log beside the gap, names from ``("precision", "recall",
            "density", "coverage", "authenticity")`` (keys ``knn/<name>``, see
            :mod:`gapcallback.evaluation.sample_metrics`; ``authenticity`` needs ``train``).
            Each is an optional part of the evaluation.
        log_figure: send a figure (law + history) to every logger that takes images and save it
            as ``gap_callback.png`` in the log directory, at the end of fitting and every
            ``figure_every_n_evaluations`` evaluations.
        figure_every_n_evaluations: how often the figure is rendered during training (default
            10; ``None``: at the end of fitting only). One render costs about a second of CPU,
            more than an evaluation's measurements, so it is not drawn at every evaluation.
        figure_in_background: ``True`` (default): the periodic figures are rendered on one worker
            thread (``gapcallback-figure``, from a snapshot of the history) while training goes
            on, and sent to the loggers from the training thread at a later hook, still at the
            step of the evaluation they show; a render that is due while the previous one is
            still running is skipped (counted in :attr:`figures_skipped`). The final figure at
            the end of fitting is rendered in place. ``False``: every render on the training
            thread.
        progress: show a progress bar while sampling or preparing takes longer than 2 seconds.
        prefix: prepended to every logged key (for several callbacks on one trainer).

    Attributes:
        history: list of dicts, one per evaluation: ``evaluation``, ``epoch``, ``step``,
            ``skipped`` (+ ``reason``), the logged values under their keys and, when an optional
            part failed, ``failed_parts`` (part -> reason).
        law: the fitted :class:`~gapcallback.law.GapLaw` (``None`` without ``train`` or law).
        memorization_gap: gap of the references to the training set (``None`` without train).
        data_dimension: intrinsic dimension of the training data (or references).
        n_train: number of training points.
        num_skipped: evaluations skipped so far.
        preparation_failures: data-only parts that could not be computed (``"gap/predicted"``,
            ``"id/data"``) -> reason.
        scale_warning: the value-range warning of the first evaluation, or ``None``.
        figures_skipped: periodic figures not rendered because the previous background render
            was still running.
        reference: the reference points as measured (after ``transform`` and ``max_points``),
            ``None`` before :meth:`prepare_data` (read-only).
        train: the training points likewise (``None`` without ``train``; read-only).
        data_ready: whether the data-only quantities are computed or restored (read-only).

    Example::

        callback = gc.GapCallback(reference=val_points, train=train_points, num_samples=2000)
        trainer = L.Trainer(callbacks=[callback, gc.GapEarlyStopping(patience=3)])
    """

    def __init__(
        self,
        reference: Tensor | Iterable[Any] | PreparedReference,
        train: Tensor | Iterable[Any] | None = None,
        sampler: Sampler | None = None,
        num_samples: int = 2000,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        p: float = 2.0,
        transform: Transform | None = None,
        symmetry: Symmetry | None = None,
        *,
        sample_transform: Transform | None = None,
        sample_batch_size: int = 512,
        law: bool | GapLaw = True,
        law_options: dict[str, Any] | None = None,
        dimension_method: str | None = "calibrated",
        dimension_points: int = 2000,
        memorization_ratio: float = 1.0 / 3.0,
        max_points: int | None = None,
        input_key: int | str = 0,
        seed: int = 0,
        on_error: Literal["warn", "raise"] = "warn",
        metrics: Sequence[str] = (),
        log_figure: bool = True,
        figure_every_n_evaluations: int | None = 10,
        figure_in_background: bool = True,
        progress: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__()
        if sampler is not None and not callable(sampler):
            raise TypeError(
                f"`sampler` must be callable as sampler(pl_module, n), got {sampler!r}."
            )
        for name, fn in (("transform", transform), ("sample_transform", sample_transform)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be a callable Tensor -> Tensor, got {fn!r}.")
        if symmetry is not None and not isinstance(symmetry, Symmetry):
            raise TypeError(
                f"`symmetry` must be a gapcallback.symmetry object, got {type(symmetry).__name__}."
            )
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.every_n_epochs = (
            None if not every_n_epochs else check_positive_int(every_n_epochs, "every_n_epochs")
        )
        self.every_n_train_steps = (
            None
            if every_n_train_steps is None
            else check_positive_int(every_n_train_steps, "every_n_train_steps")
        )
        if self.every_n_epochs is None and self.every_n_train_steps is None:
            raise ValueError(
                "GapCallback would never evaluate: set `every_n_epochs` or `every_n_train_steps`."
            )
        if on_error not in ("warn", "raise"):
            raise ValueError(f"`on_error` must be 'warn' or 'raise', got {on_error!r}.")
        if not isinstance(law, (bool, GapLaw)):
            raise TypeError(f"`law` must be a bool or a fitted GapLaw, got {type(law).__name__}.")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {prefix!r}.")
        if isinstance(input_key, bool) or not isinstance(input_key, (int, str)):
            raise TypeError(
                f"`input_key` must be the int position or str key of the input tensor in each "
                f"loader batch, got {input_key!r}."
            )
        self.max_points = check_optional_int(max_points, "max_points")
        if isinstance(reference, PreparedReference):
            reference.check_use(
                "given as `reference`",
                train=train,
                law=law,
                p=check_exponent(p),
                symmetry=symmetry,
                dimension_method=dimension_method,
                law_options=law_options,
            )
        else:
            check_data_source(reference, "reference", self.max_points)
        if train is not None:
            check_data_source(train, "train", self.max_points)
        self.reference_source = reference
        self.train_source = train
        self.sampler = sampler
        self.p = check_exponent(p)
        self.transform = transform
        self.sample_transform = sample_transform
        self.symmetry = symmetry
        self.sample_batch_size = check_positive_int(sample_batch_size, "sample_batch_size")
        self._law_option = law
        self.law_options = check_law_options(law_options, "GapCallback")
        self.dimension_method = dimension_method
        if dimension_method is not None:
            check_dimension_method(dimension_method, name="dimension_method")
        self.dimension_points = check_positive_int(dimension_points, "dimension_points", minimum=3)
        self.memorization_ratio = check_memorization_ratio(memorization_ratio)
        self.input_key = input_key
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.on_error = on_error
        has_train = (
            reference.train if isinstance(reference, PreparedReference) else train
        ) is not None
        self.metrics = check_sample_metrics(metrics, has_train=has_train)
        self.log_figure = check_bool(log_figure, "log_figure")
        self.figure_every_n_evaluations = check_optional_int(
            figure_every_n_evaluations, "figure_every_n_evaluations"
        )
        self.figure_in_background = check_bool(figure_in_background, "figure_in_background")
        self.progress = check_bool(progress, "progress")
        self.prefix = prefix

        self.history: list[dict[str, Any]] = []
        self.law: GapLaw | None = law if isinstance(law, GapLaw) else None
        self.memorization_gap: float | None = None
        self.data_dimension: float | None = None
        self.data_dimension_std: float | None = None
        self.n_train: int | None = None
        self.preparation_failures: dict[str, str] = {}
        self.scale_warning: str | None = None
        self._data_ready = False
        self._prepared: PreparedReference | None = None
        self._reference: Tensor | None = None
        self._reference_stats: FeatureStats | None = None
        self._scale_checked = False
        self._train: Tensor | None = None
        self._train_device: Tensor | None = None
        self._gap_metric: RepresentationGap | None = None
        self._sample_metrics: SampleMetrics | None = None
        self._last_step_evaluated = -1
        self._figure_evaluation = -1
        self._figure_warned = False
        self.figures_skipped = 0
        self._figure_executor: ThreadPoolExecutor | None = None
        self._figure_pending: _PendingFigure | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A worker thread and its future belong to this process (ddp_spawn pickles callbacks).
        state = self.__dict__.copy()
        state["_figure_executor"] = None
        state["_figure_pending"] = None
        return state

    # ------------------------------------------------------------------ Lightning plumbing

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            prefix=self.prefix,
            every_n_epochs=self.every_n_epochs,
            every_n_train_steps=self.every_n_train_steps,
        )

    @property
    def num_evaluations(self) -> int:
        """Evaluations attempted so far (including skipped ones)."""
        return len(self.history)

    @property
    def num_skipped(self) -> int:
        return sum(1 for h in self.history if h.get("skipped"))

    @property
    def latest(self) -> dict[str, Any] | None:
        """The most recent evaluation that was not skipped, or ``None``."""
        for record in reversed(self.history):
            if not record.get("skipped"):
                return record
        return None

    @property
    def logged_keys(self) -> tuple[str, ...]:
        """Every key this callback may log (:data:`LOGGED_KEYS` behind ``prefix``)."""
        return tuple(self.key(name) for name in LOGGED_KEYS)

    def key(self, name: str) -> str:
        """The logged key for ``name`` (``"gap/observed"`` -> ``prefix + "gap/observed"``)."""
        return f"{self.prefix}{name}"

    @property
    def reference(self) -> Tensor | None:
        """The reference points as measured (after ``transform`` and ``max_points``); ``None``
        before :meth:`prepare_data` (or the start of fitting) materialised them."""
        return self._reference

    @property
    def train(self) -> Tensor | None:
        """The training points as measured; ``None`` without ``train`` or before preparation."""
        return self._train

    @property
    def data_ready(self) -> bool:
        """Whether the data-only quantities (law, ``id/data``, memorization line) are computed,
        here or restored from a checkpoint."""
        return self._data_ready

    def prepare_data(self) -> None:
        """Materialise ``reference``/``train`` and compute the data-only quantities now.

        The start of fitting does this anyway (a no-op for what is already computed or restored
        from a checkpoint); call it to inspect :attr:`law`, :attr:`memorization_gap`,
        :attr:`data_dimension` or :meth:`figure` before training. Runs with the callback's own
        seed and leaves the global random streams untouched, so the values equal those of a fit.
        """
        with isolated_rng(derive_seed(self.seed, _DATA_SEED)):
            self._prepare_data()

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "law": None if self.law is None else self.law.state_dict(),
            "memorization_gap": self.memorization_gap,
            "data_dimension": self.data_dimension,
            "data_dimension_std": self.data_dimension_std,
            "n_train": self.n_train,
            "data_ready": self._data_ready,
            "last_step_evaluated": self._last_step_evaluated,
            "preparation_failures": dict(self.preparation_failures),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        law_state = state_dict.get("law")
        self.law = None if law_state is None else GapLaw.from_state_dict(law_state)
        self.memorization_gap = state_dict.get("memorization_gap")
        self.data_dimension = state_dict.get("data_dimension")
        self.data_dimension_std = state_dict.get("data_dimension_std")
        self.n_train = state_dict.get("n_train")
        self._data_ready = bool(state_dict.get("data_ready", False))
        self._last_step_evaluated = int(state_dict.get("last_step_evaluated", -1))
        self.preparation_failures = dict(state_dict.get("preparation_failures", {}))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            stage == "fit"
            and self.sampler is None
            and not callable(getattr(pl_module, "sample", None))
        ):
            raise TypeError(
                f"GapCallback needs model samples: define `{type(pl_module).__name__}.sample(n)` "
                "returning a tensor [n, *dims], or pass `sampler=lambda module, n: ...`."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with isolated_rng(derive_seed(self.seed, _DATA_SEED), pl_module.device):
            self._prepare_data(announce=trainer.is_global_zero)
        self._gap_metric = RepresentationGap(
            self._reference,
            p=self.p,
            symmetry=self.symmetry,  # type: ignore[arg-type]
        ).to(pl_module.device)
        if self.metrics:
            assert self._reference is not None
            unbuilt: dict[str, str] = {}
            self._sample_metrics = SampleMetrics(
                self.metrics, self._reference, self._train, pl_module.device, failed=unbuilt
            )
            for part, reason in unbuilt.items():
                if self.on_error == "raise":
                    raise ValueError(f"GapCallback cannot measure {part}: {reason}")
                self.preparation_failures[part] = reason
                rank_zero_warn(
                    f"GapCallback cannot measure {part} on these points ({reason}); its keys "
                    "will not be logged.",
                    category=GapEvaluationWarning,
                )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect_figure(trainer)
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._evaluate(trainer, pl_module, on_step=False)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._collect_figure(trainer)
        step = trainer.global_step
        if (
            self.every_n_train_steps
            and step > 0
            and step % self.every_n_train_steps == 0
            and step != self._last_step_evaluated
        ):
            self._evaluate(trainer, pl_module, on_step=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            self._collect_figure(trainer, wait=True)
            latest = self.latest
            if (
                self.log_figure
                and trainer.is_global_zero
                and latest is not None
                and latest["evaluation"] != self._figure_evaluation
            ):
                self._emit_figure(trainer, latest)
        finally:
            self._close_figure_worker()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_figure_worker()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_figure_worker()

    # ------------------------------------------------------------------ data (once)

    def _prepare_data(self, announce: bool = False) -> None:
        """Materialise reference/train and compute everything that depends on the data only
        (:func:`~gapcallback.evaluation.prepared.prepare_reference`), unless restored from a
        checkpoint or given as a :class:`PreparedReference`.

        With ``announce`` (rank zero), one log line before and one after, with the time taken,
        and a progress bar over the stages when they take more than 2 seconds.
        """
        started = time.perf_counter()
        given = (
            self.reference_source if isinstance(self.reference_source, PreparedReference) else None
        )
        if given is not None:
            reference, train = given.reference, given.train
            if not self._data_ready:
                self._adopt(given)
        else:
            reference = self.collect(self.reference_source, "reference")
            train = None
            if self.train_source is not None:
                train = self.collect(self.train_source, "train")
                if train.shape[1:] != reference.shape[1:]:
                    raise ValueError(
                        f"`train` points have shape {tuple(train.shape[1:])} but `reference` "
                        f"points {tuple(reference.shape[1:])}; pass data from the same space (or "
                        "the same `transform`)."
                    )
        self._reference, self._train = reference, train
        self._reference_stats = FeatureStats()
        self._reference_stats.update(reference)
        if not self._data_ready:
            stages = preparation_stages(train is not None, self._law_option, self.dimension_method)
            if announce and stages:
                sizes = f"{reference.shape[0]} reference"
                if train is not None:
                    sizes += f" and {train.shape[0]} training"
                _LOG.info(
                    "GapCallback: preparing the data-only quantities (%s) from %s points of shape "
                    "%s...",
                    ", ".join(stages),
                    sizes,
                    tuple(reference.shape[1:]),
                )
            with stage_progress(
                stages, desc="GapCallback preparing", show=self.progress and announce
            ) as on_stage:
                prepared = prepare_reference(
                    reference,
                    train,
                    p=self.p,
                    symmetry=self.symmetry,
                    law=self._law_option,
                    law_options=self.law_options,
                    dimension_method=self.dimension_method,
                    dimension_points=self.dimension_points,
                    seed=self.seed,
                    on_error=self.on_error,
                    on_stage=on_stage,
                    warn=lambda message: rank_zero_warn(
                        f"GapCallback {message}", category=GapEvaluationWarning
                    ),
                )
            self._adopt(prepared)
            if announce and stages:
                _LOG.info(
                    "GapCallback: data ready in %.1f s (%s).",
                    time.perf_counter() - started,
                    self._preparation_summary(),
                )
        self._prepared = PreparedReference(
            reference=reference,
            train=train,
            p=self.p,
            symmetry=self.symmetry,
            law=self.law,
            memorization_gap=self.memorization_gap,
            data_dimension=self.data_dimension,
            data_dimension_std=self.data_dimension_std,
            failures=dict(self.preparation_failures),
        )

    def collect(self, source: Any, name: str) -> Tensor:
        """``reference``/``train`` (named ``name``) as points ``[N, *dims]`` in task space: the
        extension point of subclasses that measure other points (pairs, for a predictor)."""
        return collect_points(
            source,
            name,
            transform=self.transform,
            input_key=self.input_key,
            max_points=self.max_points,
        )

    def _adopt(self, prepared: PreparedReference) -> None:
        """Take the data-only quantities of ``prepared`` (a law given to the callback wins)."""
        if not isinstance(self._law_option, GapLaw):
            self.law = prepared.law if self._law_option is not False else None
        self.memorization_gap = prepared.memorization_gap
        self.data_dimension = prepared.data_dimension if self.dimension_method else None
        self.data_dimension_std = prepared.data_dimension_std if self.dimension_method else None
        self.n_train = prepared.n_train
        self.preparation_failures = dict(prepared.failures)
        self._data_ready = True

    def _preparation_summary(self) -> str:
        parts = []
        if self.memorization_gap is not None:
            parts.append(f"gap/memorization={self.memorization_gap:.4g}")
        if self.law is not None:
            parts.append(f"law d={self.law.dimension:.2f}")
        if self.data_dimension is not None:
            parts.append(f"id/data={self.data_dimension:.2f}")
        parts.extend(f"{name} failed" for name in self.preparation_failures)
        return ", ".join(parts)

    # ------------------------------------------------------------------ one evaluation

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, on_step: bool
    ) -> None:
        self._collect_figure(trainer)
        index = len(self.history)
        record: dict[str, Any] = {
            "evaluation": index,
            "epoch": int(trainer.current_epoch),
            "step": int(trainer.global_step),
            "skipped": False,
        }
        self._last_step_evaluated = int(trainer.global_step)
        error: BaseException | None = None
        local: SampleMeasurement | None = None
        try:
            local = self._measure_local(trainer, pl_module, index)
        except Exception as err:
            error = err
        # Every rank learns whether any rank failed before any collective on the metrics.
        all_ok = trainer.strategy.reduce_boolean_decision(error is None, all=True)
        if all_ok:
            assert local is not None
            try:
                measured = self._reduce(trainer, local)
            except (ValueError, RuntimeError) as err:
                error, all_ok = err, False
        if not all_ok:
            self._skip(trainer, pl_module, record, error, on_step)
            return
        assert self._prepared is not None and local is not None
        derived = {**measured_values(self._prepared, measured), **self.additional_values(trainer)}
        values = {self.key(k): v for k, v in derived.items()}
        values[self.key("gap/skipped_evaluations")] = float(self.num_skipped)
        record.update(values)
        self.history.append(record)
        self._log(trainer, pl_module, values, on_step)
        if measured.failed:
            self._part_failed(record, measured.failed)
        if not self._scale_checked:
            if trainer.is_global_zero:
                self._check_scale(local.stats)
            self._scale_checked = True  # on every rank, so none keeps gathering the statistics
        if (
            self.log_figure
            and trainer.is_global_zero
            and self.figure_every_n_evaluations
            and (index + 1) % self.figure_every_n_evaluations == 0
        ):
            if self.figure_in_background:
                self._submit_figure(trainer, record)
            else:
                self._emit_figure(trainer, record)

    def _measure_local(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int
    ) -> SampleMeasurement:
        """Draw this rank's share of samples and stream them into the (local) states
        (:class:`~gapcallback.evaluation.measurement.SampleMeasurement`).

        A fault of the sampler (or the gap's own update) raises; a failure of an optional part
        (the memorization test, the dimension's update) is recorded in ``failed`` and that part
        is left out for the rest of the evaluation.
        """
        assert self._gap_metric is not None and self._reference is not None
        device = pl_module.device
        rank = trainer.global_rank
        id_metric = None
        if self.dimension_method is not None:
            id_metric = IntrinsicDimension(
                method=self.dimension_method, max_points=self.dimension_points, seed=self.seed
            ).to(device)
        measurement = SampleMeasurement(
            self._gap_metric.to(device),
            train=self._train_on(device),
            symmetry=self.symmetry,
            memorization_ratio=self.memorization_ratio,
            dimension=id_metric,
            stats=None if self._scale_checked else FeatureStats(),
            sample_metrics=(
                None if self._sample_metrics is None else self._sample_metrics.to(device)
            ),
        )
        eval_seed = derive_seed(self.seed, index, rank)
        generator = torch.Generator(device=device).manual_seed(eval_seed)
        pending: list[Tensor] = []
        pending_values = 0
        with isolated_rng(eval_seed, device), torch.no_grad(), eval_mode(pl_module):
            for batch in self.draw_batches(trainer, pl_module, index, generator):
                pending.append(batch)
                pending_values += pending[-1].numel()
                if pending_values >= MEASURE_BLOCK_VALUES:
                    measurement.update(torch.cat(pending))
                    pending, pending_values = [], 0
            if pending:
                measurement.update(torch.cat(pending))
        return measurement

    def draw_batches(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        index: int,
        generator: torch.Generator,
    ) -> Iterator[Tensor]:
        """This process's points of evaluation ``index``, batch by batch, in task space
        ``[B, *dims]`` (the references' space).

        The extension point of subclasses (:class:`~gapcallback.PredictionGapCallback` yields
        probe pairs): here, the rank's share of ``num_samples`` samples from the sampler, in
        batches of ``sample_batch_size``, each checked and transformed by :meth:`_draw`. Runs
        under ``torch.no_grad()``, the module in eval mode and the evaluation's seeded streams; a
        fault raises and skips the evaluation.
        """
        rank, world = trainer.global_rank, trainer.world_size
        n_local = self.num_samples // world + (1 if rank < self.num_samples % world else 0)
        for n in self._progress(_batch_sizes(n_local, self.sample_batch_size), trainer, index):
            yield self._draw(pl_module, n, generator)

    def additional_values(self, trainer: pl.Trainer) -> dict[str, float]:
        """Keys a subclass logs beside the gap's (unprefixed), after the gap's collectives and
        on every process (it may run its own); none here."""
        return {}

    def _train_on(self, device: torch.device) -> Tensor | None:
        """The training points on ``device`` (copied once per device), ``None`` below 2 points."""
        if self._train is None or self._train.shape[0] < 2:
            return None
        if self._train_device is None or self._train_device.device != device:
            self._train_device = self._train.to(device)
        return self._train_device

    def _draw(self, pl_module: pl.LightningModule, n: int, generator: torch.Generator) -> Tensor:
        fn: Callable[..., Any]
        if self.sampler is not None:
            fn, args = self.sampler, (pl_module, n)
        else:
            fn, args = pl_module.sample, (n,)  # type: ignore[assignment]
        kwargs = {"generator": generator} if accepts_keyword(fn, "generator") else {}
        try:
            samples = fn(*args, **kwargs)
        except Exception as err:
            raise EvaluationFault(f"the sampler raised {type(err).__name__}: {err}") from err
        if not isinstance(samples, Tensor):
            raise EvaluationFault(f"the sampler returned {type(samples).__name__}, not a tensor")
        samples = samples.detach()
        for name, fn in (
            ("sample_transform", self.sample_transform),
            ("transform", self.transform),
        ):
            if fn is None:
                continue
            try:
                samples = fn(samples)
            except Exception as err:
                raise EvaluationFault(
                    f"`{name}` raised {type(err).__name__} on the samples: {err}"
                ) from err
            if not isinstance(samples, Tensor):
                raise EvaluationFault(f"`{name}` returned {type(samples).__name__}, not a tensor")
        assert self._reference is not None
        expected = tuple(self._reference.shape[1:])
        if samples.ndim < 1 or tuple(samples.shape[1:]) != expected:
            raise EvaluationFault(
                f"the sampler returned shape {tuple(samples.shape)}, expected [{n}, "
                f"{', '.join(map(str, expected))}] like the reference points"
            )
        if samples.shape[0] < n:
            raise EvaluationFault(
                f"the sampler returned {samples.shape[0]} samples, {n} were asked"
            )
        samples = samples[:n]
        if not samples.is_floating_point():
            raise EvaluationFault(f"the sampler returned dtype {samples.dtype}, not floating point")
        if not bool(torch.isfinite(samples).all()):
            bad = int((~torch.isfinite(samples.reshape(n, -1))).any(1).sum())
            raise EvaluationFault(f"the sampler returned NaN/Inf in {bad} of {n} samples")
        return samples.to(self._gap_metric.reference.device)  # type: ignore[union-attr]

    def _reduce(self, trainer: pl.Trainer, local: SampleMeasurement) -> MeasuredSamples:
        """The collectives of an evaluation, identical on every rank; no arithmetic on the values.

        The gap metric reduces its per-reference minima itself (``compute``). The callback's own
        states (memorization count, samples drawn, which optional parts failed) travel as one
        packed tensor summed over ranks, so every rank leaves out the same parts and enters the
        same collectives after it (the dimension metric's ``compute``).
        """
        return local.finish(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))

    def _part_failed(self, record: dict[str, Any], failed: dict[str, str]) -> None:
        """Record optional parts that failed in an evaluation that was logged otherwise."""
        record.setdefault("failed_parts", {}).update(failed)
        where = (
            f"GapCallback evaluation {record['evaluation']} (epoch {record['epoch']}, step "
            f"{record['step']})"
        )
        detail = "; ".join(f"{part}: {reason}" for part, reason in failed.items())
        if self.on_error == "raise":
            raise RuntimeError(f"{where}: {detail}")
        rank_zero_warn(
            f"{where}: left out {', '.join(failed)} ({detail}); every other key was logged.",
            category=GapEvaluationWarning,
        )

    def _check_scale(self, sample_stats: FeatureStats | None) -> None:
        """Warn once when the first samples are clearly on another scale than the references."""
        if sample_stats is None or self._reference_stats is None:
            return
        self._scale_checked = True
        message = scale_mismatch(self._reference_stats, sample_stats)
        if message is None:
            return
        self.scale_warning = message
        rank_zero_warn(
            "GapCallback: the model's samples and the reference points look like they are on "
            f"different scales ({message}). Distances between them, and so every gap/* value, "
            "are not meaningful until they are. An untrained model's samples can look like this "
            "too; this warning is shown once.",
            category=GapEvaluationWarning,
        )

    def _skip(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        record: dict[str, Any],
        error: BaseException | None,
        on_step: bool,
    ) -> None:
        reason = (
            f"{error}"
            if isinstance(error, EvaluationFault)
            else describe_error(error)
            if error is not None
            else "an evaluation step failed on another process"
        )
        record.update(skipped=True, reason=reason)
        self.history.append(record)
        if self._gap_metric is not None:
            self._gap_metric.reset()
        if self.on_error == "raise":
            raise RuntimeError(
                f"GapCallback evaluation {record['evaluation']} (epoch {record['epoch']}, step "
                f"{record['step']}) failed: {reason}"
            ) from error
        warnings.warn(
            f"GapCallback skipped evaluation {record['evaluation']} (epoch {record['epoch']}, step "
            f"{record['step']}): {reason}. Training continues; pass on_error='raise' to stop instead.",
            GapEvaluationWarning,
            stacklevel=2,
        )
        self._log(
            trainer,
            pl_module,
            {self.key("gap/skipped_evaluations"): float(self.num_skipped)},
            on_step,
        )

    # ------------------------------------------------------------------ outputs

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        values: dict[str, float],
        on_step: bool,
    ) -> None:
        # Without a logger the values still reach `callback_metrics` (EarlyStopping,
        # ModelCheckpoint); `logger=False` spares Lightning's "no logger configured" warning.
        to_logger = bool(trainer.loggers)
        for name, value in values.items():
            pl_module.log(
                name,
                float(value),
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == self.key("gap/observed"),
                logger=to_logger,
                sync_dist=False,
                batch_size=1,
            )

    def figure(self) -> Any:
        """The current figure (law panel + history panel) as a matplotlib ``Figure``."""
        from gapcallback.plotting import gap_history_figure

        return gap_history_figure(
            self.history,
            law=self.law,
            n_train=self.n_train,
            memorization_gap=self.memorization_gap,
            prefix=self.prefix,
        )

    def _emit_figure(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        """Render the figure once, here; send it to the loggers at the scalars' step; save the PNG."""
        from gapcallback.plotting import render_rgb

        self._figure_evaluation = record["evaluation"]
        try:
            rgb = render_rgb(self.figure())
        except Exception as err:
            self._figure_failed(record, err)
            return
        self._send_rendered(trainer, record, rgb, _figure_step(record))

    def _submit_figure(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        """Start rendering the figure of ``record`` on the worker thread (at most one in flight)."""
        self._collect_figure(trainer)
        if self._figure_pending is not None:
            self.figures_skipped += 1
            _LOG.debug(
                "GapCallback: figure of evaluation %d skipped (the previous one is still being "
                "rendered).",
                record["evaluation"],
            )
            return
        try:  # imported here, not first on the worker; without matplotlib: the warning, no thread
            from gapcallback.plotting import require_matplotlib

            require_matplotlib("GapCallback's figure")
        except ImportError as err:
            self._figure_failed(record, err)
            return
        if self._figure_executor is None:
            self._figure_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="gapcallback-figure"
            )
        # Everything the worker reads is copied here: the training thread goes on appending to
        # the history and adding `failed_parts` to its records.
        snapshot = _FigureSnapshot(
            history=tuple(dict(h) for h in self.history),
            law=self.law,
            n_train=self.n_train,
            memorization_gap=self.memorization_gap,
            prefix=self.prefix,
        )
        self._figure_evaluation = record["evaluation"]
        future = self._figure_executor.submit(_render_snapshot, snapshot)
        self._figure_pending = _PendingFigure(future, record, _figure_step(record))

    def _collect_figure(self, trainer: pl.Trainer, *, wait: bool = False) -> None:
        """Deliver the background render once it is done (``wait``: wait for it), on this thread
        and at the step of the evaluation it shows."""
        pending = self._figure_pending
        if pending is None or not (wait or pending.future.done()):
            return
        self._figure_pending = None
        try:
            rgb = pending.future.result()
        except Exception as err:
            self._figure_failed(pending.record, err)
            return
        self._send_rendered(trainer, pending.record, rgb, pending.step)

    def _close_figure_worker(self) -> None:
        """Drop an undelivered render and stop the worker thread (waits for a running render)."""
        executor, self._figure_executor = self._figure_executor, None
        self._figure_pending = None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _figure_failed(self, record: dict[str, Any], err: Exception) -> None:
        if isinstance(err, ImportError):
            if not self._figure_warned:
                rank_zero_warn(f"GapCallback: no figure ({err}).")
                self._figure_warned = True
            return
        self._part_failed(record, {"figure": describe_error(err)})

    def _send_rendered(
        self, trainer: pl.Trainer, record: dict[str, Any], rgb: Any, step: int
    ) -> None:
        """Send a rendered figure to every logger that takes images at ``step``; save the PNG."""
        from gapcallback.plotting import save_png

        try:
            tag = self.key("gap/figure")
            for logger in trainer.loggers:
                _send_figure(logger, tag, rgb, step)
            log_dir = trainer.log_dir or trainer.default_root_dir
            path = Path(log_dir) / f"{self.prefix.replace('/', '_')}gap_callback.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(rgb, path)
        except Exception as err:
            self._part_failed(record, {"figure": describe_error(err)})

    def _progress(self, sizes: list[int], trainer: pl.Trainer, index: int) -> Iterator[int]:
        if not (self.progress and trainer.is_global_zero and len(sizes) > 1):
            yield from sizes
            return
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(sizes),
            desc=f"GapCallback sampling (evaluation {index})",
            unit="sample",
            leave=False,
            delay=2.0,
            mininterval=0.5,
        )
        try:
            for n in sizes:
                yield n
                bar.update(n)
        finally:
            bar.close()


@dataclass(frozen=True)
class _FigureSnapshot:
    """What a background render reads: copies, nothing the training thread changes later."""

    history: tuple[dict[str, Any], ...]
    law: GapLaw | None
    n_train: int | None
    memorization_gap: float | None
    prefix: str


@dataclass(frozen=True)
class _PendingFigure:
    """A render in flight, the record it depicts and the step its scalars were logged at."""

    future: Future[Any]
    record: dict[str, Any]
    step: int


def _render_snapshot(snapshot: _FigureSnapshot) -> Any:
    """Build and render the figure of ``snapshot`` (runs on the worker thread: matplotlib's OO
    API on the figure's own Agg canvas only, never pyplot)."""
    from gapcallback import plotting

    fig = plotting.gap_history_figure(
        list(snapshot.history),
        law=snapshot.law,
        n_train=snapshot.n_train,
        memorization_gap=snapshot.memorization_gap,
        prefix=snapshot.prefix,
    )
    return plotting.render_rgb(fig)


def _figure_step(record: dict[str, Any]) -> int:
    """The step of an evaluation's scalars: Lightning logs them at the step before the
    optimizer step counter."""
    return max(int(record["step"]) - 1, 0)


def _send_figure(logger: Any, tag: str, rgb: Any, step: int) -> None:
    """Send a rendered figure ``[H, W, 3]`` to a logger that takes images; ignore the others."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, rgb, global_step=step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[rgb], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(
            logger.run_id, rgb, artifact_file=f"{tag.replace('/', '_')}_{step:08d}.png"
        )


def _batch_sizes(total: int, batch: int) -> list[int]:
    sizes = [batch] * (total // batch)
    if total % batch:
        sizes.append(total % batch)
    return sizes
