"""Cost of each symmetry's exact orbit kNN relative to the plain exact kNN on the same data.

Run (single thread, low priority on shared machines)::

    nice -n 10 python benchmarks/symmetry/bench_symmetry.py

Writes ``benchmarks/symmetry/results.md``: median wall times of ``knn(queries, points, k=1)`` with
and without ``symmetry=``, the two timed alternately (plain, orbit, plain, orbit, ...) so that load
from other processes hits both alike, and the median of the per-repeat ratios orbit / plain.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gapcallback.functional import knn
from gapcallback.symmetry import CyclicShifts, FiniteGroup, Permutations, RigidMotions
from gapcallback.symmetry.central_split import central_split


def _search_label(sym, x: torch.Tensor) -> tuple[str, int | None]:
    """How the orbit search runs on points like ``x``, and the group order when finite."""
    if isinstance(sym, CyclicShifts) and sym.choose_method(x) == "fft":
        return "FFT screen", sym.order_on(x)
    if isinstance(sym, (FiniteGroup, CyclicShifts)):
        dim = x[0].numel()
        code = torch.arange(dim, dtype=torch.float64).reshape(1, *x.shape[1:])
        perms = sym.orbit(code).reshape(-1, dim).round().long()
        split = central_split(perms)
        if split is None:
            return "stacked GEMM", len(perms)
        n_h, n_e = split.cosets.shape[0], split.involutions.shape[0]
        return f"split GEMM ({n_h} cosets x {n_e})", len(perms)
    return "bounds + exact", None


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _alternating(plain, orbit, repeats: int) -> tuple[float, float, float]:
    """Median plain time, median orbit time and median per-repeat ratio, timed alternately."""
    plain()  # warm-up
    orbit()
    tp, to, ratios = [], [], []
    for _ in range(repeats):
        a = _timed(plain)
        b = _timed(orbit)
        tp.append(a)
        to.append(b)
        ratios.append(b / a)
    return statistics.median(tp), statistics.median(to), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.md"))
    parser.add_argument("--only", nargs="*", help="run only cases whose name contains a word")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    cases = [
        # (label, symmetry, |G| or dim G, queries, points)
        ("1-D signals [L=64]", "FiniteGroup.flips (|G|=2)", FiniteGroup.flips((-1,)), rand(1000, 64), rand(4000, 64)),
        ("images [3, 16, 16]", "FiniteGroup.rotations90 (|G|=4)", FiniteGroup.rotations90(), rand(500, 3, 16, 16), rand(2000, 3, 16, 16)),
        ("images [1, 16, 16]", "FiniteGroup.dihedral (|G|=8)", FiniteGroup.dihedral(), rand(500, 1, 16, 16), rand(2000, 1, 16, 16)),
        ("1-D signals [L=16]", "CyclicShifts (|G|=16)", CyclicShifts((-1,)), rand(1000, 16), rand(4000, 16)),
        ("1-D signals [L=64]", "CyclicShifts (|G|=64)", CyclicShifts((-1,)), rand(1000, 64), rand(4000, 64)),
        ("images [1, 16, 16]", "CyclicShifts 2-D (|G|=256)", CyclicShifts((-2, -1)), rand(500, 1, 16, 16), rand(2000, 1, 16, 16)),
        ("images [1, 16, 16]", "CyclicShifts 2-D (|G|=256), method=fft", CyclicShifts((-2, -1), method="fft"), rand(500, 1, 16, 16), rand(2000, 1, 16, 16)),
        ("images [3, 8, 8]", "CyclicShifts 2-D (|G|=64)", CyclicShifts((-2, -1)), rand(500, 3, 8, 8), rand(2000, 3, 8, 8)),
        ("images [3, 8, 8]", "CyclicShifts 2-D (|G|=64), method=fft", CyclicShifts((-2, -1), method="fft"), rand(500, 3, 8, 8), rand(2000, 3, 8, 8)),
        ("clouds [32, 3]", "RigidMotions (dim G=6)", RigidMotions(), rand(500, 32, 3), rand(2000, 32, 3)),
        ("sets [8, 2]", "Permutations (|G|=8!)", Permutations(), rand(200, 8, 2), rand(1000, 8, 2)),
        ("clouds [8, 3]", "Permutations x RigidMotions (local opt.)", Permutations(rigid=RigidMotions()), rand(10, 8, 3), rand(100, 8, 3)),
    ]  # fmt: skip
    rows = []
    for data, name, sym, q, x in cases:
        if args.only and not any(word in name for word in args.only):
            continue
        search, order = _search_label(sym, x)
        plain, orbit, ratio = _alternating(
            lambda q=q, x=x: knn(q, x, 1),
            lambda q=q, x=x, s=sym: knn(q, x, 1, symmetry=s),
            args.repeats,
        )
        rows.append((data, name, search, order, q.shape[0], x.shape[0], plain, orbit, ratio))
        print(
            f"{data:20s} {name:42s} {search:28s} plain {plain * 1e3:9.2f} ms  orbit {orbit * 1e3:10.2f} ms  x{ratio:8.1f}",
            flush=True,
        )

    lines = [
        "# Orbit kNN cost relative to the plain exact kNN",
        "",
        f"`knn(queries, points, k=1)`; {args.repeats} alternating runs (plain, orbit, plain, ...) after "
        "a warm-up; times are medians, the ratio is the median of the per-run ratios; "
        f"torch {torch.__version__}, {args.threads} thread(s), CPU ({platform.processor() or platform.machine()}), "
        "float32 inputs. Generated by `benchmarks/symmetry/bench_symmetry.py`. "
        f"1-minute load average at the end: {os.getloadavg()[0]:.1f} "
        f"({os.cpu_count()} cores); on a shared machine ratios vary by up to ~2x between runs.",
        "",
        "| data | symmetry | search | queries | points | plain (ms) | orbit (ms) | ratio "
        "| ratio / order | orbit µs / pair |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for data, name, search, order, n, m, plain, orbit, ratio in rows:
        cell = name.replace("|", "\\|")
        per_pair = orbit / (n * m) * 1e6
        rel = f"{ratio / order:.2f}" if order else "-"
        lines.append(
            f"| {data} | {cell} | {search} | {n} | {m} | {plain * 1e3:.1f} | {orbit * 1e3:.1f} | "
            f"{ratio:.1f}x | {rel} | {per_pair:.3g} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
