"""GapEarlyStopping refuses bad arguments at construction and an unknown ``monitor`` at setup.

Real ``lightning.Trainer`` runs on CPU where a trainer is needed; no mocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest

import gapcallback as gc
from gapcallback.callbacks.gap_callback import LOGGED_KEYS
from tests.lightning_models import PointCloudModel, circle_data, loader

TRAIN = circle_data(120, seed=0)
REFERENCE = circle_data(80, seed=1)


def _gap_callback(prefix: str = "") -> gc.GapCallback:
    return gc.GapCallback(
        REFERENCE, num_samples=32, dimension_method=None, log_figure=False, prefix=prefix
    )


def _fit(tmp_path: Path, callbacks: list, epochs: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(PointCloudModel(), loader(TRAIN))
    return trainer


# ------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patience": -1}, ValueError, "`patience` must be >= 0"),
        ({"patience": 1.5}, TypeError, "`patience` must be an int"),
        ({"patience": True}, TypeError, "`patience`"),
        ({"min_delta": math.nan}, ValueError, "`min_delta` must be a finite number"),
        ({"min_delta": math.inf}, ValueError, "`min_delta` must be a finite number"),
        ({"min_delta": "0.1"}, TypeError, "`min_delta` must be a real number"),
        ({"mode": "minimum"}, ValueError, r"`mode` must be one of 'min', 'max'.*'min'\?"),
        ({"mode": None}, ValueError, "`mode` must be one of"),
        ({"stopping_threshold": math.nan}, ValueError, "`stopping_threshold`"),
        ({"divergence_threshold": math.nan}, ValueError, "`divergence_threshold`"),
        ({"divergence_threshold": "1"}, TypeError, "`divergence_threshold`"),
        ({"verbose": "yes"}, TypeError, "`verbose` must be True or False"),
        ({"strict": 1}, TypeError, "`strict`"),
        ({"check_finite": None}, TypeError, "`check_finite`"),
        ({"log_rank_zero_only": 0}, TypeError, "`log_rank_zero_only`"),
        ({"monitor": 3}, TypeError, "`monitor` must be the name of a logged key"),
        ({"monitor": "val_loss"}, ValueError, r"'val_loss' is not a key .*'gap/observed'"),
        ({"monitor": "gap/observd"}, ValueError, "gap/memorized_fraction"),
        (
            {"mode": "min", "stopping_threshold": 0.5, "divergence_threshold": 0.1},
            ValueError,
            "stopping threshold must be below",
        ),
        (
            {"mode": "max", "stopping_threshold": 0.1, "divergence_threshold": 0.5},
            ValueError,
            "stopping threshold must be above",
        ),
        ({"callback": L.pytorch.callbacks.EarlyStopping("x")}, TypeError, "`callback` must"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        gc.GapEarlyStopping(**kwargs)


def test_valid_arguments_are_accepted() -> None:
    stopper = gc.GapEarlyStopping(
        monitor="val/gap/memorized_fraction",  # any prefix in front of a logged key
        min_delta=1,
        patience=0,
        mode="min",
        stopping_threshold=0.01,
        divergence_threshold=math.inf,
    )
    assert stopper.patience == 0 and stopper.min_delta == -1.0
    for key in LOGGED_KEYS:
        gc.GapEarlyStopping(monitor=key, mode="max")


def test_monitor_is_checked_against_the_given_callback() -> None:
    callback = _gap_callback(prefix="val/")
    with pytest.raises(ValueError, match=r"prefix 'val/'.*'val/gap/observed'"):
        gc.GapEarlyStopping(monitor="gap/observed", callback=callback)
    stopper = gc.GapEarlyStopping(monitor="val/gap/observed", callback=callback)
    assert stopper.callback is callback


# ------------------------------------------------------------------------- setup


def test_monitor_no_callback_logs_fails_at_setup_listing_the_keys(tmp_path: Path) -> None:
    callbacks = [_gap_callback(), gc.GapEarlyStopping(monitor="val/gap/observed")]
    with pytest.raises(ValueError, match=r"no GapCallback in the Trainer logs.*'gap/observed'"):
        _fit(tmp_path, callbacks)


def test_setup_picks_the_callback_that_logs_the_monitor(tmp_path: Path) -> None:
    plain, val = _gap_callback(), _gap_callback(prefix="val/")
    stopper = gc.GapEarlyStopping(monitor="val/gap/observed", patience=5)
    trainer = _fit(tmp_path, [stopper, plain, val])
    assert stopper.callback is val
    # It was moved right after the callback it follows, and saw its evaluation.
    assert trainer.callbacks.index(stopper) == trainer.callbacks.index(val) + 1
    assert stopper.last_evaluation == val.latest["evaluation"] == 0


def test_given_callback_must_be_in_the_trainer(tmp_path: Path) -> None:
    stopper = gc.GapEarlyStopping(callback=_gap_callback())
    with pytest.raises(ValueError, match="not in this Trainer"):
        _fit(tmp_path, [_gap_callback(prefix="other/"), stopper])
