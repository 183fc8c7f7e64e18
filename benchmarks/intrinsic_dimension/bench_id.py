"""Accuracy of every intrinsic-dimension estimator vs the truth, with scikit-dimension side by side.

Run: ``nice -n 10 python benchmarks/intrinsic_dimension/bench_id.py`` (single-threaded, ~25 min on
one core). Writes ``accuracy.md`` next to this file (merged into ``results.md``). Every estimator
sees the same points (one seeded sample per manifold and n). Tables: the project's suite
(``manifolds.py``) at n = 2500 with scikit-dimension side by side, load_digits, the run time of the
default (first call with an empty calibration cache, then cached), scikit-dimension's own benchmark
suite (``skdim.datasets.BenchmarkManifolds``, n = 2500; needs pandas), and n = 500 / 20000.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

from gapcallback.functional import intrinsic_dimension
from gapcallback.functional.dimension_references import reference_stats

try:
    from manifolds import SUITE, by_name
except ImportError:  # run as a module from the repository root
    from benchmarks.intrinsic_dimension.manifolds import SUITE, by_name

HERE = Path(__file__).resolve().parent
PREVIOUS = "sphere-only k=5"  # the default of version 0.1: MLE(k=5) calibrated on spheres only
OURS = {
    "calibrated": {},
    PREVIOUS: {"k": 5, "references": ("sphere",)},
    "twonn": {},
    "twonn-lin": {"fit": "linear"},
    "mle(k=10)": {},
    "gap": {},
}
DANCO_MAX_D = 12  # skdim's DANCo is slow (it simulates every d up to D): run it on d <= 12 only


def ours(x: np.ndarray, name: str) -> float:
    method = {"twonn-lin": "twonn", "mle(k=10)": "mle", PREVIOUS: "calibrated"}.get(name, name)
    return float(intrinsic_dimension(torch.from_numpy(x), method, **OURS[name]))


def peers(x: np.ndarray, d: int) -> dict[str, float]:
    import skdim

    out = {
        "skdim TwoNN": float(skdim.id.TwoNN().fit(x).dimension_),
        "skdim MLE": float(skdim.id.MLE(K=10).fit(x).dimension_),
    }
    if d <= DANCO_MAX_D:
        out["skdim DANCo"] = float(skdim.id.DANCo(k=10, random_state=0).fit(x).dimension_)
    return out


def table(n: int, with_peers: bool) -> tuple[str, dict[str, list[float]]]:
    cols = list(OURS) + (["skdim TwoNN", "skdim MLE", "skdim DANCo"] if with_peers else [])
    rows, errs = [], {c: [] for c in cols}
    errs_main = {c: [] for c in cols}
    for m in SUITE:
        x = m.sample(n, np.random.default_rng(12345))
        vals = {c: ours(x, c) for c in OURS}
        if with_peers:
            vals.update(peers(x, m.d))
        cells = []
        for c in cols:
            if c in vals and np.isfinite(vals[c]):
                e = abs(vals[c] - m.d) / m.d
                errs[c].append(e)
                if m.name != "torus_18":
                    errs_main[c].append(e)
                cells.append(f"{vals[c]:.2f}")
            else:
                cells.append("-")
        rows.append(f"| {m.name} | {m.d} | {m.D} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    head = "| manifold | d | D | " + " | ".join(cols) + " |\n|" + "---|" * (3 + len(cols))
    mean = (
        "| **mean rel. error** | | | "
        + " | ".join(
            f"**{100 * np.mean(errs[c]):.1f}%**"
            + ("" if len(errs[c]) == len(SUITE) else f" ({len(errs[c])})")
            for c in cols
        )
        + " |"
    )
    mean2 = (
        "| mean rel. error without torus_18 | | | "
        + " | ".join(f"{100 * np.mean(errs_main[c]):.1f}%" for c in cols)
        + " |"
    )
    return "\n".join([head, *rows, mean, mean2]), errs


def digits_row() -> str:
    import skdim
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    vals = {c: ours(x, c) for c in OURS}
    vals.update(
        {
            "skdim TwoNN": float(skdim.id.TwoNN().fit(x).dimension_),
            "skdim MLE": float(skdim.id.MLE(K=10).fit(x).dimension_),
            "skdim DANCo": float(skdim.id.DANCo(k=10, random_state=0).fit(x).dimension_),
        }
    )
    head = "| data | " + " | ".join(vals) + " |\n|" + "---|" * (1 + len(vals))
    return (
        head
        + "\n| load_digits (1797 x 64) | "
        + " | ".join(f"{v:.2f}" for v in vals.values())
        + " |"
    )


def timing_table() -> str:
    """Run time of the default: first call with an empty calibration cache, then cached calls."""
    rows = []
    for n in (2500, 4000):
        for name in ("gaussian_10_in_30", "sphere_30_in_40"):
            x = torch.from_numpy(by_name(name).sample(n, np.random.default_rng(7)))
            reference_stats.cache_clear()  # the memo of the simulated references
            t0 = time.perf_counter()
            d = float(intrinsic_dimension(x))
            first = time.perf_counter() - t0
            cached, raw = [], []
            for _ in range(3):  # alternate, medians
                t0 = time.perf_counter()
                intrinsic_dimension(x)
                cached.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                intrinsic_dimension(x, "mle")
                raw.append(time.perf_counter() - t0)
            rows.append(
                f"| {name} | {n} | {d:.2f} | {first:.1f} | {np.median(cached):.3f} |"
                f" {np.median(raw):.3f} |"
            )
            print(rows[-1], flush=True)
    head = (
        "| data | n | estimate | first call (s, empty cache) | cached call (s) | raw mle (s) |\n"
        "|---|---|---|---|---|---|"
    )
    return "\n".join([head, *rows])


def skdim_suite_table(n: int = 2500) -> str:
    """scikit-dimension's standard benchmark (``BenchmarkManifolds``): ours vs its TwoNN and MLE."""
    import skdim

    bm = skdim.datasets.BenchmarkManifolds(random_state=0)
    data = bm.generate(n=n)
    truth = bm.truth["Intrinsic Dimension"]
    cols = ["calibrated", PREVIOUS, "skdim TwoNN", "skdim MLE"]
    rows, errs = [], {c: [] for c in cols}
    for name, x in data.items():
        d = int(truth[name])
        x = np.asarray(x, dtype=np.float64)
        vals = {c: ours(x, c) for c in cols[:2]}
        vals["skdim TwoNN"] = float(skdim.id.TwoNN().fit(x).dimension_)
        vals["skdim MLE"] = float(skdim.id.MLE(K=10).fit(x).dimension_)
        for c in cols:
            errs[c].append(abs(vals[c] - d) / d)
        rows.append(
            f"| {name} | {d} | {x.shape[1]} | " + " | ".join(f"{vals[c]:.2f}" for c in cols) + " |"
        )
        print(rows[-1], flush=True)
    head = "| manifold | d | D | " + " | ".join(cols) + " |\n|" + "---|" * (3 + len(cols))
    mean = (
        "| **mean rel. error** | | | "
        + " | ".join(f"**{100 * np.mean(errs[c]):.1f}%**" for c in cols)
        + " |"
    )
    return "\n".join([head, *rows, mean])


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    t0 = time.time()
    parts = ["## Intrinsic dimension: accuracy vs truth\n"]
    tab, _ = table(2500, with_peers=True)
    parts += [
        "n = 2500 points per manifold (one seeded sample, the same for every estimator). skdim "
        f"DANCo only for d <= {DANCO_MAX_D} (its count in brackets).\n",
        tab,
        "",
    ]
    (HERE / "accuracy.md").write_text("\n".join(parts) + "\n")
    parts += ["### load_digits\n", digits_row(), ""]
    (HERE / "accuracy.md").write_text("\n".join(parts) + "\n")
    parts += [
        "### Run time of the default (torch threads = 1)\n",
        "First call: the calibration cache emptied before it (simulation of the reference families"
        " for this n); cached: median of 3, alternating with the raw `mle` (one k = 10 search).\n",
        timing_table(),
        "",
    ]
    (HERE / "accuracy.md").write_text("\n".join(parts) + "\n")
    try:
        parts += [
            "### scikit-dimension's benchmark suite (`BenchmarkManifolds(random_state=0)`,"
            " n = 2500)\n",
            skdim_suite_table(),
            "",
        ]
    except ImportError as err:  # BenchmarkManifolds needs pandas
        parts += [f"(scikit-dimension's benchmark suite skipped: {err})", ""]
    (HERE / "accuracy.md").write_text("\n".join(parts) + "\n")
    for n in (500, 20000):
        global OURS
        saved = OURS
        OURS = {"calibrated": {}, PREVIOUS: saved[PREVIOUS], "twonn": {}, "mle(k=10)": {}}
        tab, _ = table(n, with_peers=False)
        OURS = saved
        parts += [f"### n = {n} (ours only)\n", tab, ""]
        (HERE / "accuracy.md").write_text("\n".join(parts) + "\n")
    parts.append(f"(total {time.time() - t0:.0f} s, torch threads = 1)")
    (HERE / "accuracy.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
