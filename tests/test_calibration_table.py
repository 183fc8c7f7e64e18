"""Tests of the shipped calibration table of the ``"calibrated"`` intrinsic-dimension estimator.

Oracles: a fresh simulation by the estimator's own ``simulate_reference_stats`` (equal at grid
points, within Monte-Carlo noise between them), the simulation counter of its memo
``reference_stats.cache_info()`` (a call the table covers must not simulate), and a sphere of
known dimension.
"""

from __future__ import annotations

import ast
import importlib.resources
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gapcallback.functional import calibration_table as table_module
from gapcallback.functional.dimension import intrinsic_dimension_estimate
from gapcallback.functional.dimension_calibration import (
    References,
    calibration_sizes,
    family_reading,
    match_references,
)
from gapcallback.functional.dimension_references import (
    CALIBRATION_DIMS,
    MAX_REFERENCE_POINTS,
    REFERENCE_CACHE_SIZE,
    REFERENCE_FAMILIES,
    reference_stats,
    simulate_reference_stats,
)

pytestmark = pytest.mark.usefixtures("one_thread")

simulate = simulate_reference_stats  # the uncached simulation


def _sphere(n: int, d: int, big_d: int | None = None, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d + 1))
    x = z / np.linalg.norm(z, axis=1, keepdims=True)
    if big_d is not None:
        q, _ = np.linalg.qr(rng.standard_normal((big_d, d + 1)))
        x = x @ q.T
    return torch.from_numpy(x)


def _simulations() -> int:
    """Calls of the simulation so far (hits and misses of its memo)."""
    info = reference_stats.cache_info()
    return info.hits + info.misses


# ---------------------------------------------------------------- the file and its grid


def test_table_loads_with_the_documented_grid() -> None:
    table = table_module.load_table()
    assert table_module.load_table() is table  # read once per process
    assert table.families == REFERENCE_FAMILIES
    assert table.k == table_module.K == 10 and table.seed == table_module.SEED == 0
    # dimensions: the estimator's fixed grid, every integer to 12, then ~15% steps to 512
    assert tuple(table.dims) == CALIBRATION_DIMS
    assert tuple(table.dims[:13]) == (*range(1, 13), 14) and table.dims[-1] == 512
    assert table.dims.size == 39 and np.diff(table.dims[11:]).min() >= 2
    assert (table.dims[12:-1] / table.dims[11:-2]).max() < 1.2
    # sizes: 28 on a log grid from k + 1 = 11 to the chunk size 4000
    assert tuple(table.sizes) == table_module.SIZES and len(table_module.SIZES) == 28
    assert table.sizes[0] == 11 and table.sizes[-1] == MAX_REFERENCE_POINTS == 4000
    assert np.exp(np.diff(np.log(table.sizes))).max() < 1.3
    assert table.raw.shape == table.cos.shape == (4, 39, 28)
    assert np.isfinite(table.raw).all() and np.isfinite(table.cos).all()
    assert (table.raw > 0).all() and (np.abs(table.cos) < 1).all()
    # the raw MLE grows with the dimension (the estimator reads it off this curve; at a few dozen
    # points it is noisy, and the estimator reads the monotone envelope)
    big = table.sizes >= 60
    assert (np.diff(table.raw[:, :, big], axis=1) > 0).all()
    assert (np.diff(table.raw, axis=1) > -0.2 * table.raw[:, 1:]).all()
    assert (table.raw[:, -1] > 5 * table.raw[:, 4]).all()


def test_table_is_small_package_data() -> None:
    resource = importlib.resources.files("gapcallback") / "data" / table_module.TABLE_FILE
    assert resource.is_file() and len(resource.read_bytes()) <= 2 * 1024 * 1024


def test_save_and_read_round_trip(tmp_path) -> None:
    built = table_module.build_table(sizes=(11, 20), dims=(1, 2), families=("cube", "sphere"))
    path = tmp_path / "t.npz"
    table_module.save_table(built, path)
    back = table_module.read_table(path)
    assert back.families == ("cube", "sphere") and back.k == 10 and back.seed == 0
    assert back.seeds == table_module.SEEDS == (0, 1, 2, 3)
    assert np.array_equal(back.raw, built.raw) and np.array_equal(back.cos, built.cos)
    mean = np.mean([simulate("cube", 2, 20, 10, seed)[0] for seed in table_module.SEEDS])
    assert back.raw[0, 1, 1] == pytest.approx(mean, rel=1e-14)


@pytest.mark.parametrize(
    ("family", "dim", "n"),
    [
        ("sphere", 1, 11),
        ("torus", 3, 51),
        ("cube", 7, 234),
        ("gaussian", 12, 98),
        ("torus", 21, 41),
    ],
)
def test_table_equals_a_fresh_simulation_at_grid_points(family: str, dim: int, n: int) -> None:
    # The mean of four fresh simulations with the same function and seeding keys: bit for bit on
    # the machine that built the table, up to the order of the four-term sum; 1e-12 leaves room
    # for another CPU's last-bit libm differences. A failure means the simulation changed
    # (torch's random streams or the estimator): regenerate the table.
    table = table_module.load_table()
    f = table.families.index(family)
    j = int(np.searchsorted(table.dims, dim))
    i = int(np.searchsorted(table.sizes, n))
    assert table.dims[j] == dim and table.sizes[i] == n
    assert table.seeds == table_module.SEEDS
    raw, cos = np.mean([simulate(family, dim, n, 10, seed) for seed in table.seeds], axis=0)
    assert table.raw[f, j, i] == pytest.approx(raw, rel=1e-12, abs=0)
    assert table.cos[f, j, i] == pytest.approx(cos, rel=1e-12, abs=1e-15)
    assert table_module.lookup(family, dim, n, 10, 0) == (table.raw[f, j, i], table.cos[f, j, i])


@pytest.mark.parametrize(("family", "dim", "n"), [("cube", 5, 320), ("sphere", 16, 700)])
def test_interpolation_is_within_monte_carlo_noise_of_a_fresh_simulation(
    family: str, dim: int, n: int
) -> None:
    # Off-grid n (between two grid sizes): the interpolated pair against fresh simulations at n
    # with other seeds, whose spread is the Monte-Carlo noise of one simulation.
    assert n not in table_module.SIZES
    fresh = np.array([simulate(family, dim, n, 10, seed) for seed in range(1, 9)])
    mean, spread = fresh.mean(0), fresh.std(0, ddof=1)
    got = np.array(table_module.lookup(family, dim, n, 10, 0))
    assert (np.abs(got - mean) <= 4 * spread).all(), (got, mean, spread)
    # and it lies between its neighbours on the grid (linear in log n)
    lo = max(s for s in table_module.SIZES if s < n)
    hi = min(s for s in table_module.SIZES if s > n)
    ends = np.array([table_module.lookup(family, dim, m, 10, 0) for m in (lo, hi)])
    t = math.log(n / lo) / math.log(hi / lo)
    assert np.allclose(got, (1 - t) * ends[0] + t * ends[1], rtol=1e-14)


def test_lookup_outside_the_table_is_none() -> None:
    assert table_module.lookup("cube", 5, 300, 7, 0) is None  # other k
    assert table_module.lookup("cube", 5, 300, 10, 1) is None  # other seed
    assert table_module.lookup("cube", 13, 300, 10, 0) is None  # off the dimension grid
    assert table_module.lookup("cube", 5, 5000, 10, 0) is None  # above the sizes
    assert not table_module.covers(10, 10, 0) and table_module.covers(11, 10, 0)


# ---------------------------------------------------------------- caches and modules


def test_the_caches_are_bounded_and_inspectable() -> None:
    # The memo of the simulated references and the loaded table: bounded lru_caches.
    assert reference_stats.cache_info().maxsize == REFERENCE_CACHE_SIZE == 4096
    assert table_module.load_table.cache_info().maxsize == 1
    reference_stats.cache_clear()
    first = reference_stats("cube", 2, 20, 10, 5)
    info = reference_stats.cache_info()
    assert (info.misses, info.hits, info.currsize) == (1, 0, 1)
    assert reference_stats("cube", 2, 20, 10, 5) == first == simulate("cube", 2, 20, 10, 5)
    assert reference_stats.cache_info().hits == 1
    reference_stats.cache_clear()
    assert reference_stats.cache_info().currsize == 0


_ID_MODULES = {
    "dimension_references": "gapcallback/functional/dimension_references.py",
    "calibration_table": "gapcallback/functional/calibration_table.py",
    "dimension_calibration": "gapcallback/functional/dimension_calibration.py",
    "dimension": "gapcallback/functional/dimension.py",
    "metric": "gapcallback/metrics/intrinsic_dimension.py",
}


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from gapcallback... import name`` in the file (any depth)."""
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gapcallback")
        for alias in node.names
    ]


def test_the_estimator_modules_import_public_names_one_way() -> None:
    # No private names across modules, and a one-way layering: references <- table <-
    # calibration <- dimension (the table module is imported by the calibration on first use).
    root = Path(__file__).resolve().parent.parent
    found = {key: _imports(root / path) for key, path in _ID_MODULES.items()}
    for key, imports in found.items():
        assert not [i for i in imports if i[1].startswith("_")], key
    below = {
        "dimension_references": (),
        "calibration_table": ("dimension_references",),
        "dimension_calibration": ("dimension_references", "calibration_table"),
    }
    for key, allowed in below.items():
        used = {m.rsplit(".", 1)[-1] for m, _ in found[key]} | {
            n for m, n in found[key] if m == "gapcallback.functional"
        }
        assert used & set(_ID_MODULES) <= set(allowed), (key, used)


def test_the_table_command_runs_without_importing_the_module_twice() -> None:
    # Importing the package does not import the table module, so `python -m
    # gapcallback.functional.calibration_table` (the documented way to regenerate the table) runs
    # it once: runpy would warn otherwise.
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", table_module.__name__, "--help"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "--workers" in out.stdout and "--out" in out.stdout


# ---------------------------------------------------------------- the estimator reads it


def test_table_covers_every_input_size_from_50_to_a_million() -> None:
    # The estimator compares chunks of at most 4000 points with references of the chunk size:
    # for N on a log grid 50..10^6 (and every N from 11 to 9000), that size is in the table.
    sizes = {int(v) for v in np.geomspace(50, 1e6, 80).round()} | set(range(11, 9001))
    for n in sorted(sizes):
        chunks, size, ref_n = calibration_sizes(n)
        assert chunks * size <= n < chunks * (size + 1) and size <= 4000
        assert table_module.covers(ref_n, 10, 0), n


def _gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)))


@pytest.mark.parametrize(
    ("x", "d"),
    [
        (_sphere(50, 2, 5), 2),
        (_sphere(777, 4, 20), 4),
        (_sphere(2503, 3, 600), 3),
        (_sphere(4500, 2), 2),
        (_sphere(20000, 2), 2),
        (_gaussian(600, 20), 20),  # reads up to the grid's 21, clamped to D = 20
        (_gaussian(300, 13), 13),  # reads up to 14, clamped to 13
    ],
    ids=["N50", "N777-D20", "N2503-D600", "N4500", "N20000", "gauss20", "gauss13"],
)
def test_a_table_covered_call_simulates_nothing(caplog, x: torch.Tensor, d: int) -> None:
    # Every ambient dimension reads the table: the fixed grid is walked to the first grid
    # dimension >= D, never to D itself.
    reference_stats.cache_clear()
    with caplog.at_level(logging.INFO, logger="gapcallback"):
        est = intrinsic_dimension_estimate(x)
    assert _simulations() == 0
    assert est.details["tabulated"]
    assert not [r for r in caplog.records if r.name.startswith("gapcallback")]
    assert float(est.dimension) == pytest.approx(d, rel=0.1)
    assert float(est.dimension) <= x.shape[1]


def test_an_off_table_call_simulates_and_says_so_in_one_line(caplog) -> None:
    x = _sphere(300, 3, 6, seed=1)
    reference_stats.cache_clear()
    with caplog.at_level(logging.INFO, logger="gapcallback"):
        est = intrinsic_dimension_estimate(x, k=7)
    assert not est.details["tabulated"]
    simulated = reference_stats.cache_info().misses
    assert simulated > 0
    lines = [r for r in caplog.records if r.name.startswith("gapcallback")]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    message = lines[0].getMessage()
    assert "k=7" in message and "n=300" in message and "not in the shipped table" in message
    # a second call reads the per-process memo: no simulation, no line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gapcallback"):
        again = intrinsic_dimension_estimate(x, k=7)
    assert reference_stats.cache_info().misses == simulated and not caplog.records
    assert torch.equal(again.dimension, est.dimension)


def test_the_estimate_of_a_3_sphere_from_the_table() -> None:
    reference_stats.cache_clear()
    est = intrinsic_dimension_estimate(_sphere(3000, 3, 10, seed=3))
    assert _simulations() == 0 and est.details["reference_points"] == 3000
    assert float(est.dimension) == pytest.approx(3, rel=0.03)
    assert max(est.details["reference"], key=est.details["reference"].get) == "sphere"


def test_the_table_gives_the_simulated_estimate_at_a_grid_size() -> None:
    # N = 234 is a grid size: the table and fresh simulations (the mean over the table's seeds,
    # read through the simulation instead of the table) give the same estimate.
    x = _sphere(234, 6, 9, seed=4)
    tabulated = intrinsic_dimension_estimate(x)

    def refs(family: str, dim: int) -> tuple[float, float]:
        runs = [simulate(family, dim, 234, 10, seed) for seed in table_module.SEEDS]
        raw, cos = np.mean(runs, axis=0)
        return float(raw), float(cos)

    d, _ = match_references(
        tabulated.details["raw"], tabulated.details["cos"], refs, 9, REFERENCE_FAMILIES
    )
    assert d == pytest.approx(float(tabulated.dimension), rel=1e-12)


def test_the_reading_is_clamped_to_an_off_grid_ambient_dimension() -> None:
    # top = 20 lies between the grid dimensions 18 and 21: the walk stops at 21, the reading
    # is clamped to 20 (and below it equals the interpolation on the grid).
    refs = References(1000, 10, 0)
    calls: list[int] = []

    def counted(family: str, dim: int) -> tuple[float, float]:
        calls.append(dim)
        return refs(family, dim)

    d, _ = family_reading("cube", 1e9, counted, 20)
    assert d == 20.0 and calls[-1] == 21 and calls == list(CALIBRATION_DIMS[:16])
    r18, r21 = refs("cube", 18)[0], refs("cube", 21)[0]
    mid = 0.5 * (r18 + r21)
    d, _ = family_reading("cube", mid, refs, 20)
    assert d == pytest.approx(19.5) and d <= 20
