"""``GapEarlyStopping``: early stopping that counts only fresh gap evaluations.

Lightning's ``EarlyStopping(monitor="gap/observed")`` works, but ``trainer.callback_metrics`` keeps a
value until it is logged again, so with evaluations every k epochs it counts stale values as "no
improvement" (logged every 3rd epoch with ``patience=2`` it stops at epoch 2).
:class:`GapEarlyStopping` reads the value from the :class:`~gapcallback.GapCallback` that produced
it and acts once per evaluation, skipped evaluations not counting.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from gapcallback.callbacks.gap_callback import GapCallback
from gapcallback.callbacks.prediction_gap_callback import PREDICTION_KEYS
from gapcallback.utils.checks import check_bool, check_choice, check_number, check_positive_int

LOGGED_KEYS = PREDICTION_KEYS
"""Every key a gap callback may log (``GapCallback``: all but ``gap/risk``)."""

__all__ = ["GapEarlyStopping"]


class GapEarlyStopping(EarlyStopping):
    """Stop training when a :class:`~gapcallback.GapCallback` metric stops improving.

    Same parameters and semantics as :class:`lightning.pytorch.callbacks.EarlyStopping`
    (``monitor``, ``mode``, ``patience``, ``min_delta``, ``stopping_threshold``,
    ``divergence_threshold``, ``check_finite``, ``verbose``, ``strict``), but ``patience`` counts
    *evaluations* of the gap callback, not epochs. Checks happen right after each evaluation
    (epoch- or step-based). The decision is reduced across DDP ranks (any rank stopping stops all;
    the values are identical on every rank anyway). ``stopping_reason`` and
    ``stopping_reason_message`` say why training stopped.

    Stop on memorization: ``GapEarlyStopping(monitor="gap/memorized_fraction", mode="min",
    divergence_threshold=0.5)`` stops once more than half the samples copy a training point.

    Args:
        monitor: a key logged by a ``GapCallback`` in the same trainer (default ``gap/observed``).
        callback: the ``GapCallback`` to follow; default: the one in ``trainer.callbacks`` that
            logs ``monitor``.
        **kwargs: see ``EarlyStopping``. ``check_on_train_epoch_end`` is not accepted.

    Raises:
        TypeError, ValueError: at construction, for an argument of the wrong type or out of range
            (``patience < 0``, NaN ``min_delta`` or thresholds, ``mode`` not ``"min"``/``"max"``,
            thresholds in the wrong order for ``mode``), or a ``monitor`` that no GapCallback logs
            (any of :data:`~gapcallback.callbacks.prediction_gap_callback.PREDICTION_KEYS` behind a prefix; the
            keys of ``callback`` when it is given). At setup, when no GapCallback of the Trainer
            logs ``monitor`` (the error lists the keys they log) or ``callback`` is not in it.

    The callback moves itself after its ``GapCallback`` in ``trainer.callbacks`` so that it sees
    each evaluation in the same hook, whatever order the callbacks were passed in.
    """

    def __init__(
        self,
        monitor: str = "gap/observed",
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        log_rank_zero_only: bool = False,
        callback: GapCallback | None = None,
    ) -> None:
        if callback is not None and not isinstance(callback, GapCallback):
            raise TypeError(
                f"`callback` must be the GapCallback to follow (or None to find it in the Trainer),"
                f" got {type(callback).__name__}."
            )
        _check_monitor(monitor, callback)
        min_delta = check_number(min_delta, "min_delta")
        patience = check_positive_int(patience, "patience", minimum=0)
        mode = check_choice(mode, "mode", ("min", "max"))
        for name, flag in (
            ("verbose", verbose),
            ("strict", strict),
            ("check_finite", check_finite),
            ("log_rank_zero_only", log_rank_zero_only),
        ):
            check_bool(flag, name)
        stopping_threshold = check_number(
            stopping_threshold, "stopping_threshold", allow_none=True, allow_inf=True
        )
        divergence_threshold = check_number(
            divergence_threshold, "divergence_threshold", allow_none=True, allow_inf=True
        )
        if stopping_threshold is not None and divergence_threshold is not None:
            better = stopping_threshold < divergence_threshold
            if better != (mode == "min"):
                relation = "below" if mode == "min" else "above"
                raise ValueError(
                    f"With mode={mode!r} training stops once `{monitor}` is {relation} "
                    f"stopping_threshold={stopping_threshold:g} (good enough) or beyond "
                    f"divergence_threshold={divergence_threshold:g} (diverged), so the stopping"
                    f" threshold must be {relation} the divergence threshold; swap them or fix "
                    "`mode`."
                )
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=True,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.callback = callback
        self.last_evaluation = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.callback is None:
            self.callback = self._find_source(trainer)
        elif not any(c is self.callback for c in trainer.callbacks):
            raise ValueError(
                f"GapEarlyStopping(monitor={self.monitor!r}) follows a GapCallback (`callback=`) that"
                " is not in this Trainer, so it would never see an evaluation; pass the same object"
                " in `Trainer(callbacks=[gap_callback, GapEarlyStopping(..., "
                "callback=gap_callback)])`."
            )
        # Run right after the gap callback in every hook.
        callbacks = trainer.callbacks
        if self in callbacks and self.callback in callbacks:
            if callbacks.index(self) < callbacks.index(self.callback):
                callbacks.remove(self)
                callbacks.insert(callbacks.index(self.callback) + 1, self)

    def _find_source(self, trainer: pl.Trainer) -> GapCallback:
        """The one GapCallback of ``trainer`` whose keys include ``monitor``."""
        sources = [c for c in trainer.callbacks if isinstance(c, GapCallback)]
        if not sources:
            raise RuntimeError(
                "GapEarlyStopping needs a GapCallback in the same Trainer: "
                "`Trainer(callbacks=[GapCallback(...), GapEarlyStopping(...)])`. For metrics logged "
                "by other code use lightning's EarlyStopping."
            )
        matching = [c for c in sources if self.monitor in _keys(c)]
        if not matching:
            available = [key for c in sources for key in _keys(c)]
            raise ValueError(
                f"GapEarlyStopping(monitor={self.monitor!r}): no GapCallback in the Trainer logs "
                f"this key. The Trainer's GapCallbacks log {available}; pass one of them as "
                "`monitor=` (a callback with `prefix=` puts the prefix in front of every key)."
            )
        if len(matching) > 1:
            raise RuntimeError(
                f"GapEarlyStopping(monitor={self.monitor!r}) matches {len(matching)} GapCallbacks; "
                "give them distinct `prefix=` values or pass `callback=`."
            )
        return matching[0]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, gap=True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["last_evaluation"] = self.last_evaluation
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last_evaluation = int(state_dict.get("last_evaluation", -1))

    # Lightning calls these; all of them defer to the freshness-aware check.
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_fresh(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._check_fresh(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return

    def _check_fresh(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run or self.callback is None:
            return
        latest = self.callback.latest
        if latest is None or latest["evaluation"] <= self.last_evaluation:
            return  # nothing new since the last check: stale values never count
        self.last_evaluation = int(latest["evaluation"])
        if self.monitor not in latest:
            if self.strict:
                available = sorted(k for k in latest if "/" in k)
                raise RuntimeError(
                    f"GapEarlyStopping monitors {self.monitor!r}, which the GapCallback does not log"
                    f" (it logs {available}). Pass train= to the GapCallback for memorization and "
                    "law keys, or set strict=False."
                )
            return
        current = torch.tensor(float(latest[self.monitor]))
        should_stop, reason = self._evaluate_stopping_criteria(current)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)


def _keys(callback: GapCallback) -> list[str]:
    """Every key ``callback`` may log (behind its prefix)."""
    return list(callback.logged_keys)


def _check_monitor(monitor: object, callback: GapCallback | None) -> None:
    """``monitor`` must be a key a GapCallback logs: one of ``callback``'s keys when it is given,
    else one of :data:`LOGGED_KEYS` behind any prefix."""
    if not isinstance(monitor, str):
        raise TypeError(
            f"`monitor` must be the name of a logged key (a str such as 'gap/observed'), got "
            f"{monitor!r}."
        )
    if callback is not None:
        keys = _keys(callback)
        if monitor not in keys:
            raise ValueError(
                f"`monitor`={monitor!r} is not a key of the GapCallback passed as `callback=` "
                f"(prefix {callback.prefix!r}); it logs {keys}. Pass one of them."
            )
    elif not any(monitor.endswith(name) for name in LOGGED_KEYS):
        raise ValueError(
            f"`monitor`={monitor!r} is not a key a GapCallback logs; the keys are {list(LOGGED_KEYS)}"
            " (each behind the callback's `prefix`, e.g. 'val/gap/observed'). For a metric logged"
            " by other code use lightning's EarlyStopping."
        )
