r"""``PredictionGapCallback``: the representation gap of a supervised (or ambiguous) predictor.

A prediction task is a set of observations :math:`(x, y)` and a model is its prediction space
:math:`\Omega_f = \{(x', f(x'))\}` (:mod:`gapcallback.functional.prediction`). The callback is
:class:`~gapcallback.GapCallback` on the joint vectors :math:`[x, w\,y]`: the same preparation
(the law fitted on the training pairs against the reference pairs, ``id/data`` of
:math:`\Omega`, the memorization line of the training set as a lookup table), the same
measurement, reduction and logging, with the model's *probe pairs* in place of samples: at each
evaluation the model predicts at the probe inputs (by default the reference inputs and the
training inputs), and every key of ``GapCallback`` is logged, plus

``gap/risk``  :math:`w^p \frac1m \sum_i \lVert y_i - f(x_i) \rVert^p`, the test risk at the gap's
              loss. Since the probes contain every reference input, ``gap/observed`` :math:`\le`
              ``gap/risk``; the difference is what the model gains by being evaluated anywhere on
              its graph.

``gap/memorized_fraction`` is the fraction of probe pairs that reproduce a training pair
(:math:`d_1 < r\,d_2`): a model that fits its training labels exactly has it near the training
inputs' share of the probes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from gapcallback.callbacks.gap_callback import LOGGED_KEYS, EvaluationFault, GapCallback
from gapcallback.evaluation.prepared import PreparedReference
from gapcallback.evaluation.processes import shard_rows
from gapcallback.functional.prediction import check_y_weight, joint_points, round_like_gap
from gapcallback.utils.checks import (
    check_choice,
    check_exponent,
    check_positive_int,
    compute_dtype,
)
from gapcallback.utils.data import collect_pairs
from gapcallback.utils.signatures import accepts_keyword

__all__ = ["PREDICTION_KEYS", "PredictionGapCallback"]

PREDICTION_KEYS = (*LOGGED_KEYS, "gap/risk")
"""Every key a :class:`PredictionGapCallback` may log (behind its ``prefix``)."""

PROBES = ("reference+train", "reference")

Predictor = Callable[[pl.LightningModule, Tensor], Tensor]


class PredictionGapCallback(GapCallback):
    r"""Measure the representation gap of a supervised or ambiguous predictor while it trains.

    Args:
        reference: held-out pairs: a tuple ``(x, y)`` of tensors / numpy arrays with the same
            number of rows, or a DataLoader of ``(x, y)`` batches (``input_key``/``target_key``).
            Targets are floating point: regression targets as they are, classes one-hot
            (``target_transform=lambda y: torch.nn.functional.one_hot(y, k).float()``) with the
            model's probabilities as predictions (``predict_fn=lambda m, x: m(x).softmax(-1)``).
        train: the training pairs (same forms): the law, the memorization line (the training
            set as a lookup table), ``id/data`` on them, and probe inputs.
        predict_fn: ``predict_fn(pl_module, x) -> y [B, *y_dims]`` (default ``pl_module(x)``).
        sample_fn: for ambiguous tasks, a conditional sampler ``sample_fn(pl_module, x,
            generator=...) -> y [B, *y_dims]`` (one sample per input; ``generator`` passed when
            its signature takes it); not with ``predict_fn``.
        samples_per_input: probes per input with ``sample_fn`` (each a fresh sample).
        probe: the probe inputs: ``"reference+train"`` (default), ``"reference"``, or a tensor of
            inputs ``[P, *x_dims]`` (the reference inputs are always probed, so that
            ``gap/observed <= gap/risk``).
        y_weight: :math:`w`, the weight of the targets in the joint distance
            :math:`(\lVert x - x'\rVert^2 + w^2 \lVert y - y'\rVert^2)^{p/2}`.
        target_transform: applied to the reference and training targets (e.g. one-hot).
        target_key: index/key of the targets in loader batches (default 1).
        batch_size: inputs per call of the predictor.
        every_n_epochs, every_n_train_steps, p: as in :class:`~gapcallback.GapCallback`.
        transform: applied to the inputs :math:`x` to place them in the task's input space (e.g.
            a flatten or a fixed feature extractor); the model always receives the raw inputs.
        **options: the other options of :class:`~gapcallback.GapCallback` (``law``,
            ``law_options``, ``dimension_method``, ``dimension_points``,
            ``memorization_ratio``, ``max_points``, ``input_key``, ``seed``, ``on_error``,
            ``log_figure``, ``figure_every_n_evaluations``, ``figure_in_background``,
            ``progress``, ``prefix``).

    Example::

        callback = gc.PredictionGapCallback(reference=(x_val, y_val), train=(x_train, y_train))
        trainer = L.Trainer(callbacks=[callback, gc.GapEarlyStopping(monitor="gap/observed")])
    """

    def __init__(
        self,
        reference: tuple[Any, Any] | Iterable[Any],
        train: tuple[Any, Any] | Iterable[Any] | None = None,
        predict_fn: Predictor | None = None,
        *,
        sample_fn: Callable[..., Tensor] | None = None,
        samples_per_input: int = 1,
        probe: str | Tensor = "reference+train",
        y_weight: float = 1.0,
        target_transform: Callable[[Tensor], Tensor] | None = None,
        target_key: int | str = 1,
        batch_size: int = 1024,
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        p: float = 2.0,
        transform: Callable[[Tensor], Tensor] | None = None,
        **options: Any,
    ) -> None:
        for name in ("sampler", "symmetry", "sample_transform", "num_samples"):
            if name in options:
                raise TypeError(
                    f"PredictionGapCallback takes no `{name}`: its probes are the model's "
                    "predictions at the probe inputs (`predict_fn`, `sample_fn`, `probe`)."
                )
        if isinstance(reference, PreparedReference):
            raise TypeError(
                "PredictionGapCallback needs the reference pairs themselves (their inputs are "
                "probed): pass `reference=(x, y)` or a DataLoader of (x, y) batches."
            )
        for name, fn in (
            ("predict_fn", predict_fn),
            ("sample_fn", sample_fn),
            ("target_transform", target_transform),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable, got {fn!r}.")
        if predict_fn is not None and sample_fn is not None:
            raise ValueError(
                "Pass `predict_fn` (a deterministic predictor) or `sample_fn` (a conditional "
                "sampler for an ambiguous task), not both."
            )
        self.samples_per_input = check_positive_int(samples_per_input, "samples_per_input")
        if self.samples_per_input > 1 and sample_fn is None:
            raise ValueError(
                "`samples_per_input` > 1 needs `sample_fn`: a deterministic predictor gives the "
                "same prediction every time."
            )
        if isinstance(probe, Tensor):
            if probe.ndim < 1 or probe.shape[0] == 0:
                raise ValueError("`probe` inputs must be a non-empty tensor [P, *x_dims].")
        else:
            check_choice(probe, "probe", PROBES)
        self.y_weight = check_y_weight(y_weight)
        self.predict_fn = predict_fn
        self.sample_fn = sample_fn
        self.probe = probe
        self.target_transform = target_transform
        self.target_key = target_key
        self.batch_size = check_positive_int(batch_size, "batch_size")
        for name, source in (("reference", reference), ("train", train)):
            if source is not None:
                _check_pair_source(source, name, target_transform)
        super().__init__(
            reference,  # type: ignore[arg-type]
            train=train,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            p=check_exponent(p),
            transform=transform,
            **options,
        )
        self._inputs: dict[str, Tensor] = {}
        self._task_inputs: dict[str, Tensor] = {}
        self._targets: dict[str, Tensor] = {}
        self._risk = torch.zeros(2, dtype=torch.float64)

    @property
    def logged_keys(self) -> tuple[str, ...]:
        """Every key this callback may log (:data:`PREDICTION_KEYS` behind ``prefix``)."""
        return tuple(self.key(name) for name in PREDICTION_KEYS)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing to check: the module itself is the default predictor."""

    # ------------------------------------------------------------------ data: pairs

    def collect(self, source: Any, name: str) -> Tensor:
        """The pairs of ``source`` as joint vectors ``[N, D_x + D_y]``; keeps the raw inputs
        (probed), the task-space inputs and the targets."""
        x, y = collect_pairs(
            source,
            name,
            input_key=self.input_key,
            target_key=self.target_key,
            max_points=self.max_points,
        )
        if self.target_transform is not None:
            y = self.target_transform(y)
            if not isinstance(y, Tensor):
                raise TypeError(f"`target_transform` must return a tensor, got {type(y)}.")
        task_x = self._task_space(x, name)
        if not y.is_floating_point():
            joint_points(task_x, y, names=(f"{name} x", f"{name} y"))  # raises the label advice
        y = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
        joint = joint_points(task_x, y, y_weight=self.y_weight, names=(f"{name} x", f"{name} y"))
        self._inputs[name] = x
        self._task_inputs[name] = task_x
        self._targets[name] = y.reshape(y.shape[0], -1)
        return joint

    def _task_space(self, x: Tensor, name: str) -> Tensor:
        if self.transform is None:
            return x if x.is_floating_point() else x.float()
        with torch.no_grad():
            out = self.transform(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"`transform` must return a tensor, got {type(out).__name__}.")
        return out if out.is_floating_point() else out.float()

    def _probe_sets(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, raw inputs, task-space inputs)`` of every probe set, references first."""
        sets = [("reference", self._inputs["reference"], self._task_inputs["reference"])]
        if isinstance(self.probe, Tensor):
            if "probe" not in self._inputs:
                self._inputs["probe"] = self.probe.detach().cpu()
                self._task_inputs["probe"] = self._task_space(self._inputs["probe"], "probe")
            sets.append(("probe", self._inputs["probe"], self._task_inputs["probe"]))
        elif self.probe == "reference+train" and "train" in self._inputs:
            sets.append(("train", self._inputs["train"], self._task_inputs["train"]))
        return sets

    # ------------------------------------------------------------------ one evaluation

    def draw_batches(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        index: int,
        generator: torch.Generator,
    ) -> Iterator[Tensor]:
        """The model's probe pairs ``[B, D_x + D_y]`` on this process: its share of each probe
        set's inputs, predicted in batches of ``batch_size``; the test risk accumulates on the
        reference inputs."""
        self._risk = torch.zeros(2, dtype=torch.float64)
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        ref_y = self._targets["reference"]
        per_row = int(ref_y.shape[1])
        for _ in range(self.samples_per_input):
            for name, raw, task in self._probe_sets():
                own = shard_rows(int(raw.shape[0]), rank, world)
                for start in range(own.start, own.stop, self.batch_size):
                    stop = min(start + self.batch_size, own.stop)
                    pred = self._predict(pl_module, raw[start:stop].to(device), generator)
                    pred = pred.reshape(pred.shape[0], -1)
                    if pred.shape[1] != per_row:
                        raise EvaluationFault(
                            f"the predictor returned {pred.shape[1]} values per input, the "
                            f"targets have {per_row}"
                        )
                    if name == "reference":
                        self._add_risk(task[start:stop], ref_y[start:stop].to(device), pred)
                    yield joint_points(
                        task[start:stop].to(device),
                        pred,
                        y_weight=self.y_weight,
                        names=("probe inputs", "predictions"),
                    )

    def _predict(self, pl_module: pl.LightningModule, x: Tensor, generator: Any) -> Tensor:
        what = "sample_fn" if self.sample_fn is not None else "predict_fn"
        try:
            if self.sample_fn is not None:
                kwargs = (
                    {"generator": generator} if accepts_keyword(self.sample_fn, "generator") else {}
                )
                out = self.sample_fn(pl_module, x, **kwargs)
            elif self.predict_fn is not None:
                out = self.predict_fn(pl_module, x)
            else:
                what = f"{type(pl_module).__name__}.forward"
                out = pl_module(x)
        except Exception as err:
            raise EvaluationFault(f"{what} raised {type(err).__name__}: {err}") from err
        if not isinstance(out, Tensor):
            raise EvaluationFault(f"{what} returned {type(out).__name__}, not a tensor")
        out = out.detach()
        if out.ndim < 1 or out.shape[0] != x.shape[0]:
            raise EvaluationFault(
                f"{what} returned shape {tuple(out.shape)} for {x.shape[0]} inputs; return one "
                "prediction per input"
            )
        if not out.is_floating_point():
            raise EvaluationFault(
                f"{what} returned dtype {out.dtype}: return probabilities (softmax) or values, "
                "not class indices"
            )
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out.reshape(out.shape[0], -1))).any(1).sum())
            raise EvaluationFault(f"{what} returned NaN/Inf for {bad} of {x.shape[0]} inputs")
        return out

    def _add_risk(self, x: Tensor, y: Tensor, pred: Tensor) -> None:
        """Add :math:`\\sum_i w^p \\lVert y_i - f(x_i) \\rVert^p` of a batch, on the scaled
        targets and predictions exactly as :func:`joint_points` forms them (float64
        differences), so that ``gap/observed <= gap/risk`` holds in floating point too."""
        w = self.y_weight

        def scaled(t: Tensor) -> Tensor:
            t = t.to(compute_dtype(x, t))
            return t * w if w != 1.0 else t

        scaled_y, scaled_f = scaled(y), scaled(pred)
        sq = (scaled_y.double() - scaled_f.double()).pow(2).sum(1)
        terms = sq.pow(self.p / 2).sum().cpu()
        self._risk += torch.stack([terms, torch.tensor(float(y.shape[0]), dtype=torch.float64)])

    def additional_values(self, trainer: pl.Trainer) -> dict[str, float]:
        """``gap/risk`` from the risk sums of every process (one sum over processes)."""
        assert self._gap_metric is not None
        device = self._gap_metric.reference.device
        total = trainer.strategy.reduce(self._risk.to(device), reduce_op="sum")
        total = total.detach().cpu()
        if float(total[1]) <= 0:
            return {}
        # Rounded as the gap is (to the joint vectors' dtype), so gap/observed <= gap/risk.
        risk = round_like_gap(total[0] / total[1], self._gap_metric.gap_dtype)
        return {"gap/risk": float(risk)}


def _check_pair_source(source: Any, name: str, target_transform: Any) -> None:
    """At construction: a pair of arrays with equal rows (and no bare class labels), or an
    iterable of batches."""
    if isinstance(source, (tuple, list)) and len(source) == 2:
        x, y = source
        if hasattr(x, "shape") and hasattr(y, "shape"):
            if len(x.shape) == 0 or len(y.shape) == 0 or x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"`{name}` = (x, y) has {x.shape[0] if len(x.shape) else 0} inputs but "
                    f"{y.shape[0] if len(y.shape) else 0} targets: pass one target per input."
                )
            if target_transform is None and isinstance(y, Tensor) and not y.is_floating_point():
                raise TypeError(
                    f"`{name}` targets are integer class labels ({y.dtype}): class labels are "
                    "not points of a metric space. Pass one-hot targets (target_transform="
                    "lambda y: torch.nn.functional.one_hot(y, num_classes).float()) and the "
                    "model's probabilities as predictions (predict_fn=lambda m, x: "
                    "m(x).softmax(-1)); for integer regression targets, target_transform="
                    "lambda y: y.float()."
                )
            return
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise TypeError(
            f"`{name}` must be a pair (x, y) of tensors or a DataLoader of (x, y) batches, got "
            f"{type(source).__name__}."
        )
