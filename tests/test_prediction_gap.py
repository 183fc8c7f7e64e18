"""The gap of a prediction task (joint vectors [x, w y]): F.prediction_gap / prediction_risk
against float64 brute force, the risk inequality and the lookup-table line (hypothesis);
gc.PredictionGap streaming and in two real gloo processes; gc.PredictionGapCallback in real
lightning Trainer runs on CPU (regression, classification, an ambiguous task, faults, DDP)."""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gapcallback as gc
from gapcallback.callbacks.prediction_gap_callback import PREDICTION_KEYS
from gapcallback.functional import prediction_gap, prediction_risk, representation_gap
from gapcallback.utils.rng import derive_seed

FAST = {"law_options": {"num_sizes": 4, "repeats": 2}, "dimension_points": 200}

#: The keys every evaluation logs here (the k-NN family only when asked with `metrics=`).
ALWAYS_KEYS = tuple(k for k in PREDICTION_KEYS if not k.startswith("knn/"))


# ---------------------------------------------------------------------------------- oracles


def joint64(x: torch.Tensor, y: torch.Tensor, w: float) -> torch.Tensor:
    """[x, w y] built by hand (w y in the inputs' dtype), then float64."""
    n = x.shape[0]
    return torch.cat([x.reshape(n, -1), w * y.reshape(n, -1)], dim=1).double()


def brute_gap(ref_x, ref_y, probe_x, probe_y, w=1.0, p=2.0) -> float:
    ref, probe = joint64(ref_x, ref_y, w), joint64(probe_x, probe_y, w)
    return float(torch.cdist(ref, probe).min(dim=1).values.pow(p).mean())


def brute_risk(ref_y, pred_y, w=1.0, p=2.0) -> float:
    n = ref_y.shape[0]
    diff = (w * ref_y.reshape(n, -1)).double() - (w * pred_y.reshape(n, -1)).double()
    return float(diff.norm(dim=1).pow(p).mean())


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2
    return x, torch.stack([x[:, 0].sin(), x[:, 1].cos()], dim=1)


def class_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = regression_data(n, seed)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes, int64 labels


TX, TY = regression_data(160, seed=0)
RX, RY = regression_data(90, seed=1)
CTX, CTY = class_data(160, seed=2)
CRX, CRY = class_data(90, seed=3)


def smooth_map(x: torch.Tensor, out: int, seed: int) -> torch.Tensor:
    """A random smooth function R^{D_x} -> R^{out} (one tanh layer)."""
    g = torch.Generator().manual_seed(seed)
    flat = x.reshape(x.shape[0], -1)
    a = torch.randn(flat.shape[1], 8, generator=g, dtype=x.dtype)
    c = torch.randn(8, out, generator=g, dtype=x.dtype)
    return torch.tanh(flat @ a) @ c


# ---------------------------------------------------------------------------------- functional


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("y_shape", [(4,), ()], ids=["y[N,4]", "y[N]"])
def test_prediction_gap_equals_float64_brute_force(p, w, y_shape):
    g = torch.Generator().manual_seed(int(10 * p + w))
    ref_x, probe_x = torch.randn(37, 2, 3, generator=g), torch.randn(53, 2, 3, generator=g)
    ref_y, probe_y = torch.randn(37, *y_shape, generator=g), torch.randn(53, *y_shape, generator=g)
    value = prediction_gap(ref_x, ref_y, probe_x, probe_y, y_weight=w, p=p)
    assert value.ndim == 0 and value.dtype == torch.float32
    expected = brute_gap(ref_x, ref_y, probe_x, probe_y, w, p)
    assert float(value) == pytest.approx(expected, rel=1e-5)
    # float64 inputs: the float64 answer.
    value64 = prediction_gap(
        ref_x.double(), ref_y.double(), probe_x.double(), probe_y.double(), y_weight=w, p=p
    )
    assert value64.dtype == torch.float64
    expected64 = brute_gap(ref_x.double(), ref_y.double(), probe_x.double(), probe_y.double(), w, p)
    assert float(value64) == pytest.approx(expected64, rel=1e-12)
    # The risk: w^p mean ||y - f||^p, a closed form (w y rounded to float32 as in the joint
    # vectors; float64 inputs: float64 throughout).
    assert float(prediction_risk(ref_y, probe_y[:37], y_weight=w, p=p)) == pytest.approx(
        brute_risk(ref_y, probe_y[:37], w, p), rel=1e-6
    )
    ref_y64, probe_y64 = ref_y.double(), probe_y[:37].double()
    risk64 = prediction_risk(ref_y64, probe_y64, y_weight=w, p=p)
    assert float(risk64) == pytest.approx(brute_risk(ref_y64, probe_y64, w, p), rel=1e-12)


@pytest.mark.parametrize("w", [0.5, 1.0, 3.0])
def test_prediction_gap_is_exactly_zero_when_probes_hold_the_reference_pairs(w):
    g = torch.Generator().manual_seed(5)
    ref_x, ref_y = torch.randn(30, 2, 3, generator=g), torch.randn(30, 4, generator=g)
    other_x, other_y = torch.randn(20, 2, 3, generator=g), torch.randn(20, 4, generator=g)
    order = torch.randperm(80, generator=g)  # duplicated references, shuffled among others
    probe_x = torch.cat([ref_x, other_x, ref_x])[order]
    probe_y = torch.cat([ref_y, other_y, ref_y])[order]
    assert float(prediction_gap(ref_x, ref_y, probe_x, probe_y, y_weight=w, p=3.0)) == 0.0
    assert float(prediction_gap(ref_x, ref_y[:, 0], ref_x, ref_y[:, 0], y_weight=w)) == 0.0
    # ...but not when one reference target is moved: then w^2 * shift^2 / m, a closed form.
    shifted = ref_y.clone()
    shifted[7, 2] += 1e-2
    far_x = torch.cat([ref_x, ref_x + 100.0])  # no other probe near reference 7
    value = prediction_gap(ref_x, ref_y, far_x, torch.cat([shifted, shifted]), y_weight=w)
    assert float(value) == pytest.approx(w**2 * 1e-4 / 30, rel=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 12),
    extra=st.integers(1, 12),
    x_dims=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    y_dim=st.integers(0, 3),
    scale=st.sampled_from([1e-2, 1.0, 1e2]),
    w=st.floats(0.1, 10.0),
    p=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_prediction_gap_hypothesis_brute_force(m, extra, x_dims, y_dim, scale, w, p, seed):
    g = torch.Generator().manual_seed(seed)
    y_shape = (y_dim,) if y_dim else ()

    def pairs(n):
        return (
            scale * torch.randn(n, *x_dims, generator=g, dtype=torch.float64),
            scale * torch.randn(n, *y_shape, generator=g, dtype=torch.float64),
        )

    ref_x, ref_y = pairs(m)
    probe_x, probe_y = pairs(extra)
    value = float(prediction_gap(ref_x, ref_y, probe_x, probe_y, y_weight=w, p=p))
    assert value == pytest.approx(brute_gap(ref_x, ref_y, probe_x, probe_y, w, p), rel=1e-9)
    # The references themselves among the probes: exactly 0.
    both_x, both_y = torch.cat([probe_x, ref_x]), torch.cat([probe_y, ref_y])
    assert float(prediction_gap(ref_x, ref_y, both_x, both_y, y_weight=w, p=p)) == 0.0


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 40),
    extra=st.integers(1, 40),
    noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    target_noise=st.sampled_from([0.0, 0.05, 0.5]),
    w=st.sampled_from([0.3, 1.0, 4.0]),
    p=st.sampled_from([1.0, 2.0, 3.0]),
    y_dim=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_risk_inequality_and_more_probes_never_increase_the_gap(
    m, extra, noise, target_noise, w, p, y_dim, seed
):
    """gap(ref, {(x', f(x')) : x' in ref_x + other_x}) <= risk(ref_y, f(ref_x)), in float32 too;
    and a superset of probe pairs never has a larger gap."""
    g = torch.Generator().manual_seed(seed)
    ref_x, other_x = torch.randn(m, 2, generator=g), torch.randn(extra, 2, generator=g)
    truth = lambda x: smooth_map(x, y_dim, seed)  # noqa: E731
    ref_y = truth(ref_x) + target_noise * torch.randn(m, y_dim, generator=g)
    model = lambda x: smooth_map(x, y_dim, seed + 1) * 0.5 + truth(x)  # noqa: E731

    def predictions(x):
        return model(x) + noise * torch.randn(x.shape[0], y_dim, generator=g)

    pred_ref, pred_other = predictions(ref_x), predictions(other_x)
    risk = float(prediction_risk(ref_y, pred_ref, y_weight=w, p=p))
    assert risk == pytest.approx(brute_risk(ref_y, pred_ref, w, p), rel=1e-6)
    probe_x, probe_y = torch.cat([ref_x, other_x]), torch.cat([pred_ref, pred_other])
    gap = float(prediction_gap(ref_x, ref_y, probe_x, probe_y, y_weight=w, p=p))
    assert gap <= risk
    assert gap == pytest.approx(brute_gap(ref_x, ref_y, probe_x, probe_y, w, p), rel=1e-5)
    # The reference inputs alone probe a subset of the graph: never a smaller gap.
    only_ref = float(prediction_gap(ref_x, ref_y, ref_x, pred_ref, y_weight=w, p=p))
    assert gap <= only_ref <= risk
    # Adding probes (more points of the graph) never increases the gap.
    more_x = torch.randn(25, 2, generator=g)
    more = float(
        prediction_gap(
            ref_x,
            ref_y,
            torch.cat([probe_x, more_x]),
            torch.cat([probe_y, predictions(more_x)]),
            y_weight=w,
            p=p,
        )
    )
    assert more <= gap


def test_gap_never_exceeds_the_risk_after_the_float32_cast():
    """A near-exact model probed at the (well separated) reference inputs only: every reference's
    nearest probe is its own, so gap == risk in float64; the float32 gap must not round above
    the risk (it did, in 9 of these 40 cases, before the risk was rounded as the gap is)."""
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        pred = RY + 1e-3 * torch.randn(RY.shape, generator=g)
        gap = float(prediction_gap(RX, RY, RX, pred))
        risk = float(prediction_risk(RY, pred))
        assert gap <= risk
        assert gap == pytest.approx(brute_risk(RY, pred), rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    w=st.sampled_from([0.25, 1.0, 3.0]),
    p=st.sampled_from([1.0, 2.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_lookup_table_line_is_the_representation_gap_of_joint_vectors(m, n, w, p, seed):
    g = torch.Generator().manual_seed(seed)
    ref_x, ref_y = torch.randn(m, 3, generator=g), torch.randn(m, 2, generator=g)
    train_x, train_y = torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)
    by_hand = representation_gap(
        torch.cat([ref_x, w * ref_y], dim=1), torch.cat([train_x, w * train_y], dim=1), p=p
    )
    value = prediction_gap(ref_x, ref_y, train_x, train_y, y_weight=w, p=p)
    assert torch.equal(value, by_hand)


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_with_messages_naming_the_argument():
    x, y = torch.randn(10, 2), torch.randn(10, 3)
    with pytest.raises(ValueError, match="`ref_y` has 4 rows but `ref_x` has 10"):
        prediction_gap(x, y[:4], x, y)
    with pytest.raises(ValueError, match="`probe_y` has 9 rows but `probe_x` has 10"):
        prediction_gap(x, y, x, y[:9])
    labels = torch.randint(0, 3, (10,))
    with pytest.raises(TypeError, match="one_hot"):
        prediction_gap(x, labels, x, y[:, 0])
    with pytest.raises(TypeError, match="one_hot"):
        prediction_risk(labels, labels)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="y_weight"):
            prediction_gap(x, y, x, y, y_weight=bad)
        with pytest.raises(ValueError, match="y_weight"):
            gc.PredictionGap(x, y, y_weight=bad)
        with pytest.raises(ValueError, match="y_weight"):
            gc.PredictionGapCallback(reference=(x, y), y_weight=bad)
    for bad in (True, "1", None):
        with pytest.raises(TypeError, match="y_weight"):
            prediction_gap(x, y, x, y, y_weight=bad)
        with pytest.raises(TypeError, match="y_weight"):
            prediction_risk(y, y, y_weight=bad)
    with pytest.raises(ValueError, match="joint features"):
        prediction_gap(x, y, x, y[:, :2])
    with pytest.raises(ValueError, match="pred_y"):
        prediction_risk(y, y[:, :2])
    with pytest.raises(TypeError, match="ref_x"):
        prediction_gap(x.numpy(), y, x, y)
    with pytest.raises(TypeError, match="probe_y"):
        prediction_gap(x, y, x, y.tolist())
    with pytest.raises(TypeError, match="ref_y"):
        prediction_gap(x, y.numpy(), x, y)
    with pytest.raises(TypeError, match="ref_x"):
        gc.PredictionGap(x.tolist(), y)
    metric = gc.PredictionGap(x, y)
    with pytest.raises(ValueError, match="joint features"):
        metric.update(x, y[:, :1])
    with pytest.raises(TypeError, match="one_hot"):
        metric.update(x, labels)


def test_callback_refuses_bad_pairs_at_construction():
    with pytest.raises(ValueError, match=r"`reference`.*10 inputs but 7 targets"):
        gc.PredictionGapCallback(reference=(torch.randn(10, 2), torch.randn(7, 2)))
    with pytest.raises(TypeError, match="one_hot"):
        gc.PredictionGapCallback(reference=(CRX, F.one_hot(CRY, 3).float()), train=(CTX, CTY))
    with pytest.raises(TypeError, match="`reference`"):
        gc.PredictionGapCallback(reference="pairs.csv")
    with pytest.raises(ValueError, match="samples_per_input"):
        gc.PredictionGapCallback(reference=(RX, RY), samples_per_input=3)
    with pytest.raises(ValueError, match="not both"):
        gc.PredictionGapCallback(
            reference=(RX, RY), predict_fn=lambda m, x: m(x), sample_fn=lambda m, x: m(x)
        )


# ---------------------------------------------------------------------------------- the Metric


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric PredictionGap")
def test_metric_streaming_equals_functional_and_reset():
    g = torch.Generator().manual_seed(11)
    probe_x, probe_y = torch.randn(101, 2, generator=g), torch.randn(101, 2, generator=g)
    metric = gc.PredictionGap(RX, RY, y_weight=2.0, p=3.0)
    for start in range(0, 101, 17):
        metric.update(probe_x[start : start + 17], probe_y[start : start + 17])
    expected = prediction_gap(RX, RY, probe_x, probe_y, y_weight=2.0, p=3.0)
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) == pytest.approx(brute_gap(RX, RY, probe_x, probe_y, 2.0, 3.0), rel=1e-5)
    metric.reset()
    with pytest.raises(RuntimeError, match="before any samples"):
        metric.compute()
    metric.update(TX, TY)  # after reset: only the new probes count
    assert float(metric.compute()) == pytest.approx(
        float(prediction_gap(RX, RY, TX, TY, y_weight=2.0, p=3.0)), rel=1e-6
    )
    metric.update(RX, RY)
    assert float(metric.compute()) == 0.0


METRIC_PROBE_X = torch.randn(75, 2, generator=torch.Generator().manual_seed(3))
METRIC_PROBE_Y = smooth_map(METRIC_PROBE_X, 2, seed=4)


def metric_on_own_probes(rank: int) -> float:
    """gc.PredictionGap updated in batches with this process's (uneven) share of the probes;
    ``compute()`` reduces the running minima over the process group when there is one. Run by
    both processes of the gloo group of test_ddp_two_processes_equal_one_process (one spawn
    serves both DDP checks: starting two processes costs ~25 s on this machine)."""
    own = slice(0, 40) if rank == 0 else slice(40, 75)
    metric = gc.PredictionGap(RX, RY, y_weight=0.5, p=2.0)
    for start in range(own.start, own.stop, 16):
        stop = min(start + 16, own.stop)
        metric.update(METRIC_PROBE_X[start:stop], METRIC_PROBE_Y[start:stop])
    return float(metric.compute())


# ---------------------------------------------------------------------------------- callback


class Regressor(L.LightningModule):
    """MLP 2 -> 32 -> out trained with MSE (or cross-entropy on int labels)."""

    def __init__(self, out: int = 2, lr: float = 0.05, classify: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return F.cross_entropy(out, y) if self.hparams.classify else F.mse_loss(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def pairs_loader(x, y, batch_size=40, shuffle=False) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_trainer(tmp_path: Path, callbacks, epochs=3, loggers=None) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers if loggers is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


def fresh(history):
    return [h for h in history if not h["skipped"]]


def model_pairs(model, inputs):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x) for x in inputs])


def test_regression_in_a_real_trainer(tmp_path):
    L.seed_everything(0)
    default = gc.PredictionGapCallback(reference=(RX, RY), train=(TX, TY), **FAST, log_figure=False)
    ref_only = gc.PredictionGapCallback(
        reference=(RX, RY),
        train=(TX, TY),
        probe="reference",
        prefix="ref/",
        **FAST,
        log_figure=False,
    )
    from_loaders = gc.PredictionGapCallback(
        reference=pairs_loader(RX, RY, batch_size=32),
        train=pairs_loader(TX, TY, batch_size=64),
        prefix="dl/",
        **FAST,
        log_figure=False,
    )
    logger = CSVLogger(tmp_path)
    epochs = 3
    trainer = make_trainer(tmp_path, [default, ref_only, from_loaders], epochs, loggers=logger)
    model = Regressor()
    trainer.fit(model, pairs_loader(TX, TY, shuffle=True))
    assert trainer.current_epoch == epochs

    history = default.history
    assert len(history) == epochs and not any(h["skipped"] for h in history)
    for record in history:
        assert set(ALWAYS_KEYS) <= set(record), set(ALWAYS_KEYS) - set(record)
        assert record["gap/observed"] <= record["gap/risk"]
        assert record["gap/memorization"] == pytest.approx(
            float(prediction_gap(RX, RY, TX, TY)), rel=1e-6
        )
        assert record["gap/memorization"] == pytest.approx(brute_gap(RX, RY, TX, TY), rel=1e-5)
        assert math.isfinite(record["gap/predicted"]) and record["gap/predicted"] > 0
        assert math.isfinite(record["id/data"]) and math.isfinite(record["id/samples"])
        assert 0.0 <= record["gap/memorized_fraction"] <= 1.0
    assert default.law is not None and default.n_train == len(TX)
    assert history[0]["gap/observed"] != history[-1]["gap/observed"]  # the model trained

    # The last evaluation ran after the last step: the final model reproduces it.
    assert history[-1]["epoch"] == epochs - 1
    pred_ref, pred_train = model_pairs(model, [RX]), model_pairs(model, [TX])
    probe_x, probe_y = torch.cat([RX, TX]), torch.cat([pred_ref, pred_train])
    assert history[-1]["gap/observed"] == pytest.approx(
        float(prediction_gap(RX, RY, probe_x, probe_y)), rel=1e-6
    )
    assert history[-1]["gap/observed"] == pytest.approx(
        brute_gap(RX, RY, probe_x, probe_y), rel=1e-5
    )
    assert history[-1]["gap/risk"] == pytest.approx(brute_risk(RY, pred_ref), rel=1e-6)

    # Fewer probes (the reference inputs only): a gap at least as large, the same risk.
    for mine, ref in zip(history, ref_only.history, strict=True):
        assert ref["ref/gap/observed"] >= mine["gap/observed"]
        assert ref["ref/gap/risk"] == pytest.approx(mine["gap/risk"], rel=1e-9)
        assert ref["ref/gap/observed"] <= ref["ref/gap/risk"]
    assert ref_only.history[-1]["ref/gap/observed"] == pytest.approx(
        float(prediction_gap(RX, RY, RX, pred_ref)), rel=1e-6
    )
    # DataLoaders of (x, y) batches: the same values as the tensors.
    for mine, dl in zip(history, from_loaders.history, strict=True):
        for key in ALWAYS_KEYS:
            assert dl[f"dl/{key}"] == pytest.approx(mine[key], rel=1e-6), key

    # Every value reached the CSV logger.
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ALWAYS_KEYS:
        logged = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        assert logged == pytest.approx([h[key] for h in history], rel=1e-6), key


def test_callback_gap_never_exceeds_the_risk_for_near_exact_predictors(tmp_path):
    """Probed at the reference inputs only, a near-exact predictor has gap == risk in float64;
    the logged gap/observed (float32) must not be above gap/risk (half of these were before)."""

    def near_exact(seed):
        def predict(module, x):
            noise = torch.randn(x.shape[0], 2, generator=torch.Generator().manual_seed(seed))
            return torch.stack([x[:, 0].sin(), x[:, 1].cos()], dim=1) + 1e-3 * noise

        return predict

    callbacks = [
        gc.PredictionGapCallback(
            reference=(RX, RY),
            train=(TX, TY),
            predict_fn=near_exact(seed),
            probe="reference",
            prefix=f"s{seed}/",
            law=False,
            dimension_method=None,
            log_figure=False,
        )
        for seed in range(8)
    ]
    trainer = make_trainer(tmp_path, callbacks, epochs=1)
    trainer.fit(Regressor(), pairs_loader(TX, TY))
    for seed, callback in enumerate(callbacks):
        (record,) = callback.history
        observed, risk = record[f"s{seed}/gap/observed"], record[f"s{seed}/gap/risk"]
        assert observed <= risk
        pred = near_exact(seed)(None, RX)
        assert risk == pytest.approx(brute_risk(RY, pred), rel=1e-6)
        assert observed == pytest.approx(brute_gap(RX, RY, RX, pred), rel=1e-6)


def test_classification_with_one_hot_targets(tmp_path):
    L.seed_everything(1)
    one_hot = lambda y: F.one_hot(y, 3).float()  # noqa: E731
    callback = gc.PredictionGapCallback(
        reference=(CRX, CRY),
        train=(CTX, CTY),
        predict_fn=lambda m, x: m(x).softmax(-1),
        target_transform=one_hot,
        y_weight=2.0,
        **FAST,
        log_figure=False,
    )
    model = Regressor(out=3, lr=0.1, classify=True)
    trainer = make_trainer(tmp_path, [callback], epochs=3)
    trainer.fit(model, pairs_loader(CTX, CTY, shuffle=True))
    history = callback.history
    assert len(fresh(history)) == 3
    assert all(h["gap/observed"] <= h["gap/risk"] for h in history)
    ref_y, train_y = one_hot(CRY), one_hot(CTY)
    assert history[0]["gap/memorization"] == pytest.approx(
        brute_gap(CRX, ref_y, CTX, train_y, w=2.0), rel=1e-5
    )
    probs_ref = model_pairs(model, [CRX]).softmax(-1)
    probs_train = model_pairs(model, [CTX]).softmax(-1)
    probe_x, probe_y = torch.cat([CRX, CTX]), torch.cat([probs_ref, probs_train])
    assert history[-1]["gap/observed"] == pytest.approx(
        float(prediction_gap(CRX, ref_y, probe_x, probe_y, y_weight=2.0)), rel=1e-6
    )
    assert history[-1]["gap/risk"] == pytest.approx(brute_risk(ref_y, probs_ref, w=2.0), rel=1e-6)
    # Every wrong confident answer costs at most 2 w^2: the risk is bounded by it.
    assert history[-1]["gap/risk"] <= 2 * 2.0**2


def test_integer_labels_without_target_transform_are_refused():
    with pytest.raises(TypeError, match="one_hot"):
        gc.PredictionGapCallback(reference=(CRX, CRY), train=(CTX, CTY))
    with pytest.raises(TypeError, match="one_hot"):
        gc.PredictionGapCallback(reference=(CRX, CRY.float()), train=(CTX, CTY))


def faulty_predictor(module, x):
    if module.current_epoch == 1:
        return torch.full((x.shape[0], 2), float("nan"))
    if module.current_epoch == 2:
        return module(x)[:, :1]  # one value per input, the targets have two
    return module(x)


def test_faulty_predictor_skips_the_evaluation_and_training_goes_on(tmp_path):
    callback = gc.PredictionGapCallback(
        reference=(RX, RY), train=(TX, TY), predict_fn=faulty_predictor, **FAST, log_figure=False
    )
    trainer = make_trainer(tmp_path, [callback], epochs=4)
    with pytest.warns(gc.GapEvaluationWarning, match="skipped evaluation"):
        trainer.fit(Regressor(), pairs_loader(TX, TY))
    assert trainer.current_epoch == 4
    assert [h["skipped"] for h in callback.history] == [False, True, True, False]
    assert "NaN/Inf" in callback.history[1]["reason"]
    assert "values per input" in callback.history[2]["reason"]
    assert callback.history[3]["gap/skipped_evaluations"] == 2.0
    assert callback.history[3]["gap/observed"] <= callback.history[3]["gap/risk"]


def test_gap_early_stopping_on_the_risk(tmp_path):
    callback = gc.PredictionGapCallback(
        reference=(RX, RY), train=(TX, TY), **FAST, log_figure=False
    )
    # No change of the risk can beat min_delta: evaluation 0 sets the best, evaluation 1 ends it.
    stopper = gc.GapEarlyStopping(monitor="gap/risk", patience=0, min_delta=1e6)
    trainer = make_trainer(tmp_path, [callback, stopper], epochs=5)
    trainer.fit(Regressor(), pairs_loader(TX, TY))
    assert stopper.stopped_epoch == 1 and trainer.current_epoch == 2
    assert stopper.stopping_reason.name == "PATIENCE_EXHAUSTED"
    assert float(stopper.best_score) == pytest.approx(callback.history[0]["gap/risk"], rel=1e-6)
    assert [h["epoch"] for h in callback.history] == [0, 1]
    with pytest.raises(ValueError, match="monitor"):
        gc.GapEarlyStopping(monitor="gap/riskiness")


# ---------------------------------------------------------------------------------- ambiguous


def g_of(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([1.0 + x[:, 0].sin() ** 2, x[:, 1].cos() + 1.5], dim=1)  # never 0


def random_sign_sampler(module, x, generator=None):
    signs = torch.randint(0, 2, (x.shape[0], 1), generator=generator, device=x.device) * 2 - 1
    return signs * g_of(x)


def test_ambiguous_task_sampler_beats_the_conditional_mean(tmp_path):
    g = torch.Generator().manual_seed(21)
    train_x, ref_x = torch.rand(150, 2, generator=g) * 4 - 2, torch.rand(80, 2, generator=g) * 4 - 2

    def observe(x):
        signs = torch.randint(0, 2, (x.shape[0], 1), generator=g) * 2 - 1
        return signs * g_of(x)

    train_y, ref_y = observe(train_x), observe(ref_x)
    callback = gc.PredictionGapCallback(
        reference=(ref_x, ref_y),
        train=(train_x, train_y),
        sample_fn=random_sign_sampler,
        samples_per_input=4,
        **FAST,
        log_figure=False,
    )
    trainer = make_trainer(tmp_path, [callback], epochs=2)
    trainer.fit(Regressor(), pairs_loader(train_x, train_y))
    history = callback.history
    assert len(fresh(history)) == 2
    assert all(h["gap/observed"] <= h["gap/risk"] for h in history)

    # Reproduce evaluation 1 from its seed: 4 passes over (reference, train) inputs.
    gen = torch.Generator().manual_seed(derive_seed(0, 1, 0))
    xs, ys = [], []
    for _ in range(4):
        for x in (ref_x, train_x):
            xs.append(x)
            ys.append(random_sign_sampler(None, x, generator=gen))
    sampler_x, sampler_y = torch.cat(xs), torch.cat(ys)
    sampler_gap = float(prediction_gap(ref_x, ref_y, sampler_x, sampler_y))
    assert history[1]["gap/observed"] == pytest.approx(sampler_gap, rel=1e-6)

    # The conditional mean (0) at the same inputs: its gap is w^p mean ||g(x_i)||^p (the
    # reference inputs are probed, and every other probe is farther), whatever the data size.
    probe_x = torch.cat([ref_x, train_x])
    mean_gap = float(prediction_gap(ref_x, ref_y, probe_x, torch.zeros(len(probe_x), 2)))
    assert mean_gap == pytest.approx(float(g_of(ref_x).pow(2).sum(1).mean()), rel=1e-5)
    assert sampler_gap < mean_gap
    assert sampler_gap < 0.1 * mean_gap


# ---------------------------------------------------------------------------------- DDP


class HistoryWriter(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, gc.PredictionGapCallback))
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {
                    "history": callback.history,
                    "epochs": trainer.current_epoch,
                    "metric": metric_on_own_probes(trainer.global_rank).hex(),
                }
            )
        )


def ddp_callback() -> gc.PredictionGapCallback:
    # The dimension's reservoir holds every probe pair (250): its hash keys see the exact bytes
    # of each prediction, which a different batching across processes may change in the last bit.
    return gc.PredictionGapCallback(
        reference=(RX, RY),
        train=(TX, TY),
        law_options=FAST["law_options"],
        dimension_points=1000,
        log_figure=False,
    )


def test_ddp_two_processes_equal_one_process(tmp_path):
    L.seed_everything(3)
    frozen = Regressor(lr=0.0)  # the same model in both runs (DDP splits the batches)
    model_one = copy.deepcopy(frozen)
    one = ddp_callback()
    trainer = make_trainer(tmp_path / "one", [one], epochs=2)
    trainer.fit(model_one, pairs_loader(TX, TY))

    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        callbacks=[ddp_callback(), HistoryWriter(str(tmp_path))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(frozen, pairs_loader(TX, TY))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["epochs"] == ranks[1]["epochs"] == 2
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["history"]) == len(one.history) == 2
    for ddp, single in zip(ranks[0]["history"], one.history, strict=True):
        assert not ddp["skipped"]
        for key in ALWAYS_KEYS:
            assert ddp[key] == pytest.approx(single[key], rel=1e-6, nan_ok=True), key
    pred_ref, pred_train = model_pairs(model_one, [RX]), model_pairs(model_one, [TX])
    assert ranks[0]["history"][-1]["gap/observed"] == pytest.approx(
        float(prediction_gap(RX, RY, torch.cat([RX, TX]), torch.cat([pred_ref, pred_train]))),
        rel=1e-6,
    )
    assert ranks[0]["history"][-1]["gap/risk"] == pytest.approx(brute_risk(RY, pred_ref), rel=1e-6)
    assert np.isfinite(ranks[0]["history"][-1]["id/data"])

    # gc.PredictionGap in the same two gloo processes, each updated with its share of the probes:
    # the one-process value, bit for bit, on both.
    values = [float.fromhex(r["metric"]) for r in ranks]
    one_metric = gc.PredictionGap(RX, RY, y_weight=0.5, p=2.0)
    one_metric.update(METRIC_PROBE_X, METRIC_PROBE_Y)
    assert values[0] == values[1] == float(one_metric.compute())
    assert values[0] == pytest.approx(
        brute_gap(RX, RY, METRIC_PROBE_X, METRIC_PROBE_Y, 0.5, 2.0), rel=1e-5
    )
    assert metric_on_own_probes(0) > values[0]  # rank 0's share alone: a larger gap


def test_the_history_figure_plots_the_risk_beside_the_gap():
    pytest.importorskip("matplotlib")
    from gapcallback.plotting import gap_history_figure

    history = [
        {"evaluation": i, "epoch": i, "step": 10 * i, "skipped": False,
         "gap/observed": 0.5 / (i + 1), "gap/risk": 0.6 / (i + 1)}
        for i in range(3)
    ]  # fmt: skip
    fig = gap_history_figure(history, law=None, n_train=None, memorization_gap=None)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["test risk (gap/risk)"].get_ydata()) == [h["gap/risk"] for h in history]
    without = gap_history_figure(
        [{k: v for k, v in h.items() if k != "gap/risk"} for h in history],
        law=None, n_train=None, memorization_gap=None,
    )  # fmt: skip
    assert "test risk (gap/risk)" not in {
        line.get_label() for ax in without.axes for line in ax.get_lines()
    }
