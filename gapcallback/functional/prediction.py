r"""The representation gap of a prediction task: observations :math:`(x, y)` in a joint space.

The Representation Gap paper sets a task as a set :math:`\Omega \subset X \times Y` of
observations and a model by its prediction space :math:`\Omega_f \subset X \times Y`; the gap is

.. math:: R(\Omega, \Omega_f) = \mathbb{E}_{(x, y) \sim P} \min_{w \in \Omega_f} l((x, y), w),
    \qquad l((x, y), (x', y')) = \left(\lVert x - x' \rVert^2 + w^2 \lVert y - y' \rVert^2
    \right)^{p/2},

with ``y_weight`` :math:`= w`. It is the plain representation gap of the *joint vectors*
:math:`[x, w\,y]` (:func:`joint_points`), so everything exact about the gap holds here too.

* A deterministic predictor :math:`f` has :math:`\Omega_f = \{(x', f(x'))\}`, estimated on a finite
  set of probe inputs :math:`x'` (the callback's default: the reference inputs and the training
  inputs). Because the probes contain every reference input :math:`x_i`,

  .. math:: R \le w^p\, \frac1m \sum_i \lVert y_i - f(x_i) \rVert^p = \text{risk}

  (:func:`prediction_risk`, the test risk at the same loss): the gap is the risk minus what the
  model gains by being evaluated anywhere on its graph, not only at :math:`x_i`. On a finite probe
  set the estimate is biased *upwards* (a minimum over fewer points) and decreases to the gap of
  the whole graph as the probe set grows.
* The training set as a predictor (a lookup table) has :math:`\Omega_f` = the training pairs: its
  gap is the memorization line, which follows the law with :math:`d = \dim \Omega` (for
  :math:`y = g(x)`, the dimension of the inputs' manifold).
* Ambiguous tasks (several valid :math:`y` per :math:`x`): a conditional generator's prediction
  space is the set of its samples :math:`(x', y'_s)`, :math:`y'_s \sim f(\cdot \mid x')`; a
  regressor predicting the conditional mean has a gap bounded below by the spread of :math:`y`
  given :math:`x`, whatever :math:`n`.

Targets: regression targets as they are; classification targets one-hot with the model's
outputs as probabilities (softmax), so that a correct confident prediction is at distance 0 and
every wrong one at :math:`\sqrt 2\, w`; integer class labels are refused with how to convert them
(a label's number is not a position in a metric space).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gapcallback.functional.gap import representation_gap
from gapcallback.utils.checks import check_exponent, check_point_set, compute_dtype

__all__ = [
    "check_y_weight",
    "joint_points",
    "prediction_gap",
    "prediction_risk",
    "round_like_gap",
]


def check_y_weight(y_weight: object) -> float:
    """``y_weight`` as a positive finite float, or a ``ValueError``/``TypeError`` naming it."""
    if isinstance(y_weight, bool) or not isinstance(y_weight, (int, float)):
        raise TypeError(f"`y_weight` must be a positive number, got {y_weight!r}.")
    value = float(y_weight)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"`y_weight` must be positive and finite (the weight of the targets in the joint "
            f"distance), got {y_weight!r}."
        )
    return value


def round_like_gap(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A float64 mean rounded to ``dtype`` as the gap's float64 mean is (kept in float64 below
    ``dtype``'s smallest normal number or above its largest), returned in float64.

    :func:`prediction_gap` casts its float64 mean to the inputs' dtype; the risk rounded the same
    way keeps ``gap <= risk`` after the cast (rounding to nearest is monotone), where the
    unrounded float64 risk can be half a float32 ulp below a gap that equals it in float64.
    """
    v = float(value)
    info = torch.finfo(dtype)
    if dtype == torch.float64 or not (info.tiny <= v <= info.max):
        return value.to(torch.float64)
    return value.to(dtype).to(torch.float64)


def _targets(y: Tensor, rows: int, name: str, x_name: str) -> Tensor:
    """``y`` as ``[N, Dy]`` floating targets, refusing class labels."""
    if not isinstance(y, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor (convert numpy arrays with torch.as_tensor), got "
            f"{type(y).__name__}."
        )
    if not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool:
        raise TypeError(
            f"`{name}` holds integer values ({y.dtype}): class labels are not points of a metric "
            "space. Pass one-hot targets, torch.nn.functional.one_hot(labels, num_classes).float(), "
            "and the model's probabilities (softmax) as predictions; for integer-valued "
            "regression targets, pass them as floats (.float())."
        )
    if y.ndim == 1:
        y = y.unsqueeze(1)
    y = check_point_set(y, name)
    if y.shape[0] != rows:
        raise ValueError(
            f"`{name}` has {y.shape[0]} rows but `{x_name}` has {rows}: one target per input; "
            "pass pairs (x_i, y_i) of the same length."
        )
    return y.reshape(rows, -1)


def joint_points(
    x: Tensor,
    y: Tensor,
    *,
    y_weight: float = 1.0,
    names: tuple[str, str] = ("x", "y"),
) -> Tensor:
    r"""The joint vectors :math:`[x, w\,y]` ``[N, D_x + D_y]`` of pairs :math:`(x_i, y_i)`.

    Args:
        x: ``[N, *x_dims]`` inputs (flattened).
        y: ``[N, *y_dims]`` targets or predictions (flattened; ``[N]`` is one target per row),
            floating point: one-hot or probabilities for classes.
        y_weight: :math:`w > 0`, the weight of the targets in the joint distance.
        names: the arguments' names for error messages.

    Returns:
        ``[N, D_x + D_y]`` in the promoted floating dtype of ``x`` and ``y`` (float32 at least).
    """
    w = check_y_weight(y_weight)
    x = check_point_set(x, names[0])
    y = _targets(y, int(x.shape[0]), names[1], names[0])
    if x.device != y.device:
        raise ValueError(
            f"`{names[0]}` is on {x.device} but `{names[1]}` on {y.device}; move them to one device."
        )
    dtype = compute_dtype(x, y)
    flat_x = x.reshape(x.shape[0], -1).to(dtype)
    return torch.cat([flat_x, y.to(dtype) * w if w != 1.0 else y.to(dtype)], dim=1)


def prediction_gap(
    ref_x: Tensor,
    ref_y: Tensor,
    probe_x: Tensor,
    probe_y: Tensor,
    *,
    y_weight: float = 1.0,
    p: float = 2.0,
) -> Tensor:
    r"""The gap of a prediction task: references :math:`(x_i, y_i)` to the probe pairs
    :math:`(x'_j, y'_j)` of a model, :math:`\frac1m \sum_i \min_j l((x_i, y_i), (x'_j, y'_j))`.

    Exact (the engine of :func:`~gapcallback.functional.representation_gap` on
    :func:`joint_points`); exactly 0 when every reference pair is among the probe pairs.

    Args:
        ref_x, ref_y: ``[m, *x_dims]``, ``[m, *y_dims]`` held-out pairs.
        probe_x, probe_y: ``[M, *x_dims]``, ``[M, *y_dims]`` the model's pairs: probe inputs and
            its predictions there (or, for an ambiguous task, its samples given them).
        y_weight: :math:`w`, the weight of the targets.
        p: loss exponent.

    Returns:
        0-dim tensor, as :func:`~gapcallback.functional.representation_gap`.

    Example:
        >>> import torch
        >>> x = torch.linspace(0, 1, 50).unsqueeze(1)
        >>> f = lambda x: 2 * x
        >>> float(prediction_gap(x, f(x), x, f(x)))
        0.0
    """
    check_exponent(p)
    ref = joint_points(ref_x, ref_y, y_weight=y_weight, names=("ref_x", "ref_y"))
    probe = joint_points(probe_x, probe_y, y_weight=y_weight, names=("probe_x", "probe_y"))
    if ref.shape[1] != probe.shape[1]:
        raise ValueError(
            f"The reference pairs have {ref.shape[1]} joint features but the probe pairs "
            f"{probe.shape[1]}: `ref_x`/`probe_x` and `ref_y`/`probe_y` must describe the same "
            "spaces."
        )
    return representation_gap(ref, probe, p=p)


def prediction_risk(
    ref_y: Tensor, pred_y: Tensor, *, y_weight: float = 1.0, p: float = 2.0
) -> Tensor:
    r"""The test risk at the gap's loss, :math:`w^p \frac1m \sum_i \lVert y_i - f(x_i) \rVert^p`.

    Computed on the same scaled targets as :func:`joint_points` (float64 differences) and rounded
    to their dtype as the gap is (:func:`round_like_gap`), so :func:`prediction_gap` with the
    reference inputs among the probes is never above it.

    Args:
        ref_y: ``[m, *y_dims]`` targets.
        pred_y: ``[m, *y_dims]`` predictions at the same inputs.
        y_weight, p: as in :func:`prediction_gap`.

    Returns:
        0-dim float64 tensor.
    """
    p = check_exponent(p)
    w = check_y_weight(y_weight)
    n = int(ref_y.shape[0]) if isinstance(ref_y, Tensor) and ref_y.ndim else -1
    y = _targets(ref_y, n, "ref_y", "ref_y")
    f = _targets(pred_y, n, "pred_y", "ref_y")
    if y.shape[1] != f.shape[1]:
        raise ValueError(
            f"`pred_y` has {f.shape[1]} values per row but `ref_y` {y.shape[1]}; predict the "
            "targets' shape."
        )
    dtype = compute_dtype(y, f)
    scale = (lambda t: t.to(dtype) * w) if w != 1.0 else (lambda t: t.to(dtype))
    sq = (scale(y).double() - scale(f).double()).pow(2).sum(1)
    return round_like_gap(sq.pow(p / 2).mean(), dtype)
