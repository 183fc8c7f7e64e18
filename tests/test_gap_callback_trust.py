"""First-run trust (issue 12): options fail at construction, optional parts fail alone, samples on
another scale are flagged, effective n outside the law is nan, the figure is drawn only when due
and lands on the scalars' step, the data preparation announces itself. Real Trainer, real loggers.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

import gapcallback as gc
from gapcallback.functional import representation_gap
from gapcallback.utils.value_range import FeatureStats, scale_mismatch
from tests.lightning_models import PointCloudModel, circle_data, loader
from tests.test_gap_callback import FAST, column, make_trainer, read_csv_metrics

TRAIN = circle_data(200, seed=0)
REFERENCE = circle_data(120, seed=1)


class Stream(IterableDataset):
    """An endless stream of points (a streaming data set has no length)."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            angle = torch.rand(1, generator=g) * 2 * torch.pi
            yield torch.cat([angle.cos(), angle.sin(), torch.zeros(1)])


# ---------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dimension_method": "twonnn"}, ValueError, r"`dimension_method`.*Did you mean 'twonn'"),
        ({"dimension_method": 3}, ValueError, "`dimension_method`"),
        ({"law_options": {"repeat": 2}}, TypeError, r"`law_options`: .*\['repeat'\].*'repeats'"),
        ({"law_options": {"num_sizes": 2}}, ValueError, "`law_options`: .*num_sizes"),
        ({"law_options": {"p": 1.0}}, TypeError, "pass them to GapCallback itself"),
        ({"law_options": [("k", 3)]}, TypeError, "`law_options` must be a dict"),
        ({"input_key": 1.5}, TypeError, "`input_key`"),
        ({"input_key": True}, TypeError, "`input_key`"),
        ({"memorization_ratio": "x"}, TypeError, "`memorization_ratio`"),
        ({"memorization_ratio": 2.0}, ValueError, "`memorization_ratio`"),
        ({"figure_every_n_evaluations": 0}, ValueError, "`figure_every_n_evaluations`"),
        ({"log_figure": "yes"}, TypeError, "`log_figure`"),
        ({"figure_in_background": 1}, TypeError, "`figure_in_background`"),
        ({"progress": 1}, TypeError, "`progress`"),
        ({"sample_transform": "flip"}, TypeError, "`sample_transform`"),
        ({"max_points": 0}, ValueError, "`max_points`"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        gc.GapCallback(REFERENCE, **kwargs)


def test_bad_data_sources_fail_at_construction():
    with pytest.raises(TypeError, match="`reference` must be a tensor or numpy array"):
        gc.GapCallback(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`train` must be"):
        gc.GapCallback(REFERENCE, train="train.npy")  # type: ignore[arg-type]
    stream = DataLoader(Stream(), batch_size=10)
    with pytest.raises(ValueError, match=r"`train` is an iterable without a length.*max_points="):
        gc.GapCallback(REFERENCE, train=stream)


def test_streaming_source_with_max_points(tmp_path):
    callback = gc.GapCallback(
        DataLoader(Stream(), batch_size=32),
        train=TRAIN,
        max_points=100,
        num_samples=64,
        log_figure=False,
        **FAST,
    )
    trainer = make_trainer(tmp_path, [callback], epochs=1)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    assert callback.reference.shape == (100, 3)
    assert len(callback.history) == 1 and not callback.history[0]["skipped"]


def test_numpy_reference_equals_tensor_reference(tmp_path):
    runs = []
    for reference in (REFERENCE, REFERENCE.numpy()):
        L.seed_everything(0)
        callback = gc.GapCallback(
            reference, train=TRAIN.numpy(), num_samples=64, log_figure=False, **FAST
        )
        trainer = make_trainer(tmp_path, [callback], epochs=1)
        trainer.fit(PointCloudModel(), loader(TRAIN))
        runs.append(callback.history[0])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------- parts


class CollapsedModel(PointCloudModel):
    """Every sample is the same point: the gap is defined, the samples' dimension is not."""

    def sample(self, n, generator=None):
        return self.points[:1].expand(n, -1).clone()


def test_a_failing_optional_part_logs_everything_else(tmp_path):
    callback = gc.GapCallback(REFERENCE, train=TRAIN, num_samples=64, log_figure=False, **FAST)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], epochs=2, loggers=logger)
    with pytest.warns(gc.GapEvaluationWarning, match=r"left out id/samples.*every other key"):
        trainer.fit(CollapsedModel(), loader(TRAIN))
    rows = read_csv_metrics(Path(logger.log_dir))
    for key in ("gap/observed", "gap/memorization", "gap/memorized_fraction", "id/data"):
        assert len(column(rows, key)) == 2, key
    assert "id/samples" not in rows[0]
    assert callback.num_skipped == 0
    for record in callback.history:
        assert "3 distinct points" in record["failed_parts"]["id/samples"]
    samples = trainer.lightning_module.points[:1].detach()  # the last evaluation's model
    assert callback.history[-1]["gap/observed"] == pytest.approx(
        float(representation_gap(REFERENCE, samples)), rel=1e-6
    )


def test_a_failing_optional_part_raises_with_on_error_raise(tmp_path):
    callback = gc.GapCallback(
        REFERENCE, num_samples=64, log_figure=False, on_error="raise", dimension_points=100
    )
    trainer = make_trainer(tmp_path, [callback], epochs=1)
    with pytest.raises(RuntimeError, match="id/samples"):
        trainer.fit(CollapsedModel(), loader(TRAIN))


class ImagelessTensorBoard(TensorBoardLogger):
    """A TensorBoard logger whose image upload fails (a full disk, a closed writer...)."""

    def log_image_fails(self, *args, **kwargs):
        raise OSError("image upload failed")

    @property
    def experiment(self):
        writer = super().experiment
        writer.add_image = self.log_image_fails
        return writer


def test_a_failing_figure_is_recorded_and_scalars_are_kept(tmp_path):
    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, num_samples=64, figure_every_n_evaluations=1, **FAST
    )
    logger = ImagelessTensorBoard(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], epochs=2, loggers=logger)
    with pytest.warns(gc.GapEvaluationWarning, match="image upload failed"):
        trainer.fit(PointCloudModel(), loader(TRAIN))
    assert all("figure" in h["failed_parts"] for h in callback.history)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("gap/observed")) == 2


# ---------------------------------------------------------------------------------- scale


class MinusOneToOneModel(PointCloudModel):
    """Works in [-1, 1] while the data lie in [0, 1] (as diffusers' pipelines do)."""

    def sample(self, n, generator=None):
        return 2.0 * super().sample(n, generator=generator) - 1.0


UNIT_TRAIN = (TRAIN + 1.0) / 2.0  # the circle moved into [0, 1]^3
UNIT_REFERENCE = (REFERENCE + 1.0) / 2.0


def _unit_model() -> MinusOneToOneModel:
    model = MinusOneToOneModel()
    with torch.no_grad():  # samples 2 * points - 1 start on the data's [-1, 1] image
        model.points.copy_(UNIT_TRAIN[:48])
    return model


def test_samples_on_another_scale_warn_once_with_the_fix(tmp_path):
    callback = gc.GapCallback(
        UNIT_REFERENCE, train=UNIT_TRAIN, num_samples=200, log_figure=False, **FAST
    )
    trainer = make_trainer(tmp_path, [callback], epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_unit_model(), loader(UNIT_TRAIN))
    scale = [w for w in caught if "different scales" in str(w.message)]
    assert len(scale) == 1
    message = str(scale[0].message)
    assert re.search(r"look like (1\.9|2\.0)\d* \* reference - 0\.9\d*\b", message), message
    assert re.search(r"sample_transform=lambda z: \(z \+ 0\.9\d*\) / (1\.9|2\.0)\d*", message)
    assert callback.scale_warning is not None


def test_sample_transform_maps_samples_back(tmp_path):
    callback = gc.GapCallback(
        UNIT_REFERENCE,
        train=UNIT_TRAIN,
        num_samples=200,
        log_figure=False,
        sample_transform=lambda z: (z + 1.0) / 2.0,
        transform=lambda x: 10.0 * x,  # applied to samples after sample_transform, and to data
        **FAST,
    )
    trainer = make_trainer(tmp_path, [callback], epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _unit_model()
        trainer.fit(model, loader(UNIT_TRAIN))
    assert not [w for w in caught if "different scales" in str(w.message)]
    assert callback.scale_warning is None
    assert callback.memorization_gap == pytest.approx(
        float(representation_gap(10 * UNIT_REFERENCE, 10 * UNIT_TRAIN)), rel=1e-6
    )
    # The samples are (2 x - 1 + 1) / 2 * 10 = 10 x: near the scaled data, not 20x away.
    assert callback.history[0]["gap/ratio"] < 20


def test_scale_mismatch_rule():
    g = torch.Generator().manual_seed(0)
    unit = torch.rand(2000, 16, generator=g)

    def stats(x):
        s = FeatureStats()
        for chunk in x.split(300):
            s.update(chunk)
        return s

    ref = stats(unit)
    assert scale_mismatch(ref, stats(torch.rand(2000, 16, generator=g))) is None
    assert scale_mismatch(ref, stats(unit + 0.05 * torch.randn(2000, 16, generator=g))) is None
    assert "2 * reference - 1." in scale_mismatch(ref, stats(2 * unit - 1))
    assert scale_mismatch(stats(2 * unit - 1), ref) is not None  # the other way round
    assert "255 * reference" in scale_mismatch(ref, stats(255 * unit))
    # A model that collapsed to one point: no affine fix is suggested (no division by zero).
    collapsed = scale_mismatch(ref, stats(torch.full((500, 16), 0.3)))
    assert "do not vary" in collapsed and "/ 0" not in collapsed and "lambda" not in collapsed
    # Streaming moments equal the one-shot ones (an independent float64 oracle).
    one = stats(unit.double())
    assert one.location == pytest.approx(float(unit.double().mean()), rel=1e-12)
    assert one.scale == pytest.approx(
        float(unit.double().var(0, unbiased=False).mean().sqrt()), rel=1e-9
    )


# ---------------------------------------------------------------------------------- law range


class FarAwayModel(PointCloudModel):
    def sample(self, n, generator=None):
        return super().sample(n, generator=generator) + 5.0


def test_effective_n_outside_the_law_is_nan(tmp_path):
    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, num_samples=64, figure_every_n_evaluations=1, **FAST
    )
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], epochs=1, loggers=logger)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gc.GapEvaluationWarning)
        trainer.fit(FarAwayModel(), loader(TRAIN))
    record = callback.history[0]
    law = callback.law
    raw = float(law.samples_for(record["gap/observed"]))
    assert raw < float(law.sizes.min())  # the law would answer a size below its range
    assert np.isnan(record["gap/effective_n"])
    rows = read_csv_metrics(Path(logger.log_dir))
    assert rows[0]["gap/effective_n"] == "nan"
    assert "figure" not in record.get("failed_parts", {}), record  # drawn without that point


def test_effective_n_inside_the_law_is_the_law_inverse():
    from gapcallback.evaluation.values import effective_training_size

    law = gc.GapLaw.from_gaps([100, 200, 400, 800], [0.4, 0.2, 0.1, 0.05])  # R = 40 / n
    assert effective_training_size(law, 0.01) == pytest.approx(4000)
    assert effective_training_size(law, 0.2) == pytest.approx(200)
    assert np.isnan(effective_training_size(law, 1.0))  # n = 40 < 100, the smallest size
    assert np.isnan(effective_training_size(law, 0.0))


def test_values_are_a_pure_function_of_the_summed_counts():
    """Local states -> one summed tensor -> pure derivation: what two ranks log depends on the sum
    only, and a part that failed on one rank is left out on both."""
    from gapcallback.evaluation.values import (
        SHARED_PARTS,
        gap_values,
        merge_failures,
        pack_counts,
        unpack_counts,
    )

    law = gc.GapLaw.from_gaps([100, 200, 400, 800], [0.4, 0.2, 0.1, 0.05])  # R = 40 / n
    rank0 = pack_counts(3, 51, {})
    rank1 = pack_counts(2, 50, {"id/samples": "ValueError: too few points"})
    assert rank0.dtype == torch.float64 and rank0.numel() == 2 + len(SHARED_PARTS)
    counts = unpack_counts(rank0 + rank1)  # what a sum over the two ranks returns
    assert (counts.memorized, counts.drawn, counts.failed) == (5.0, 101.0, {"id/samples"})
    assert merge_failures({}, counts) == {"id/samples": "it failed on another process"}
    own = {"id/samples": "ValueError: too few points"}
    assert merge_failures(own, counts) == own  # the own reason is kept
    values = gap_values(0.02, counts=counts, memorization_gap=0.05, law=law, n_train=800)
    assert values == {
        "gap/observed": 0.02,
        "gap/memorized_fraction": 5 / 101,
        "gap/memorization": 0.05,
        "gap/predicted": pytest.approx(0.05),
        "id/law": pytest.approx(2.0),
        "gap/effective_n": pytest.approx(2000),
        "gap/ratio": pytest.approx(0.4),
    }
    # The same sum in any order, the same values; a failed memorization test anywhere: no key.
    assert gap_values(0.02, counts=unpack_counts(rank1 + rank0), law=law) == gap_values(
        0.02, counts=counts, law=law
    )
    broken = unpack_counts(rank0 + pack_counts(0, 50, {"gap/memorized_fraction": "boom"}))
    assert "gap/memorized_fraction" not in gap_values(0.02, counts=broken)
    assert gap_values(0.02, memorization_gap=0.01) == {
        "gap/observed": 0.02,
        "gap/memorization": 0.01,
        "gap/ratio": 2.0,
    }
    with pytest.raises(ValueError, match="not both"):
        gap_values(0.02, counts=counts, memorized_fraction=0.1)
    with pytest.raises(ValueError, match="packed counts"):
        unpack_counts(torch.zeros(3))


# ---------------------------------------------------------------------------------- outputs


def test_no_logger_no_warning_and_values_reach_callback_metrics(tmp_path):
    callback = gc.GapCallback(REFERENCE, train=TRAIN, num_samples=64, **FAST)
    trainer = make_trainer(tmp_path, [callback], epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(PointCloudModel(), loader(TRAIN))
    assert not [w for w in caught if "no logger configured" in str(w.message)]
    assert float(trainer.callback_metrics["gap/observed"]) == pytest.approx(
        callback.history[-1]["gap/observed"]
    )


def _watch_renders(monkeypatch, fail: bool = False) -> list[tuple[int, str]]:
    """(evaluation shown, thread name) of every figure built; ``fail``: each build raises."""
    from gapcallback import plotting

    original = plotting.gap_history_figure
    renders: list[tuple[int, str]] = []

    def watched(history, **kwargs):
        renders.append((history[-1]["evaluation"], threading.current_thread().name))
        if fail:
            raise RuntimeError("render exploded")
        return original(history, **kwargs)

    monkeypatch.setattr(plotting, "gap_history_figure", watched)
    return renders


def _figure_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gapcallback-figure")]


def _tensorboard_steps(log_dir: str) -> tuple[list[int], list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("gap/observed")], [e.step for e in acc.Images("gap/figure")]


def test_figure_cadence_and_same_step_as_the_scalars(tmp_path, monkeypatch):
    """``figure_in_background=False``: every render on the training thread, as before."""
    renders = _watch_renders(monkeypatch)
    callback = gc.GapCallback(
        REFERENCE,
        train=TRAIN,
        num_samples=64,
        figure_every_n_evaluations=2,
        figure_in_background=False,
        **FAST,
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], epochs=5, loggers=logger)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    scalar_steps, image_steps = _tensorboard_steps(logger.log_dir)
    assert len(scalar_steps) == 5
    # Evaluations 1 and 3 (every 2nd), then the last one at the end of fitting.
    assert image_steps == [scalar_steps[1], scalar_steps[3], scalar_steps[4]]
    assert renders == [(1, "MainThread"), (3, "MainThread"), (4, "MainThread")]
    assert callback.figures_skipped == 0
    png = Path(trainer.log_dir) / "gap_callback.png"
    assert png.stat().st_size > 1000


def test_background_figures_reach_the_loggers_at_their_scalars_step(tmp_path, monkeypatch):
    renders = _watch_renders(monkeypatch)
    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, num_samples=64, figure_every_n_evaluations=1, **FAST
    )
    assert callback.figure_in_background
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [callback], epochs=4, loggers=logger)
    trainer.fit(PointCloudModel(), loader(TRAIN))
    assert not _figure_threads()  # the worker does not outlive the fit
    scalar_steps, image_steps = _tensorboard_steps(logger.log_dir)
    assert len(scalar_steps) == 4
    background = [e for e, thread in renders if thread.startswith("gapcallback-figure")]
    # A render due while the previous one runs is skipped, not queued; evaluation 0 never is.
    assert background[0] == 0 and len(background) + callback.figures_skipped == 4
    # The last evaluation is drawn once: in the background, or at the end of fitting if skipped.
    final = [(3, "MainThread")] if 3 not in background else []
    assert renders == [(e, t) for e, t in renders if e in background] + final
    # Every render reached TensorBoard, each at the step of its evaluation's scalars.
    assert image_steps == [scalar_steps[e] for e, _ in renders]
    assert not any("failed_parts" in h for h in callback.history)
    png = Path(trainer.log_dir) / "gap_callback.png"
    assert png.stat().st_size > 1000


def test_a_failing_background_render_is_recorded_and_training_goes_on(tmp_path, monkeypatch):
    renders = _watch_renders(monkeypatch, fail=True)
    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, num_samples=64, figure_every_n_evaluations=1, **FAST
    )
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, [callback], epochs=3, loggers=logger)
    with pytest.warns(gc.GapEvaluationWarning, match="figure.*RuntimeError: render exploded"):
        trainer.fit(PointCloudModel(), loader(TRAIN))
    assert not _figure_threads()
    assert renders[0] == (0, "gapcallback-figure_0")
    assert len(callback.history) == 3  # every evaluation ran and was logged
    assert len(column(read_csv_metrics(Path(logger.log_dir)), "gap/observed")) == 3
    failed = [h["evaluation"] for h in callback.history if "figure" in h.get("failed_parts", {})]
    assert failed == [e for e, _ in renders]
    assert callback.history[0]["failed_parts"]["figure"] == "RuntimeError: render exploded"
    assert not (Path(logger.log_dir) / "gap_callback.png").exists()


class FailsInSecondEpoch(PointCloudModel):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise ValueError("training broke")
        return super().training_step(batch, batch_idx)


def test_no_figure_thread_outlives_a_failed_fit(tmp_path, monkeypatch):
    renders = _watch_renders(monkeypatch)
    callback = gc.GapCallback(
        REFERENCE, train=TRAIN, num_samples=64, figure_every_n_evaluations=1, **FAST
    )
    trainer = make_trainer(tmp_path, [callback], epochs=3)
    with pytest.raises(ValueError, match="training broke"):
        trainer.fit(FailsInSecondEpoch(), loader(TRAIN))
    assert renders == [(0, "gapcallback-figure_0")]
    assert not _figure_threads()


def test_figure_shows_memorized_fraction_and_names_the_colour_ramp():
    import math

    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    callback = gc.GapCallback(REFERENCE, train=TRAIN, **FAST)
    callback.prepare_data()
    for i, (gap, frac) in enumerate([(0.05, 0.0), (0.01, 0.2), (0.004, 0.6)]):
        callback.history.append(
            {
                "evaluation": i,
                "epoch": i,
                "step": 10 * (i + 1),
                "skipped": False,
                "gap/observed": gap,
                "gap/memorized_fraction": frac,
            }
        )
    placed = [
        h["step"]
        for h in callback.history
        if math.isfinite(callback.law.effective_size(h["gap/observed"]))
    ]
    assert len(placed) >= 2  # the test needs a ramp to name
    fig = callback.figure()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    labels = [t.get_text() for legend in legends for t in legend.texts]
    assert "memorized fraction (right)" in labels
    assert any(ax.get_ylabel() == "memorized fraction of samples" for ax in fig.axes)
    # The markers' colour ramp (global step, viridis) is named by its two ends in the legend.
    ends = {
        t.get_text(): handle
        for legend in legends
        for t, handle in zip(legend.texts, legend.legend_handles, strict=True)
        if t.get_text().startswith("model at effective n, step ")
    }
    first, last = min(placed), max(placed)
    assert set(ends) == {
        f"model at effective n, step {first}",
        f"model at effective n, step {last}",
    }
    for step, shade in ((first, 0.0), (last, 1.0)):
        colour = ends[f"model at effective n, step {step}"].get_facecolor()[0]
        assert to_rgba(colour) == pytest.approx(colormaps["viridis"](shade))
    # ... with no colour bar: two panels and the memorized fraction's second y axis.
    assert len(fig.axes) == 3


def test_data_preparation_announces_itself(tmp_path):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.INFO)
    library = logging.getLogger("gapcallback")
    library.addHandler(handler)
    old_level = library.level
    library.setLevel(logging.INFO)
    try:
        callback = gc.GapCallback(REFERENCE, train=TRAIN, num_samples=64, log_figure=False, **FAST)
        trainer = make_trainer(tmp_path, [callback], epochs=1)
        trainer.fit(PointCloudModel(), loader(TRAIN))
    finally:
        library.removeHandler(handler)
        library.setLevel(old_level)
    lines = [r.getMessage() for r in records]
    start = [m for m in lines if m.startswith("GapCallback: preparing")]
    done = [m for m in lines if m.startswith("GapCallback: data ready in")]
    assert (
        len(start) == 1 and "gap law" in start[0] and "120 reference and 200 training" in start[0]
    )
    assert len(done) == 1 and f"law d={callback.law.dimension:.2f}" in done[0]
