"""gc.evaluate: the callback's keys for given samples, against a real Trainer run, independent
oracles (float64 brute force, the functional API, the fitted law) and two real gloo processes."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gapcallback as gc
import gapcallback.functional as F
from gapcallback.evaluation import EVALUATION_KEYS, GapEvaluationWarning
from tests.ddp_utils import run_ddp

# No Lightning at module level: the two gloo processes import this module, and gapcallback itself
# loads Lightning only for the callbacks.


def circle_data(n: int, seed: int, dim: int = 3) -> torch.Tensor:
    """Points on the unit circle in the first two of ``dim`` coordinates (as
    ``tests.lightning_models.circle_data``)."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * torch.pi
    x = torch.zeros(n, dim)
    x[:, 0], x[:, 1] = angle.cos(), angle.sin()
    return x


# Small searches: one thread (two oversubscribe a shared 2-core machine, 10x slower).
pytestmark = pytest.mark.usefixtures("one_thread")

# Odd sizes on purpose: two processes get uneven shards of samples and of references.
TRAIN = circle_data(200, seed=0)
REFERENCE = circle_data(121, seed=1)
SEED = 7
LAW = {"num_sizes": 4, "repeats": 2}
FAST = {"law_options": LAW, "dimension_points": 200}  # 200 >= every set here: no subsampling


def make_samples() -> torch.Tensor:
    """151 samples: 40 near-copies of training points (memorized) and 111 noisy circle points."""
    g = torch.Generator().manual_seed(11)
    copies = TRAIN[:40] + 1e-4 * torch.randn(40, 3, generator=g)
    fresh = circle_data(111, seed=2) + 0.05 * torch.randn(111, 3, generator=g)
    return torch.cat([copies, fresh])


SAMPLES = make_samples()


def same_values(a: dict, b: dict) -> None:
    """Same keys and exactly the same values (NaN equal to NaN)."""
    assert list(a) == list(b)
    for key in a:
        x, y = float(a[key]), float(b[key])
        assert x == y or (math.isnan(x) and math.isnan(y)), (key, x, y)


def brute_gap(reference: torch.Tensor, samples: torch.Tensor, p: float) -> float:
    d = torch.cdist(reference.double().flatten(1), samples.double().flatten(1))
    return float(d.min(dim=1).values.pow(p).mean())


def brute_memorized(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1 / 3) -> int:
    d = torch.cdist(samples.double(), train.double()).sort(dim=1).values
    return int((d[:, 0] < ratio * d[:, 1]).sum())


# ---------------------------------------------------------------------------- the callback


class CursorSampler:
    """Hands out the fixed samples in order: ``SAMPLES[i:i + n]`` on each call."""

    def __init__(self) -> None:
        self.start = 0

    def __call__(self, module, n):
        out = SAMPLES[self.start : self.start + n]
        self.start += n
        return out


def fit_callback(tmp_path: Path, **options) -> gc.GapCallback:
    import lightning as L

    from tests.lightning_models import PointCloudModel, loader

    callback = gc.GapCallback(
        options.pop("reference", REFERENCE),
        sampler=options.pop("sampler", CursorSampler()),
        num_samples=len(SAMPLES),
        seed=SEED,
        log_figure=False,
        progress=False,
        **options,
    )
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(PointCloudModel(), loader(TRAIN))
    return callback


def logged_values(callback: gc.GapCallback) -> dict:
    record = callback.history[0]
    assert not record["skipped"]
    extra = set(record) - set(EVALUATION_KEYS)
    assert extra <= {"evaluation", "epoch", "step", "skipped", "gap/skipped_evaluations"}, extra
    return {key: record[key] for key in EVALUATION_KEYS if key in record}


@pytest.mark.parametrize(
    ("options", "batch"),
    [
        ({"train": TRAIN}, 64),  # the callback draws 64 + 64 + 23 samples
        ({"train": TRAIN, "dimension_method": None}, 512),
        ({}, 512),
    ],
    ids=["with-train", "no-dimension", "no-train"],
)
def test_evaluate_equals_the_callback_key_for_key(tmp_path, options, batch):
    callback = fit_callback(tmp_path, sample_batch_size=batch, **FAST, **options)
    logged = logged_values(callback)
    values = gc.evaluate(REFERENCE, SAMPLES, seed=SEED, **FAST, **options)
    same_values(values, logged)
    expected = {"gap/observed", "id/data", "id/samples"}
    if options.get("dimension_method", "calibrated") is None:
        expected -= {"id/data", "id/samples"}
    if "train" in options:
        expected |= {"gap/memorization", "gap/predicted", "gap/ratio", "gap/effective_n"}
        expected |= {"gap/memorized_fraction", "id/law"}
    assert set(values) == expected


# ---------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_values_against_independent_oracles(p):
    values = gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, p=p, seed=SEED, **FAST)
    assert values["gap/observed"] == pytest.approx(brute_gap(REFERENCE, SAMPLES, p), rel=1e-5)
    assert values["gap/memorization"] == pytest.approx(
        float(F.representation_gap(REFERENCE, TRAIN, p=p)), rel=1e-5
    )
    assert values["gap/memorization"] == pytest.approx(brute_gap(REFERENCE, TRAIN, p), rel=1e-5)

    memorized = F.memorization(SAMPLES, TRAIN)
    assert values["gap/memorized_fraction"] == int(memorized.memorized.sum()) / len(SAMPLES)
    assert values["gap/memorized_fraction"] == brute_memorized(SAMPLES, TRAIN) / len(SAMPLES)
    assert 0 < values["gap/memorized_fraction"] < 1  # the 40 copies, not the fresh samples

    # 151 samples and 200 training points <= dimension_points: the estimates see every point.
    assert values["id/samples"] == pytest.approx(float(F.intrinsic_dimension(SAMPLES)), rel=1e-6)
    assert values["id/data"] == pytest.approx(float(F.intrinsic_dimension(TRAIN)), rel=1e-6)

    law = gc.prepare_reference(REFERENCE, train=TRAIN, p=p, seed=SEED, **FAST).law
    assert law is not None and law.p == p
    assert values["gap/predicted"] == float(law.predict(len(TRAIN)))
    assert values["id/law"] == law.dimension
    assert values["gap/ratio"] == pytest.approx(
        values["gap/observed"] / values["gap/predicted"], rel=1e-12
    )
    # (J / R)^(d / p): the training-set size at which the law reaches the observed gap.
    effective = (law.constant / values["gap/observed"]) ** (law.dimension / p)
    assert law.sizes.min() <= effective  # within the sizes the law supports: not NaN
    assert values["gap/effective_n"] == pytest.approx(effective, rel=1e-9)


def test_without_law_the_ratio_is_against_the_memorization_line():
    values = gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, law=False, dimension_method=None)
    assert set(values) == {
        "gap/observed",
        "gap/memorization",
        "gap/ratio",
        "gap/memorized_fraction",
    }
    assert values["gap/ratio"] == pytest.approx(
        brute_gap(REFERENCE, SAMPLES, 2.0) / brute_gap(REFERENCE, TRAIN, 2.0), rel=1e-5
    )


# ---------------------------------------------------------------------------- sample forms


def test_batches_loaders_and_numpy_give_the_tensor_result():
    kwargs = {"train": TRAIN, "seed": SEED, **FAST}
    expected = gc.evaluate(REFERENCE, SAMPLES, **kwargs)
    batches = list(SAMPLES.split(40))
    same_values(gc.evaluate(REFERENCE, batches, **kwargs), expected)
    dataloader = DataLoader(TensorDataset(SAMPLES), batch_size=32)  # batches are [tensor]
    same_values(gc.evaluate(REFERENCE, dataloader, **kwargs), expected)
    same_values(gc.evaluate(REFERENCE, SAMPLES.numpy(), **kwargs), expected)
    same_values(
        gc.evaluate(REFERENCE.numpy(), SAMPLES, **{**kwargs, "train": TRAIN.numpy()}), expected
    )


def test_sample_transform_is_applied_to_the_samples_only():
    kwargs = {"train": TRAIN, "seed": SEED, **FAST}
    expected = gc.evaluate(REFERENCE, SAMPLES, **kwargs)
    # Scaling by 2 and back is exact in floating point.
    halved = gc.evaluate(REFERENCE, SAMPLES * 2, sample_transform=lambda z: z / 2, **kwargs)
    same_values(halved, expected)
    doubled = gc.evaluate(REFERENCE, SAMPLES, sample_transform=lambda z: z * 2, **kwargs)
    assert doubled["gap/observed"] == pytest.approx(
        brute_gap(REFERENCE, SAMPLES * 2, 2.0), rel=1e-5
    )
    # The reference and the training set were not transformed.
    assert doubled["gap/memorization"] == expected["gap/memorization"]
    assert doubled["id/data"] == expected["id/data"]
    assert doubled["gap/predicted"] == expected["gap/predicted"]


# ---------------------------------------------------------------------------- bad input


class CountingLoader:
    """A loader of the training points that records whether it was ever iterated."""

    def __init__(self, data: torch.Tensor) -> None:
        self.loader = DataLoader(TensorDataset(data), batch_size=50)
        self.iterated = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.iterated += 1
        return iter(self.loader)


def nan_samples() -> torch.Tensor:
    bad = SAMPLES.clone()
    bad[3, 1] = float("nan")
    return bad


@pytest.mark.parametrize(
    ("samples", "options", "error", "name"),
    [
        (nan_samples(), {}, ValueError, "samples"),
        (torch.zeros(10, 4), {}, ValueError, "samples"),
        (torch.zeros(10, 3, 1), {}, ValueError, "samples"),
        (torch.empty(0, 3), {}, ValueError, "samples"),
        ([], {}, ValueError, "samples"),
        ("samples.npy", {}, TypeError, "samples"),
        (SAMPLES, {"law_options": {"num_sizes": 4, "bogus": 1}}, TypeError, "law_options"),
        (SAMPLES, {"law_options": {"seed": 1}}, TypeError, "law_options"),
        (SAMPLES, {"dimension_method": "twonnn"}, ValueError, "dimension_method"),
        (SAMPLES, {"memorization_ratio": 0}, ValueError, "memorization_ratio"),
        (SAMPLES, {"transform": 123}, TypeError, "transform"),
        (SAMPLES, {"sample_transform": "flatten"}, TypeError, "sample_transform"),
        (SAMPLES, {"figure": 123}, TypeError, "figure"),
        (SAMPLES, {"p": 0.0}, ValueError, "p"),
    ],
    ids=[
        "nan",
        "shape",
        "extra-dim",
        "empty",
        "no-batches",
        "string",
        "law-option-key",
        "law-option-own",
        "dimension-method",
        "ratio",
        "transform",
        "sample-transform",
        "figure",
        "p",
    ],
)
def test_bad_input_is_refused_naming_the_argument_before_the_preparation(
    samples, options, error, name
):
    train = CountingLoader(TRAIN)
    with pytest.raises(error, match=re.escape(f"`{name}`")):
        gc.evaluate(REFERENCE, samples, train=train, **{**FAST, **options})
    assert train.iterated == 0, "the training set was collected (the law fitted) before the error"


@pytest.mark.parametrize(
    ("samples", "options"),
    [
        (nan_samples(), {"sample_transform": lambda z: z}),
        (torch.zeros(10, 3, 2), {"transform": lambda z: z.flatten(1)}),
        ([SAMPLES[:20], torch.zeros(10, 4)], {}),
        ([SAMPLES[:20], nan_samples()[:10]], {}),
    ],
    ids=["nan-transformed", "shape-transformed", "batch-shape", "batch-nan"],
)
def test_bad_samples_found_only_while_measuring_are_refused_too(samples, options):
    with pytest.raises(ValueError, match="`samples`"):
        gc.evaluate(REFERENCE, samples, train=TRAIN, **{**FAST, **options})


def test_prepared_reference_refuses_train_and_other_options():
    prepared = gc.prepare_reference(REFERENCE, train=TRAIN, seed=SEED, **FAST)
    with pytest.raises(ValueError, match="`train"):
        gc.evaluate(prepared, SAMPLES, train=TRAIN)
    with pytest.raises(ValueError, match=re.escape("p=2.0 there, 1.0 asked")):
        gc.evaluate(prepared, SAMPLES, p=1.0)
    with pytest.raises(ValueError, match="dimension_method"):
        gc.evaluate(prepared, SAMPLES, dimension_method="twonn")
    with pytest.raises(ValueError, match="law_options"):
        gc.evaluate(prepared, SAMPLES, law_options={"num_sizes": 5, "repeats": 2})
    with pytest.raises(ValueError, match="law"):
        gc.evaluate(prepared, SAMPLES, law=prepared.law)
    # The same options are accepted, and give the values of the unprepared call.
    same_values(
        gc.evaluate(prepared, SAMPLES, seed=SEED, **FAST),
        gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, seed=SEED, **FAST),
    )


def test_scale_mismatch_warns():
    g = torch.Generator().manual_seed(3)
    reference = torch.rand(150, 3, generator=g)  # in [0, 1]
    samples = torch.rand(150, 3, generator=g) * 2 - 1  # in [-1, 1]
    with pytest.warns(GapEvaluationWarning, match="different scales"):
        gc.evaluate(reference, samples, dimension_method=None)
    # Mapped onto the references' scale, no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", GapEvaluationWarning)
        gc.evaluate(
            reference, samples, sample_transform=lambda z: (z + 1) / 2, dimension_method=None
        )


def test_figure_is_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sub" / "f.png"
    values = gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, seed=SEED, figure=path, **FAST)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    same_values(values, gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, seed=SEED, **FAST))


# ---------------------------------------------------------------------------- the k-NN family

KNN_FAMILY = ("precision", "recall", "density", "coverage", "authenticity")


def test_knn_family_equals_its_functional_forms_and_the_callback(tmp_path):
    values = gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, metrics=KNN_FAMILY, seed=SEED, **FAST)
    precision, recall = F.precision_recall(REFERENCE, SAMPLES)
    density, coverage = F.density_coverage(REFERENCE, SAMPLES)
    assert values["knn/precision"] == float(precision) and values["knn/recall"] == float(recall)
    assert values["knn/density"] == float(density)
    assert values["knn/coverage"] == float(coverage)
    assert values["knn/authenticity"] == float(F.authenticity(SAMPLES, TRAIN))
    assert 0 < values["knn/authenticity"] < 1  # 40 near-copies among 151 samples
    # Only what was asked, in the asked order's canonical place; the gap keys unchanged.
    some = gc.evaluate(REFERENCE, SAMPLES, metrics=("coverage",), seed=SEED, **FAST)
    assert [k for k in some if k.startswith("knn/")] == ["knn/coverage"]
    assert some["knn/coverage"] == values["knn/coverage"]
    plain = gc.evaluate(REFERENCE, SAMPLES, train=TRAIN, seed=SEED, **FAST)
    same_values({k: v for k, v in values.items() if not k.startswith("knn/")}, plain)
    # The callback logs the same keys with the same values.
    callback = fit_callback(tmp_path, train=TRAIN, metrics=KNN_FAMILY, **FAST)
    same_values(logged_values(callback), values)


def test_knn_family_options_fail_early():
    with pytest.raises(ValueError, match="authenticity"):
        gc.evaluate(REFERENCE, SAMPLES, metrics=("authenticity",))  # no training set
    with pytest.raises(ValueError, match="precission"):
        gc.evaluate(REFERENCE, SAMPLES, metrics=("precission",))
    with pytest.raises(TypeError, match="metrics"):
        gc.evaluate(REFERENCE, SAMPLES, metrics="precision")
    with pytest.raises(ValueError, match="authenticity"):
        gc.GapCallback(REFERENCE, metrics=("authenticity",))
    with pytest.raises(ValueError, match="not one of"):
        gc.GapCallback(REFERENCE, train=TRAIN, metrics=("recal",))


def test_a_knn_part_that_cannot_be_measured(tmp_path):
    # k = 3 needs at least 4 references: evaluate (an explicit call) refuses, naming k; the
    # callback warns at fit start, leaves those keys out and logs everything else.
    few = REFERENCE[:3]
    with pytest.raises(ValueError, match="`k`=3"):
        gc.evaluate(few, SAMPLES, train=TRAIN, metrics=("precision",), dimension_method=None)
    with pytest.warns(GapEvaluationWarning, match="knn/precision_recall"):
        callback = fit_callback(
            tmp_path, reference=few, train=TRAIN, metrics=("precision", "authenticity"),
            law=False, dimension_method=None,
        )  # fmt: skip
    logged = logged_values(callback)
    assert "knn/precision" not in logged and "knn/authenticity" in logged
    assert "knn/precision_recall" in callback.preparation_failures
    assert logged["gap/observed"] == pytest.approx(brute_gap(few, SAMPLES, 2.0), rel=1e-5)


# ---------------------------------------------------------------------------- two processes


def evaluations() -> dict[str, dict[str, float]]:
    """The evaluations both the parent (one process) and each of two gloo processes run."""
    kwargs = {"train": TRAIN, "seed": SEED, **FAST}
    batches = list(SAMPLES.split(40))  # 4 batches: 2 per process, of 40 + 40 and 40 + 31 rows
    prepared = gc.prepare_reference(REFERENCE, **kwargs)
    return {
        "tensor": gc.evaluate(REFERENCE, SAMPLES, **kwargs),
        "tensor/shard_references": gc.evaluate(REFERENCE, SAMPLES, shard_references=True, **kwargs),
        "batches": gc.evaluate(REFERENCE, batches, **kwargs),
        "batches/shard_references": gc.evaluate(
            REFERENCE, batches, shard_references=True, **kwargs
        ),
        "prepared/shard_references": gc.evaluate(
            prepared, SAMPLES, shard_references=True, seed=SEED, **FAST
        ),
        "p=1, no train": gc.evaluate(REFERENCE, SAMPLES, p=1.0, **FAST),
        "p=1, no train/shard_references": gc.evaluate(
            REFERENCE, SAMPLES, p=1.0, shard_references=True, **FAST
        ),
        "knn family": gc.evaluate(REFERENCE, SAMPLES, metrics=KNN_FAMILY, **kwargs),
        "knn family/batches": gc.evaluate(REFERENCE, batches, metrics=KNN_FAMILY, **kwargs),
    }


def _ddp_evaluate(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.save(evaluations(), Path(out_dir) / f"rank{rank}.pt")


def test_two_gloo_processes_give_the_one_process_values(tmp_path):
    run_ddp(_ddp_evaluate, str(tmp_path))
    single = evaluations()
    assert len(single["tensor"]) == 9  # every key
    assert len(single["knn family"]) == 14  # and the five of the k-NN family
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(results) == list(single)
        for name, values in single.items():
            same_values(results[name], values)
