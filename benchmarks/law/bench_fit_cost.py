"""Cost of :meth:`gapcallback.law.GapLaw.fit` in single-kNN-search equivalents.

Times ``GapLaw.fit(train, reference)`` (default options, pooled) against one
``F.knn(pool, pool, 1, exclude_self=True)`` of the same pool (``pool = cat(train, reference)``),
alternating the two so that a change of machine load hits both, and prints the ratio of the
medians. Also counts the kNN searches the fit runs and their work in pair products (a spy around
``gapcallback.functional.gap_curve.curve_knn``, through which every search of the fit goes, or the
``knn`` of an older ``law.py``; the real search runs), in units of the reference search
(``N^2 / 2`` products: a leave-one-out search computes each pair once), and prints the fitted
dimension and constant with their bootstrap standard deviations.

``--law-file`` times the ``GapLaw`` of another copy of ``law.py`` instead (e.g. an older commit's,
``git show <commit>:gapcallback/law.py > /tmp/law_old.py``), for a before/after comparison on the
same machine.

Run:  python benchmarks/law/bench_fit_cost.py [--n 20000 --m 5000 --dim 64 --data sphere]
(about a minute per round at the default size on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from gapcallback import functional as F


def make_data(n: int, m: int, dim: int, data: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training and ``m`` reference points, float32: uniform on S^(dim-1) or Gaussian."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, dim, generator=g)
    if data == "sphere":
        x = x / x.norm(dim=1, keepdim=True)
    return x[:n], x[n:]


def load_law_module(path: str | None) -> ModuleType:
    if path is None:
        import gapcallback.law as law

        return law
    spec = importlib.util.spec_from_file_location("gapcallback_law_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def search_hook(law_module: ModuleType, law_file: str | None) -> tuple[ModuleType, str]:
    """The module and name of the function every search of the fit goes through."""
    if law_file is None:
        from gapcallback.functional import gap_curve

        return gap_curve, "curve_knn"
    return law_module, "knn"  # an older, single-file law.py


def count_searches(module: ModuleType, name: str, run: Callable[[], Any]) -> tuple[Any, int, float]:
    """Run ``run()`` with a counting wrapper around ``module.<name>``; return (result, calls,
    pairs)."""
    real = getattr(module, name)
    calls = 0
    pairs = 0.0

    def spy(queries: torch.Tensor, points: torch.Tensor, k: int = 1, **kwargs: Any) -> Any:
        nonlocal calls, pairs
        calls += 1
        same = kwargs.get("exclude_self", False) and queries is points
        q, p = queries.shape[0], points.shape[0]
        pairs += q * p / 2 if same else q * p
        return real(queries, points, k, **kwargs)

    setattr(module, name, spy)
    try:
        result = run()
    finally:
        setattr(module, name, real)
    return result, calls, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="training points")
    parser.add_argument("--m", type=int, default=5000, help="reference points")
    parser.add_argument("--dim", type=int, default=64, help="ambient dimension")
    parser.add_argument("--data", choices=("sphere", "gaussian"), default="sphere")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--law-file", default=None, help="time the GapLaw of this law.py instead")
    args = parser.parse_args()

    law_module = load_law_module(args.law_file)
    train, reference = make_data(args.n, args.m, args.dim, args.data, args.seed)
    pool = torch.cat([train, reference])
    big_n = pool.shape[0]

    def fit() -> Any:
        return law_module.GapLaw.fit(train, reference, seed=args.seed)

    F.knn(pool[:2000], pool[:2000], 1, exclude_self=True)  # warm-up
    law, calls, pairs = count_searches(*search_hook(law_module, args.law_file), fit)
    search_times, fit_times = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        F.knn(pool, pool, 1, exclude_self=True)
        search_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        fit()
        fit_times.append(time.perf_counter() - t)
    search, fitted = statistics.median(search_times), statistics.median(fit_times)
    print(
        f"n={args.n} m={args.m} D={args.dim} {args.data}, torch threads "
        f"{torch.get_num_threads()}, law from {args.law_file or 'gapcallback.law'}"
    )
    print(f"one knn(pool, pool, 1, exclude_self=True): median {search:.3f} s  {search_times}")
    print(f"GapLaw.fit:                                median {fitted:.3f} s  {fit_times}")
    print(f"ratio (single-search equivalents, time):   {fitted / search:.1f}")
    print(
        f"kNN searches: {calls} calls, {pairs / (big_n * big_n / 2):.2f} leave-one-out searches "
        "of the pool in pair products"
    )
    print(
        f"dimension {law.dimension:.4f} +- {law.dimension_std:.4f}, "
        f"constant {law.constant:.5f} +- {law.constant_std:.5f}"
    )


if __name__ == "__main__":
    main()
