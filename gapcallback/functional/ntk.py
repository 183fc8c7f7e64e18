"""The empirical neural tangent kernel (NTK) and its spectrum.

For a model ``f(x; theta)`` with trainable parameters ``theta`` (``P`` coordinates) and inputs
``x_1..x_N``, flatten the outputs into the vector ``F(theta)`` of ``N * O`` numbers
(``O = prod(output_shape)`` per input, row ``n * O + o`` is output ``o`` of input ``n``). With the
Jacobian ``J = dF / d theta`` (``[N O, P]``) the empirical NTK is the Gram matrix

.. code-block:: text

    Theta = J J^T,      Theta[(n, o), (m, o')] = <d f_o(x_n) / d theta, d f_o'(x_m) / d theta>

(Jacot et al. 2018). It is the kernel of the linearised model: one gradient-descent step on the
squared loss moves the outputs by ``-eta Theta (F - y)``, so the eigenvalues ``lambda_i`` of
``Theta`` are the learning speeds of its eigen-directions; their decay (``lambda_i ~ i^-alpha``)
and effective rank describe how many directions the network fits quickly.

``J`` is computed by ``torch.func`` (``jacrev`` of one input's outputs, ``vmap`` over a chunk of
inputs) and ``Theta`` is accumulated block by block,

.. code-block:: text

    Theta[a, b] = sum over parameter tensors t of J_a,t J_b,t^T        (a, b chunks of inputs)

so that only two chunks of ``J`` are held at a time (chunks are recomputed when ``J`` does not fit
the memory budget). The model is evaluated in ``eval()`` mode (every submodule's mode restored).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gapcallback.utils.checks import check_choice, check_optional_int, check_positive_int
from gapcallback.utils.modes import eval_mode
from gapcallback.utils.precision import full_precision

__all__ = ["NTKSpectrum", "empirical_ntk", "ntk_eigenvalues", "ntk_spectrum"]

#: Bytes of one chunk of the Jacobian when ``chunk_size`` is chosen automatically.
CHUNK_BYTES = 256 * 2**20


class NTKSpectrum(NamedTuple):
    """Summary of the empirical NTK's spectrum (see :func:`ntk_spectrum`).

    Attributes:
        eigenvalues: Tensor ``[k]``, the largest eigenvalues in descending order.
        effective_rank: 0-dim tensor, from *all* ``N O`` eigenvalues.
        decay_exponent: 0-dim tensor, ``alpha`` of ``lambda_i ~ i^-alpha`` fitted over the
            returned eigenvalues (NaN when fewer than two are above the numerical floor).
    """

    eigenvalues: Tensor
    effective_rank: Tensor
    decay_exponent: Tensor


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "`model` has no parameters with requires_grad=True, so its tangent kernel is empty; "
            "unfreeze the parameters to analyse (p.requires_grad_(True))."
        )
    for k, p in params.items():
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(
                f"`model` parameter {k!r} has dtype {p.dtype}; the NTK needs real floating "
                "parameters (complex parameters are not supported)."
            )
    devices = {p.device for p in params.values()}
    if len(devices) > 1:
        raise ValueError(
            f"`model` has trainable parameters on several devices ({sorted(map(str, devices))}); "
            "move the model to one device first."
        )
    return params


def _check_inputs(x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"`x` must be a torch.Tensor of inputs [N, *input_shape], got {type(x).__name__}."
        )
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(
            f"`x` must hold at least one input along its leading dimension, got shape "
            f"{tuple(x.shape)}."
        )
    return x


def _check_outputs(out: object, n: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"`model(x)` must return a Tensor [N, *output_shape], got {type(out).__name__}; wrap "
            "the model so that it returns the outputs to analyse."
        )
    if out.is_complex() or not out.is_floating_point():
        raise TypeError(
            f"`model(x)` returned dtype {out.dtype}; the NTK needs real floating outputs "
            "(complex or integer outputs have no real Jacobian)."
        )
    if out.ndim < 1 or out.shape[0] != n:
        raise ValueError(
            f"`model(x)` must return one row of outputs per input: {n} inputs gave shape "
            f"{tuple(out.shape)}."
        )
    if out[0].numel() == 0:
        raise ValueError(f"`model(x)` returned no outputs per input (shape {tuple(out.shape)}).")
    return out


def _raise_from_model(err: Exception) -> None:
    """Re-raise an exception of the model's forward as the same type, naming ``model(x)``."""
    message = (
        f"`model(x)` raised {type(err).__name__}: {err}. Check that `x` is what the model takes."
    )
    try:
        new = type(err)(message)
    except Exception:  # an exception type whose constructor takes other arguments
        new = RuntimeError(message)
    raise new from err


def _ntk(model: nn.Module, x: Tensor, chunk_size: int | None) -> Tensor:
    """``Theta`` as float64 ``[N O, N O]`` (model already in eval mode)."""
    from torch.func import functional_call, jacrev, vmap

    params = _trainable(model)
    x = _check_inputs(x)
    chunk_size = check_optional_int(chunk_size, "chunk_size")
    n = x.shape[0]
    size = sum(p.numel() for p in params.values())
    device = next(iter(params.values())).device
    constants = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    constants |= {k: v.detach() for k, v in model.named_buffers()}

    try:
        with torch.no_grad():
            first = model(x[:1])
    except Exception as err:
        _raise_from_model(err)
    first = _check_outputs(first, 1)
    outputs = first[0].numel()
    itemsize = max(p.element_size() for p in params.values())
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // max(1, outputs * size * itemsize))
    chunk_size = min(chunk_size, n)

    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        out = functional_call(model, p | constants, (xi.unsqueeze(0),))
        return out.reshape(-1)

    jac = vmap(jacrev(one), in_dims=(None, 0))

    def jacobian(start: int) -> list[Tensor]:
        chunk = x[start : start + chunk_size]
        try:
            with torch.enable_grad():
                blocks = jac(params, chunk)
        except Exception as err:
            raise RuntimeError(
                f"The Jacobian of `model(x)` (torch.func vmap over jacrev) failed with "
                f"{type(err).__name__}: {err}. The model must evaluate each input on its own "
                "under vmap (no .item(), no data-dependent Python control flow)."
            ) from err
        rows = chunk.shape[0] * outputs
        return [blocks[k].detach().reshape(rows, -1) for k in params]

    starts = list(range(0, n, chunk_size))
    theta = torch.zeros(n * outputs, n * outputs, dtype=torch.float64, device=device)
    with full_precision(device.type):
        for i, a in enumerate(starts):
            ja = jacobian(a)
            ra = slice(a * outputs, a * outputs + ja[0].shape[0])
            for b in starts[i:]:
                jb = ja if b == a else jacobian(b)
                rb = slice(b * outputs, b * outputs + jb[0].shape[0])
                block = sum(
                    (u @ v.T).double() for u, v in zip(ja, jb, strict=True)
                )  # sum over parameter tensors
                theta[ra, rb] = block
                if b != a:
                    theta[rb, ra] = block.T
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(
            "The Jacobian of `model(x)` is not finite (NaN/Inf) at these parameters and inputs."
        )
    return theta


def _dtype(model: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def empirical_ntk(model: nn.Module, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """The empirical neural tangent kernel ``Theta = J J^T`` of ``model`` on the inputs ``x``.

    Args:
        model: the network, called as ``model(x_chunk) -> Tensor [c, *output_shape]``; its
            parameters with ``requires_grad=True`` are the variables. Evaluated in ``eval()``
            mode (each submodule's mode restored), so batch norm uses its running statistics and
            every input's Jacobian is its own (``model`` must work under ``torch.func.vmap``).
        x: inputs ``[N, *input_shape]`` (any dtype the model accepts, e.g. token ids).
        chunk_size: inputs per Jacobian chunk (``[chunk_size * O, P]`` numbers held, two chunks
            at a time). Default: the most that fit in :data:`CHUNK_BYTES` (256 MiB). With
            ``C = ceil(N / chunk_size)`` chunks, ``C (C + 1) / 2`` chunk Jacobians are computed
            (one pass when ``C = 1``).

    Returns:
        Tensor ``[N O, N O]``, symmetric positive semi-definite, rows ordered input-major
        (``n * O + o``), float64 for float64 models and float32 otherwise (accumulated in
        float64), on the parameters' device.

    Example:
        >>> model = nn.Linear(3, 1, bias=False)             # f(x) = x . w, J = X
        >>> x = torch.eye(3)[:2]
        >>> empirical_ntk(model, x)                          # X X^T
        tensor([[1., 0.],
                [0., 1.]])
    """
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        theta = _ntk(model, x, chunk_size)
    return theta.to(_dtype(model))


def _eigenvalues(theta: Tensor) -> Tensor:
    """All eigenvalues of the PSD ``theta``, descending, round-off negatives clamped to 0."""
    with full_precision(theta.device.type):
        return torch.linalg.eigvalsh(theta).flip(0).clamp_min(0.0)


def _check_k(k: int, rows: int) -> int:
    k = check_positive_int(k, "k")
    if k > rows:
        raise ValueError(
            f"`k` = {k} exceeds the size of the NTK: {rows} rows (inputs times outputs per "
            "input); pass more inputs or a smaller k."
        )
    return k


def ntk_eigenvalues(
    model: nn.Module, x: Tensor, k: int = 10, *, chunk_size: int | None = None
) -> Tensor:
    """The ``k`` largest eigenvalues of the empirical NTK ``Theta = J J^T``, largest first.

    ``Theta`` is formed by :func:`empirical_ntk` (exact, chunked) and diagonalised in float64
    (``torch.linalg.eigvalsh``). Its eigenvalues equal the squared singular values of ``J``;
    round-off negatives are clamped to 0 (``Theta`` is positive semi-definite).

    Args:
        model: the network (see :func:`empirical_ntk`).
        x: inputs ``[N, *input_shape]``.
        k: number of eigenvalues, ``1 <= k <= N O``.
        chunk_size: see :func:`empirical_ntk`.

    Returns:
        Tensor ``[k]`` in descending order (float64 for float64 models, else float32).

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> ntk_eigenvalues(model, torch.tensor([[3.0, 0.0], [0.0, 1.0]]), k=2)
        tensor([9., 1.])
    """
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        theta = _ntk(model, x, chunk_size)
    k = _check_k(k, theta.shape[0])
    return _eigenvalues(theta)[:k].to(_dtype(model))


def ntk_spectrum(
    model: nn.Module,
    x: Tensor,
    k: int | None = None,
    *,
    chunk_size: int | None = None,
    rank: str = "participation",
) -> NTKSpectrum:
    """Eigenvalues, effective rank and power-law decay exponent of the empirical NTK.

    With the eigenvalues ``lambda_1 >= ... >= lambda_R >= 0`` of ``Theta`` (``R = N O``):

    .. code-block:: text

        effective rank, rank="participation":  (sum_i lambda_i)^2 / sum_i lambda_i^2
        effective rank, rank="entropy":        exp(-sum_i p_i log p_i),  p_i = lambda_i / sum_j lambda_j
        decay exponent alpha:                   least-squares slope of log lambda_i against log i,
                                                alpha = -slope, over i = 1..m

    Both effective ranks lie in ``[1, R]``: ``R`` for a flat spectrum, 1 for a rank-one kernel
    (the participation ratio; Roy & Vetterli 2007 for the entropy form). Both use all ``R``
    eigenvalues, whatever ``k``. The decay fit range is the returned top ``k`` eigenvalues
    (all when ``k`` is None), stopping before the first one at or below the numerical floor
    ``1000 * eps * lambda_1`` (``eps`` of the model's dtype), where rounding, not the kernel,
    sets the value; ``m`` is the number kept. ``alpha`` is NaN when ``m < 2``.
    An exact power law ``lambda_i = c i^-alpha`` gives back ``alpha``.

    Args:
        model: the network (see :func:`empirical_ntk`).
        x: inputs ``[N, *input_shape]``.
        k: number of eigenvalues returned and fitted, ``1 <= k <= N O``; ``None``: all.
        chunk_size: see :func:`empirical_ntk`.
        rank: ``"participation"`` (default) or ``"entropy"``.

    Returns:
        :class:`NTKSpectrum` ``(eigenvalues [k], effective_rank, decay_exponent)``, float64 for
        float64 models and float32 otherwise. A zero kernel gives effective rank 0.
    """
    rank = check_choice(rank, "rank", ("participation", "entropy"))
    with eval_mode(model) if isinstance(model, nn.Module) else nullcontext():
        theta = _ntk(model, x, chunk_size)
    rows = theta.shape[0]
    k = rows if k is None else _check_k(k, rows)
    dtype = _dtype(model)
    lam = _eigenvalues(theta)
    total = lam.sum()
    if float(total) <= 0.0:
        eff = torch.zeros((), dtype=torch.float64, device=lam.device)
    elif rank == "participation":
        eff = total**2 / (lam**2).sum()
    else:
        p = lam / total
        p = p[p > 0]
        eff = torch.exp(-(p * p.log()).sum())
    top = lam[:k]
    floor = 1000.0 * torch.finfo(dtype).eps * float(lam[0])
    above = top > floor
    m = int(above.long().cumprod(0).sum()) if float(lam[0]) > 0 else 0
    if m >= 2:
        log_i = torch.arange(1, m + 1, dtype=torch.float64, device=lam.device).log()
        log_l = top[:m].log()
        li = log_i - log_i.mean()
        slope = (li * (log_l - log_l.mean())).sum() / (li * li).sum()
        alpha = -slope
    else:
        alpha = torch.tensor(math.nan, dtype=torch.float64, device=lam.device)
    return NTKSpectrum(top.to(dtype), eff.to(dtype), alpha.to(dtype))
