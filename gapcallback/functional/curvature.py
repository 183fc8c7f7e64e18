"""Curvature of the loss landscape: top Hessian eigenvalues (sharpness) and the Hessian trace.

For a model with trainable parameters ``theta`` (``P`` coordinates in total, every parameter with
``requires_grad=True`` flattened and concatenated in ``model.named_parameters()`` order) and a
scalar loss ``L(theta) = loss_fn(model, batch)``, the Hessian is the symmetric ``P x P`` matrix

.. code-block:: text

    H = d^2 L / d theta^2,        H v = d/de grad L(theta + e v) |_{e=0}

It is never formed: both functions below only need Hessian-vector products ``v -> H v``, computed
exactly (to rounding) by automatic differentiation with ``torch.func``:

* ``"forward-over-reverse"`` (default): ``jvp(grad(L), (theta,), (v,))`` -- one forward-mode pass
  through the backward pass, about the cost of two to three gradient evaluations per product;
* ``"reverse-over-reverse"``: ``vjp(grad(L), theta)`` built once (a backward pass that records its
  own graph), then each product is one more backward pass. Use it for models with an operation
  that has no forward-mode derivative.

Quantities:

* :func:`hessian_eigenvalues`: the ``k`` algebraically largest eigenvalues
  ``lambda_1 >= ... >= lambda_k`` of ``H`` by the Lanczos method with full reorthogonalisation.
  ``lambda_1`` is the *sharpness* of the minimum (Keskar et al. 2017; Cohen et al. 2021 "edge of
  stability": gradient descent with learning rate ``eta`` is stable only while ``lambda_1 < 2/eta``).
* :func:`hessian_trace`: ``tr H = sum_i lambda_i`` by Hutchinson's estimator with Rademacher
  vectors, with its standard error.

The model is evaluated in ``eval()`` mode (batch norm uses its running statistics, dropout is off):
the probes differentiate the deterministic function the model computes, and batch-norm running
statistics are never updated. Every submodule gets its own mode back afterwards. ``loss_fn`` must
be a deterministic function of the parameters (draw any noise once, into ``batch``).

Pure functions: no state is kept between calls; the random vectors come from a private
``torch.Generator`` seeded with ``seed`` (the global RNG is not touched).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gapcallback.utils.checks import check_number, check_positive_int
from gapcallback.utils.modes import eval_mode
from gapcallback.utils.precision import full_precision

__all__ = ["HessianTrace", "hessian_eigenvalues", "hessian_trace"]

LossFn = Callable[[nn.Module, Any], Tensor]

_METHODS = ("forward-over-reverse", "reverse-over-reverse")


class HessianTrace(NamedTuple):
    """Hutchinson's estimate of the Hessian trace.

    Attributes:
        trace: 0-dim tensor, ``(1/S) sum_s v_s^T H v_s`` over ``S`` Rademacher vectors ``v_s``.
        std: 0-dim tensor, its standard error ``sqrt(var_s(v_s^T H v_s) / S)`` (unbiased sample
            variance, divisor ``S - 1``). The estimator is unbiased, ``E[v^T H v] = tr H``, with
            variance ``2 sum_{i != j} H_ij^2`` per vector: exact (``std = 0``) for a diagonal ``H``.
    """

    trace: Tensor
    std: Tensor


# ----------------------------------------------------------------------------------------------
# the parameters as one flat vector, the loss as a function of it
# ----------------------------------------------------------------------------------------------


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``functional_call`` can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class _Flat:
    """The trainable parameters of a model and the map between ``{name: Tensor}`` and ``[P]``."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "`model` has no parameters with requires_grad=True, so the loss has no Hessian; "
                "unfreeze the parameters to analyse (p.requires_grad_(True))."
            )
        for k, p in named:
            if p.is_complex() or not p.is_floating_point():
                raise TypeError(
                    f"`model` parameter {k!r} has dtype {p.dtype}; curvature needs real floating "
                    "parameters (complex parameters are not supported)."
                )
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(
                f"`model` has trainable parameters on several devices ({sorted(map(str, devices))});"
                " move the model to one device first."
            )
        self.names = [k for k, _ in named]
        self.params = {k: p.detach() for k, p in named}
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dtypes = [p.dtype for _, p in named]
        self.size = sum(self.numels)
        self.device = named[0][1].device
        # Lanczos vectors and Rademacher probes: float64 for float64 models, else float32.
        self.dtype = torch.float64 if torch.float64 in self.dtypes else torch.float32
        self.constants = {
            k: v.detach() for k, v in model.named_parameters() if not v.requires_grad
        } | {k: v.detach() for k, v in model.named_buffers()}

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        parts = torch.split(vec, self.numels)
        return {
            k: part.reshape(shape).to(dtype)
            for k, part, shape, dtype in zip(
                self.names, parts, self.shapes, self.dtypes, strict=True
            )
        }

    def flatten(self, tree: dict[str, Tensor]) -> Tensor:
        return torch.cat([tree[k].reshape(-1).to(self.dtype) for k in self.names])


def _raise_from_loss_fn(err: Exception) -> None:
    """Re-raise an exception of ``loss_fn`` as the same type, with a message naming it."""
    message = (
        f"`loss_fn(model, batch)` raised {type(err).__name__}: {err}. Check that `batch` is what "
        "`loss_fn` expects and that it runs on the model in eval mode."
    )
    try:
        new = type(err)(message)
    except Exception:  # an exception type whose constructor takes other arguments
        new = RuntimeError(message)
    raise new from err


def _check_loss(loss: object) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`loss_fn(model, batch)` must return a scalar Tensor, got {type(loss).__name__}."
        )
    if loss.is_complex() or not loss.is_floating_point():
        raise TypeError(
            f"`loss_fn(model, batch)` returned dtype {loss.dtype}; the loss must be a real "
            "floating scalar to have a Hessian."
        )
    if loss.numel() != 1:
        raise ValueError(
            "`loss_fn(model, batch)` must return a scalar loss (one number), got shape "
            f"{tuple(loss.shape)}; reduce it, e.g. `.mean()`."
        )
    return loss


class _HVP:
    """``v -> H v`` for ``L(theta) = loss_fn(model, batch)`` at the model's current parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any, method: str) -> None:
        from torch.func import functional_call, grad, jvp, vjp

        if not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be callable as loss_fn(model, batch) -> scalar loss Tensor, got "
                f"{type(loss_fn).__name__}."
            )
        if method not in _METHODS:
            raise ValueError(
                f"`method` must be one of {', '.join(map(repr, _METHODS))}; got {method!r}."
            )
        self.flat = flat = _Flat(model)
        # One plain evaluation first: loss_fn's own failures and a wrong return value are
        # reported as such, not as a torch.func error.
        try:
            with torch.no_grad():
                loss = loss_fn(model, batch)
        except Exception as err:
            _raise_from_loss_fn(err)
        loss = _check_loss(loss)
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError(
                f"`loss_fn(model, batch)` returned {float(loss)}; the Hessian of a non-finite "
                "loss is undefined."
            )
        self.loss = float(loss.detach())
        wrapper = _LossModule(model, loss_fn)
        constants = {f"model.{k}": v for k, v in flat.constants.items()}

        def loss_of(p: dict[str, Tensor]) -> Tensor:
            state = {f"model.{k}": v for k, v in p.items()} | constants
            return functional_call(wrapper, state, (batch,)).reshape(())

        self.method = method
        gradient = grad(loss_of)
        if method == "forward-over-reverse":

            def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
                return jvp(gradient, (flat.params,), (v,))[1]

        else:
            with torch.enable_grad():
                _, pullback = vjp(gradient, flat.params)

            def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
                return pullback(v)[0]

        self._product = product
        self.calls = 0

    def __call__(self, vec: Tensor) -> Tensor:
        try:
            with torch.enable_grad():
                out = self._product(self.flat.unflatten(vec))
        except Exception as err:
            hint = (
                " If an operation lacks a forward-mode derivative, pass "
                "method='reverse-over-reverse'."
                if self.method == "forward-over-reverse"
                else ""
            )
            raise RuntimeError(
                f"A Hessian-vector product of `loss_fn(model, batch)` failed with "
                f"{type(err).__name__}: {err}.{hint}"
            ) from err
        self.calls += 1
        hv = self.flat.flatten({k: t.detach() for k, t in out.items()})
        if not bool(torch.isfinite(hv).all()):
            raise ValueError(
                "A Hessian-vector product of `loss_fn(model, batch)` is not finite (NaN/Inf); "
                "the loss is not twice differentiable at these parameters."
            )
        return hv


# ----------------------------------------------------------------------------------------------
# Lanczos
# ----------------------------------------------------------------------------------------------


class _Lanczos(NamedTuple):
    eigenvalues: Tensor  # [k] float64, descending
    residuals: Tensor  # [k] float64, ||H y_i - theta_i y_i||
    iterations: int
    converged: bool


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """``w`` minus its projection on the rows of ``basis``, twice ("twice is enough", Kahan)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    iterations: int,
    tol: float,
    start: Callable[[], Tensor],
) -> _Lanczos:
    """The ``k`` largest eigenvalues of a symmetric operator by Lanczos, full reorthogonalisation.

    Each Lanczos vector is orthogonalised against all previous ones (twice), so the basis stays
    orthonormal to rounding and no ghost eigenvalues appear. On a breakdown (the Krylov space is
    invariant: ``beta ~ 0``) a fresh random vector orthogonal to the basis continues the
    iteration, which is how eigenvalues of multiplicity > 1 are found. Stops when every one of
    the top ``k`` Ritz pairs has residual ``beta_m |s_mi| <= tol * max_i |theta_i|``, after at
    least ``min(dim, max(2k + 1, 8))`` steps, or when the basis spans the whole space (exact).
    """
    q = start()
    q = q / q.norm()
    basis = torch.empty(min(iterations, dim), dim, dtype=q.dtype, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    min_steps = min(dim, max(2 * k + 1, 8))
    breakdown = 100.0 * torch.finfo(q.dtype).eps
    theta = s = None
    converged = False
    for j in range(basis.shape[0]):
        basis[j] = q
        w = matvec(q)
        alpha = float(q @ w)
        w = _orthogonalise(w, basis[: j + 1])
        beta = float(w.norm())
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        theta, s = _tridiagonal_eigh(alphas, betas)
        m = j + 1
        if m == dim:  # the basis spans the space: T is H in that basis, its spectrum is exact
            converged = True
            beta = 0.0
            break
        if beta <= breakdown * max(scale, 1e-300):  # invariant Krylov space: restart
            q = _orthogonalise(start(), basis[:m])
            norm = float(q.norm())
            if norm <= breakdown:
                converged = True
                beta = 0.0
                break
            betas.append(0.0)
            q = q / norm
            continue
        top = min(k, m)
        residual = beta * s[-1, -top:].abs()
        if m >= min_steps and top == k:
            ritz_scale = max(float(theta.abs().max()), 1e-300)
            if bool((residual <= tol * ritz_scale).all()):
                converged = True
                break
        betas.append(beta)
        q = w / beta
    assert theta is not None and s is not None
    top = min(k, theta.numel())
    residual = (beta * s[-1, -top:].abs()).flip(0)
    if not converged and top == k:  # the last step (or restart) may have met the tolerance
        converged = bool((residual <= tol * max(float(theta.abs().max()), 1e-300)).all())
    return _Lanczos(theta[-top:].flip(0), residual, len(alphas), converged)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    return seed


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    *,
    iterations: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    method: str = "forward-over-reverse",
) -> Tensor:
    """The ``k`` largest eigenvalues of the Hessian of ``loss_fn(model, batch)``, largest first.

    Lanczos iteration on Hessian-vector products (``torch.func``, see the module docstring), with
    full reorthogonalisation: after ``m`` steps the orthonormal basis ``Q_m = [q_1 .. q_m]`` of
    the Krylov space ``span{q_1, H q_1, .., H^(m-1) q_1}`` gives the tridiagonal
    ``T_m = Q_m^T H Q_m`` whose eigenvalues ``theta_i`` (Ritz values) approach the extreme
    eigenvalues of ``H``, the largest ones first. The start vector ``q_1`` is Gaussian, drawn from
    a generator seeded with ``seed``.

    Convergence. For a Ritz pair ``(theta_i, y_i = Q_m s_i)`` the residual is
    ``r_i = ||H y_i - theta_i y_i|| = beta_m |s_i[m]|``, and some eigenvalue ``lambda`` of ``H``
    satisfies ``|lambda - theta_i| <= r_i`` (and ``<= r_i^2 / gap_i``, the distance to the rest of
    the spectrum, once ``r_i < gap_i``: the eigenvalue error is usually far below ``r_i``).
    Iteration stops when ``r_i <= tol * max_j |theta_j|`` for all ``k`` returned values (after
    at least ``min(P, max(2k + 1, 8))`` steps), or when the basis spans all ``P`` coordinates
    (the result is then exact to rounding), or after ``iterations`` steps, with a
    ``RuntimeWarning`` giving the residuals. Ritz values never exceed the true ``lambda_1``
    (they interlace); with a random start a missed eigenvalue has probability zero, but an
    eigenvalue whose eigenvector is nearly orthogonal to ``q_1`` can appear late. Eigenvalues of
    multiplicity ``> 1`` are found by restarting with a fresh orthogonal vector when the Krylov
    space becomes invariant.

    Cost: one Hessian-vector product per step (typically 20-60 for ``k = 1`` at the default
    ``tol``) and ``iterations * P`` stored numbers (float32 for float32 models).

    Args:
        model: the network; its parameters with ``requires_grad=True`` are the variables
            (frozen ones and buffers are constants). Evaluated in ``eval()`` mode, every
            submodule's mode restored afterwards; batch-norm statistics are not updated.
        loss_fn: ``loss_fn(model, batch) -> Tensor`` scalar loss, e.g.
            ``lambda m, b: F.cross_entropy(m(b[0]), b[1])``. Must be deterministic.
        batch: anything ``loss_fn`` accepts (a probe batch of training data).
        k: number of eigenvalues, ``1 <= k <= P``.
        iterations: the most Lanczos steps (capped at ``P``); must be ``>= k``.
        tol: relative residual tolerance (above), ``> 0``.
        seed: seed of the start vector.
        method: ``"forward-over-reverse"`` (default) or ``"reverse-over-reverse"`` (for operations
            without a forward-mode derivative; holds the double-backward graph in memory).

    Returns:
        Tensor ``[k]``, the algebraically largest eigenvalues in descending order (negative
        curvature shows as negative values), float64 for float64 models and float32 otherwise,
        on the parameters' device.

    Raises:
        TypeError, ValueError: bad arguments (the message names them), a ``loss_fn`` that fails
            (same exception type, message naming ``loss_fn``) or returns no real scalar.
        RuntimeError: a Hessian-vector product failed.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> loss = lambda m, b: (m(b) ** 2).sum()           # H = 2 X^T X
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> hessian_eigenvalues(model, loss, x, k=2)
        tensor([8., 2.])
    """
    k = check_positive_int(k, "k")
    iterations = check_positive_int(iterations, "iterations")
    tol = check_number(tol, "tol", minimum=0.0, strict=True)
    seed = _check_seed(seed)
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        hvp = _HVP(model, loss_fn, batch, method)
        flat = hvp.flat
        if k > flat.size:
            raise ValueError(
                f"`k` = {k} exceeds the number of trainable parameters ({flat.size}); the Hessian "
                f"has only {flat.size} eigenvalues."
            )
        if iterations < k and iterations < flat.size:
            raise ValueError(
                f"`iterations` = {iterations} is below `k` = {k}; Lanczos needs at least k steps."
            )
        gen = _generator(flat.device, seed)

        def start() -> Tensor:
            return torch.randn(flat.size, generator=gen, device=flat.device, dtype=flat.dtype)

        with full_precision(flat.device.type):
            result = _lanczos(hvp, flat.size, k, iterations, float(tol), start)
    if not result.converged:
        rel = float(result.residuals.max()) / max(float(result.eigenvalues.abs().max()), 1e-300)
        warnings.warn(
            f"hessian_eigenvalues: Lanczos did not converge in {result.iterations} iterations "
            f"(largest relative residual {rel:.2e} > tol = {tol:g}); the returned Ritz values are "
            "within their residuals of eigenvalues but may not be the largest yet. Increase "
            "`iterations` or `tol`.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result.eigenvalues.to(device=flat.device, dtype=flat.dtype)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    samples: int = 100,
    seed: int = 0,
    method: str = "forward-over-reverse",
) -> HessianTrace:
    """Hutchinson's estimate of the trace of the Hessian of ``loss_fn(model, batch)``.

    .. code-block:: text

        tr H ~ (1/S) sum_{s=1..S} v_s^T H v_s,      v_s i.i.d. Rademacher (+-1 entries)

    unbiased (``E[v v^T] = I``) with per-vector variance ``2 sum_{i != j} H_ij^2``, the smallest
    among estimators with i.i.d. entries (Hutchinson 1990). The returned standard error
    ``std = sqrt(var_s / S)`` (sample variance ``var_s``) makes ``trace +- 2 std`` an approximate
    95% interval for ``S`` beyond a few tens. ``tr H`` is the sum of all ``P`` eigenvalues: a flatness
    measure that, unlike the top eigenvalue, sees every direction.

    Args:
        model: the network (trainable parameters as in :func:`hessian_eigenvalues`; evaluated in
            eval mode, modes restored, batch-norm statistics untouched).
        loss_fn: ``loss_fn(model, batch) -> Tensor`` scalar loss (deterministic).
        batch: anything ``loss_fn`` accepts.
        samples: number of Rademacher vectors ``S >= 2`` (one Hessian-vector product each).
        seed: seed of the generator drawing the vectors (on the parameters' device).
        method: Hessian-vector product mode, see :func:`hessian_eigenvalues`.

    Returns:
        :class:`HessianTrace` ``(trace, std)``: 0-dim tensors, float64 for float64 models and
        float32 otherwise, on the parameters' device.

    Raises:
        TypeError, ValueError, RuntimeError: as :func:`hessian_eigenvalues`.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> loss = lambda m, b: (m(b) ** 2).sum()           # H = 2 X^T X = diag(2, 8)
        >>> hessian_trace(model, loss, torch.tensor([[1.0, 0.0], [0.0, 2.0]]), samples=4)
        HessianTrace(trace=tensor(10.), std=tensor(0.))
    """
    samples = check_positive_int(samples, "samples", minimum=2)
    seed = _check_seed(seed)
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        hvp = _HVP(model, loss_fn, batch, method)
        flat = hvp.flat
        gen = _generator(flat.device, seed)
        values = torch.empty(samples, dtype=torch.float64)
        with full_precision(flat.device.type):
            for i in range(samples):
                v = torch.randint(0, 2, (flat.size,), generator=gen, device=flat.device)
                v = v.to(flat.dtype).mul_(2).sub_(1)
                values[i] = float((v.double() * hvp(v).double()).sum())
    var, mean = torch.var_mean(values, correction=1)
    std = torch.sqrt(var / samples)
    out = {"device": flat.device, "dtype": flat.dtype}
    return HessianTrace(mean.to(**out), std.to(**out))
