"""Precision/recall, density/coverage: ours against clovaai/prdc and torch-fidelity's PRC.

Same features, same process. Three parts:

1. ``values``: Gaussian and manifold features (D = 64, float32, where float32 arithmetic is
   accurate) at every size the peers fit; ours, prdc's ``compute_prdc`` and torch-fidelity's
   ``calculate_precision_recall_full`` (``_part`` where the full matrices do not fit), and a
   float64 brute-force oracle with closed balls up to ``--oracle-max`` points.
2. ``exactness``: near-duplicate features far from the origin, exact duplicates, identical real
   and fake sets (N = M = 2000), every method against the float64 oracle.
3. ``cost``: wall time (median of ``--repeats`` runs up to N = 20000, one run beyond, after a
   warm-up call of each method) and peak extra memory (resident set size sampled every millisecond
   by a thread, minus the value before the call, freed heap memory handed back first) of each
   method, at each ``--sizes`` (peers only where their estimated peak fits in 70% of the
   available memory).

Peers are not dependencies of the project: install them apart, without their dependencies
(PyPI's torchvision is a CUDA build that breaks torchmetrics here), and pass ``--peers DIR``::

    pip install --no-deps --target /tmp/peers torch-fidelity prdc
    python benchmarks/knn_family/bench_knn_family.py --sizes 10000 50000 200000 \\
        --json benchmarks/results/knn_family.json

torch-fidelity's package ``__init__`` imports torchvision (its feature extractors), so its PRC
module ``torch_fidelity/metric_prc.py`` is loaded from its source file with ``importlib``, its
package registered as a bare namespace and the one torchvision-dependent import it names
(``torch_fidelity.utils``: feature extraction, unused by the PRC functions) replaced by a stub;
the PRC code itself runs unmodified. prdc is imported normally (numpy + scikit-learn).

Before any numpy peer is timed, the script prints the BLAS libraries threadpoolctl reports
(OpenBLAS kernel, threads).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc as garbage
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gapcallback import functional as F

K_PR = 3  # Kynkäänniemi et al. (and torch-fidelity's default neighbourhood)
K_DC = 5  # Naeem et al. (prdc's README)


# --- peers ------------------------------------------------------------------------------------


def load_peers(folder: str) -> dict[str, Any]:
    """``{"prdc": compute_prdc, "tf_full": ..., "tf_part": ...}`` from the target dir ``folder``."""
    peers: dict[str, Any] = {}
    root = Path(folder)
    if not root.is_dir():
        print(f"peers folder {folder} not found: peers skipped")
        return peers
    # Loaded from their files, never by putting the folder on sys.path: torchmetrics imports a
    # torch_fidelity it finds there (and torch_fidelity needs torchvision).
    prdc_file = root / "prdc" / "prdc.py"
    if prdc_file.is_file():
        spec = importlib.util.spec_from_file_location("prdc_peer", prdc_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # numpy and scikit-learn only
        peers["prdc"] = module.compute_prdc
        print(f"prdc loaded from {prdc_file}")
    else:
        print(f"prdc not found in {folder}: skipped")
    tf_dir = root / "torch_fidelity"
    if (tf_dir / "metric_prc.py").is_file():
        package = types.ModuleType("torch_fidelity")
        package.__path__ = [str(tf_dir)]  # a bare package: its __init__ (torchvision) never runs
        sys.modules["torch_fidelity"] = package
        stub = types.ModuleType("torch_fidelity.utils")

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("torch_fidelity.utils needs torchvision: not loaded")

        for name in (
            "create_feature_extractor",
            "extract_featuresdict_from_input_id_cached",
            "resolve_feature_extractor",
            "resolve_feature_layer_for_metric",
        ):
            setattr(stub, name, unavailable)
        sys.modules["torch_fidelity.utils"] = stub
        spec = importlib.util.spec_from_file_location(
            "torch_fidelity.metric_prc", tf_dir / "metric_prc.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        peers["tf_full"] = module.calculate_precision_recall_full
        peers["tf_part"] = module.calculate_precision_recall_part
        version = (root / "torch_fidelity" / "version.py").read_text().strip()
        print(f"torch-fidelity PRC loaded from {tf_dir / 'metric_prc.py'} ({version})")
    return peers


def blas_report() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries threadpoolctl sees (printed before any numpy peer is timed)."""
    import sklearn.metrics  # noqa: F401  (load the libraries prdc uses)
    from threadpoolctl import threadpool_info

    info = threadpool_info()
    for lib in info:
        kernel = lib.get("architecture", "-")
        print(
            f"threadpoolctl: {lib.get('internal_api')} {lib.get('version')} kernel={kernel} "
            f"threads={lib.get('num_threads')} ({Path(lib.get('filepath', '')).name})"
        )
    return info


# --- data -------------------------------------------------------------------------------------


def gaussian(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, dim, generator=g)
    fake = torch.randn(n, dim, generator=g) * 1.1 + 0.05
    return real, fake


def manifold(n: int, dim: int, seed: int, intrinsic: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A curved ``intrinsic``-manifold (a product of circles) in R^dim, randomly rotated; the fakes
    cover the angles unevenly (a mode-dropping model)."""
    g = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(7)))[0]

    def embed(angles: torch.Tensor) -> torch.Tensor:
        x = torch.cat([angles.cos(), angles.sin()], dim=1)  # [n, 2 * intrinsic // 2]
        return torch.cat([x, torch.zeros(x.shape[0], dim - x.shape[1])], dim=1) @ rotation.T

    half = intrinsic // 2
    real = embed(2 * math.pi * torch.rand(n, half, generator=g))
    fake = embed(2 * math.pi * torch.rand(n, half, generator=g).pow(1.3))
    return real, fake


# --- the float64 oracle -----------------------------------------------------------------------


def _sq_blocks(a: torch.Tensor, b: torch.Tensor, block: int = 1024):
    """Float64 squared distances by direct difference (``cdist`` without the GEMM), row blocks."""
    for s in range(0, a.shape[0], block):
        d = torch.cdist(a[s : s + block], b, compute_mode="donot_use_mm_for_euclid_dist")
        yield s, d.square_()


def oracle(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """Precision, recall, density, coverage, float64 brute force: closed balls for precision and
    recall, open balls with their centre for density and coverage (gapcallback's conventions)."""
    r, f = real.double(), fake.double()

    def radii(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], dtype=torch.float64)
        for s, d in _sq_blocks(x, x):
            out[s : s + d.shape[0]] = d.kthvalue(k + 1, dim=1).values  # self at 0 is the first
        return out

    rr, rf = radii(r), radii(f)
    in_real = torch.zeros(f.shape[0], dtype=torch.float64)  # closed balls containing each fake
    in_open = torch.zeros(f.shape[0], dtype=torch.float64)  # open balls (+ centre) containing it
    recall_hits = torch.zeros(r.shape[0], dtype=torch.bool)
    covered = torch.zeros(r.shape[0], dtype=torch.bool)
    for s, d in _sq_blocks(r, f):
        rows = slice(s, s + d.shape[0])
        in_real += (d <= rr[rows, None]).sum(0)
        inside_open = (d < rr[rows, None]) | (d == 0)
        in_open += inside_open.sum(0)
        covered[rows] = inside_open.any(1)
        recall_hits[rows] = (d <= rf[None, :]).any(1)
    return {
        "precision": float((in_real > 0).double().mean()),
        "recall": float(recall_hits.double().mean()),
        "density": float(in_open.mean() / k),
        "coverage": float(covered.double().mean()),
    }


# --- the methods ------------------------------------------------------------------------------


def ours_pr(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    p, r = F.precision_recall(real, fake, k=k)
    return {"precision": float(p), "recall": float(r)}


def ours_dc(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    d, c = F.density_coverage(real, fake, k=k)
    return {"density": float(d), "coverage": float(c)}


def ours_all(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """The four values with one k, sharing the radii and passes (prdc's ``compute_prdc``)."""
    return {
        key: float(v)
        for key, v in F.precision_recall_density_coverage(real, fake, k)._asdict().items()
    }


def ours_separate(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    """The two public calls, each on its own (the real radii computed twice)."""
    return {**ours_pr(real, fake, k), **ours_dc(real, fake, k)}


def prdc_all(peers: dict, real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the set sizes
        out = peers["prdc"](real.numpy(), fake.numpy(), nearest_k=k)
    return {key: float(v) for key, v in out.items()}


def tf_pr(peers: dict, real: torch.Tensor, fake: torch.Tensor, k: int, part: bool) -> dict:
    fn = peers["tf_part" if part else "tf_full"]
    p, r = fn(fake, real, neighborhood=k, batch_size=10000)  # features_1 is the generated set
    return {"precision": float(p), "recall": float(r)}


# --- cost -------------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident set size during a ``with`` block, sampled every millisecond, minus the RSS at
    its start (bytes)."""

    def __enter__(self) -> PeakRSS:
        garbage.collect()
        _trim()  # hand freed heap memory back, so that the baseline is what is live
        self.base = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


def estimated_peak(method: str, n: int, m: int) -> float:
    """Bytes a peer needs at its peak (its full matrices), to skip what cannot fit."""
    big = max(n, m)
    if method == "prdc":  # float32 N x N distances + int64 argpartition indices of that shape
        return 12.0 * big * big + 6.0 * n * m
    if method == "tf_full":  # N x N float32 blocks and their concatenation
        return 8.0 * big * big + 8.0 * n * m
    if method == "tf_part":  # one 10000-row block of distances, twice (blocks and concatenation)
        return 8.0 * min(10000, big) * big
    return 0.0


def _fits(method: str, n: int) -> bool:
    return estimated_peak(method, n, n) < 0.7 * _available()


def timed(fn: Any, *fn_args: Any) -> tuple[float, int, Any]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn(*fn_args)
        seconds = time.perf_counter() - start
    return seconds, mem.extra, out


# --- the parts --------------------------------------------------------------------------------


def values_part(peers: dict, sizes: list[int], dim: int, oracle_max: int) -> list[dict]:
    rows = []
    for n in sizes:
        for family, make in (("gaussian", gaussian), ("manifold", manifold)):
            real, fake = make(n, dim, seed=n)
            row: dict[str, Any] = {"family": family, "n": n}
            row["ours_k3"] = ours_separate(real, fake, K_PR)
            row["ours_k5"] = ours_separate(real, fake, K_DC)
            assert ours_all(real, fake, K_DC) == row["ours_k5"]
            if "prdc" in peers and _fits("prdc", n):
                row["prdc_k5"] = prdc_all(peers, real, fake, K_DC)
                row["prdc_k3"] = prdc_all(peers, real, fake, K_PR)
            if "tf_full" in peers:
                part = not _fits("tf_full", n)
                row["tf_k3" + ("_part" if part else "")] = tf_pr(peers, real, fake, K_PR, part)
            if n <= oracle_max:
                row["oracle_k3"] = oracle(real, fake, K_PR)
                row["oracle_k5"] = oracle(real, fake, K_DC)
            row["differences"] = differences(row)
            rows.append(row)
            print(_values_line(row))
            print("    |ours - peer| > 1e-6: " + (", ".join(row["differences"]) or "none"))
    return rows


def differences(row: dict) -> list[str]:
    """``peer.quantity: ours - peer`` for every value of a peer (or the oracle) that differs from
    ours (same k) by more than 1e-6."""
    out = []
    for key, vals in row.items():
        if not isinstance(vals, dict) or key.startswith("ours"):
            continue
        k = key.split("_k")[1][0]
        for quantity, v in vals.items():
            diff = row[f"ours_k{k}"][quantity] - v
            if abs(diff) > 1e-6:
                out.append(f"{key}.{quantity}: {diff:+.2e}")
    return out


def _values_line(row: dict) -> str:
    parts = [f"{row['family']:9s} N=M={row['n']:6d}"]
    for key, vals in row.items():
        if isinstance(vals, dict):
            parts.append(f"{key}: " + " ".join(f"{q[0]}={v:.6f}" for q, v in vals.items()))
    return " | ".join(parts)


def exactness_part(peers: dict, n: int, dim: int) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(n, dim, generator=g)
    cases = {
        # features far from the origin with tiny differences: fakes are near-copies of reals
        "near-duplicates, offset 1e3": (
            1e3 + 1e-2 * base,
            1e3 + 1e-2 * base + 1e-4 * torch.randn(n, dim, generator=g),
        ),
        # every real point 4 times: its 3-NN radius is 0; the fakes are the same points
        "exact duplicates (x4)": (base[: n // 4].repeat(4, 1), base[: n // 4].repeat(4, 1).flip(0)),
        "identical sets": (base, base.clone()),
    }
    rows = []
    for name, (real, fake) in cases.items():
        row: dict[str, Any] = {"case": name, "n": n}
        row["oracle_k3"] = oracle(real, fake, K_PR)
        row["ours_k3"] = ours_separate(real, fake, K_PR)
        if "prdc" in peers:
            row["prdc_k3"] = prdc_all(peers, real, fake, K_PR)
        if "tf_full" in peers:
            row["tf_k3"] = tf_pr(peers, real, fake, K_PR, part=False)
        row["differences"] = differences(row)
        rows.append(row)
        print(f"{name:28s} " + _values_line({"family": "", "n": n, **{
            k: v for k, v in row.items() if isinstance(v, dict)}}))  # fmt: skip
        print("    |ours - peer| > 1e-6: " + (", ".join(row["differences"]) or "none"))
    return rows


def cost_part(peers: dict, sizes: list[int], dim: int, repeats: int) -> list[dict]:
    rows = []
    warm_real, warm_fake = gaussian(500, dim, seed=0)
    for fn, fn_args in (
        (ours_all, (warm_real, warm_fake, K_DC)),
        (ours_pr, (warm_real, warm_fake, K_PR)),
    ):
        fn(*fn_args)  # first calls: imports, thread pools, the engine's cost-model probes
    if "prdc" in peers:
        prdc_all(peers, warm_real, warm_fake, K_DC)
    if "tf_full" in peers:
        tf_pr(peers, warm_real, warm_fake, K_PR, part=False)
    for n in sizes:
        real, fake = gaussian(n, dim, seed=n)
        entry: dict[str, Any] = {"n": n, "dim": dim}
        runs: list[tuple[str, str, Any, tuple]] = [
            ("ours precision_recall (k=3)", "ours", ours_pr, (real, fake, K_PR)),
            ("ours density_coverage (k=5)", "ours", ours_dc, (real, fake, K_DC)),
            ("ours all four (k=5)", "ours", ours_all, (real, fake, K_DC)),
            ("ours PR + DC calls (k=5)", "ours", ours_separate, (real, fake, K_DC)),
        ]
        if "prdc" in peers:
            runs.append(("prdc compute_prdc (k=5)", "prdc", prdc_all, (peers, real, fake, K_DC)))
        if "tf_full" in peers:
            for method, part in (("tf_full", False), ("tf_part", True)):
                label = f"torch-fidelity PRC {method[3:]} (k=3)"
                runs.append((label, method, tf_pr, (peers, real, fake, K_PR, part)))
        for name, method, fn, fn_args in runs:
            need = estimated_peak(method, n, n)
            if not _fits(method, n):
                entry[name] = {"skipped": f"needs ~{need / 2**30:.0f} GiB"}
                print(f"N=M={n:6d} {name:32s} skipped (needs ~{need / 2**30:.0f} GiB)")
                continue
            times, extras = [], []
            for _ in range(repeats if n <= 20000 else 1):
                seconds, extra, out = timed(fn, *fn_args)
                times.append(seconds)
                extras.append(extra)
            seconds, extra = statistics.median(times), max(extras)
            entry[name] = {"seconds": seconds, "all_seconds": times, "peak_extra_bytes": extra,
                           "values": out}  # fmt: skip
            print(f"N=M={n:6d} {name:32s} {seconds:9.2f} s  peak +{extra / 2**20:9.1f} MiB")
        rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--peers", default="/tmp/peers")
    parser.add_argument("--oracle-max", type=int, default=10000)
    parser.add_argument("--exact-n", type=int, default=2000)
    parser.add_argument("--parts", nargs="+", default=["values", "exactness", "cost"])
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs up to N = 20000 (median)"
    )
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads and BLAS threads (threadpoolctl) for every method; "
                        "prdc's scikit-learn call keeps its own n_jobs=8")  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        limits = threadpool_limits(limits=args.threads)  # noqa: F841  (kept for the whole run)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}")  # fmt: skip
    peers = load_peers(args.peers)
    blas = blas_report()  # before any numpy peer runs
    result: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "blas": blas, "sizes": args.sizes, "dim": args.dim}  # fmt: skip
    if "values" in args.parts:
        print("\n== values (same features, same process) ==")
        value_sizes = [n for n in args.sizes if n <= 50000]
        result["values"] = values_part(peers, value_sizes, args.dim, args.oracle_max)
    if "exactness" in args.parts:
        print("\n== exactness ==")
        result["exactness"] = exactness_part(peers, args.exact_n, args.dim)
    if "cost" in args.parts:
        print("\n== cost (one call each; peak extra resident memory) ==")
        result["cost"] = cost_part(peers, args.sizes, args.dim, args.repeats)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
