"""Gradient signal-to-noise ratio (GSNR) and the one-step generalization ratio (OSGR).

For a model with parameters ``theta`` (``P`` coordinates in total) and per-sample gradients
``g_i = grad_theta loss(x_i)`` on ``B`` samples, the per-coordinate gradient SNR is

.. code-block:: text

    r_j = mean_i(g_ij)^2 / var_i(g_ij)                  (unbiased variance, divisor B - 1)

(Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of Parameters").
One step of gradient descent with learning rate ``lambda`` on a training set of ``n`` samples
decreases the training loss by ``E[dL_train] = lambda * sum_j (gbar_j^2 + sigma_j^2 / n)`` and the
population loss by ``E[dL_test] = lambda * sum_j gbar_j^2``; their ratio is the one-step
generalization ratio

.. code-block:: text

    OSGR = E[dL_test] / E[dL_train] = 1 - (1/n) sum_j W_j / (r_j + 1/n),
    W_j  = (gbar_j^2 + sigma_j^2 / n) / sum_k (gbar_k^2 + sigma_k^2 / n)

``W_j`` is coordinate ``j``'s share of the expected training-loss decrease (its expected squared
full-batch gradient). ``OSGR`` is 1 when every coordinate is pure signal and 0 when the gradient is
pure noise; the predicted growth of the generalization gap per unit of training-loss decrease is
``1 - OSGR``.

Everything here is a pure function of tensors (torchmetrics "functional" style) plus one small
streaming accumulator, :class:`StreamingGradientMoments`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "StreamingGradientMoments",
    "gradient_moments",
    "gradient_snr",
    "one_step_generalization_ratio",
    "osgr_weights",
    "per_sample_gradients",
    "predicted_gap_growth",
]

GradTree = TypeVar("GradTree", Tensor, Mapping[str, Tensor], Sequence[Tensor])


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _map(fn: Callable[..., Tensor], tree: Any, *others: Any) -> Any:
    """Apply ``fn`` leaf-wise to a Tensor, a mapping of tensors or a sequence of tensors."""
    if isinstance(tree, Tensor):
        return fn(tree, *others)
    if isinstance(tree, Mapping):
        return {k: fn(v, *(o[k] for o in others)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(fn(v, *(o[i] for o in others)) for i, v in enumerate(tree))
    raise TypeError(
        "Expected a Tensor, a mapping name -> Tensor or a list/tuple of tensors, got "
        f"{type(tree).__name__}."
    )


def _flat(tree: Any) -> Tensor:
    """Concatenate the leaves of a tensor tree into one flat float tensor ``[P]``."""
    if isinstance(tree, Tensor):
        return tree.reshape(-1)
    if isinstance(tree, Mapping):
        leaves = list(tree.values())
    elif isinstance(tree, (list, tuple)):
        leaves = list(tree)
    else:
        raise TypeError(
            "Expected a Tensor, a mapping name -> Tensor or a list/tuple of tensors, got "
            f"{type(tree).__name__}."
        )
    if not leaves:
        raise ValueError("Got an empty collection of tensors: there are no parameters to analyse.")
    return torch.cat([t.reshape(-1) for t in leaves])


def _check_samples(g: Tensor) -> Tensor:
    if not isinstance(g, Tensor):
        raise TypeError(f"Per-sample gradients must be tensors, got {type(g).__name__}.")
    if g.ndim < 1 or g.shape[0] < 2:
        raise ValueError(
            "Per-sample gradients need a leading sample dimension with at least 2 samples "
            f"(the variance is undefined for one), got shape {tuple(g.shape)}."
        )
    if not g.is_floating_point():
        g = g.float()
    return g


# ----------------------------------------------------------------------------------------------
# per-sample gradients
# ----------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so torch.func can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _batch_size(batch: Any) -> int:
    leaves = [t for t in _leaves(batch) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("The batch holds no tensors; pass a Tensor or a tuple/dict of tensors.")
    sizes = {t.shape[0] for t in leaves if t.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(
            f"Every tensor in the batch must share the leading (sample) dimension, got sizes {sizes}."
        )
    return sizes.pop()


def _leaves(batch: Any) -> list[Any]:
    if isinstance(batch, Mapping):
        return [x for v in batch.values() for x in _leaves(v)]
    if isinstance(batch, (list, tuple)):
        return [x for v in batch for x in _leaves(v)]
    return [batch]


def _index(batch: Any, i: slice | int) -> Any:
    if isinstance(batch, Tensor):
        return batch[i] if batch.ndim > 0 else batch
    if isinstance(batch, Mapping):
        return {k: _index(v, i) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_index(v, i) for v in batch)
    return batch


def per_sample_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    method: str = "vmap",
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradients of each sample's loss with respect to every trainable parameter.

    Uses ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``): the loss of one sample is a
    function of the parameters, differentiated and vectorised over the batch. Each sample is fed
    to ``loss_fn`` as a batch of one (leading dimension kept), so the same ``loss_fn`` works for the
    training step and here.

    Args:
        model: the network; parameters with ``requires_grad=False`` are treated as constants.
            Its train/eval mode is used as is (put it in ``eval()`` for batch norm, whose batch
            statistics couple the samples; dropout draws different masks per sample).
        loss_fn: ``loss_fn(model, batch) -> Tensor [B]`` per-sample losses (not reduced), e.g.
            ``lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")``. It must call the
            model passed to it (not a captured reference) so that parameters can be substituted.
        batch: a Tensor or a (nested) tuple/list/dict of tensors sharing the leading dimension
            ``B``.
        method: ``"vmap"`` (default, vectorised) or ``"loop"`` (one ``autograd.grad`` call per
            sample; slower, works for any model, e.g. ones with data-dependent control flow).
        chunk_size: forwarded to ``vmap`` to bound memory (``None``: all samples at once).

    Returns:
        ``{name: Tensor [B, *param.shape]}`` for every parameter with ``requires_grad``, in
        ``model.named_parameters()`` order.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> loss = lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2
        >>> g = per_sample_gradients(model, loss, (torch.randn(5, 3), torch.randn(5)))
        >>> g["weight"].shape
        torch.Size([5, 1, 3])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be callable as loss_fn(model, batch) -> per-sample losses [B]."
        )
    if method not in ("vmap", "loop"):
        raise ValueError(f"Unknown method {method!r}: expected 'vmap' or 'loop'.")
    n = _batch_size(batch)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError("The model has no parameters with requires_grad=True.")
    running = [
        name
        for name, module in model.named_modules()
        if module.training and getattr(module, "running_mean", None) is not None
    ]
    if running:
        raise ValueError(
            f"`model` has normalisation layers in train mode that update running statistics "
            f"({', '.join(repr(r) for r in running[:3])}{', ...' if len(running) > 3 else ''}): "
            "in train mode batch norm computes its statistics over the batch, which couples the "
            "samples, so per-sample gradients are not defined (and the update is an in-place "
            "write torch.func cannot differentiate). Call model.eval() first (GradientSNR does)."
        )

    def _as_scalar(losses: Tensor) -> Tensor:
        if losses.numel() != 1:
            raise ValueError(
                "loss_fn(model, batch) must return one loss per sample, shape [B]; with a batch "
                f"of one sample it returned shape {tuple(losses.shape)}. Use reduction='none'."
            )
        return losses.reshape(())

    if method == "loop":
        out: dict[str, list[Tensor]] = {k: [] for k in params}
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        for i in range(n):
            with torch.enable_grad():
                loss = _as_scalar(loss_fn(model, _index(batch, slice(i, i + 1))))
                grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (k, p), g in zip(named, grads, strict=True):
                out[k].append(torch.zeros_like(p) if g is None else g.detach())
        return {k: torch.stack(v) for k, v in out.items()}

    from torch.func import functional_call, grad, vmap

    wrapper = _LossModule(model, loss_fn)
    buffers = {f"model.{k}": v.detach() for k, v in model.named_buffers()}
    frozen = {f"model.{k}": v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    batch_dims = _map_batch(lambda t: 0, batch, leaf_default=None)

    def one(p: dict[str, Tensor], sample: Any) -> Tensor:
        sample = _unsqueeze_batched(sample, batch_dims)
        state = {f"model.{k}": v for k, v in p.items()} | buffers | frozen
        return _as_scalar(functional_call(wrapper, state, (sample,)))

    in_dims = (None, batch_dims)
    with torch.enable_grad():
        grads = vmap(grad(one), in_dims=in_dims, chunk_size=chunk_size, randomness="different")(
            params, batch
        )
    return {k: grads[k].detach() for k in params}


def _unsqueeze_batched(sample: Any, dims: Any) -> Any:
    """Give every vmapped leaf (``dims`` entry 0) back a leading batch dimension of one."""
    if isinstance(sample, Tensor):
        return sample.unsqueeze(0) if dims == 0 else sample
    if isinstance(sample, Mapping):
        return {k: _unsqueeze_batched(v, dims[k]) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(_unsqueeze_batched(v, d) for v, d in zip(sample, dims, strict=True))
    return sample


def _map_batch(fn: Callable[[Tensor], Any], batch: Any, leaf_default: Any = "keep") -> Any:
    if isinstance(batch, Tensor):
        return fn(batch) if batch.ndim > 0 else (batch if leaf_default == "keep" else None)
    if isinstance(batch, Mapping):
        return {k: _map_batch(fn, v, leaf_default) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_batch(fn, v, leaf_default) for v in batch)
    return batch if leaf_default == "keep" else None


# ----------------------------------------------------------------------------------------------
# moments, SNR, OSGR
# ----------------------------------------------------------------------------------------------


def gradient_moments(per_sample_grads: GradTree) -> tuple[GradTree, GradTree]:
    """Per-coordinate mean and unbiased variance over the sample dimension.

    Args:
        per_sample_grads: a Tensor ``[B, *shape]`` (``B >= 2``) or a mapping/sequence of them
            (e.g. the output of :func:`per_sample_gradients`).

    Returns:
        ``(mean, var)`` with the same structure, each leaf of shape ``[*shape]``;
        ``var = sum_i (g_i - mean)^2 / (B - 1)``.
    """

    def mv(g: Tensor) -> Tensor:
        g = _check_samples(g)
        return torch.stack(torch.var_mean(g, dim=0, correction=1)[::-1])

    both = _map(mv, per_sample_grads)
    return _map(lambda t: t[0], both), _map(lambda t: t[1], both)


def _snr_from_moments(mean: Tensor, var: Tensor) -> Tensor:
    signal = mean * mean
    r = signal / var
    # var == 0: pure signal (inf) when the mean is non-zero; a dead coordinate (0) when it is 0
    r = torch.where(var > 0, r, torch.where(signal > 0, torch.full_like(r, math.inf), 0.0))
    return r


def gradient_snr(per_sample_grads: GradTree) -> GradTree:
    """Per-coordinate gradient signal-to-noise ratio ``r = mean(g)^2 / var(g)``.

    The mean and the unbiased variance are taken over the leading (sample) dimension. Degenerate
    coordinates are handled without NaN: ``var = 0`` with a non-zero mean gives ``r = inf`` (every
    sample agrees: pure signal) and ``var = 0`` with a zero mean gives ``r = 0`` (a coordinate that
    never receives gradient, e.g. an unused embedding row). ``inf`` is harmless downstream:
    ``W / (inf + 1/n) = 0`` in the OSGR.

    Args:
        per_sample_grads: Tensor ``[B, *shape]`` with ``B >= 2``, or a mapping/sequence of them.

    Returns:
        ``r`` with the per-sample dimension removed (same structure as the input), ``r >= 0``.

    Example:
        >>> g = torch.tensor([[1.0, 1.0], [3.0, -1.0]])   # 2 samples, 2 coordinates
        >>> gradient_snr(g)                                # means (2, 0), variances (2, 2)
        tensor([2., 0.])
    """
    mean, var = gradient_moments(per_sample_grads)
    return _map(_snr_from_moments, mean, var)


def osgr_weights(mean: GradTree, var: GradTree, n: int) -> Tensor:
    """Liu et al.'s weights ``W_j = (mean_j^2 + var_j / n) / sum_k (mean_k^2 + var_k / n)``.

    ``W_j`` is coordinate ``j``'s expected share of a gradient-descent step's training-loss
    decrease (the expected squared full-batch gradient over a training set of ``n`` samples).

    Args:
        mean: per-coordinate gradient means (Tensor or mapping/sequence of tensors).
        var: per-coordinate per-sample gradient variances, same structure as ``mean``.
        n: number of samples averaged in one gradient step (see
            :func:`one_step_generalization_ratio`).

    Returns:
        Flat tensor ``[P]`` of non-negative weights summing to 1 (uniform if all are 0).
    """
    n = _check_n(n)
    m, v = _flat(mean).double(), _flat(var).double()
    w = m * m + v / n
    total = w.sum()
    if not torch.isfinite(total):
        raise ValueError("Gradient moments contain inf/NaN; cannot form OSGR weights.")
    if total <= 0:
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n < 1 or n != int(n):
        raise ValueError(f"n must be a positive integer number of samples, got {n!r}.")
    return int(n)


def one_step_generalization_ratio(
    r: GradTree, n: int, weights: Tensor | GradTree | None = None
) -> Tensor:
    """One-step generalization ratio ``OSGR = 1 - (1/n) sum_j W_j / (r_j + 1/n)``.

    The ratio of the expected population-loss decrease to the expected training-loss decrease for
    one gradient step (Liu et al. 2020, Eq. 13 under their non-overfitting assumption). It lies in
    [0, 1]: 1 when every coordinate's SNR is infinite, ``1 / (1 + 1/(n r))`` for a common ``r``.

    Args:
        r: per-coordinate gradient SNR (Tensor or mapping/sequence; flattened to ``[P]``).
        n: number of samples in one gradient step: the training-set size for full-batch gradient
            descent, the batch size for minibatch steps on fresh data.
        weights: ``W_j`` with the structure of ``r`` or flat ``[P]``, non-negative; normalised here
            to sum to 1. ``None`` uses uniform weights ``1/P`` — use :func:`osgr_weights` to get
            Liu et al.'s weights (the expected squared full-batch gradient), which is what
            :class:`~gapcallback.callbacks.gradient_snr.GradientSNR` does.

    Returns:
        0-dim float64 tensor.

    Example:
        >>> one_step_generalization_ratio(torch.tensor([1.0, 1.0]), n=1)   # 1 - (1/1) / (1 + 1)
        tensor(0.5000, dtype=torch.float64)
    """
    n = _check_n(n)
    rf = _flat(r).double()
    if (rf < 0).any() or rf.isnan().any():
        raise ValueError("The SNR r must be non-negative and not NaN.")
    if weights is None:
        w = torch.full_like(rf, 1.0 / rf.numel())
    else:
        w = _flat(weights).double().to(rf.device)
        if w.shape != rf.shape:
            raise ValueError(
                f"weights must have one entry per coordinate of r: got {w.numel()} and {rf.numel()}."
            )
        if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero.")
        w = w / w.sum()
    return 1.0 - (w / (rf + 1.0 / n)).sum() / n


def predicted_gap_growth(osgr: Tensor | float, train_loss_decrease: Tensor | float) -> Tensor:
    """Predicted increase of the generalization gap ``(1 - OSGR) * dL_train``.

    If the training loss falls by ``dL_train`` the population loss is predicted to fall by
    ``OSGR * dL_train``, so the gap ``L_test - L_train`` grows by the remainder.
    """
    return (1.0 - torch.as_tensor(osgr, dtype=torch.float64)) * torch.as_tensor(
        train_loss_decrease, dtype=torch.float64
    )


# ----------------------------------------------------------------------------------------------
# streaming estimate from minibatch gradients
# ----------------------------------------------------------------------------------------------


class StreamingGradientMoments:
    """Welford accumulator of minibatch gradients; a cheap per-sample SNR estimate.

    A minibatch gradient of ``b`` i.i.d. samples has the per-sample mean and ``1/b`` of the
    per-sample variance, so from ``T`` minibatch gradients ``G_1..G_T``

    .. code-block:: text

        mean_j  = (1/T) sum_t G_tj
        var_j   = b * sum_t (G_tj - mean_j)^2 / (T - 1)       (per-sample variance estimate)
        r_j     = mean_j^2 / var_j

    The estimate assumes the parameters move little over the window (drift inflates the variance),
    so reset it every few dozen steps (:class:`~gapcallback.callbacks.gradient_snr.GradientSNR` does
    so after every report). Memory: two float64 tensors per parameter.

    Example:
        >>> acc = StreamingGradientMoments()
        >>> for g in ([1.0, 0.0], [3.0, 0.0]):
        ...     acc.update([torch.tensor(g)], batch_size=4)
        >>> acc.snr()[0]            # mean 2, minibatch variance 2, per-sample variance 8
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self.count = 0
        self.batch_size_sum = 0
        self.mean: list[Tensor] = []
        self.m2: list[Tensor] = []

    def update(self, grads: Sequence[Tensor | None], batch_size: int) -> None:
        """Add one minibatch gradient (one tensor per parameter, ``None`` counts as zeros).

        Args:
            grads: list of gradient tensors in a fixed parameter order. A ``None`` entry (a
                parameter with no gradient this step) needs an earlier or later non-``None`` entry
                to know its shape; until then it is skipped.
            batch_size: samples averaged in this gradient.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if self.count and len(grads) != len(self.mean):
            raise ValueError(
                f"Expected {len(self.mean)} gradient tensors (as in the first update), got {len(grads)}."
            )
        self.count += 1
        self.batch_size_sum += int(batch_size)
        if self.count == 1:
            self.mean = [
                torch.zeros(0) if g is None else g.detach().double().clone() for g in grads
            ]
            self.m2 = [torch.zeros_like(m) for m in self.mean]
            return
        for i, g in enumerate(grads):
            if g is None:
                if self.mean[i].numel() == 0:
                    continue
                x = torch.zeros_like(self.mean[i])
            else:
                x = g.detach().double()
                if self.mean[i].numel() == 0:  # first time this parameter has a gradient
                    self.mean[i] = torch.zeros_like(x)
                    self.m2[i] = torch.zeros_like(x)
            delta = x - self.mean[i]
            self.mean[i] += delta / self.count
            self.m2[i] += delta * (x - self.mean[i])

    def moments(self) -> tuple[list[Tensor], list[Tensor]]:
        """``(mean, per-sample variance)`` per parameter; needs at least two updates."""
        if self.count < 2:
            raise ValueError(
                f"The streaming estimate needs at least 2 minibatch gradients, got {self.count}."
            )
        b = self.batch_size_sum / self.count
        var = [m2 * (b / (self.count - 1)) for m2 in self.m2]
        return [m.clone() for m in self.mean], var

    def snr(self) -> list[Tensor]:
        """Per-sample gradient SNR estimate per parameter (same conventions as :func:`gradient_snr`)."""
        mean, var = self.moments()
        return [_snr_from_moments(m, v) for m, v in zip(mean, var, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (tensors on CPU)."""
        return {
            "count": self.count,
            "batch_size_sum": self.batch_size_sum,
            "mean": [m.cpu() for m in self.mean],
            "m2": [m.cpu() for m in self.m2],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.count = int(state["count"])
        self.batch_size_sum = int(state["batch_size_sum"])
        self.mean = [m.clone() for m in state["mean"]]
        self.m2 = [m.clone() for m in state["m2"]]
