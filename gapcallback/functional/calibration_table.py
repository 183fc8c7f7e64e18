r"""The precomputed calibration table of the default ``"calibrated"`` intrinsic-dimension estimator.

:func:`~gapcallback.functional.dimension.intrinsic_dimension_estimate` (``"calibrated"``)
compares two statistics of the k nearest neighbours of the data with the same statistics on
simulated reference families of known dimension and the same number of points. Simulating them
costs seconds to a minute of CPU, so the package ships them for the defaults, in
``gapcallback/data/calibration_k10_seed0.npz``; this module loads that table, interpolates it, and
regenerates it (``python -m gapcallback.functional.calibration_table``).

What an entry holds
    For a family :math:`f` (sphere :math:`S^d`, flat torus :math:`(S^1)^d`, cube :math:`[0,1]^d`,
    Gaussian :math:`N(0, I_d)`), a dimension :math:`d` and a reference size :math:`n`, the pair
    :func:`~gapcallback.functional.dimension_references.simulate_reference_stats` ``(f, d, n,
    k=10, seed)`` of the estimator, averaged over the four seeds :data:`SEEDS` (0 to 3). One
    simulation draws ``r`` samples of ``n`` points with :math:`r = \min(6, \lceil 5000 /
    n\rceil)`, drawn from one ``torch.Generator`` seeded with
    ``(1_000_003 seed + 7919 d + 31 n + k + 104_729 index(f)) mod 2^62``, and

    * the raw Levina-Bickel MLE :math:`\hat m = (k - 1) / \frac1r \sum_{\text{samples}}
      \frac1n \sum_i \sum_{j<k} \log(T_{k,i} / T_{j,i})`;
    * the mean neighbour cosine :math:`\bar c = \frac1r \sum_{\text{samples}} \frac1n \sum_i
      (\lVert \sum_{j \le k} u_{ij} \rVert^2 - k) / (k (k - 1))`, with
      :math:`u_{ij}` the unit direction from point :math:`i` to its j-th neighbour.

    Every entry is the mean of what the estimator would simulate with each of the four seeds (same
    function, same seeding keys), so at a grid point the table equals the mean of four fresh
    simulations bit for bit, with half the Monte-Carlo noise of one. ``seed=0`` (the default)
    reads the table; another seed simulates once, as before.

The grid
    * families: :data:`~gapcallback.functional.dimension_references.REFERENCE_FAMILIES` (4);
    * dimensions: the estimator's fixed grid
      :data:`~gapcallback.functional.dimension_references.CALIBRATION_DIMS`, 1 to 12, then steps
      of about 15% up to 512 (39 values: ..., 12, 14, 16, 18, 21, 24, 28, 32, ..., 458, 512);
    * sizes: :data:`SIZES`, 28 sizes geometrically spaced from ``k + 1 = 11`` (the fewest points
      ``k = 10`` neighbours allow) to 4000 (about 24% apart);
    * ``k = 10`` and ``seed = 0`` (:data:`K`, :data:`SEED`, the estimator's defaults), each entry
      averaged over the simulation seeds :data:`SEEDS`.

Coverage
    The estimator splits ``N`` points into :math:`c = \lceil N / 4000\rceil` chunks of
    :math:`\lfloor N / c\rfloor` points and simulates references of that size (rounded to 3
    significant digits above 1000), which always lies in ``[11, 4000]``: from 11 to 4000 for
    ``N <= 4000``, then between 2000 and 4000 for every larger ``N`` (``N = 10^6`` gives 250 chunks
    of 4000). So every input the estimator accepts with ``k = 10, seed = 0`` (``N`` from 11 to
    :math:`10^6` and beyond) reads the table and simulates nothing. Other ``k`` or ``seed`` fall
    outside: the estimator simulates then (announced by one log line, memoised for the process
    by :func:`~gapcallback.functional.dimension_references.reference_stats`).
    A subset of ``references`` reads the same table.

Interpolation
    Between two grid sizes :math:`n_0 < n < n_1` both statistics are interpolated linearly in
    :math:`\log n` (the MLE's small-sample bias moves with :math:`\log n`):
    :math:`v(n) = (1 - t) v(n_0) + t v(n_1)`, :math:`t = \log(n / n_0) / \log(n_1 / n_0)`; at a grid
    size the stored value is returned unchanged. The interpolation error is below the Monte-Carlo
    noise of a fresh simulation (tested).

Caching
    :func:`load_table` reads the shipped file once per process (``functools.lru_cache(maxsize=1)``:
    one entry, the table; ``load_table.cache_info()`` reports it, ``load_table.cache_clear()``
    forgets it); the loaded arrays take about 70 kB. That is the module's only state: building a
    table simulates through the uncached
    :func:`~gapcallback.functional.dimension_references.simulate_reference_stats`, so it neither
    reads nor fills the estimator's memo.

Regenerating (the grid and the seeds are the constants here; four simulations per entry, about
an hour of CPU: one simulation per entry took 807 s on one core of the build machine)::

    python -m gapcallback.functional.calibration_table [--out PATH] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.resources
import io
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch

from gapcallback.functional.dimension_references import (
    CALIBRATION_DIMS,
    MAX_REFERENCE_POINTS,
    REFERENCE_FAMILIES,
    simulate_reference_stats,
)

__all__ = [
    "SEED",
    "SEEDS",
    "SIZES",
    "TABLE_FILE",
    "CalibrationTable",
    "K",
    "build_table",
    "covers",
    "load_table",
    "lookup",
    "read_table",
    "save_table",
]

K = 10
"""Neighbours of the shipped table (the estimator's default ``k``)."""

SEED = 0
"""The estimator ``seed`` the shipped table answers for (the estimator's default)."""

SEEDS: tuple[int, ...] = (0, 1, 2, 3)
"""Simulation seeds averaged in each entry of the shipped table: four independent simulations
halve the Monte-Carlo noise of the references (its spread moved the mean relative error of the
benchmark suites by about +-0.15 points with one simulation)."""

SIZES: tuple[int, ...] = tuple(
    int(v) for v in np.unique(np.round(np.geomspace(K + 1, MAX_REFERENCE_POINTS, 28)))
)
"""Reference sizes of the table: 28 sizes geometrically spaced from ``K + 1`` to 4000."""

TABLE_FILE = "calibration_k10_seed0.npz"
"""File name of the shipped table inside the ``gapcallback/data`` package folder."""


class CalibrationTable(NamedTuple):
    """The reference statistics of :func:`build_table`, as stored and as loaded.

    Attributes:
        families: ``F`` family names (in the order of ``REFERENCE_FAMILIES``).
        dims: ``[D]`` int64, the simulated dimensions (increasing).
        sizes: ``[S]`` int64, the reference sizes (increasing).
        raw: ``[F, D, S]`` float64, the raw Levina-Bickel MLE of each entry.
        cos: ``[F, D, S]`` float64, the mean neighbour cosine of each entry.
        k: neighbours.
        seed: the estimator ``seed`` the table answers for.
        seeds: the simulation seeds averaged in each entry.
    """

    families: tuple[str, ...]
    dims: np.ndarray
    sizes: np.ndarray
    raw: np.ndarray
    cos: np.ndarray
    k: int
    seed: int
    seeds: tuple[int, ...] = (SEED,)


def _simulate_entry(
    task: tuple[int, int, int, str, int, int, int],
) -> tuple[int, int, int, float, float]:
    """One simulation of the table (a worker task): ``(f, d, s, raw, cos)`` for one seed."""
    f, d, s, family, dim, n, k_seed = task
    k, seed = divmod(k_seed, 1 << 20)
    torch.set_num_threads(1)
    raw, cos = simulate_reference_stats(family, dim, n, k, seed)  # not the estimator's memo
    return f, d, s, raw, cos


def build_table(
    sizes: Sequence[int] = SIZES,
    dims: Sequence[int] = CALIBRATION_DIMS,
    families: Sequence[str] = REFERENCE_FAMILIES,
    k: int = K,
    seeds: Sequence[int] = SEEDS,
    workers: int = 1,
    verbose: bool = False,
) -> CalibrationTable:
    """Simulate every entry of the table: the mean over ``seeds`` of
    :func:`~gapcallback.functional.dimension_references.simulate_reference_stats`.

    Args:
        sizes: increasing reference sizes (each ``> k``).
        dims: increasing dimensions.
        families: names from ``REFERENCE_FAMILIES``.
        k: neighbours.
        seeds: simulation seeds averaged per entry; the table answers for ``seeds[0]``.
        workers: processes simulating in parallel (each on one thread; the result does not
            depend on it).
        verbose: print progress.

    Returns:
        :class:`CalibrationTable` with ``raw`` and ``cos`` of shape ``[F, D, S]``.
    """
    seeds = tuple(int(v) for v in seeds)
    shape = (len(families), len(dims), len(sizes))
    raw_sum = np.zeros(shape)
    cos_sum = np.zeros(shape)
    tasks = [
        (f, d, s, family, int(dim), int(n), int(k) * (1 << 20) + seed)
        for f, family in enumerate(families)
        for d, dim in enumerate(dims)
        for s, n in enumerate(sizes)
        for seed in seeds
    ]
    # Largest first (cost ~ n * max(n, 5000) * dim), so the workers finish together.
    tasks.sort(key=lambda t: -t[5] * max(t[5], 5000) * (t[4] + 2))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers > 1:
            import multiprocessing

            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers))
            results = pool.imap_unordered(_simulate_entry, tasks, chunksize=1)
        else:
            results = map(_simulate_entry, tasks)
        for done, (f, d, s, raw, cos) in enumerate(results, 1):
            raw_sum[f, d, s] += raw
            cos_sum[f, d, s] += cos
            if verbose and done % 200 == 0:
                print(
                    f"{done}/{len(tasks)} simulations, {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
    return CalibrationTable(
        tuple(families),
        np.asarray(dims, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
        raw_sum / len(seeds),
        cos_sum / len(seeds),
        int(k),
        seeds[0],
        seeds,
    )


def save_table(table: CalibrationTable, path: str | Path) -> None:
    """Write ``table`` as a compressed ``.npz`` (plain arrays, loadable without pickle)."""
    np.savez_compressed(
        path,
        families=np.asarray(table.families),
        dims=table.dims,
        sizes=table.sizes,
        raw=table.raw,
        cos=table.cos,
        k=np.int64(table.k),
        seed=np.int64(table.seed),
        seeds=np.asarray(table.seeds, dtype=np.int64),
        torch_version=np.asarray(torch.__version__),
    )


def read_table(source: str | Path | IO[bytes]) -> CalibrationTable:
    """Read a table written by :func:`save_table` (a path or a binary file object; no pickle)."""
    with np.load(source, allow_pickle=False) as npz:
        table = CalibrationTable(
            tuple(str(f) for f in npz["families"]),
            npz["dims"].astype(np.int64),
            npz["sizes"].astype(np.int64),
            npz["raw"].astype(np.float64),
            npz["cos"].astype(np.float64),
            int(npz["k"]),
            int(npz["seed"]),
            tuple(int(v) for v in npz["seeds"]) if "seeds" in npz.files else (int(npz["seed"]),),
        )
    shape = (len(table.families), table.dims.size, table.sizes.size)
    if table.raw.shape != shape or table.cos.shape != shape:
        raise ValueError(
            f"A calibration table needs raw and cos of shape {shape} (families x dims x sizes),"
            f" got {table.raw.shape} and {table.cos.shape}."
        )
    return table


@functools.lru_cache(maxsize=1)
def load_table() -> CalibrationTable:
    """The shipped table (package data ``gapcallback/data/calibration_k10_seed0.npz``), read once
    per process (``functools.lru_cache(maxsize=1)``; ``load_table.cache_clear()`` forgets it)."""
    resource = importlib.resources.files("gapcallback") / "data" / TABLE_FILE
    try:
        data = resource.read_bytes()
    except FileNotFoundError as err:
        raise RuntimeError(
            f"The calibration table gapcallback/data/{TABLE_FILE} is missing from the installed"
            " package; reinstall gapcallback, or regenerate it with"
            " `python -m gapcallback.functional.calibration_table`."
        ) from err
    return read_table(io.BytesIO(data))


def covers(n: int, k: int, seed: int) -> bool:
    """Whether the shipped table holds the references of size ``n`` for ``k`` and ``seed``."""
    table = load_table()
    return k == table.k and seed == table.seed and table.sizes[0] <= n <= table.sizes[-1]


def lookup(family: str, dim: int, n: int, k: int, seed: int) -> tuple[float, float] | None:
    """``(raw MLE, mean cosine)`` of ``family`` in dimension ``dim`` at reference size ``n``.

    Interpolated linearly in :math:`\\log n` between the two grid sizes around ``n`` (the stored
    value at a grid size); ``None`` when the table does not hold it (other ``k`` or ``seed``,
    ``n`` or ``dim`` off the grid, unknown family), so the caller simulates.
    """
    table = load_table()
    if not covers(n, k, seed) or family not in table.families:
        return None
    j = int(np.searchsorted(table.dims, dim))
    if j == table.dims.size or table.dims[j] != dim:
        return None
    f = table.families.index(family)
    i = int(np.searchsorted(table.sizes, n))
    if table.sizes[i] == n:
        return float(table.raw[f, j, i]), float(table.cos[f, j, i])
    n0, n1 = int(table.sizes[i - 1]), int(table.sizes[i])
    t = math.log(n / n0) / math.log(n1 / n0)
    raw = (1.0 - t) * table.raw[f, j, i - 1] + t * table.raw[f, j, i]
    cos = (1.0 - t) * table.cos[f, j, i - 1] + t * table.cos[f, j, i]
    return float(raw), float(cos)


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate the table (one CPU thread, so the result does not depend on the thread count)."""
    parser = argparse.ArgumentParser(
        prog="python -m gapcallback.functional.calibration_table",
        description=__doc__.split("\n")[0],
    )
    default = Path(__file__).resolve().parent.parent / "data" / TABLE_FILE
    parser.add_argument(
        "--out", type=Path, default=default, help=f"output file (default {default})"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes simulating in parallel (default 1)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    table = build_table(workers=args.workers, verbose=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_table(table, args.out)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB): {len(table.families)}"
        f" families x {table.dims.size} dims x {table.sizes.size} sizes in"
        f" {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
