"""TwoNN speed and agreement: ours vs scikit-dimension at N = 20000, D = 64.

Data: a 10-dimensional Gaussian in a random 10-dimensional subspace of R^64 (float64). Both
single-threaded (torch.set_num_threads(1); skdim uses scikit-learn's single-threaded search);
medians of 5 alternating runs in one process. Writes ``speed.md`` next to this file.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from gapcallback.functional.intrinsic_dimension import intrinsic_dimension

HERE = Path(__file__).resolve().parent


def main(n: int = 20000, big_d: int = 64, d: int = 10, runs: int = 5) -> None:
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
            lin = (statistics.median(t_ours), statistics.median(t_peer), v_ours[-1], v_peer[-1])
        else:
            mle = (statistics.median(t_ours), v_ours[-1])
    rows = [
        "## TwoNN speed (N = 20000, D = 64, d = 10 Gaussian; 1 thread; median of 5 alternating runs)\n",
        "| estimator | time (s) | estimate |",
        "|---|---|---|",
        f"| skdim TwoNN (linear fit, discard 10%) | {lin[1]:.2f} | {lin[3]:.3f} |",
        f"| ours twonn, fit='linear' (discard 10%) | {lin[0]:.2f} | {lin[2]:.3f} |",
        f"| ours twonn, fit='mle' | {mle[0]:.2f} | {mle[1]:.3f} |",
        "",
        f"Speed-up (linear fit vs skdim): **{lin[1] / lin[0]:.1f}x**; estimates differ by "
        f"**{100 * abs(lin[2] - lin[3]) / lin[3]:.2f}%**.",
    ]
    (HERE / "speed.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
