"""TwoNN speed and agreement: ours vs scikit-dimension at N = 20000, D = 64.

Data: a 10-dimensional Gaussian in a random 10-dimensional subspace of R^64 (float64). Both
single-threaded (torch.set_num_threads(1); skdim uses scikit-learn's single-threaded search);
medians of 9 alternating runs in one process. Writes ``speed.md`` next to this file.
"""

from __future__ import annotations

import os

# Single-threaded on both sides, BLAS pools included: an idle multi-threaded OpenBLAS pool left
# spinning by the peer's numpy calls would otherwise steal the core from the next timed run.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gapcallback.functional.dimension import intrinsic_dimension  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(n: int = 20000, big_d: int = 64, d: int = 10, runs: int = 9) -> None:
    import skdim

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((big_d, d)))
    x = rng.standard_normal((n, d)) @ q.T
    xt = torch.from_numpy(x)
    t_ours, t_peer, v_ours, v_peer = [], [], [], []
    for fit, method in (("linear", "linear"), ("mle", None)):
        t_ours, t_peer = [], []
        for _ in range(runs):
            t = time.perf_counter()
            v_ours.append(float(intrinsic_dimension(xt, "twonn", fit=fit)))
            t_ours.append(time.perf_counter() - t)
            if method is not None:
                t = time.perf_counter()
                v_peer.append(float(skdim.id.TwoNN(method=method).fit(x).dimension_))
                t_peer.append(time.perf_counter() - t)
        if method is not None:
            ratios = sorted(p / o for p, o in zip(t_peer, t_ours, strict=True))
            lin = (statistics.median(t_ours), statistics.median(t_peer), v_ours[-1], v_peer[-1])
            ratio_range = (statistics.median(ratios), ratios[0], ratios[-1])
        else:
            mle = (statistics.median(t_ours), v_ours[-1])
    rows = [
        "## TwoNN speed (N = 20000, D = 64, d = 10 Gaussian; 1 thread; median of 9 alternating runs)\n",
        "| estimator | time (s) | estimate |",
        "|---|---|---|",
        f"| skdim TwoNN (linear fit, discard 10%) | {lin[1]:.2f} | {lin[3]:.3f} |",
        f"| ours twonn, fit='linear' (discard 10%) | {lin[0]:.2f} | {lin[2]:.3f} |",
        f"| ours twonn, fit='mle' | {mle[0]:.2f} | {mle[1]:.3f} |",
        "",
        f"Speed-up (linear fit vs skdim, median of the per-run ratios): **{ratio_range[0]:.1f}x** "
        f"(runs: {ratio_range[1]:.1f}x to {ratio_range[2]:.1f}x); estimates differ by "
        f"**{100 * abs(lin[2] - lin[3]) / lin[3]:.2f}%**.",
    ]
    (HERE / "speed.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
