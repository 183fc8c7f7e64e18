"""Lightning callback logging sharpness (Hessian) and neural-tangent-kernel diagnostics.

Every ``every_n_train_steps`` optimizer steps :class:`GeneralizationDiagnostics` measures, on a
fixed probe batch and at the current parameters,

==============================  ================================================================
key                             meaning
==============================  ================================================================
``sharpness/top_eigenvalue``    ``lambda_1`` of the loss Hessian (Lanczos,
                                :func:`~gapcallback.functional.curvature.hessian_eigenvalues`)
``sharpness/eigenvalue_<i>``    ``lambda_i`` for ``i = 2..hessian_k`` (when ``hessian_k > 1``)
``sharpness/trace``             ``tr H`` (Hutchinson,
                                :func:`~gapcallback.functional.curvature.hessian_trace`)
``sharpness/trace_std``         its standard error
``ntk/top_eigenvalue``          largest eigenvalue of the empirical NTK on ``ntk_inputs``
                                (:func:`~gapcallback.functional.ntk.ntk_spectrum`)
``ntk/effective_rank``          participation ratio ``(sum lambda)^2 / sum lambda^2`` (all)
``ntk/decay_exponent``          ``alpha`` of ``lambda_i ~ i^-alpha`` over the top ``ntk_k``
==============================  ================================================================

each prefixed with ``prefix``. A sharp minimum (large ``lambda_1`` or trace) is the classic
predictor of a large generalization gap (Keskar et al. 2017; Jiang et al. 2020), and
``lambda_1 ~ 2 / lr`` marks the edge of stability (Cohen et al. 2021); the NTK spectrum describes
which functions the network currently learns fast.

The measurement is plumbing around the pure functions of ``gapcallback.functional``: the module
is put in ``eval()`` mode (each submodule gets its own mode back, batch-norm statistics are not
updated), the torch, numpy and python RNGs are forked and restored (training's random streams
are unchanged), and the torch RNG is reseeded before *every* evaluation of the loss, so that a
loss drawing noise (a diffusion loss's timesteps and noise) is one deterministic function of the
parameters during a report. Each part that fails is skipped with a
:class:`~gapcallback.evaluation.prepared.GapEvaluationWarning`; training never stops unless
``on_error="raise"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from gapcallback.evaluation.measurement import describe_error
from gapcallback.evaluation.prepared import GapEvaluationWarning
from gapcallback.functional.curvature import hessian_eigenvalues, hessian_trace
from gapcallback.functional.ntk import ntk_spectrum
from gapcallback.utils.checks import (
    check_choice,
    check_number,
    check_optional_int,
    check_positive_int,
)
from gapcallback.utils.data import batch_length
from gapcallback.utils.modes import eval_mode
from gapcallback.utils.rng import derive_seed, isolated_rng, seed_torch

__all__ = ["GeneralizationDiagnostics"]

LossFn = Callable[[nn.Module, Any], Tensor]

_LOSS_SEED = 0x5A4D  # derive_seed(seed, _LOSS_SEED, step): the loss's fixed random numbers


def _training_step_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model.training_step(batch, 0)`` as a scalar loss (a Tensor, or a dict's ``"loss"``)."""
    out = model.training_step(batch, 0)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            "GeneralizationDiagnostics: `training_step(batch, 0)` must return the loss Tensor or "
            f"a dict with a 'loss' Tensor, got {type(out).__name__}; pass `loss_fn` instead."
        )
    return out


@contextmanager
def _silenced_logging(module: L.LightningModule) -> Iterator[None]:
    """No-op ``log``/``log_dict`` while the probes evaluate ``training_step`` (and restore them)."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}

    def _ignore(*args: Any, **kwargs: Any) -> None:
        return None

    module.log = _ignore  # type: ignore[method-assign]
    module.log_dict = _ignore  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                module.__dict__[name] = saved[name]
            else:
                module.__dict__.pop(name, None)


class GeneralizationDiagnostics(L.Callback):
    """Log the sharpness of the loss (Hessian eigenvalues, trace) and the NTK spectrum.

    Args:
        probe_batch: a fixed batch of training data (Tensor, tuple/list/dict of tensors, or a
            ``DataLoader`` whose first batch is used) for the Hessian. May be ``None`` only when
            both Hessian parts are off (``hessian_k=0, trace_samples=0``).
        loss_fn: ``loss_fn(model, batch) -> Tensor`` scalar loss, called with the
            LightningModule. Default: ``model.training_step(batch, 0)`` (a Tensor or a dict
            with ``"loss"``), its ``self.log`` calls silenced during the probes. Needs automatic
            optimization (a manual-optimization ``training_step`` steps the optimizer).
        every_n_train_steps: report every this many optimizer steps (``trainer.global_step``).
        hessian_k: number of top Hessian eigenvalues (0: off). Lanczos cost: one
            Hessian-vector product (about three gradient evaluations) per iteration.
        trace_samples: Rademacher vectors of the trace estimate (0: off; otherwise >= 2), one
            Hessian-vector product each.
        ntk_inputs: inputs ``[N, *input_shape]`` for the empirical NTK of ``pl_module(x)``
            (``None``: off). Cost: ``N * outputs`` backward passes and an ``[N O, N O]`` matrix.
        ntk_k: eigenvalues over which the NTK decay exponent is fitted (and
            ``ntk/top_eigenvalue`` is the first of them); at most ``N * outputs``.
        on_error: ``"warn"`` (default): a failing part is skipped with a
            :class:`~gapcallback.evaluation.prepared.GapEvaluationWarning`, recorded in
            :attr:`failures`, and training goes on; ``"raise"``: raise a ``RuntimeError``.
        prefix: prepended to every logged key (e.g. ``"probe_a/"``).
        seed: seed of the Lanczos start vector, the Rademacher vectors and the loss's random
            numbers. The same vectors are used at every report (common random numbers: changes
            between reports are not blurred by new probe noise).
        hessian_iterations, hessian_tol: Lanczos options (see
            :func:`~gapcallback.functional.curvature.hessian_eigenvalues`).
        ntk_chunk_size: inputs per Jacobian chunk (see
            :func:`~gapcallback.functional.ntk.empirical_ntk`).

    Raises:
        TypeError, ValueError: at construction, for an argument of the wrong type or out of
            range; in ``setup``, for ``hessian_k`` above the number of trainable parameters or the
            default ``loss_fn`` with manual optimization.

    Every process of a distributed run measures the same quantities on its own copy of the
    probe (no collective is needed; the values agree).

    Example:
        >>> cb = GeneralizationDiagnostics((x_probe, y_probe), every_n_train_steps=50,  # doctest: +SKIP
        ...                                ntk_inputs=x_probe[:32])
    """

    def __init__(
        self,
        probe_batch: Any,
        loss_fn: LossFn | None = None,
        every_n_train_steps: int = 100,
        hessian_k: int = 1,
        trace_samples: int = 20,
        ntk_inputs: Tensor | None = None,
        ntk_k: int = 10,
        on_error: Literal["warn", "raise"] = "warn",
        prefix: str = "",
        seed: int = 0,
        *,
        hessian_iterations: int = 100,
        hessian_tol: float = 1e-3,
        ntk_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be None (use training_step) or callable as "
                f"loss_fn(model, batch) -> scalar loss, got {type(loss_fn).__name__}."
            )
        every_n_train_steps = check_positive_int(every_n_train_steps, "every_n_train_steps")
        hessian_k = check_positive_int(hessian_k, "hessian_k", minimum=0)
        trace_samples = check_positive_int(trace_samples, "trace_samples", minimum=0)
        if trace_samples == 1:
            raise ValueError(
                "`trace_samples` must be 0 (trace off) or >= 2 (the standard error needs two "
                "samples), got 1."
            )
        ntk_k = check_positive_int(ntk_k, "ntk_k")
        on_error = check_choice(on_error, "on_error", ("warn", "raise"))  # type: ignore[assignment]
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {prefix!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        hessian_iterations = check_positive_int(hessian_iterations, "hessian_iterations")
        if hessian_k and hessian_iterations < hessian_k:
            raise ValueError(
                f"`hessian_iterations` = {hessian_iterations} is below `hessian_k` = {hessian_k}."
            )
        hessian_tol = check_number(hessian_tol, "hessian_tol", minimum=0.0, strict=True)
        ntk_chunk_size = check_optional_int(ntk_chunk_size, "ntk_chunk_size")
        if ntk_inputs is not None:
            if not isinstance(ntk_inputs, Tensor):
                raise TypeError(
                    "`ntk_inputs` must be None (NTK off) or a Tensor of inputs [N, *input_shape], "
                    f"got {type(ntk_inputs).__name__}."
                )
            if ntk_inputs.ndim < 1 or ntk_inputs.shape[0] == 0:
                raise ValueError(
                    "`ntk_inputs` must hold at least one input along its leading dimension, got "
                    f"shape {tuple(ntk_inputs.shape)}."
                )
        uses_probe = hessian_k > 0 or trace_samples > 0
        if not uses_probe and ntk_inputs is None:
            raise ValueError(
                "Nothing to measure: `hessian_k` and `trace_samples` are 0 and `ntk_inputs` is "
                "None; enable at least one part."
            )
        if isinstance(probe_batch, torch.utils.data.DataLoader):
            probe_batch = next(iter(probe_batch))
        if probe_batch is None:
            if uses_probe:
                raise ValueError(
                    "`probe_batch` is None but the Hessian parts are on; pass a batch of training "
                    "data (or hessian_k=0 and trace_samples=0 for the NTK alone)."
                )
        elif not isinstance(probe_batch, (Tensor, Mapping, list, tuple)):
            raise TypeError(
                "`probe_batch` must be a Tensor, a tuple/list/dict of tensors or a DataLoader, got "
                f"{type(probe_batch).__name__}."
            )
        elif batch_length(probe_batch) in (None, 0):
            raise ValueError("`probe_batch` holds no samples (no tensor with a leading dimension).")

        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.every_n_train_steps = every_n_train_steps
        self.hessian_k = hessian_k
        self.trace_samples = trace_samples
        self.ntk_inputs = ntk_inputs
        self.ntk_k = ntk_k
        self.on_error = on_error
        self.prefix = prefix
        self.seed = seed
        self.hessian_iterations = hessian_iterations
        self.hessian_tol = float(hessian_tol)
        self.ntk_chunk_size = ntk_chunk_size

        #: one record per report: ``{"step": ..., <key>: value, ...}`` (keys without prefix)
        self.history: list[dict[str, float]] = []
        #: one record per failed part: ``{"step", "part", "reason"}``
        self.failures: list[dict[str, Any]] = []
        self._last_reported_step = -1
        self._on_device: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------
    def key(self, name: str) -> str:
        """The logged name of ``name`` (``"sharpness/trace"`` -> ``prefix + "sharpness/trace"``)."""
        return f"{self.prefix}{name}"

    def _loss(self, step: int, device: torch.device) -> LossFn:
        inner = self.loss_fn if self.loss_fn is not None else _training_step_loss
        loss_seed = derive_seed(self.seed, _LOSS_SEED, step)

        def loss(model: nn.Module, batch: Any) -> Tensor:
            seed_torch(loss_seed, device)  # the same random numbers at every evaluation
            return inner(model, batch)

        return loss

    def _device_copy(self, name: str, value: Any, device: torch.device) -> Any:
        cached = self._on_device.get(name)
        if cached is not None and cached[0] == device:
            return cached[1]
        moved = move_data_to_device(value, device)
        self._on_device[name] = (device, moved)
        return moved

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.loss_fn is None and (self.hessian_k or self.trace_samples):
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "GeneralizationDiagnostics: the default loss (`training_step(batch, 0)`) "
                    "cannot be used with manual optimization (it would step the optimizer); pass "
                    "loss_fn=lambda model, batch: <scalar loss>."
                )
        size = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if self.hessian_k > size:
            raise ValueError(
                f"`hessian_k` = {self.hessian_k} exceeds the number of trainable parameters of "
                f"the module ({size})."
            )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_train_steps != 0 or step == self._last_reported_step:
            return
        self._last_reported_step = step
        values = self.measure(pl_module, step)
        for name, value in values.items():
            if math.isfinite(value):
                pl_module.log(
                    self.key(name), float(value), on_step=True, on_epoch=False, batch_size=1
                )
        if values:
            self.history.append({"step": float(step), **values})

    # ------------------------------------------------------------------------------------------
    # the measurement
    # ------------------------------------------------------------------------------------------
    def measure(self, pl_module: L.LightningModule, step: int = 0) -> dict[str, float]:
        """Measure every enabled part now; ``{key without prefix: value}``.

        Failing parts are skipped (recorded in :attr:`failures`, warned about) or raised,
        according to ``on_error``.
        """
        device = pl_module.device
        loss = self._loss(step, device)
        values: dict[str, float] = {}
        with (
            isolated_rng(derive_seed(self.seed, step), device),
            eval_mode(pl_module),
            _silenced_logging(pl_module),
        ):
            if self.hessian_k:
                try:
                    batch = self._device_copy("probe", self.probe_batch, device)
                    eig = hessian_eigenvalues(
                        pl_module,
                        loss,
                        batch,
                        self.hessian_k,
                        iterations=self.hessian_iterations,
                        tol=self.hessian_tol,
                        seed=self.seed,
                    )
                    values["sharpness/top_eigenvalue"] = float(eig[0])
                    for i in range(1, eig.numel()):
                        values[f"sharpness/eigenvalue_{i + 1}"] = float(eig[i])
                except Exception as err:
                    self._failed(step, "hessian_eigenvalues", err)
            if self.trace_samples:
                try:
                    batch = self._device_copy("probe", self.probe_batch, device)
                    trace = hessian_trace(
                        pl_module, loss, batch, samples=self.trace_samples, seed=self.seed
                    )
                    values["sharpness/trace"] = float(trace.trace)
                    values["sharpness/trace_std"] = float(trace.std)
                except Exception as err:
                    self._failed(step, "hessian_trace", err)
            if self.ntk_inputs is not None:
                try:
                    x = self._device_copy("ntk", self.ntk_inputs, device)
                    spectrum = ntk_spectrum(
                        pl_module, x, self.ntk_k, chunk_size=self.ntk_chunk_size
                    )
                    values["ntk/top_eigenvalue"] = float(spectrum.eigenvalues[0])
                    values["ntk/effective_rank"] = float(spectrum.effective_rank)
                    values["ntk/decay_exponent"] = float(spectrum.decay_exponent)
                except Exception as err:
                    self._failed(step, "ntk_spectrum", err)
        return values

    def _failed(self, step: int, part: str, err: Exception) -> None:
        reason = describe_error(err).rstrip(". ")
        self.failures.append({"step": step, "part": part, "reason": reason})
        if self.on_error == "raise":
            raise RuntimeError(
                f"GeneralizationDiagnostics: {part} at step {step} failed: {reason}"
            ) from err
        warnings.warn(
            f"GeneralizationDiagnostics skipped {part} at step {step}: {reason}. Training "
            "continues; pass on_error='raise' to stop instead.",
            GapEvaluationWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------------------------------
    # state
    # ------------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Checkpoint slot: distinct for instances that measure differently."""
        return self._generate_state_key(
            every_n_train_steps=self.every_n_train_steps,
            hessian_k=self.hessian_k,
            trace_samples=self.trace_samples,
            ntk=self.ntk_inputs is not None,
            ntk_k=self.ntk_k,
            prefix=self.prefix,
            seed=self.seed,
            loss_fn="training_step" if self.loss_fn is None else "loss_fn",
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "failures": [dict(f) for f in self.failures],
            "last_reported_step": self._last_reported_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self.failures = [dict(f) for f in state_dict.get("failures", [])]
        self._last_reported_step = int(state_dict.get("last_reported_step", -1))
