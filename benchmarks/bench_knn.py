"""F.knn / F.representation_gap vs faiss IndexFlatL2 vs torch.cdist, side by side in one process.

Usage::

    python benchmarks/bench_knn.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_knn.py --quick    # small shapes, for a smoke test

Timing: medians of alternating runs (ours, faiss, cdist, ours, ...), same data, same threads;
faiss is timed building the index and searching (both sides start from two raw arrays).
Memory: peak resident-set growth of a fresh subprocess over its inputs (``ru_maxrss``).
Accuracy: offset near-duplicates (||x||^2 ~ 5e4, d^2 ~ 1e-4..1e-3) and exact duplicates.
Writes ``benchmarks/results/knn.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from gapcallback.functional import knn, representation_gap
from gapcallback.search import default_blocks

RESULTS = Path(__file__).parent / "results"


def ours_knn(q: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    return knn(q, x, 1).sq_dists[:, 0].numpy()


def ours_gap(q: torch.Tensor, x: torch.Tensor) -> float:
    return float(representation_gap(q, x))


def faiss_knn(q: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x.numpy())
    dist, _ = index.search(q.numpy(), 1)
    return dist[:, 0]


def cdist_knn(q: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    return (torch.cdist(q, x).min(dim=1).values ** 2).numpy()


def gemm_alone(
    q: torch.Tensor,
    x: torch.Tensor,
    block: tuple[int, int] | None = None,
) -> None:
    """The floor of any exact GEMM-based search: the blocked product ``F.knn`` runs (augmented
    ``K = D + 1`` operands, its default blocks for ``D``, one reused buffer), with no screening
    or re-check."""
    block = block or default_blocks(q.shape[1])
    q_aug = torch.cat([q, torch.ones(q.shape[0], 1)], dim=1)
    x_aug = torch.cat([x, x.square().sum(1, keepdim=True)], dim=1)
    buffer = torch.empty(block[0] * block[1])
    for s in range(0, q.shape[0], block[0]):
        rows = q_aug[s : s + block[0]]
        for t in range(0, x.shape[0], block[1]):
            cols = x_aug[t : t + block[1]]
            out = buffer[: rows.shape[0] * cols.shape[0]].view(rows.shape[0], cols.shape[0])
            torch.mm(rows, cols.T, out=out)


METHODS = {
    "gapcallback knn": ours_knn,
    "gapcallback gap": ours_gap,
    "faiss": faiss_knn,
    "cdist": cdist_knn,
    "torch GEMM alone": gemm_alone,
}


def time_shape(n: int, dim: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, dim, generator=g)
    x = torch.randn(n, dim, generator=g)
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for fn in METHODS.values():  # warm-up
        fn(q[:256], x[:1024])
    for _ in range(repeats):
        for name, fn in METHODS.items():
            start = time.perf_counter()
            fn(q, x)
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["ratio"] = _ratio_median(times["gapcallback knn"], times["faiss"])
    out["gemm_ratio"] = _ratio_median(times["torch GEMM alone"], times["faiss"])
    return out


def _ratio_median(ours: list[float], peer: list[float]) -> float:
    """Median of the per-run ratios ours / peer (robust to slow phases of a shared machine)."""
    return statistics.median(o / p for o, p in zip(ours, peer, strict=True))


def time_leave_one_out(n: int, dim: int, repeats: int) -> dict[str, float]:
    """Neighbours of a set within itself (what every estimator runs): ours with ``exclude_self``
    (one product per block pair) vs faiss searching k=2 and dropping the point itself."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, dim, generator=g)

    def ours(x: torch.Tensor) -> np.ndarray:
        return knn(x, x, 1, exclude_self=True).sq_dists[:, 0].numpy()

    def peer(x: torch.Tensor) -> np.ndarray:
        index = faiss.IndexFlatL2(dim)
        index.add(x.numpy())
        dist, _ = index.search(x.numpy(), 2)
        return dist[:, 1]

    times: dict[str, list[float]] = {"gapcallback": [], "faiss": []}
    for _ in range(repeats):
        for name, fn in (("gapcallback", ours), ("faiss", peer)):
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["ratio"] = _ratio_median(times["gapcallback"], times["faiss"])
    return out


def accuracy(n: int = 20000, dim: int = 64) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, dim, generator=g) * 0.5 + 28.0  # ||x||^2 ~ 5e4
    samples = base + torch.randn(base.shape, generator=g) * 2e-3
    n_dup = n // 10
    samples[:n_dup] = base[:n_dup]
    truth = ((samples.double() - base.double()) ** 2).sum(1).numpy()
    out = {}
    for name, fn in (("gapcallback", ours_knn), ("faiss", faiss_knn), ("cdist", cdist_knn)):
        got = fn(samples, base).astype(np.float64)
        rel = np.abs(got[n_dup:] - truth[n_dup:]) / truth[n_dup:]
        out[name] = {
            "median_rel_err": float(np.median(rel)),
            "max_rel_err": float(np.max(rel)),
            "exact_duplicates_zero": float(np.mean(got[:n_dup] == 0.0)),
        }
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_child(method: str, n: int, dim: int) -> None:
    import threading

    fn = {"gapcallback": ours_knn, "faiss": faiss_knn, "cdist": cdist_knn}[method]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, dim, generator=g)
    x = torch.randn(n, dim, generator=g)
    fn(q[:64], x[:256])
    baseline = _rss_mb()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    fn(q, x)
    done.set()
    thread.join()
    print(json.dumps({"extra_mb": peak[0] - baseline}))


def peak_memory(n: int, dim: int) -> dict[str, float]:
    out = {}
    for method in ("gapcallback", "faiss", "cdist"):
        res = subprocess.run(
            [sys.executable, __file__, "--peak-child", method, str(n), str(dim)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[method] = json.loads(res.stdout.strip().splitlines()[-1])["extra_mb"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-child", nargs=3, metavar=("METHOD", "N", "D"))
    args = parser.parse_args()
    if args.peak_child:
        method, n, dim = args.peak_child
        _peak_child(method, int(n), int(dim))
        return
    shapes = [(2000, 64), (1000, 784)] if args.quick else [(20000, 64), (8000, 784)]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"faiss {faiss.__version__}, threads torch={torch.get_num_threads()} "
        f"faiss={faiss.omp_get_max_threads()}",
        "timing_s": {},
    }
    for n, dim in shapes:
        result["timing_s"][f"N=M={n}, D={dim}"] = time_shape(n, dim, args.repeats)
    result["leave_one_out_s"] = {
        f"N={n}, D={dim}": time_leave_one_out(n, dim, args.repeats) for n, dim in shapes
    }
    mem_n = 3000 if args.quick else 30000
    result["peak_extra_mb"] = {f"N=M={mem_n}, D=64": peak_memory(mem_n, 64)}
    result["accuracy"] = accuracy(2000 if args.quick else 20000)
    RESULTS.mkdir(exist_ok=True)
    name = "knn_quick.json" if args.quick else "knn.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"machine: {result['machine']}\n")
    print(
        "| shape | gapcallback knn (s) | gapcallback gap (s) | faiss IndexFlatL2 (s) | torch.cdist (s) "
        "| torch GEMM alone (s) | ours / faiss | GEMM alone / faiss |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape, t in result["timing_s"].items():
        print(
            f"| {shape} | {t['gapcallback knn']:.3f} | {t['gapcallback gap']:.3f} | {t['faiss']:.3f} "
            f"| {t['cdist']:.3f} | {t['torch GEMM alone']:.3f} | {t['ratio']:.2f}x "
            f"| {t['gemm_ratio']:.2f}x |"
        )
    print("\n| leave-one-out (k=1 other point) | gapcallback (s) | faiss k=2 (s) | ours / faiss |")
    print("|---|---|---|---|")
    for shape, t in result["leave_one_out_s"].items():
        print(f"| {shape} | {t['gapcallback']:.3f} | {t['faiss']:.3f} | {t['ratio']:.2f}x |")
    print("\n| peak extra memory | gapcallback | faiss | cdist |\n|---|---|---|---|")
    for shape, m in result["peak_extra_mb"].items():
        print(
            f"| {shape} | {m['gapcallback']:.0f} MB | {m['faiss']:.0f} MB | {m['cdist']:.0f} MB |"
        )
    print(
        "\n| offset near-duplicates | median rel. err of d^2 | max rel. err | exact duplicates -> 0 |"
    )
    print("|---|---|---|---|")
    for name, a in result["accuracy"].items():
        print(
            f"| {name} | {a['median_rel_err']:.2e} | {a['max_rel_err']:.2e} | {100 * a['exact_duplicates_zero']:.0f}% |"
        )


if __name__ == "__main__":
    main()
