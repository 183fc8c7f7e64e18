"""Exact low-dimension search: cKDTree backend vs the GEMM engine vs faiss, side by side.

Measures what ``gapcallback.search.kdtree.prefer_kdtree``'s cost model needs (issue 13, part 2):

* ``kdtree_knn``: the exact backend (cKDTree window + float64 re-check + tie handling);
* ``cKDTree``: scipy's tree alone, build + query of ``k`` neighbours (its own distances);
* ``gemm``: ``gapcallback.functional.knn`` with the GEMM backend (the current engine);
* ``faiss``: ``IndexFlatL2`` add + search (float32, brute force), if faiss is importable.

Grid: D in {2, 3, 4, 6, 8, 12, 16}; N = M in {2000, 10000, 50000, 100000} (100000 only for D <= 4
unless ``--full``); k in {1, 10}; data ``uniform`` in [0, 1]^D and ``manifold2``, a smooth 2-D
manifold embedded in D dimensions (for D = 2, a warped square). Inputs are float32, as
representations usually are. Same threads for everyone (``--threads``, default torch's).

Timing: after one warm-up call each, ``--repeats`` rounds run the methods in rotating order on the
same data; medians per method, and medians of the per-round ratios to the GEMM engine. Each row
also checks that ``kdtree_knn`` returns exactly the GEMM engine's indices and distances.

Usage::

    python benchmarks/bench_kdtree.py                 # grid above (tens of minutes on 2 cores)
    python benchmarks/bench_kdtree.py --full          # also N = 100000 for D > 4
    python benchmarks/bench_kdtree.py --self          # also leave-one-out (exclude_self=True)
    python benchmarks/bench_kdtree.py --quick --out /tmp/kdtree_quick.json   # smoke test

Prints the environment (CPU model, threadpoolctl's BLAS libraries with their OpenBLAS core type),
a markdown table and the smallest N at which ``kdtree_knn`` beats the GEMM engine; writes JSON to
``benchmarks/results/kdtree.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import torch
from scipy.spatial import cKDTree

from gapcallback.functional import knn
from gapcallback.search.kdtree import kdtree_knn, prefer_kdtree

try:
    import faiss
except ImportError:  # faiss-cpu is a dev extra
    faiss = None

RESULTS = Path(__file__).parent / "results"
DIMS = (2, 3, 4, 6, 8, 12, 16)
SIZES = (2000, 10000, 50000, 100000)
KS = (1, 10)
DATA = ("uniform", "manifold2")
BIG = 100000  # sizes from here on run only for D <= BIG_MAX_DIM unless --full
BIG_MAX_DIM = 4

Method = Callable[[torch.Tensor, torch.Tensor, int, bool], Any]


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def blas_libraries() -> list[dict[str, Any]]:
    """threadpoolctl's view of the loaded BLAS/OpenMP libraries, with who loaded them."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl is not installed"}]
    out = []
    for lib in threadpool_info():
        path = str(lib.get("filepath", ""))
        owner = next((o for o in ("faiss", "numpy", "scipy", "torch") if o in path), "other")
        out.append(
            {
                "owner": owner,
                "user_api": lib.get("user_api"),
                "internal_api": lib.get("internal_api"),
                "version": lib.get("version"),
                "architecture": lib.get("architecture"),  # OpenBLAS core type (Haswell, ...)
                "threading_layer": lib.get("threading_layer"),
                "num_threads": lib.get("num_threads"),
                "filepath": path,
            }
        )
    return out


def environment(threads: int) -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "faiss": getattr(faiss, "__version__", None) if faiss is not None else None,
        "blas": blas_libraries(),
    }


def print_environment(env: dict[str, Any]) -> None:
    print(f"CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs), {env['threads']} threads")
    print(f"torch {env['torch']}, numpy {env['numpy']}, scipy {env['scipy']}, faiss {env['faiss']}")
    for lib in env["blas"]:
        if "error" in lib:
            print(f"threadpoolctl: {lib['error']}")
            continue
        core = lib["architecture"] or "-"
        print(
            f"  {lib['owner']:>6}: {lib['internal_api']} {lib['version']} core={core} "
            f"threads={lib['num_threads']} layer={lib['threading_layer']} ({lib['filepath']})"
        )
    generic = [lib["owner"] for lib in env["blas"] if lib.get("architecture") == "Prescott"]
    if generic:  # OpenBLAS did not recognise the CPU: its timings would not be the peer's own
        print(
            f"warning: {', '.join(generic)}'s OpenBLAS runs its generic Prescott kernels: set "
            "OPENBLAS_CORETYPE to the CPU's family (e.g. SkylakeX, Haswell, Zen)"
        )
    print()


# ------------------------------------------------------------------------------------------------
# data and methods
# ------------------------------------------------------------------------------------------------


def make_data(kind: str, n: int, dim: int, seed: int) -> torch.Tensor:
    """``[n, dim]`` float32: uniform in [0, 1]^dim, or a smooth 2-D manifold embedded in dim."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, dim, generator=g)
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    # Fixed embedding (seed 0): coordinates sin(pi (a u1 + b u2) + phase), after u itself.
    e = torch.Generator().manual_seed(0)
    freq = torch.rand(2, max(dim - 2, 0), generator=e, dtype=torch.float64) * 4 - 2
    phase = torch.rand(max(dim - 2, 0), generator=e, dtype=torch.float64) * math.pi
    if dim == 2:  # a warped square: still 2-D, non-uniform density
        return torch.stack([u[:, 0], u[:, 1] + 0.3 * torch.sin(math.pi * u[:, 0])], 1).float()
    return torch.cat([u, torch.sin(math.pi * (u @ freq) + phase)], dim=1).float()


_KNN_HAS_BACKEND = "backend" in inspect.signature(knn).parameters


def run_gemm(q: torch.Tensor, x: torch.Tensor, k: int, self_: bool) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {"exclude_self": self_}
    if _KNN_HAS_BACKEND:
        kwargs["backend"] = "gemm"
    return tuple(knn(q, x, k, **kwargs))


def run_kdtree(q: torch.Tensor, x: torch.Tensor, k: int, self_: bool) -> tuple[Any, Any]:
    return kdtree_knn(q, x, k, exclude_self=self_)


def run_ckdtree(q: torch.Tensor, x: torch.Tensor, k: int, self_: bool) -> tuple[Any, Any]:
    data = x.to(torch.float64).numpy()
    tree = cKDTree(data, copy_data=False)
    queries = data if self_ else q.to(torch.float64).numpy()
    return tree.query(queries, k=k + (1 if self_ else 0), workers=torch.get_num_threads())


def run_faiss(q: torch.Tensor, x: torch.Tensor, k: int, self_: bool) -> tuple[Any, Any]:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x.numpy())
    return index.search(q.numpy(), k + (1 if self_ else 0))


def methods() -> dict[str, Method]:
    out: dict[str, Method] = {"kdtree_knn": run_kdtree, "cKDTree": run_ckdtree, "gemm": run_gemm}
    if faiss is not None:
        out["faiss"] = run_faiss
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def time_case(kind: str, dim: int, n: int, k: int, self_: bool, repeats: int) -> dict[str, Any]:
    x = make_data(kind, n, dim, seed=1)
    q = x if self_ else make_data(kind, n, dim, seed=2)
    fns = methods()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    for name in names:  # warm-up (and the results checked below)
        results[name] = fns[name](q, x, k, self_)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name](q, x, k, self_)
            times[name].append(time.perf_counter() - start)
    kd_d, kd_i = results["kdtree_knn"]
    gm_d, gm_i = results["gemm"]
    exact = bool(torch.equal(kd_i, gm_i)) and bool(torch.equal(kd_d.to(gm_d.dtype), gm_d))
    row: dict[str, Any] = {
        "data": kind,
        "dim": dim,
        "n": n,
        "m": n,
        "k": k,
        "exclude_self": self_,
        "repeats": repeats,
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratio_to_gemm": {
            name: statistics.median(a / b for a, b in zip(t, times["gemm"], strict=True))
            for name, t in times.items()
            if name != "gemm"
        },
        "kdtree_equals_gemm": exact,
        "prefer_kdtree": prefer_kdtree(n, n, dim, k, device=torch.device("cpu")),
    }
    if "faiss" in times:
        row["kdtree_to_faiss"] = statistics.median(
            a / b for a, b in zip(times["kdtree_knn"], times["faiss"], strict=True)
        )
    return row


def grid(args: argparse.Namespace) -> list[tuple[str, int, int, int, bool]]:
    if args.quick:
        dims, sizes, ks = (2, 8), (400, 1000), KS
    else:
        dims, sizes, ks = DIMS, SIZES, KS
    dims = args.dims or dims
    sizes = args.sizes or sizes
    ks = args.ks or ks
    data = args.data or DATA
    modes = (False, True) if args.self else (False,)
    cases = []
    for self_, kind, dim, k, n in itertools.product(modes, data, dims, ks, sizes):
        if n >= BIG and dim > BIG_MAX_DIM and not args.full:
            continue
        cases.append((kind, dim, n, k, self_))
    return cases


def print_table(rows: list[dict[str, Any]]) -> None:
    names = list(rows[0]["seconds"])
    head = ["data", "D", "N=M", "k", "self", *[f"{m} (s)" for m in names]]
    head += ["kdtree/gemm", "kdtree/faiss", "exact", "prefer"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        cells = [
            r["data"],
            str(r["dim"]),
            str(r["n"]),
            str(r["k"]),
            "y" if r["exclude_self"] else "",
        ]
        cells += [f"{r['seconds'][m]:.4f}" for m in names]
        cells.append(f"{r['ratio_to_gemm']['kdtree_knn']:.3f}")
        cells.append(f"{r['kdtree_to_faiss']:.3f}" if "kdtree_to_faiss" in r else "-")
        cells.append("yes" if r["kdtree_equals_gemm"] else "NO")
        cells.append("yes" if r["prefer_kdtree"] else "")
        print("| " + " | ".join(cells) + " |")
    print()


def crossover(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (mode, data, D, k): the smallest N from which kdtree_knn beats the GEMM engine at every
    larger size measured (None: never), to set ``prefer_kdtree``'s constants."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["exclude_self"], r["data"], r["dim"], r["k"]), []).append(r)
    out = []
    for (self_, kind, dim, k), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["n"])
        wins = [r["ratio_to_gemm"]["kdtree_knn"] < 1.0 for r in rs]
        first = None
        for i in range(len(rs)):
            if all(wins[i:]):
                first = rs[i]["n"]
                break
        out.append(
            {
                "exclude_self": self_,
                "data": kind,
                "dim": dim,
                "k": k,
                "kdtree_wins_from_n": first,
                "ratios": {r["n"]: round(r["ratio_to_gemm"]["kdtree_knn"], 4) for r in rs},
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid, for a smoke test")
    parser.add_argument("--full", action="store_true", help="N = 100000 for every D")
    parser.add_argument("--self", action="store_true", help="also leave-one-out searches")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 5; quick 2)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="ambient dimensions")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="N = M values")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="neighbour counts")
    parser.add_argument("--data", nargs="+", default=None, choices=DATA, help="data kinds")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "kdtree.json")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    repeats = args.repeats or (2 if args.quick else 5)
    env = environment(threads)
    print_environment(env)
    rows = []
    cases = grid(args)
    for i, (kind, dim, n, k, self_) in enumerate(cases, 1):
        row = time_case(kind, dim, n, k, self_, repeats)
        rows.append(row)
        secs = ", ".join(f"{m} {s:.4f}s" for m, s in row["seconds"].items())
        flag = "" if row["kdtree_equals_gemm"] else "  MISMATCH"
        print(
            f"[{i}/{len(cases)}] {kind} D={dim} N={n} k={k} self={self_}: {secs}{flag}", flush=True
        )
    print()
    print_table(rows)
    summary = crossover(rows)
    print("kdtree_knn beats the GEMM engine from N = M =")
    for s in summary:
        mode = "self " if s["exclude_self"] else ""
        print(f"  {mode}{s['data']:>9} D={s['dim']:>2} k={s['k']:>2}: {s['kdtree_wins_from_n']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "repeats": repeats,
        "quick": args.quick,
        "rows": rows,
        "crossover": summary,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if not all(r["kdtree_equals_gemm"] for r in rows):
        raise SystemExit("kdtree_knn differs from the GEMM engine on some rows (see MISMATCH)")


if __name__ == "__main__":
    main()
