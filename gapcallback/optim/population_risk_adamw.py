"""AdamW with a per-coordinate population-risk gate (validation-free generalization).

The optimizer keeps AdamW's two moments ``m`` (``exp_avg``) and ``v`` (``exp_avg_sq``) plus one
extra state tensor ``s`` (``gate_noise``): an exponential moving average of the squared
*leave-one-out* deviation of the batch gradient from the running mean of the previous batches.
Each coordinate's Adam step is multiplied by a gate ``q`` in [0, 1] that is open when the batch
signal ``m_hat^2`` exceeds ``alpha`` times the noise ``s_hat`` (Litman & Guo, arXiv 2605.01172).

For a parameter tensor with gradient ``g_t`` at step ``t`` (all operations element-wise):

.. code-block:: text

    m_prev = m_{t-1}                                   (first moment before this step's update; m_0 = 0)
    s_t    = rho * s_{t-1} + (1 - rho) * (g_t - m_prev)^2
    m_t    = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t    = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    m_hat  = m_t / (1 - beta1^t),  v_hat = v_t / (1 - beta2^t),  s_hat = s_t / (1 - rho^t)
    w     <- w * (1 - lr * weight_decay)                    (decoupled and *not* gated)
    w     <- w - lr * q * m_hat / (sqrt(v_hat) + eps)

with the gate ``q`` one of

.. code-block:: text

    "hard":  q = 1{m_hat^2 > alpha * s_hat}
    "soft":  q = (m_hat^2 - alpha * s_hat)_+ / ((m_hat^2 - alpha * s_hat)_+ + lambda * s_hat + gate_eps)
    "snr":   q = m_hat^2 / (m_hat^2 + lambda * s_hat + gate_eps)

and ``alpha`` one of ``"online"`` (``alpha = 1``: every batch is fresh), ``"finite"``
(``alpha = b / (n - b)`` for a training set of ``n`` samples and batches of ``b``) or a number
``>= 0``. With ``gate="hard", alpha=0`` every gate is open and the optimizer reproduces
:class:`torch.optim.AdamW` step for step.

Note on the first step: ``m_prev = 0`` so ``s_hat_1 = g_1^2 = m_hat_1^2``; a single batch cannot
show signal above its own noise, so the ``"hard"`` and ``"soft"`` gates with ``alpha >= 1`` are
closed at ``t = 1`` (only weight decay moves the weights) and the ``"snr"`` gate is
``1 / (1 + lambda)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["PopulationRiskAdamW", "resolve_alpha"]

_GATES = ("hard", "soft", "snr")
_ALPHA_MODES = ("online", "finite")


def resolve_alpha(
    alpha: str | float,
    dataset_size: int | None = None,
    batch_size: int | None = None,
) -> float:
    """Turn an ``alpha`` specification into the number used by the gate.

    Args:
        alpha: ``"online"`` (returns ``1.0``: each batch is drawn fresh from the population),
            ``"finite"`` (returns ``b / (n - b)``, the leave-one-out correction for a finite training
            set of ``n = dataset_size`` samples seen in batches of ``b = batch_size``) or a
            non-negative real number, returned as a float.
        dataset_size: number of training samples ``n`` (required for ``"finite"``).
        batch_size: samples per optimizer step ``b`` (required for ``"finite"``).

    Returns:
        The gate threshold ``alpha >= 0``.

    Raises:
        ValueError: on an unknown mode, a negative or non-finite number, or a ``"finite"`` request
            without valid ``dataset_size > batch_size >= 1``.
        TypeError: when ``alpha`` is neither a string nor a real number.

    Example:
        >>> resolve_alpha("finite", dataset_size=1000, batch_size=200)
        0.25
    """
    if isinstance(alpha, str):
        if alpha == "online":
            return 1.0
        if alpha == "finite":
            if dataset_size is None or batch_size is None:
                raise ValueError(
                    'alpha="finite" needs the training-set size and the batch size: pass '
                    "dataset_size=n and batch_size=b (alpha is then b / (n - b)), or give alpha as "
                    "a number."
                )
            n, b = int(dataset_size), int(batch_size)
            if b < 1 or n <= b:
                raise ValueError(
                    f'alpha="finite" needs dataset_size > batch_size >= 1, got dataset_size={n} and '
                    f"batch_size={b}. For full-batch training there is no leave-one-out noise: use "
                    "plain AdamW or a numeric alpha."
                )
            return b / (n - b)
        raise ValueError(
            f"Unknown alpha mode {alpha!r}: expected one of {_ALPHA_MODES} or a number >= 0."
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(
            f"alpha must be 'online', 'finite' or a real number >= 0, got {type(alpha).__name__}."
        )
    value = float(alpha)
    if not (value >= 0.0) or math.isnan(value):
        raise ValueError(f"alpha must be >= 0 (0 opens every gate), got {alpha}.")
    return value


def _check_hparams(group: dict[str, Any]) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("A tensor lr must hold exactly one element.")
        lr = float(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: lr={lr}; it must be >= 0.")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"Invalid eps={group['eps']}; it must be >= 0.")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"Invalid betas={betas}; expected two numbers in [0, 1).")
    if not 0.0 <= group["weight_decay"]:
        raise ValueError(f"Invalid weight_decay={group['weight_decay']}; it must be >= 0.")
    if group["gate"] not in _GATES:
        raise ValueError(f"Unknown gate {group['gate']!r}: expected one of {_GATES}.")
    if not 0.0 <= group["rho"] < 1.0:
        raise ValueError(f"Invalid rho={group['rho']}; the noise EMA decay must lie in [0, 1).")
    if not 0.0 <= group["gate_lambda"]:
        raise ValueError(f"Invalid gate_lambda={group['gate_lambda']}; it must be >= 0.")
    if not 0.0 <= group["gate_eps"]:
        raise ValueError(f"Invalid gate_eps={group['gate_eps']}; it must be >= 0.")


class PopulationRiskAdamW(Optimizer):
    r"""AdamW whose per-coordinate update is gated by a validation-free population-risk test.

    A coordinate moves (beyond weight decay) only as far as its batch signal ``m_hat^2`` exceeds
    ``alpha`` times its leave-one-out noise ``s_hat``; see the module docstring for the full
    update. State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v) and the one extra
    tensor ``gate_noise`` (s), plus two 0-dim diagnostics ``gate_open`` (fraction of coordinates
    with ``q > 0`` at the last step) and ``gate_mean`` (mean of ``q``).

    Args:
        params: iterable of parameters or of parameter-group dicts (any argument below may be
            overridden per group, including ``alpha``, ``dataset_size`` and ``batch_size``).
        lr: learning rate.
        betas: ``(beta1, beta2)`` decay rates of the first and second moments.
        eps: term added to ``sqrt(v_hat)`` (as in AdamW).
        weight_decay: decoupled weight decay coefficient; applied to every coordinate whatever its
            gate (so with every gate closed only weight decay moves the weights).
        gate: ``"soft"`` (default), ``"hard"`` or ``"snr"``.
        alpha: ``"online"`` (1; fresh batches), ``"finite"`` (``b / (n - b)``; needs
            ``dataset_size`` and ``batch_size``) or a number ``>= 0``. Larger values gate more.
        gate_lambda: ``lambda``, the noise weight in the denominators of the ``"soft"`` and ``"snr"``
            gates (unused by ``"hard"``).
        rho: decay of the noise EMA ``s`` (bias-corrected by ``1 - rho^t``).
        gate_eps: small constant in the gate denominators (keeps ``0 / 0`` at ``q = 0``).
        dataset_size: ``n`` for ``alpha="finite"``.
        batch_size: ``b`` for ``alpha="finite"``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = PopulationRiskAdamW(model.parameters(), lr=1e-3, gate="hard", alpha="online")
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> _ = opt.step()
        >>> opt.open_gate_fraction()  # a single batch never beats its own noise with alpha = 1
        0.0
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        gate: str = "soft",
        alpha: str | float = "online",
        gate_lambda: float = 1.0,
        rho: float = 0.99,
        gate_eps: float = 1e-30,
        dataset_size: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "gate": gate,
            "alpha": alpha,
            "gate_lambda": gate_lambda,
            "rho": rho,
            "gate_eps": gate_eps,
            "dataset_size": dataset_size,
            "batch_size": batch_size,
        }
        # validate the defaults once up front so a bad argument fails here with a clear message
        probe = dict(defaults)
        _check_hparams(probe)
        resolve_alpha(alpha, dataset_size, batch_size)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, validating its hyper-parameters and resolving its ``alpha``.

        The group's ``alpha`` is stored as the resolved number (``"online"`` -> 1.0, ``"finite"``
        -> ``b / (n - b)``) so that ``state_dict`` round trips need no extra information.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        _check_hparams(group)
        group["alpha"] = resolve_alpha(group["alpha"], group["dataset_size"], group["batch_size"])
        for p in group["params"]:
            if p.is_complex():
                raise TypeError("PopulationRiskAdamW supports real parameters only.")

    @staticmethod
    def _gate(
        m_hat: Tensor,
        s_hat: Tensor,
        gate: str,
        alpha: float,
        gate_lambda: float,
        gate_eps: float,
    ) -> Tensor:
        """Element-wise gate ``q`` in [0, 1] from ``m_hat`` and ``s_hat`` (same shape)."""
        signal = m_hat * m_hat
        if gate == "hard":
            return (signal > alpha * s_hat).to(m_hat.dtype)
        tiny = torch.finfo(m_hat.dtype).tiny
        noise = gate_lambda * s_hat
        if gate == "soft":
            excess = (signal - alpha * s_hat).clamp_min_(0.0)
            return excess / (excess + noise + gate_eps).clamp_min_(tiny)
        # "snr"
        return signal / (signal + noise + gate_eps).clamp_min_(tiny)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure`` (``None`` without one).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, Tensor) else lr
            wd, eps = group["weight_decay"], group["eps"]
            rho, alpha = group["rho"], float(group["alpha"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(
                        "PopulationRiskAdamW does not support sparse gradients; use dense embeddings."
                    )
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["gate_noise"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, gate_noise = (
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    state["gate_noise"],
                )
                state["step"] += 1
                t = float(state["step"])

                # leave-one-out noise: deviation of this batch from the mean of previous batches
                dev = grad - exp_avg  # exp_avg is m_prev here (before this step's update)
                gate_noise.mul_(rho).addcmul_(dev, dev, value=1.0 - rho)

                # decoupled weight decay, applied whatever the gate (exactly as torch AdamW)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)

                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)

                bias_correction1 = 1.0 - beta1**t
                bias_correction2 = 1.0 - beta2**t
                bias_correction_s = 1.0 - rho**t
                if t == 1.0:
                    # after one observation both bias-corrected EMAs equal it exactly; computing
                    # them this way keeps the m_hat^2 == s_hat tie exact instead of rounding-driven
                    m_hat, s_hat = grad, dev * dev
                else:
                    m_hat = exp_avg / bias_correction1
                    s_hat = gate_noise / bias_correction_s
                q = self._gate(
                    m_hat, s_hat, group["gate"], alpha, group["gate_lambda"], group["gate_eps"]
                )
                state["gate_open"] = (q > 0).float().mean()
                state["gate_mean"] = q.mean(dtype=torch.promote_types(q.dtype, torch.float32))

                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
                p.addcdiv_(q * exp_avg, denom, value=-lr / bias_correction1)

        return loss

    def _gate_stat(self, key: str, group: int | None) -> float:
        groups = self.param_groups if group is None else [self.param_groups[group]]
        total, weight = 0.0, 0
        for g in groups:
            for p in g["params"]:
                st = self.state.get(p, {})
                if key in st:
                    total += float(st[key]) * p.numel()
                    weight += p.numel()
        return total / weight if weight else float("nan")

    def open_gate_fraction(self, group: int | None = None) -> float:
        """Fraction of coordinates whose gate was open (``q > 0``) at the last step.

        Args:
            group: index of a parameter group, or ``None`` for all groups (weighted by
                ``numel``).

        Returns:
            A float in [0, 1]; ``nan`` before the first step.
        """
        return self._gate_stat("gate_open", group)

    def mean_gate(self, group: int | None = None) -> float:
        """Mean gate value ``q`` over coordinates at the last step (``numel``-weighted).

        For the ``"hard"`` gate this equals :meth:`open_gate_fraction`; for ``"soft"`` and ``"snr"``
        it is the average fraction of the Adam step that was applied.
        """
        return self._gate_stat("gate_mean", group)

    def open_gate_fractions(self) -> list[float]:
        """Per-group open-gate fractions (see :meth:`open_gate_fraction`)."""
        return [self.open_gate_fraction(i) for i in range(len(self.param_groups))]
