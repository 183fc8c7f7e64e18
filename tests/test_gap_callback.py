"""GapCallback and GapEarlyStopping on a real lightning.Trainer (CPU), real loggers, real DDP."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import gapcallback as gc
from gapcallback.functional import memorization, representation_gap
from tests.lightning_models import GlobalRNGModel, PointCloudModel, circle_data, loader

TRAIN = circle_data(200, seed=0)
REFERENCE = circle_data(120, seed=1)
FAST = {"law_options": {"num_sizes": 4, "repeats": 2}, "dimension_points": 200}


def make_trainer(tmp_path: Path, callbacks, epochs=3, loggers=None, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers if loggers is not None else False,
        callbacks=callbacks,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def read_csv_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, key):
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


def test_logs_to_csv_and_tensorboard_and_values_match_functional(tmp_path):
    L.seed_everything(0)
    callback = gc.GapCallback(
        REFERENCE, train=loader(TRAIN), num_samples=300, sample_batch_size=128, **FAST
    )
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], epochs=3, loggers=[csv_logger, tb_logger])
    model = PointCloudModel()
    trainer.fit(model, loader(TRAIN))

    rows = read_csv_metrics(Path(csv_logger.log_dir))
    observed = column(rows, "gap/observed")
    assert len(observed) == 3
    for key in [
        "gap/predicted",
        "gap/memorization",
        "gap/ratio",
        "gap/memorized_fraction",
        "id/data",
        "id/samples",
        "gap/effective_n",
        "id/law",
    ]:
        assert len(column(rows, key)) == 3, key
    history = [h for h in callback.history if not h["skipped"]]
    assert observed == pytest.approx([h["gap/observed"] for h in history], rel=1e-6)
    assert column(rows, "gap/memorization")[0] == pytest.approx(
        float(representation_gap(REFERENCE, TRAIN)), rel=1e-6
    )
    assert column(rows, "gap/ratio")[0] == pytest.approx(
        observed[0] / column(rows, "gap/predicted")[0], rel=1e-6
    )
    assert callback.n_train == 200
    assert callback.law is not None and callback.law.n_train == 200

    # The last evaluation can be reproduced from the model and the seed: an independent oracle.
    last = callback.history[-1]
    g = torch.Generator().manual_seed(
        __import__("gapcallback.utils.rng", fromlist=["x"]).derive_seed(0, last["evaluation"], 0)
    )
    samples = torch.cat([model.sample(n, generator=g) for n in (128, 128, 44)]).detach()
    assert last["gap/observed"] == pytest.approx(
        float(representation_gap(REFERENCE, samples)), rel=1e-5
    )
    assert last["gap/memorized_fraction"] == pytest.approx(
        float(memorization(samples, TRAIN).fraction), abs=1e-9
    )

    # TensorBoard wrote scalars and the figure; the PNG is in the log dir.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "gap/observed" in acc.Tags()["scalars"]
    assert [e.value for e in acc.Scalars("gap/observed")] == pytest.approx(observed, rel=1e-6)
    assert "gap/figure" in acc.Tags()["images"]
    assert (Path(trainer.log_dir) / "gap_callback.png").stat().st_size > 1000


def test_without_train_logs_observed_and_ids_only(tmp_path):
    callback = gc.GapCallback(REFERENCE, num_samples=100, dimension_points=100, log_figure=False)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], epochs=2, loggers=logger)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    rows = read_csv_metrics(Path(logger.log_dir))
    assert len(column(rows, "gap/observed")) == 2
    assert "gap/predicted" not in rows[0] and "gap/memorized_fraction" not in rows[0]
    assert len(column(rows, "id/data")) == 2


def test_step_based_evaluation_and_custom_sampler_with_transform(tmp_path):
    calls = []

    def sampler(module, n, generator=None):
        calls.append(n)
        return module.sample(n, generator=generator).unsqueeze(1)  # [n, 1, 3]: transform flattens

    callback = gc.GapCallback(
        REFERENCE.unsqueeze(1),
        sampler=sampler,
        num_samples=90,
        sample_batch_size=40,
        every_n_epochs=None,
        every_n_train_steps=3,
        transform=lambda x: x.flatten(1),
        dimension_method=None,
        log_figure=False,
    )
    trainer = make_trainer(tmp_path, [callback], epochs=2)  # 4 steps per epoch -> steps 3, 6
    trainer.fit(PointCloudModel(), loader(TRAIN))
    assert [h["step"] for h in callback.history] == [3, 6]
    assert calls == [40, 40, 10, 40, 40, 10]


def test_eval_mode_restored_and_no_grad(tmp_path):
    seen = {}

    def sampler(module, n):
        seen["training"] = module.training
        seen["grad"] = torch.is_grad_enabled()
        return module.sample(n)

    callback = gc.GapCallback(
        REFERENCE, sampler=sampler, num_samples=20, dimension_method=None, log_figure=False
    )

    class Check(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen["after"] = pl_module.training

    trainer = make_trainer(tmp_path, [callback, Check()], epochs=1)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    assert seen == {"training": False, "grad": False, "after": True}


def test_training_run_is_not_perturbed(tmp_path):
    """Same seed with and without the callback gives identical weights, even for a global-RNG sampler."""

    def run(with_callback: bool) -> torch.Tensor:
        L.seed_everything(123)
        model = GlobalRNGModel()
        callbacks = (
            [gc.GapCallback(REFERENCE, train=loader(TRAIN), num_samples=64, **FAST)]
            if with_callback
            else []
        )
        trainer = make_trainer(tmp_path, callbacks, epochs=3)
        trainer.fit(model, loader(TRAIN))
        return model.points.detach().clone()

    assert torch.equal(run(True), run(False))


@pytest.mark.parametrize(
    ("bad_sample", "reason"),
    [
        (lambda m, n: (_ for _ in ()).throw(RuntimeError("sampler exploded")), "sampler exploded"),
        (lambda m, n: torch.full((n, 3), float("nan")), "NaN/Inf"),
        (lambda m, n: torch.zeros(n, 4), "shape"),
        (lambda m, n: torch.zeros(n // 2, 3), "samples, "),
        (lambda m, n: [1, 2, 3], "not a tensor"),
        (lambda m, n: torch.zeros(n, 3, dtype=torch.long), "dtype"),
    ],
)
def test_faults_warn_skip_and_training_goes_on(tmp_path, bad_sample, reason):
    def sampler(module, n):
        if module.current_epoch == 1:  # second evaluation fails
            return bad_sample(module, n)
        return module.sample(n)

    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, sampler=sampler, num_samples=50, **FAST, log_figure=False
    )
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], epochs=3, loggers=logger)
    with pytest.warns(gc.GapEvaluationWarning, match=reason):
        trainer.fit(PointCloudModel(), loader(TRAIN))
    assert trainer.current_epoch == 3  # training finished
    assert [h["skipped"] for h in callback.history] == [False, True, False]
    assert reason in callback.history[1]["reason"]
    rows = read_csv_metrics(Path(logger.log_dir))
    assert len(column(rows, "gap/observed")) == 2  # evaluations 0 and 2 kept
    assert column(rows, "gap/skipped_evaluations") == [0.0, 1.0, 1.0]


def test_on_error_raise(tmp_path):
    def sampler(module, n):
        raise ValueError("boom")

    callback = gc.GapCallback(
        REFERENCE, sampler=sampler, num_samples=10, on_error="raise", dimension_method=None
    )
    trainer = make_trainer(tmp_path, [callback], epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(PointCloudModel(), loader(TRAIN))


def test_missing_sample_method_is_a_clear_error(tmp_path):
    class NoSample(PointCloudModel):
        sample = None  # type: ignore[assignment]

    trainer = make_trainer(tmp_path, [gc.GapCallback(REFERENCE, dimension_method=None)], epochs=1)
    with pytest.raises(TypeError, match=r"define `NoSample\.sample"):
        trainer.fit(NoSample(), loader(TRAIN))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"every_n_epochs": None}, ValueError, "never evaluate"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"sampler": 3}, TypeError, "sampler"),
        ({"p": -1}, ValueError, "positive"),
        ({"law": "yes"}, TypeError, "law"),
        ({"symmetry": "shifts"}, TypeError, "symmetry"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gc.GapCallback(REFERENCE, **kwargs)


def test_mismatched_train_and_reference_shapes(tmp_path):
    trainer = make_trainer(
        tmp_path, [gc.GapCallback(REFERENCE, train=torch.randn(50, 4), dimension_method=None)]
    )
    with pytest.raises(ValueError, match="same space"):
        trainer.fit(PointCloudModel(), loader(TRAIN))


# ---------------------------------------------------------------------------------- stopping


class StepRecorder(Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)


def test_lightning_early_stopping_monitors_the_gap(tmp_path):
    callback = gc.GapCallback(REFERENCE, num_samples=64, dimension_method=None, log_figure=False)
    stopper = EarlyStopping(monitor="gap/observed", mode="min", stopping_threshold=10.0)
    trainer = make_trainer(tmp_path, [callback, stopper], epochs=5)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    assert trainer.current_epoch == 1 and stopper.stopped_epoch == 0  # below threshold at once


class ConstantGapModel(PointCloudModel):
    """A frozen generator: its gap never improves, so patience runs out predictably."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_stale_values_fool_lightning_early_stopping_but_not_ours(tmp_path):
    # Evaluations every 3rd epoch. Lightning's EarlyStopping counts epochs 1 and 2 (stale values)
    # as "no improvement" and stops at epoch 2 with patience=2 (the bug the issue measured).
    cb_a = gc.GapCallback(
        REFERENCE, num_samples=64, every_n_epochs=3, dimension_method=None, log_figure=False
    )
    lightning_stopper = EarlyStopping(monitor="gap/observed", patience=2, strict=False)
    trainer = make_trainer(tmp_path, [cb_a, lightning_stopper], epochs=12)
    trainer.fit(PointCloudModel(lr=0.0), loader(TRAIN))
    assert lightning_stopper.stopped_epoch <= 5

    cb_b = gc.GapCallback(
        REFERENCE, num_samples=64, every_n_epochs=3, dimension_method=None, log_figure=False
    )
    ours = gc.GapEarlyStopping(monitor="gap/observed", patience=2, min_delta=1.0)
    trainer = make_trainer(tmp_path, [ours, cb_b], epochs=30)  # wrong order on purpose: it reorders
    trainer.fit(ConstantGapModel(), loader(TRAIN))
    # No change by more than min_delta: evaluation 0 sets best, evaluations 1 and 2 exhaust patience.
    assert [h["epoch"] for h in cb_b.history] == [2, 5, 8]
    assert ours.stopped_epoch == 8 and trainer.current_epoch == 9
    assert ours.stopping_reason.name == "PATIENCE_EXHAUSTED"
    assert "did not improve" in ours.stopping_reason_message


def test_skipped_evaluations_do_not_count(tmp_path):
    def sampler(module, n):
        if module.current_epoch in (1, 2, 3):
            raise RuntimeError("flaky")
        return module.sample(n)

    callback = gc.GapCallback(
        REFERENCE, sampler=sampler, num_samples=64, dimension_method=None, log_figure=False
    )
    stopper = gc.GapEarlyStopping(patience=1, min_delta=1.0)
    trainer = make_trainer(tmp_path, [callback, stopper], epochs=6)
    with pytest.warns(gc.GapEvaluationWarning):
        trainer.fit(ConstantGapModel(), loader(TRAIN))
    # Fresh evaluations at epochs 0 and 4 only; patience 1 is exhausted at epoch 4.
    assert stopper.stopped_epoch == 4


def test_stop_on_memorization(tmp_path):
    # A model that samples its training set exactly is fully memorizing.
    def copy_train(module, n, generator=None):
        idx = torch.randint(len(TRAIN), (n,), generator=generator)
        return TRAIN[idx]

    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, sampler=copy_train, num_samples=100, **FAST, log_figure=False
    )
    stopper = gc.GapEarlyStopping(
        monitor="gap/memorized_fraction", mode="min", divergence_threshold=0.5
    )
    trainer = make_trainer(tmp_path, [callback, stopper], epochs=5)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    assert callback.history[0]["gap/memorized_fraction"] == 1.0
    assert stopper.stopped_epoch == 0
    assert stopper.stopping_reason.name == "DIVERGENCE_THRESHOLD"


def test_gap_early_stopping_needs_a_gap_callback(tmp_path):
    trainer = make_trainer(tmp_path, [gc.GapEarlyStopping()], epochs=1)
    with pytest.raises(RuntimeError, match="needs a GapCallback"):
        trainer.fit(PointCloudModel(), loader(TRAIN))


def test_gap_early_stopping_unknown_key(tmp_path):
    callback = gc.GapCallback(REFERENCE, num_samples=32, dimension_method=None, log_figure=False)
    trainer = make_trainer(
        tmp_path, [callback, gc.GapEarlyStopping(monitor="gap/predicted")], epochs=1
    )
    with pytest.raises(RuntimeError, match="does not log"):
        trainer.fit(PointCloudModel(), loader(TRAIN))


# ---------------------------------------------------------------------------------- resume


def test_resume_logs_what_an_uninterrupted_run_logs(tmp_path):
    def fit(epochs, ckpt_path=None, root=None):
        L.seed_everything(7)
        callback = gc.GapCallback(
            REFERENCE, train=TRAIN, num_samples=80, every_n_epochs=1, **FAST, log_figure=False
        )
        stopper = gc.GapEarlyStopping(patience=10)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_epochs=1)
        trainer = make_trainer(
            root, [callback, stopper, ckpt], epochs=epochs, enable_checkpointing=True
        )
        trainer.fit(PointCloudModel(), loader(TRAIN, shuffle=False), ckpt_path=ckpt_path)
        return callback, stopper

    full, full_stopper = fit(4, root=tmp_path / "full")
    fit(2, root=tmp_path / "part")
    resumed, resumed_stopper = fit(
        4, ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"), root=tmp_path / "part"
    )
    assert len(resumed.history) == 4
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, nan_ok=True), key
    assert resumed.law.state_dict() == full.law.state_dict()
    assert resumed_stopper.wait_count == full_stopper.wait_count
    assert float(resumed_stopper.best_score) == pytest.approx(float(full_stopper.best_score))


def test_state_dict_round_trip():
    callback = gc.GapCallback(REFERENCE, train=TRAIN, **FAST)
    callback.prepare_data()
    callback.history.append(
        {"evaluation": 0, "epoch": 0, "step": 4, "skipped": False, "gap/observed": 0.1}
    )
    state = json.loads(json.dumps(callback.state_dict()))  # plain Python, JSON-able
    other = gc.GapCallback(REFERENCE, train=TRAIN, **FAST)
    other.load_state_dict(state)
    assert other.history == callback.history
    assert other.law.predict(200) == pytest.approx(callback.law.predict(200))
    assert other.memorization_gap == callback.memorization_gap and other.data_ready
    assert math.isfinite(other.data_dimension)


def test_prepare_data_is_public_read_only_and_idempotent():
    callback = gc.GapCallback(REFERENCE, train=loader(TRAIN), **FAST)
    assert callback.reference is None and callback.train is None and not callback.data_ready
    callback.prepare_data()
    assert callback.data_ready
    assert torch.equal(callback.reference, REFERENCE)
    assert sorted(map(tuple, callback.train.tolist())) == sorted(map(tuple, TRAIN.tolist()))
    law_state, memorization_gap = callback.law.state_dict(), callback.memorization_gap
    callback.prepare_data()  # nothing recomputed
    assert callback.law.state_dict() == law_state and callback.memorization_gap == memorization_gap
    with pytest.raises(AttributeError):
        callback.reference = TRAIN  # type: ignore[misc]


def test_memorization_line_reuses_the_law_search(monkeypatch):
    """With the law fitted here, the references' gap to the training set is read off the law's
    curve (its pool-wide search found every reference's nearest training point): no second search,
    the same value as ``representation_gap``, bit for bit."""
    import gapcallback.evaluation.prepared as module

    calls = []
    real = module.representation_gap

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "representation_gap", spy)
    for pooled in (True, False):
        options = {**FAST["law_options"], "pooled": pooled}
        callback = gc.GapCallback(
            REFERENCE, train=TRAIN, law_options=options, dimension_method=None
        )
        callback.prepare_data()
        assert calls == []
        assert callback.memorization_gap == float(representation_gap(REFERENCE, TRAIN))
        assert callback.law.curve is not None
    # Without a fitted law there is nothing to reuse: one search.
    callback = gc.GapCallback(REFERENCE, train=TRAIN, law=False, dimension_method=None)
    callback.prepare_data()
    assert len(calls) == 1
    assert callback.memorization_gap == float(representation_gap(REFERENCE, TRAIN))


# ---------------------------------------------------------------------------------- DDP


class RankRecorder(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.values = []

    def on_train_epoch_end(self, trainer, pl_module):
        keys = sorted(k for k in trainer.callback_metrics if k.startswith(("gap/", "id/")))
        self.values.append(
            {k: float(trainer.callback_metrics[k]) for k in keys} | {"epoch": trainer.current_epoch}
        )

    def on_train_end(self, trainer, pl_module):
        gap = next(c for c in trainer.callbacks if isinstance(c, gc.GapCallback))
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(
            json.dumps(
                {"values": self.values, "history": gap.history, "stopped": trainer.current_epoch}
            )
        )


class FlakyOnRankOne(PointCloudModel):
    def sample(self, n, generator=None):
        if self.global_rank == 1 and self.current_epoch == 1:
            raise RuntimeError("rank 1 sampler failure")
        return super().sample(n, generator=generator)


def test_ddp_two_processes(tmp_path):
    callback = gc.GapCallback(REFERENCE, train=TRAIN, num_samples=101, **FAST, log_figure=False)
    stopper = gc.GapEarlyStopping(monitor="gap/observed", patience=1, min_delta=1.0)
    trainer = L.Trainer(
        max_epochs=6,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        callbacks=[callback, stopper, RankRecorder(str(tmp_path))],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ConstantFlaky(), loader(TRAIN))
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())

    def without_reason(history):
        return [{k: v for k, v in h.items() if k != "reason"} for h in history]

    assert without_reason(r0["history"]) == without_reason(r1["history"])  # same values and skips
    assert r0["values"] == r1["values"]
    assert r0["stopped"] == r1["stopped"]  # same stopping decision
    skipped = [h["skipped"] for h in r0["history"]]
    assert skipped[:2] == [
        False,
        True,
    ]  # rank 1's failure skipped evaluation 1 on both, no deadlock
    assert "another process" in r0["history"][1]["reason"]
    assert "rank 1 sampler failure" in r1["history"][1]["reason"]
    # Frozen model (no change > min_delta): patience 1 exhausted at evaluation 2 (epoch 2).
    assert r0["stopped"] == 3
    first = r0["history"][0]
    assert first["gap/memorization"] == pytest.approx(
        float(representation_gap(REFERENCE, TRAIN)), rel=1e-6
    )
    assert 0.0 <= first["gap/memorized_fraction"] <= 1.0


class ConstantFlaky(FlakyOnRankOne):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
