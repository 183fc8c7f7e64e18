"""Reference files (gc.save_reference / gc.load_reference): the round trip, the refusals, and a
real Trainer whose GapCallback takes a loaded file instead of preparing the data itself."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gapcallback as gc
import gapcallback.functional as F
from gapcallback.evaluation import EVALUATION_KEYS
from gapcallback.law import GapLaw
from gapcallback.symmetry import CyclicShifts
from tests.test_evaluate import FAST, REFERENCE, SAMPLES, SEED, TRAIN, CursorSampler, same_values

# Small searches: one thread (two oversubscribe a shared 2-core machine, 10x slower).
pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"seed": SEED, **FAST}


def same_plain(a, b) -> bool:
    """Deep equality of JSON-like values, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same_plain(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_plain(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[gc.PreparedReference, Path]:
    prepared = gc.prepare_reference(REFERENCE, train=TRAIN, **OPTIONS)
    path = gc.save_reference(prepared, tmp_path_factory.mktemp("file") / "ref.gapref")
    return prepared, path


def rewrite(source: Path, target: Path, edit) -> Path:
    """Copy the npz at ``source`` to ``target`` after ``edit(arrays, metadata)`` changed it."""
    with np.load(source, allow_pickle=False) as archive:
        arrays = {name: archive[name].copy() for name in archive.files}
    metadata = json.loads(str(arrays["metadata"][()]))
    edit(arrays, metadata)
    arrays["metadata"] = np.array(json.dumps(metadata))
    with open(target, "wb") as handle:
        np.savez(handle, **arrays)
    return target


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_keeps_points_summary_and_values(tmp_path, dtype):
    reference, train = REFERENCE.to(dtype), TRAIN.to(dtype)
    prepared = gc.prepare_reference(reference, train=train, **OPTIONS)
    path = gc.save_reference(prepared, tmp_path / "ref.gapref")
    assert path == tmp_path / "ref.gapref"
    loaded = gc.load_reference(path)

    assert loaded.reference.dtype == dtype and torch.equal(loaded.reference, reference)
    assert loaded.train is not None and loaded.train.dtype == dtype
    assert torch.equal(loaded.train, train)
    assert same_plain(loaded.summary(), prepared.summary())
    assert loaded.law is not None and loaded.law.state_dict() == prepared.law.state_dict()

    from_file = gc.evaluate(loaded, SAMPLES.to(dtype), **OPTIONS)
    assert len(from_file) == len(
        [k for k in EVALUATION_KEYS if not k.startswith("knn/")]
    )  # every gap key
    same_values(from_file, gc.evaluate(prepared, SAMPLES.to(dtype), **OPTIONS))
    same_values(from_file, gc.evaluate(reference, SAMPLES.to(dtype), train=train, **OPTIONS))


def test_without_train_points_only_the_memorized_fraction_is_missing(tmp_path, saved):
    prepared, _ = saved
    path = gc.save_reference(prepared, tmp_path / "small.gapref", include_train=False)
    loaded = gc.load_reference(path)
    assert loaded.train is None and torch.equal(loaded.reference, prepared.reference)
    with np.load(path) as archive:
        assert "train" not in archive.files
    values = gc.evaluate(loaded, SAMPLES, **OPTIONS)
    full = gc.evaluate(prepared, SAMPLES, **OPTIONS)
    assert "gap/memorized_fraction" in full and "gap/memorized_fraction" not in values
    del full["gap/memorized_fraction"]
    same_values(values, full)


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, saved):
    prepared, _ = saved
    folder = tmp_path / "out"
    gc.save_reference(prepared, folder / "ref.gapref")
    assert os.listdir(folder) == ["ref.gapref"]
    # Over an existing file: replaced, still nothing else.
    gc.save_reference(prepared, folder / "ref.gapref", include_train=False)
    assert os.listdir(folder) == ["ref.gapref"]
    assert gc.load_reference(folder / "ref.gapref").train is None
    # A failed write (not a prepared reference) leaves nothing either.
    with pytest.raises(TypeError, match="`prepared`"):
        gc.save_reference(REFERENCE, folder / "other.gapref")  # type: ignore[arg-type]
    assert os.listdir(folder) == ["ref.gapref"]


# ---------------------------------------------------------------------------- refusals


def test_the_options_it_was_built_with_are_accepted(saved):
    prepared, path = saved
    loaded = gc.load_reference(
        path,
        reference=REFERENCE,
        train=TRAIN,
        p=2.0,
        dimension_method="calibrated",
        law_options=dict(FAST["law_options"]),
        seed=SEED,
    )
    assert same_plain(loaded.summary(), prepared.summary())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"p": 1.0}, "p=2.0 there, 1.0 asked"),
        ({"dimension_method": "twonn"}, "dimension_method='calibrated' there, 'twonn' asked"),
        ({"law_options": {"num_sizes": 5, "repeats": 2}}, "law_options="),
        ({"seed": SEED + 1}, f"seed={SEED} there, {SEED + 1} asked"),
        ({"p": 1.0, "seed": SEED + 1}, "p=2.0 there, 1.0 asked; seed="),
    ],
)
def test_other_options_are_refused_naming_them(saved, options, message):
    _, path = saved
    with pytest.raises(ValueError, match=re.escape(message)):
        gc.load_reference(path, **options)


def test_another_format_version_is_refused(tmp_path, saved):
    _, path = saved

    def bump(arrays, metadata):
        metadata["format_version"] = 2

    bad = rewrite(path, tmp_path / "v2.gapref", bump)
    with pytest.raises(ValueError, match="format version 2"):
        gc.load_reference(bad)
    # The rewrite itself is faithful: with the version left alone, the copy loads.
    gc.load_reference(rewrite(path, tmp_path / "v1.gapref", lambda arrays, metadata: None))


@pytest.mark.parametrize("name", ["reference", "train"])
def test_edited_points_are_refused_by_the_hash(tmp_path, saved, name):
    _, path = saved

    def edit(arrays, metadata):
        arrays[name][0, 0] += 1.0

    with pytest.raises(ValueError, match="hash"):
        gc.load_reference(rewrite(path, tmp_path / "edited.gapref", edit))


def test_other_data_than_the_files_is_refused(saved):
    _, path = saved
    other = REFERENCE.clone()
    other[5, 2] = 0.5
    with pytest.raises(ValueError, match="`reference` does not match"):
        gc.load_reference(path, reference=other)
    with pytest.raises(ValueError, match="`reference` does not match"):
        gc.load_reference(path, reference=REFERENCE.double())  # the same values, another dtype
    with pytest.raises(ValueError, match="`train` does not match"):
        gc.load_reference(path, train=TRAIN[:-1])
    with pytest.raises(ValueError, match="`train` does not match"):
        gc.load_reference(path, train=TRAIN.flip(0))  # the same points, another order


def test_a_symmetry_must_match_the_files(tmp_path, saved):
    _, path = saved
    with pytest.raises(ValueError, match=re.escape("symmetry=None, but symmetry='CyclicShifts")):
        gc.load_reference(path, symmetry=CyclicShifts(dims=(-1,)))
    symmetry = CyclicShifts(dims=(-1,))
    prepared = gc.prepare_reference(
        signals(101, 1), train=signals(150, 0), symmetry=symmetry, **OPTIONS
    )
    symmetric = gc.save_reference(prepared, tmp_path / "sym.gapref")
    with pytest.raises(ValueError, match=re.escape("symmetry='CyclicShifts(dims=(-1,))', but")):
        gc.load_reference(symmetric)


def test_files_that_are_not_reference_files_are_refused(tmp_path):
    junk = tmp_path / "junk.gapref"
    junk.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )
    with pytest.raises(ValueError, match="is not a gapcallback reference file"):
        gc.load_reference(junk)

    no_metadata = tmp_path / "plain.npz"
    np.savez(no_metadata, reference=REFERENCE.numpy())
    with pytest.raises(ValueError, match="is not a gapcallback reference file"):
        gc.load_reference(no_metadata)

    other_format = tmp_path / "other.npz"
    np.savez(other_format, reference=REFERENCE.numpy(), metadata=np.array('{"format": "x"}'))
    with pytest.raises(ValueError, match="is not a gapcallback reference file"):
        gc.load_reference(other_format)

    with pytest.raises(FileNotFoundError, match=re.escape("missing.gapref")):
        gc.load_reference(tmp_path / "missing.gapref")


# ---------------------------------------------------------------------------- GapCallback


def logged_rows(log_dir: Path, prefix: str = "") -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [f"{prefix}{key}" for key in EVALUATION_KEYS]
    return [
        {key[len(prefix) :]: row[key] for key in keys if row.get(key) not in (None, "")}
        for row in rows
        if row.get(f"{prefix}gap/observed") not in (None, "")
    ]


def evaluation_values(record: dict) -> dict:
    return {key: record[key] for key in EVALUATION_KEYS if key in record}


def fit(tmp_path: Path, *callbacks: gc.GapCallback) -> Path:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from tests.lightning_models import PointCloudModel, loader

    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(PointCloudModel(), loader(TRAIN))
    return Path(logger.log_dir)


def callback(reference, **options) -> gc.GapCallback:
    return gc.GapCallback(
        reference,
        sampler=CursorSampler(),
        num_samples=len(SAMPLES),
        sample_batch_size=64,
        log_figure=False,
        progress=False,
        **{**OPTIONS, **options},
    )


def test_gap_callback_with_a_loaded_file_logs_what_it_logs_preparing_itself(tmp_path, saved):
    prepared, path = saved
    loaded = gc.load_reference(path)

    own = callback(REFERENCE, train=TRAIN)
    own_logs = logged_rows(fit(tmp_path / "own", own))

    from_file = callback(loaded)
    # A law it could not have fitted itself: its gap/predicted shows whose law it used.
    assert loaded.law is not None
    state = loaded.law.state_dict()
    other_law = GapLaw.from_state_dict({**state, "constant": 2 * state["constant"]})
    altered = callback(dataclasses.replace(loaded, law=other_law), prefix="altered/")
    file_dir = fit(tmp_path / "file", from_file, altered)

    assert len(own_logs) == 1 and logged_rows(file_dir) == own_logs
    record = evaluation_values(from_file.history[0])
    same_values(record, evaluation_values(own.history[0]))
    same_values(record, gc.evaluate(loaded, SAMPLES, **OPTIONS))

    # The preparation was skipped: the callback holds the file's quantities.
    assert from_file.law is not None and from_file.law.state_dict() == state
    assert from_file.memorization_gap == loaded.memorization_gap == prepared.memorization_gap
    assert from_file.data_dimension == loaded.data_dimension
    assert from_file.n_train == len(TRAIN)
    assert altered.law is other_law
    assert altered.history[0]["altered/gap/predicted"] == float(other_law.predict(len(TRAIN)))
    assert altered.history[0]["altered/gap/predicted"] != record["gap/predicted"]
    altered_logs = logged_rows(file_dir, prefix="altered/")
    assert float(altered_logs[0]["gap/observed"]) == pytest.approx(record["gap/observed"])


def test_gap_callback_refuses_a_file_with_other_options_at_construction(saved):
    _, path = saved
    loaded = gc.load_reference(path)
    with pytest.raises(ValueError, match="law_options="):
        callback(loaded, law_options={"num_sizes": 5, "repeats": 2})
    with pytest.raises(ValueError, match=re.escape("p=2.0 there, 1.0 asked")):
        callback(loaded, p=1.0)
    with pytest.raises(ValueError, match="`train=None`"):
        callback(loaded, train=TRAIN)


# ---------------------------------------------------------------------------- symmetry


def signals(n: int, seed: int) -> torch.Tensor:
    """[n, 8] periodic signals (random phase and amplitude): a 2-d family closed under shifts."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(8.0)
    phase = torch.rand(n, 1, generator=g) * 2 * torch.pi
    amplitude = 0.5 + torch.rand(n, 1, generator=g)
    return amplitude * torch.cos(torch.pi * t / 4 + phase) + 0.3 * torch.cos(
        torch.pi * t / 2 + 2 * phase
    )


def test_symmetric_file_round_trip(tmp_path):
    symmetry = CyclicShifts(dims=(-1,))
    reference, train = signals(81, 1), signals(120, 0)
    # Shifted copies of training signals (memorized under the symmetry) and fresh signals.
    samples = torch.cat([train[:20].roll(3, dims=-1) + 1e-4, signals(41, 2)])
    prepared = gc.prepare_reference(reference, train=train, symmetry=symmetry, **OPTIONS)
    assert prepared.law is not None and not prepared.failures
    path = gc.save_reference(prepared, tmp_path / "sym.gapref")
    loaded = gc.load_reference(path, symmetry=symmetry)
    assert loaded.symmetry is symmetry
    assert same_plain(loaded.summary(), prepared.summary())
    assert loaded.summary()["symmetry"] == "CyclicShifts(dims=(-1,))"

    values = gc.evaluate(loaded, samples, **OPTIONS)
    same_values(values, gc.evaluate(prepared, samples, symmetry=symmetry, **OPTIONS))
    same_values(values, gc.evaluate(reference, samples, train=train, symmetry=symmetry, **OPTIONS))
    # The shifted copies count as memorized only under the symmetry.
    memorized = F.memorization(samples, train, symmetry=symmetry).memorized
    assert values["gap/memorized_fraction"] == int(memorized.sum()) / len(samples) >= 20 / 61
    without = gc.evaluate(reference, samples, train=train, law=False, dimension_method=None)
    assert without["gap/memorized_fraction"] < values["gap/memorized_fraction"]
