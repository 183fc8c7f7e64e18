"""Lightning callback logging the gradient signal-to-noise ratio and what it predicts.

Every ``every_n_steps`` optimizer steps :class:`GradientSNR` estimates the per-parameter gradient
SNR ``r_j = E[g_j]^2 / Var[g_j]`` over per-sample gradients and logs

==============================  ================================================================
key                             meaning
==============================  ================================================================
``snr/median``, ``snr/p95``     median and 95th percentile of ``r_j`` over all coordinates
``snr/osgr``                    one-step generalization ratio (Liu et al. 2020),
                                ``1 - (1/n) sum_j W_j / (r_j + 1/n)``
``snr/predicted_gap_growth``    ``(1 - OSGR) * (training-loss decrease since the last report)``
``snr/predicted_gap``           running sum of the above (gap growth since the first report)
``snr/open_gates``              fraction of open gates when the optimizer is
                                :class:`~gapcallback.optim.PopulationRiskAdamW`
==============================  ================================================================

Two estimators:

* **exact** (``probe_batch`` given): per-sample gradients of a fixed probe batch by ``torch.func``
  (the model is put in ``eval()`` mode for the probe; each submodule gets its own mode back). Costs about one backward pass
  per probe sample, every ``every_n_steps`` steps. The training-loss decrease is measured on the
  probe batch.
* **streaming** (no probe batch): Welford over the minibatch gradients of the last
  ``every_n_steps`` steps; the per-sample variance is ``b`` times the variance of the minibatch
  gradients. Costs a few element-wise ops per step; biased upward in noise when the parameters
  drift fast within the window. The training-loss decrease is that of the window-averaged
  training loss.

When a validation loss is logged (``val_loss_key``), the observed gap ``val_loss - train_loss`` is
recorded too and :meth:`GradientSNR.plot` shows the predicted against the observed gap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from gapcallback.functional.gradient_signal import (
    StreamingGradientMoments,
    gradient_moments,
    one_step_generalization_ratio,
    osgr_weights,
    per_sample_gradients,
)
from gapcallback.plotting import require_matplotlib
from gapcallback.utils.checks import (
    check_bool,
    check_choice,
    check_optional_int,
    check_positive_int,
)
from gapcallback.utils.data import batch_length
from gapcallback.utils.modes import eval_mode

__all__ = ["GradientSNR"]

LossFn = Callable[[nn.Module, Any], Tensor]


def _quantile(x: Tensor, q: float) -> float:
    """Nearest-rank quantile of a flat tensor (handles ``inf``; no size limit unlike torch.quantile)."""
    k = min(x.numel(), max(1, round(q * (x.numel() - 1)) + 1))
    return float(torch.kthvalue(x.cpu(), k).values)


def _loss_value(outputs: Any) -> float | None:
    if isinstance(outputs, Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    if isinstance(outputs, Mapping) and isinstance(outputs.get("loss"), Tensor):
        return float(outputs["loss"].detach())
    return None


class GradientSNR(L.Callback):
    """Log the gradient SNR, the one-step generalization ratio and the predicted gap growth.

    Args:
        probe_batch: a fixed batch of *training* samples (Tensor, tuple/list/dict of tensors, or a
            ``DataLoader`` whose first batch is used) for the exact per-sample estimate; ``None``
            uses the streaming estimate from minibatch gradients.
        every_n_steps: report every this many optimizer steps (``trainer.global_step``).
        loss_fn: ``loss_fn(model, batch) -> Tensor [B]`` of per-sample (unreduced) losses, called
            with the LightningModule; needed in exact mode only. Default: the module's
            ``per_sample_loss(batch)`` method if it defines one.
        n: samples per gradient step used in the OSGR (``1/n`` terms). Default: the training
            batch size (times ``accumulate_grad_batches``); pass the training-set size for
            full-batch training.
        val_loss_key: ``trainer.callback_metrics`` key of the validation loss, for the observed gap.
        train_loss_key: key of the training loss to subtract from it; default: the probe-batch loss
            (exact mode) or the window-averaged training-step loss (streaming mode).
        figure_path: when set, :meth:`plot` is saved there at the end of ``fit`` (needs
            matplotlib).
        method: ``"vmap"`` or ``"loop"``, forwarded to
            :func:`~gapcallback.functional.gradient_signal.per_sample_gradients`.
        chunk_size: ``vmap`` chunk size to bound probe memory.
        log_open_gates: log ``snr/open_gates`` if the optimizer exposes ``open_gate_fraction()``.

    Raises:
        TypeError, ValueError: at construction, for an argument of the wrong type or out of range
            (each message names the argument and the fix).

    Several instances can share a Trainer (e.g. an exact and a streaming one, or two intervals):
    each has its own checkpoint slot (:attr:`state_key`), built from the arguments that change
    what it measures.

    Example:
        >>> cb = GradientSNR(every_n_steps=20)                        # streaming
        >>> cb = GradientSNR(probe_batch=(x_probe, y_probe),           # doctest: +SKIP
        ...                  loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))

    The callback never stops training: a failing report is skipped with a warning.
    """

    def __init__(
        self,
        probe_batch: Any = None,
        every_n_steps: int = 50,
        loss_fn: LossFn | None = None,
        *,
        n: int | None = None,
        val_loss_key: str = "val_loss",
        train_loss_key: str | None = None,
        figure_path: str | Path | None = None,
        method: str = "vmap",
        chunk_size: int | None = None,
        log_open_gates: bool = True,
    ) -> None:
        super().__init__()
        every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be callable as loss_fn(model, batch) -> per-sample losses [B], got "
                f"{type(loss_fn).__name__}."
            )
        n = check_optional_int(n, "n")
        if not isinstance(val_loss_key, str) or not val_loss_key:
            raise TypeError(
                "`val_loss_key` must be the (non-empty) name of the logged validation loss, got "
                f"{val_loss_key!r}."
            )
        if train_loss_key is not None and (
            not isinstance(train_loss_key, str) or not train_loss_key
        ):
            raise TypeError(
                "`train_loss_key` must be None (use the probe/window loss) or the name of a logged "
                f"training loss, got {train_loss_key!r}."
            )
        if figure_path is not None and not isinstance(figure_path, (str, os.PathLike)):
            raise TypeError(
                f"`figure_path` must be None or a file path (str or Path), got {figure_path!r}."
            )
        method = check_choice(method, "method", ("vmap", "loop"))
        chunk_size = check_optional_int(chunk_size, "chunk_size")
        log_open_gates = check_bool(log_open_gates, "log_open_gates")
        if probe_batch is not None and not isinstance(
            probe_batch, (Tensor, Mapping, list, tuple, torch.utils.data.DataLoader)
        ):
            raise TypeError(
                "`probe_batch` must be None (streaming estimate), a Tensor, a tuple/list/dict of "
                f"tensors or a DataLoader, got {type(probe_batch).__name__}."
            )
        if isinstance(probe_batch, torch.utils.data.DataLoader):
            probe_batch = next(iter(probe_batch))
        if probe_batch is not None:
            size = batch_length(probe_batch)
            if size is None or size < 2:
                raise ValueError(
                    f"`probe_batch` needs at least 2 samples along its leading dimension, got {size}"
                    "; pass a larger batch of training samples (or None for the streaming estimate)."
                )
        self.probe_batch = probe_batch
        self.every_n_steps = every_n_steps
        self.loss_fn = loss_fn
        self.n = n
        self.val_loss_key = val_loss_key
        self.train_loss_key = train_loss_key
        self.figure_path = Path(figure_path) if figure_path is not None else None
        self.method = method
        self.chunk_size = chunk_size
        self.log_open_gates = log_open_gates

        self.stream = StreamingGradientMoments()
        self.history: list[dict[str, float]] = []
        self.observed: list[dict[str, float]] = []
        self._last_batch_size: int | None = None
        self._window_losses: list[float] = []
        self._prev_loss: float | None = None
        self._prev_osgr: float | None = None
        self._predicted_gap = 0.0
        self._last_train_loss: float | None = None
        self._last_reported_step = -1
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        """``True`` when no probe batch is set (minibatch-gradient estimate)."""
        return self.probe_batch is None

    def _resolve_loss_fn(self, pl_module: L.LightningModule) -> LossFn:
        if self.loss_fn is not None:
            return self.loss_fn
        if callable(getattr(pl_module, "per_sample_loss", None)):
            return lambda model, batch: model.per_sample_loss(batch)
        raise ValueError(
            "GradientSNR with a probe_batch needs per-sample losses: pass "
            "loss_fn=lambda model, batch: <Tensor [B] of unreduced losses>, or define "
            "per_sample_loss(self, batch) on your LightningModule. Or pass probe_batch=None for "
            "the streaming estimate, which needs neither."
        )

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def _step_batch_size(self, trainer: L.Trainer) -> int:
        """Samples averaged in one optimizer step (batch size times gradient accumulation)."""
        b = self._last_batch_size
        if b is None:
            b = batch_length(self.probe_batch) if self.probe_batch is not None else 1
        return max(1, int(b) * max(1, int(getattr(trainer, "accumulate_grad_batches", 1))))

    def _n(self, trainer: L.Trainer) -> int:
        return self.n if self.n is not None else self._step_batch_size(trainer)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not self.streaming:
            self._resolve_loss_fn(pl_module)  # fail early, before any training step, if missing

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        size = batch_length(batch)
        if size is not None:
            self._last_batch_size = size

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.streaming:
            return
        try:
            grads = [p.grad for p in pl_module.parameters() if p.requires_grad]
            self.stream.update(grads, batch_size=self._step_batch_size(trainer))
        except Exception as err:  # never stop training
            self._warn("stream", f"GradientSNR: streaming update skipped ({err!r}).")
            self.stream.reset()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = _loss_value(outputs)
        if loss is not None and math.isfinite(loss):
            self._window_losses.append(loss)
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps != 0 or step == self._last_reported_step:
            return
        self._last_reported_step = step
        try:
            metrics = self._report(trainer, pl_module)
        except Exception as err:  # never stop training
            self._warn("report", f"GradientSNR: report at step {step} skipped ({err!r}).")
            return
        finally:
            self._window_losses = []
            if self.streaming:
                self.stream.reset()
        if metrics is None:
            return
        for key, value in metrics.items():
            if math.isfinite(value) or math.isinf(value):
                pl_module.log(key, float(value), on_step=True, on_epoch=False, batch_size=1)
        self.history.append({"step": float(step), **{k: float(v) for k, v in metrics.items()}})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        try:
            metrics = trainer.callback_metrics
            if self.val_loss_key not in metrics:
                return
            val = float(metrics[self.val_loss_key])
            if self.train_loss_key is not None:
                if self.train_loss_key not in metrics:
                    return
                train = float(metrics[self.train_loss_key])
            elif self._last_train_loss is not None:
                train = self._last_train_loss
            else:
                return
            self.observed.append(
                {"step": float(trainer.global_step), "gap": val - train, "val_loss": val}
            )
        except Exception as err:
            self._warn("val", f"GradientSNR: observed gap not recorded ({err!r}).")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.figure_path is not None:
            self._save_figure()

    @rank_zero_only
    def _save_figure(self) -> None:
        try:
            fig = self.plot()
            self.figure_path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.figure_path, dpi=110, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
        except Exception as err:
            self._warn("figure", f"GradientSNR: figure not saved ({err!r}).")

    # ------------------------------------------------------------------------------------------
    # the report
    # ------------------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        n = self._n(trainer)
        if self.streaming:
            if self.stream.count < 2:
                self._warn(
                    "few",
                    "GradientSNR: fewer than 2 minibatch gradients in the window; increase "
                    "every_n_steps for the streaming estimate.",
                )
                return None
            mean, var = self.stream.moments()
            train_loss = (
                sum(self._window_losses) / len(self._window_losses) if self._window_losses else None
            )
        else:
            loss_fn = self._resolve_loss_fn(pl_module)
            batch = move_data_to_device(self.probe_batch, pl_module.device)
            # Each submodule gets its own mode back (a frozen encoder stays in eval mode).
            with eval_mode(pl_module):
                grads = per_sample_gradients(
                    pl_module, loss_fn, batch, method=self.method, chunk_size=self.chunk_size
                )
                with torch.no_grad():
                    train_loss = float(loss_fn(pl_module, batch).float().mean())
            mean_d, var_d = gradient_moments(grads)
            mean, var = list(mean_d.values()), list(var_d.values())

        flat_m = torch.cat([m.reshape(-1).double() for m in mean])
        flat_v = torch.cat([v.reshape(-1).double() for v in var])
        signal = flat_m * flat_m
        r = torch.where(
            flat_v > 0,
            signal / flat_v,
            torch.where(signal > 0, torch.full_like(signal, math.inf), torch.zeros_like(signal)),
        )
        osgr = float(one_step_generalization_ratio(r, n, osgr_weights(flat_m, flat_v, n)))
        out = {
            "snr/median": _quantile(r, 0.5),
            "snr/p95": _quantile(r, 0.95),
            "snr/osgr": osgr,
        }
        if train_loss is not None and math.isfinite(train_loss):
            self._last_train_loss = train_loss
            if self._prev_loss is not None:
                osgr_mid = 0.5 * (osgr + self._prev_osgr) if self._prev_osgr is not None else osgr
                growth = (1.0 - osgr_mid) * (self._prev_loss - train_loss)
                self._predicted_gap += growth
                out["snr/predicted_gap_growth"] = growth
            out["snr/predicted_gap"] = self._predicted_gap
            out["snr/train_loss"] = train_loss
            self._prev_loss = train_loss
        self._prev_osgr = osgr
        if self.log_open_gates:
            for opt in trainer.optimizers:
                frac = getattr(opt, "open_gate_fraction", None)
                if callable(frac):
                    value = float(frac())
                    if math.isfinite(value):
                        out["snr/open_gates"] = value
                    break
        return out

    # ------------------------------------------------------------------------------------------
    # figure and state
    # ------------------------------------------------------------------------------------------
    def plot(self, fig: Any = None) -> Any:
        """Figure of the SNR quantiles, the OSGR and the predicted vs observed gap.

        The predicted curve is the observed gap at the first validation after the first report plus
        the predicted growth since then (so both curves share their starting point); without
        validation data only the prediction is drawn. Needs matplotlib
        (``pip install gapcallback[plot]``).

        Returns:
            The ``matplotlib.figure.Figure``.
        """
        plt = require_matplotlib("GradientSNR.plot")
        if fig is None:
            fig = plt.figure(figsize=(10, 4))
        ax1, ax2 = fig.subplots(1, 2)
        steps = [h["step"] for h in self.history]
        if steps:
            ax1.semilogy(
                steps, [max(h["snr/median"], 1e-12) for h in self.history], label="median r"
            )
            ax1.semilogy(steps, [max(h["snr/p95"], 1e-12) for h in self.history], label="p95 r")
            axo = ax1.twinx()
            axo.plot(steps, [h["snr/osgr"] for h in self.history], "k--", label="OSGR")
            axo.set_ylabel("OSGR")
            axo.set_ylim(0, 1)
        ax1.set(xlabel="step", ylabel="gradient SNR", title="Gradient SNR")
        ax1.legend(loc="upper left", fontsize=8)
        pred = [
            (h["step"], h["snr/predicted_gap"]) for h in self.history if "snr/predicted_gap" in h
        ]
        offset = 0.0
        if self.observed and pred:
            first = next((o for o in self.observed if o["step"] >= pred[0][0]), self.observed[0])
            base = min(pred, key=lambda p: abs(p[0] - first["step"]))
            offset = first["gap"] - base[1]
        if pred:
            ax2.plot([p[0] for p in pred], [p[1] + offset for p in pred], label="predicted gap")
        if self.observed:
            ax2.plot(
                [o["step"] for o in self.observed],
                [o["gap"] for o in self.observed],
                "o-",
                label="observed gap (val - train)",
            )
        ax2.set(xlabel="step", ylabel="loss gap", title="Generalization gap")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        return fig

    @property
    def state_key(self) -> str:
        """Checkpoint slot: distinct for instances that measure differently (mode, interval...)."""
        return self._generate_state_key(
            every_n_steps=self.every_n_steps,
            streaming=self.streaming,
            n=self.n,
            val_loss_key=self.val_loss_key,
            train_loss_key=self.train_loss_key,
            method=self.method,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "observed": list(self.observed),
            "stream": self.stream.state_dict(),
            "last_batch_size": self._last_batch_size,
            "window_losses": list(self._window_losses),
            "prev_loss": self._prev_loss,
            "prev_osgr": self._prev_osgr,
            "predicted_gap": self._predicted_gap,
            "last_train_loss": self._last_train_loss,
            "last_reported_step": self._last_reported_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.observed = list(state_dict.get("observed", []))
        if "stream" in state_dict:
            self.stream.load_state_dict(state_dict["stream"])
        self._last_batch_size = state_dict.get("last_batch_size")
        self._window_losses = list(state_dict.get("window_losses", []))
        self._prev_loss = state_dict.get("prev_loss")
        self._prev_osgr = state_dict.get("prev_osgr")
        self._predicted_gap = float(state_dict.get("predicted_gap", 0.0))
        self._last_train_loss = state_dict.get("last_train_loss")
        self._last_reported_step = int(state_dict.get("last_reported_step", -1))
