"""The ``gapcallback`` command line end to end: real files in ``tmp_path``, real subprocesses
(``python -m gapcallback``, the console script, ``torchrun`` with two gloo processes), and every
bad input in-process (exit code 2, one line on stderr, no outputs).

Every number a command prints or writes is checked against the functional API
(``gc.evaluate``, ``gc.prepare_reference``, ``gc.load_reference``) on the same data and options,
never against hard-coded values.

Starting a Python process that imports torch takes seconds on a loaded machine, so the
subprocess runs are launched together (a few at a time, in background threads) by the
``cli_runs`` fixture as soon as the first test asks for it, and the in-process tests run while
they go; each subprocess test then waits for its own run.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gapcallback as gc
from gapcallback.cli.main import main
from gapcallback.utils.rng import derive_seed

# One thread here and in every subprocess (OMP_NUM_THREADS=1): the values are compared exactly.
pytestmark = pytest.mark.usefixtures("one_thread")

LAW_OPTIONS = {"num_sizes": 4, "repeats": 2}  # a fast law fit (FAST in test_gap_callback.py)
DIMENSION_POINTS = 200
FAST_ARGS = [
    *(arg for key, value in LAW_OPTIONS.items() for arg in ("--law-option", f"{key}={value}")),
    "--dimension-points",
    str(DIMENSION_POINTS),
]
N_REFERENCE, N_TRAIN, N_SAMPLES = 201, 600, 301  # odd: uneven shards over two processes
RUN_TIMEOUT = 300  # seconds for one subprocess run


# --------------------------------------------------------------------------------------------
# Data and helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Points on a 3-d linear subspace of R^8 (float32), saved as .npy in ``folder``."""

    folder: Path
    basis: np.ndarray
    reference: np.ndarray
    train: np.ndarray
    samples: np.ndarray
    files: dict[str, Path] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(getattr(self, name))


def make_data(folder: Path) -> Data:
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((3, 8)).astype(np.float32)

    def points(n: int) -> np.ndarray:
        return (rng.random((n, 3), dtype=np.float32) @ basis).astype(np.float32)

    data = Data(folder, basis, points(N_REFERENCE), points(N_TRAIN), points(N_SAMPLES))
    for name in ("reference", "train", "samples"):
        path = folder / f"{name}.npy"
        np.save(path, getattr(data, name))
        data.files[name] = path
    return data


def strict_json(text: str) -> Any:
    """``json.loads`` refusing NaN / Infinity (strict JSON) and any text around the document."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def same(a: Any, b: Any) -> bool:
    """Equal, recursively, NaN equal to NaN and tuples equal to lists."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def assert_json_metrics(written: dict[str, Any], expected: dict[str, float]) -> None:
    """``written`` (read back from JSON, NaN as null) equals ``expected`` key for key, exactly."""
    assert list(written) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert written[key] is None, key
        else:
            assert written[key] == value, (key, written[key], value)


def assert_csv_metrics(row: dict[str, str], expected: dict[str, float]) -> None:
    """A CSV row (floats in round-trip precision, NaN as ``nan``) equals ``expected``."""
    assert list(row) == list(expected)
    for key, value in expected.items():
        got = float(row[key])
        assert got == value or (math.isnan(got) and math.isnan(value)), (key, got, value)


def import_file(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected_metrics(data: Data, **options: Any) -> dict[str, float]:
    """``gc.evaluate`` with the options the CLI runs below are given."""
    return gc.evaluate(
        data.tensor("reference"),
        data.tensor("samples"),
        train=data.tensor("train"),
        law_options=LAW_OPTIONS,
        dimension_points=DIMENSION_POINTS,
        **options,
    )


SAMPLER = '''
"""A checkpoint sampler: the checkpoint's basis and scale, latent draws from `generator`."""
import torch


def sample(path, n, generator=None):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("damaged"):
        raise RuntimeError("this checkpoint is damaged")
    z = torch.rand(n, state["basis"].shape[0], generator=generator)
    return (z @ state["basis"]) * state["scale"]
'''

TRANSFORMS = '''
def to_unit(x):
    """Samples saved in [-1, 1] back to the data's [0, 1] coding."""
    return (x + 1) / 2


def double(x):
    return 2 * x


def broken(x):
    raise KeyError("no such feature")
'''


# --------------------------------------------------------------------------------------------
# The subprocess runs, launched together
# --------------------------------------------------------------------------------------------


@dataclass
class CliRuns:
    """The subprocess runs of this module (``name -> Future[CompletedProcess]``) and their data."""

    data: Data
    prepared: Any  # gc.prepare_reference with the runs' options
    target_gap: float
    checkpoints: list[tuple[str, dict[str, Any]]]  # (file name, content)
    script: Path
    futures: dict[str, Future[subprocess.CompletedProcess[str]]] = field(default_factory=dict)

    @functools.cached_property
    def expected(self) -> dict[str, float]:
        """gc.evaluate on the runs' data and options."""
        return expected_metrics(self.data)

    def result(self, name: str) -> subprocess.CompletedProcess[str]:
        return self.futures[name].result(timeout=2 * RUN_TIMEOUT)


def python_m(*args: object) -> list[str]:
    return [sys.executable, "-m", "gapcallback", *(str(a) for a in args)]


def torchrun(*args: object) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "gapcallback",
        *(str(a) for a in args),
    ]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRuns]:
    folder = tmp_path_factory.mktemp("cli_runs")
    data = make_data(folder)
    r, t, s = (data.files[k] for k in ("reference", "train", "samples"))
    prepared = gc.prepare_reference(
        data.tensor("reference"),
        data.tensor("train"),
        law_options=LAW_OPTIONS,
        dimension_points=DIMENSION_POINTS,
    )
    assert prepared.law is not None, prepared.failures
    target_gap = float(prepared.law.predict(3000))

    # Checkpoints named out of step order; the one at step 150 makes the sampler raise.
    basis = torch.from_numpy(data.basis)
    checkpoints = [
        ("ckpt_a.ckpt", {"epoch": 2, "global_step": 300, "basis": basis, "scale": 1.0}),
        ("ckpt_b.ckpt", {"epoch": 0, "global_step": 100, "basis": basis, "scale": 0.5}),
        ("ckpt_c.ckpt", {"epoch": 1, "global_step": 200, "basis": basis, "scale": 0.8}),
        ("ckpt_d.ckpt", {"epoch": 0, "global_step": 150, "damaged": True}),
    ]
    (folder / "ckpts").mkdir()
    for name, content in checkpoints:
        torch.save(content, folder / "ckpts" / name)
    (folder / "cli_test_sampler.py").write_text(SAMPLER)

    script = Path(sys.executable).parent / "gapcallback"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)

    def launch(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=folder, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )

    runs = CliRuns(data, prepared, target_gap, checkpoints, script)
    common = ["--reference", r, "--train", t, *FAST_ARGS]
    jobs: dict[str, list[str]] = {
        "evaluate": python_m("evaluate", *common, "--samples", s, "--out", folder / "eval"),
        "reference": [
            str(script),
            "reference",
            *map(str, common),
            "--out",
            str(folder / "ref.gapref"),
        ],
        "torchrun": torchrun("evaluate", *common, "--samples", s, "--json"),
        "torchrun_sharded": torchrun(
            "evaluate", *common, "--samples", s, "--json", "--shard-references"
        ),
        "plan": python_m(
            "plan",
            *common,
            "--at",
            1000,
            5000,
            "--target-gap",
            repr(target_gap),
            "--out",
            folder / "plan",
            "--json",
        ),
        "checkpoints": python_m(
            "checkpoints",
            "--sampler",
            "cli_test_sampler:sample",
            "--checkpoints",
            folder / "ckpts" / "*.ckpt",
            *common,
            "--num-samples",
            100,
            "--out",
            folder / "ckpt_out",
            "--json",
        ),
    }
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="cli-run") as pool:
        for name, argv in jobs.items():
            runs.futures[name] = pool.submit(launch, argv)

        def from_reference_file() -> subprocess.CompletedProcess[str]:
            runs.result("reference")  # the file first
            return launch(
                python_m(
                    "evaluate",
                    "--reference",
                    folder / "ref.gapref",
                    "--samples",
                    s,
                    "--dimension-points",
                    DIMENSION_POINTS,
                    "--json",
                )
            )

        runs.futures["evaluate_gapref"] = pool.submit(from_reference_file)
        try:
            yield runs
        finally:
            for future in runs.futures.values():
                future.cancel()


def succeeded(run: subprocess.CompletedProcess[str], code: int = 0) -> None:
    assert run.returncode == code, f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"


def test_console_script_is_installed(cli_runs: CliRuns) -> None:
    """The ``gapcallback`` console script sits next to the interpreter (it runs ``reference``
    below)."""
    assert cli_runs.script.is_file() and os.access(cli_runs.script, os.X_OK)


# --------------------------------------------------------------------------------------------
# In-process: successes
# --------------------------------------------------------------------------------------------


def run_main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    return make_data(tmp_path_factory.mktemp("cli_data"))


def test_transforms_from_python_files(
    capsys: pytest.CaptureFixture[str], data: Data, tmp_path: Path
) -> None:
    """``--sample-transform file.py:fn`` (samples saved in [-1, 1] mapped back) and
    ``--transform file.py:fn`` (every point set) give gc.evaluate's values with the same
    functions."""
    (tmp_path / "tf.py").write_text(TRANSFORMS)
    signed = 2 * data.samples - 1
    np.save(tmp_path / "signed.npy", signed)
    code, out, err = run_main(
        capsys,
        "evaluate",
        "--reference",
        data.files["reference"],
        "--train",
        data.files["train"],
        "--samples",
        tmp_path / "signed.npy",
        "--sample-transform",
        f"{tmp_path / 'tf.py'}:to_unit",
        "--transform",
        f"{tmp_path / 'tf.py'}:double",
        *FAST_ARGS,
        "--json",
    )
    assert code == 0, err
    functions = import_file(tmp_path / "tf.py", "cli_test_transforms")
    expected = gc.evaluate(
        data.tensor("reference"),
        torch.from_numpy(signed),
        train=data.tensor("train"),
        transform=functions.double,
        sample_transform=functions.to_unit,
        law_options=LAW_OPTIONS,
        dimension_points=DIMENSION_POINTS,
    )
    assert "gap/predicted" in expected
    assert_json_metrics(strict_json(out)["metrics"], expected)


def write_images(folder: Path, n: int, rng: np.random.Generator, basis: np.ndarray) -> None:
    folder.mkdir()
    from PIL import Image

    for i in range(n):
        pixels = 128 + 40 * (rng.random(3) @ basis).reshape(8, 8)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(
            folder / f"img_{i:03d}.png"
        )


def read_images(folder: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(folder.glob("*.png"), key=lambda p: p.name)
    arrays = [np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files]
    return torch.from_numpy(np.stack(arrays)[:, None])


def test_image_folders(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Folders of 8x8 grey PNGs as --reference, --train and --samples: the values of
    gc.evaluate on the images read as float32 [N, 1, 8, 8] in [0, 1]."""
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((3, 64))
    for name, n in (("ref", 30), ("train", 60), ("samples", 41)):
        write_images(tmp_path / name, n, rng, basis)
    code, out, err = run_main(
        capsys,
        "evaluate",
        "--reference",
        tmp_path / "ref",
        "--train",
        tmp_path / "train",
        "--samples",
        tmp_path / "samples",
        "--no-law",
        "--dimension-points",
        DIMENSION_POINTS,
        "--json",
    )
    assert code == 0, err
    reference, train, samples = (read_images(tmp_path / n) for n in ("ref", "train", "samples"))
    assert reference.shape == (30, 1, 8, 8) and samples.dtype == torch.float32
    assert 0 <= float(samples.min()) and float(samples.max()) <= 1
    expected = gc.evaluate(
        reference, samples, train=train, law=False, dimension_points=DIMENSION_POINTS
    )
    assert "gap/memorized_fraction" in expected
    payload = strict_json(out)
    assert_json_metrics(payload["metrics"], expected)
    assert (payload["n_samples"], payload["n_reference"], payload["n_train"]) == (41, 30, 60)


# --------------------------------------------------------------------------------------------
# In-process: every bad input is exit code 2, one line on stderr, nothing written
# --------------------------------------------------------------------------------------------


def bad_input(
    capsys: pytest.CaptureFixture[str], argv: list[object], *fragments: object, out: Path | None
) -> str:
    """``main(argv)`` returns 2 with one ``gapcallback: error:`` line naming ``fragments`` on
    stderr, nothing on stdout, and ``out`` (when given) not created."""
    code, stdout, stderr = run_main(capsys, *argv, "--no-progress")
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gapcallback: error: "), stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    assert stdout == ""
    if out is not None:
        assert not out.exists()
    return lines[0]


class Opaque:
    """A custom class: a .pt file holding one cannot be read with weights_only=True."""

    def __init__(self) -> None:
        self.note = "not a tensor"


@pytest.fixture(scope="module")
def small_reference_files(tmp_path_factory: pytest.TempPathFactory, data: Data) -> dict[str, Path]:
    """Reference files written by ``gapcallback reference`` in-process (no law, no id/data:
    instant): one as written (with --p 2), one whose reference points were edited afterwards."""
    folder = tmp_path_factory.mktemp("cli_gapref")
    good = folder / "p2.gapref"
    code = main(
        [
            "reference",
            "--reference",
            str(data.files["reference"]),
            "--train",
            str(data.files["train"]),
            "--p",
            "2",
            "--no-law",
            "--dimension-method",
            "none",
            "--out",
            str(good),
            "--json",
        ]
    )
    assert code == 0
    with np.load(good, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["reference"] = arrays["reference"].copy()
    arrays["reference"][0, 0] += 1.0
    edited = folder / "edited.gapref"
    with open(edited, "wb") as handle:
        np.savez(handle, **arrays)
    return {"good": good, "edited": edited}


def test_bad_input_files(capsys: pytest.CaptureFixture[str], data: Data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r, t, s = (data.files[k] for k in ("reference", "train", "samples"))

    def evaluate_with(samples: object, reference: object = r, *extra: object) -> list[object]:
        return ["evaluate", "--reference", reference, "--samples", samples, "--out", out, *extra]

    # A missing --samples file.
    bad_input(capsys, evaluate_with(tmp_path / "missing.npy"), "--samples", "missing.npy", out=out)

    # An unknown extension.
    (tmp_path / "samples.txt").write_text("1 2 3\n")
    bad_input(capsys, evaluate_with(tmp_path / "samples.txt"), "--samples", "'.txt'", out=out)

    # A pickled .pt (a custom class inside): refused, with how to re-save it.
    torch.save({"points": torch.zeros(4, 8), "meta": Opaque()}, tmp_path / "pickled.pt")
    line = bad_input(
        capsys, evaluate_with(tmp_path / "pickled.pt"), "--samples", "pickled.pt", out=out
    )
    assert "weights_only" in line and "re-save" in line and "torch.save(" in line

    # Mismatched feature sizes between --reference and --samples.
    np.save(tmp_path / "five.npy", data.samples[:, :5])
    bad_input(
        capsys,
        evaluate_with(tmp_path / "five.npy"),
        "--samples",
        "five.npy",
        "--reference",
        "[N, 5]",
        "[N, 8]",
        out=out,
    )

    # NaN rows in the samples.
    with_nan = data.samples.copy()
    with_nan[[3, 7], 2] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    bad_input(
        capsys,
        evaluate_with(tmp_path / "nan.npy"),
        "--samples",
        "nan.npy",
        "NaN",
        "rows 3, 7",
        out=out,
    )

    # An empty image folder as --reference.
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.md").write_text("not an image")
    bad_input(
        capsys,
        evaluate_with(s, tmp_path / "no_images"),
        "--reference",
        "no_images",
        "no images",
        out=out,
    )

    # A --sample-transform that raises.
    (tmp_path / "tf.py").write_text(TRANSFORMS)
    bad_input(
        capsys,
        evaluate_with(s, r, "--sample-transform", f"{tmp_path / 'tf.py'}:broken"),
        "--sample-transform",
        "KeyError",
        out=out,
    )

    # An --out that is a file: refused before any work, the file left as it was.
    (tmp_path / "a_file").write_text("keep me")
    for command in ("evaluate", "plan"):
        argv = [command, "--reference", r, "--train", t, "--out", tmp_path / "a_file"]
        if command == "evaluate":
            argv += ["--samples", s]
        bad_input(capsys, argv, "--out", "a_file", "not a folder", out=None)
        assert (tmp_path / "a_file").read_text() == "keep me"

    # A --law-option that is not KEY=VALUE.
    bad_input(
        capsys,
        evaluate_with(s, r, "--train", t, "--law-option", "repeats"),
        "--law-option",
        out=out,
    )


def test_bad_checkpoint_options(
    capsys: pytest.CaptureFixture[str], data: Data, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (tmp_path / "ckpts").mkdir()
    torch.save({"global_step": 1}, tmp_path / "ckpts" / "one.ckpt")
    (tmp_path / "sampler.py").write_text(SAMPLER)
    reference = ["--reference", data.files["reference"], "--out", out]

    # A sampler module that does not exist.
    bad_input(
        capsys,
        [
            "checkpoints",
            "--sampler",
            "nonexistent_mod:fn",
            "--checkpoints",
            tmp_path / "ckpts" / "*.ckpt",
            *reference,
        ],
        "--sampler",
        "nonexistent_mod",
        out=out,
    )
    # A glob matching nothing.
    bad_input(
        capsys,
        [
            "checkpoints",
            "--sampler",
            f"{tmp_path / 'sampler.py'}:sample",
            "--checkpoints",
            tmp_path / "ckpts" / "*.pt",
            *reference,
        ],
        "--checkpoints",
        "*.pt",
        "matches no file",
        out=out,
    )


def test_bad_reference_files(
    capsys: pytest.CaptureFixture[str],
    data: Data,
    small_reference_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    good, edited = small_reference_files["good"], small_reference_files["edited"]
    s = data.files["samples"]
    no_dimension = ["--dimension-method", "none"]

    # The file works as it is (so each refusal below is for the reason given).
    code, stdout, err = run_main(
        capsys, "evaluate", "--reference", good, "--samples", s, *no_dimension, "--json"
    )
    assert code == 0, err
    assert "gap/memorization" in strict_json(stdout)["metrics"]

    # --train together with a reference file (which holds its own).
    bad_input(
        capsys,
        [
            "evaluate",
            "--reference",
            good,
            "--train",
            data.files["train"],
            "--samples",
            s,
            "--out",
            out,
        ],
        "--train",
        "train.npy",
        "p2.gapref",
        out=out,
    )
    # Built with --p 2, asked with --p 1: the message names p.
    line = bad_input(
        capsys,
        ["evaluate", "--reference", good, "--samples", s, "--p", "1", *no_dimension, "--out", out],
        "--reference",
        "p2.gapref",
        "p=2.0",
        out=out,
    )
    assert "1.0 asked" in line and "dimension_method" not in line
    # Points edited after the file was written: the hash does not match.
    bad_input(
        capsys,
        ["evaluate", "--reference", edited, "--samples", s, *no_dimension, "--out", out],
        "--reference",
        "edited.gapref",
        "hash",
        out=out,
    )
    # `reference --out` must name a .gapref file.
    bad_input(
        capsys,
        ["reference", "--reference", data.files["reference"], "--out", tmp_path / "x.npy"],
        "--out",
        "x.npy",
        ".gapref",
        out=tmp_path / "x.npy",
    )


def test_bad_plan_options(capsys: pytest.CaptureFixture[str], data: Data, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r, t = data.files["reference"], data.files["train"]
    bad_input(capsys, ["plan", "--reference", r, "--out", out], "--train", out=out)
    bad_input(
        capsys,
        ["plan", "--reference", r, "--train", t, "--level", "1.5", "--out", out],
        "--level",
        "1.5",
        out=out,
    )
    bad_input(
        capsys,
        ["plan", "--reference", r, "--train", t, "--target-gap", "-1", "--out", out],
        "--target-gap",
        out=out,
    )


def test_usage_error_exits_2(
    capsys: pytest.CaptureFixture[str], data: Data, tmp_path: Path
) -> None:
    """argparse's usage errors: SystemExit(2) with the usage on stderr, nothing written."""
    out = tmp_path / "out"
    argv = ["evaluate", "--reference", str(data.files["reference"])]
    argv += ["--samples", str(data.files["samples"]), "--out", str(out), "--no-such-option"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gapcallback" in err and "unrecognized arguments: --no-such-option" in err
    assert not out.exists()
    with pytest.raises(SystemExit) as info:
        main([])  # no command
    assert info.value.code == 2


# --------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------


def test_evaluate_writes_metrics_and_prints_a_table(cli_runs: CliRuns) -> None:
    """``python -m gapcallback evaluate --out DIR``: metrics.json / metrics.csv / the figure,
    equal to gc.evaluate, and a table on stdout."""
    run = cli_runs.result("evaluate")
    succeeded(run)
    expected = cli_runs.expected
    assert {"gap/predicted", "gap/memorized_fraction", "id/samples"} <= set(expected)
    folder = cli_runs.data.folder / "eval"
    assert sorted(p.name for p in folder.iterdir()) == [
        "gap_figure.png",
        "metrics.csv",
        "metrics.json",
    ]
    assert (folder / "gap_figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = strict_json((folder / "metrics.json").read_text())
    assert_json_metrics(payload["metrics"], expected)
    assert (payload["n_samples"], payload["n_reference"], payload["n_train"]) == (
        N_SAMPLES,
        N_REFERENCE,
        N_TRAIN,
    )
    assert payload["processes"] == 1 and payload["options"]["law"] is True
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert_csv_metrics(rows[0], expected)
    # The table: a title and one line per key.
    assert f"{N_SAMPLES} samples" in run.stdout
    for key in expected:
        assert any(line.split()[:1] == [key] for line in run.stdout.splitlines()), key
    assert "gap/observed" in run.stdout


def test_reference_file_round_trip(cli_runs: CliRuns) -> None:
    """The console script's ``reference`` writes a file holding gc.prepare_reference's law;
    ``evaluate --reference FILE --json`` (strict JSON, nothing else on stdout) gives the values
    of the direct evaluation."""
    reference_run = cli_runs.result("reference")
    succeeded(reference_run)
    path = cli_runs.data.folder / "ref.gapref"
    assert f"wrote {path}" in reference_run.stdout
    loaded = gc.load_reference(path)
    assert cli_runs.prepared.law is not None
    law_state = json.loads(json.dumps(cli_runs.prepared.law.state_dict()))
    assert same(loaded.summary()["law"], law_state)
    assert loaded.memorization_gap == cli_runs.prepared.memorization_gap
    assert torch.equal(loaded.reference, cli_runs.data.tensor("reference"))
    assert loaded.train is not None and torch.equal(loaded.train, cli_runs.data.tensor("train"))

    run = cli_runs.result("evaluate_gapref")
    succeeded(run)
    payload = strict_json(run.stdout)  # the whole of stdout is one strict JSON document
    expected = cli_runs.expected
    assert_json_metrics(payload["metrics"], expected)
    assert_json_metrics(
        payload["metrics"],
        gc.evaluate(loaded, cli_runs.data.tensor("samples"), dimension_points=DIMENSION_POINTS),
    )
    first = cli_runs.result("evaluate")
    succeeded(first)
    written = strict_json((cli_runs.data.folder / "eval" / "metrics.json").read_text())
    assert payload["metrics"] == written["metrics"]


def test_plan(cli_runs: CliRuns) -> None:
    """``plan --at 1000 5000 --target-gap G``: the law's predictions and intervals, and the size
    for the gap the law predicts at 3000 (3000 back)."""
    run = cli_runs.result("plan")
    succeeded(run)
    law = cli_runs.prepared.law
    payload = strict_json(run.stdout)
    folder = cli_runs.data.folder / "plan"
    assert payload == strict_json((folder / "plan.json").read_text())
    assert (folder / "plan.csv").is_file()
    assert (folder / "law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["law"]["dimension"] == law.dimension
    assert payload["law"]["constant"] == law.constant
    assert payload["id/data"] == cli_runs.prepared.data_dimension
    assert payload["gap/memorization"] == cli_runs.prepared.memorization_gap
    rows = payload["predictions"]
    assert [row["kind"] for row in rows] == ["gap at size", "gap at size", "size for gap"]
    for row, n in zip(rows[:2], (1000.0, 5000.0), strict=True):
        assert row["n"] == n
        assert row["gap"] == law.predict(n)
        assert (row["low"], row["high"]) == law.predict_interval(n, 0.9)
        assert row["low"] < row["gap"] < row["high"]
    size = rows[2]
    assert size["gap"] == cli_runs.target_gap
    assert size["n"] == pytest.approx(3000, rel=1e-6)
    assert size["low"] <= size["n"] <= size["high"]


def test_checkpoints(cli_runs: CliRuns) -> None:
    """``checkpoints``: one row per checkpoint in step order, each equal to gc.evaluate on the
    sampler's draws (seeded per checkpoint with derive_seed(seed, index, rank)); the damaged
    checkpoint's row holds its error, the others are written, the exit code is 1."""
    run = cli_runs.result("checkpoints")
    succeeded(run, code=1)
    payload = strict_json(run.stdout)
    folder = cli_runs.data.folder / "ckpt_out"
    assert payload == strict_json((folder / "checkpoints.json").read_text())
    assert (folder / "checkpoints.csv").is_file() and (folder / "gap_checkpoints.png").is_file()
    rows = payload["checkpoints"]
    contents = dict(cli_runs.checkpoints)
    ordered = sorted(contents, key=lambda name: contents[name]["global_step"])
    assert [Path(row["checkpoint"]).name for row in rows] == ordered
    assert [row["step"] for row in rows] == [100, 150, 200, 300]
    assert [row["epoch"] for row in rows] == [contents[n]["epoch"] for n in ordered]
    sampler = import_file(cli_runs.data.folder / "cli_test_sampler.py", "cli_test_sampler_here")
    for index, (row, name) in enumerate(zip(rows, ordered, strict=True)):
        path = cli_runs.data.folder / "ckpts" / name
        if contents[name].get("damaged"):
            assert "damaged" in row["error"] and "gap/observed" not in row
            assert f"{path}" in run.stderr and "left out" in run.stderr
            continue
        assert "error" not in row
        generator = torch.Generator().manual_seed(derive_seed(0, index, 0))
        samples = sampler.sample(str(path), 100, generator=generator)
        expected = gc.evaluate(cli_runs.prepared, samples, dimension_points=DIMENSION_POINTS)
        metrics = {key: row[key] for key in expected}
        assert_json_metrics(metrics, expected)
        assert set(row) == {"checkpoint", "epoch", "step", *expected}
    # Different checkpoints, different values.
    gaps = [row["gap/observed"] for row in rows if "error" not in row]
    assert len(set(gaps)) == 3


@pytest.mark.parametrize("name", ["torchrun", "torchrun_sharded"])
def test_torchrun_two_processes(cli_runs: CliRuns, name: str) -> None:
    """``torchrun --nproc-per-node 2 -m gapcallback evaluate --json`` (gloo; samples, and with
    --shard-references the references too, split unevenly): the one-process values exactly."""
    run = cli_runs.result(name)
    succeeded(run)
    payload = strict_json(run.stdout)  # only process zero prints
    assert payload["processes"] == 2
    assert_json_metrics(payload["metrics"], cli_runs.expected)
