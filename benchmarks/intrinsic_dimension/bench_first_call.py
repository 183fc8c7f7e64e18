"""First call vs warm call of the default intrinsic-dimension estimator, each in a fresh process.

Issue 12's target: the first ``F.intrinsic_dimension(x)`` of a process (which used to simulate the
calibration references, 6-38 s of CPU) costs at most 1.5x a warm second call, at N = 2500, 20000
and 100000. Each measurement runs in a fresh ``python`` subprocess: import, draw the data (a
``d``-sphere rotated into R^D, seeded), time the first call, then a second call on the same data.
Sizes are alternated within each round; the table reports medians over the rounds of wall-clock
and process CPU time (all threads).

Usage::

    python benchmarks/intrinsic_dimension/bench_first_call.py [--sizes 2500 20000 100000]
        [--rounds 3] [--dim 6] [--ambient 16] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import torch
n, d, big_d, threads = (int(v) for v in sys.argv[1:5])
if threads > 0:
    torch.set_num_threads(threads)
from gapcallback import functional as F
g = torch.Generator().manual_seed(0)
z = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
q, _ = torch.linalg.qr(torch.randn(big_d, d + 1, generator=g, dtype=torch.float64))
x = (z / z.norm(dim=1, keepdim=True)) @ q.T
out = {}
for name in ("first", "warm"):
    wall, cpu = time.perf_counter(), time.process_time()
    est = float(F.intrinsic_dimension(x))
    out[name] = (time.perf_counter() - wall, time.process_time() - cpu)
out["estimate"] = est
print(json.dumps(out))
"""


def measure(n: int, dim: int, ambient: int, threads: int) -> dict:
    """One fresh process: ``{"first": (wall, cpu), "warm": (wall, cpu), "estimate": d}``."""
    args = [sys.executable, "-c", _CHILD, str(n), str(dim), str(ambient), str(threads)]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 20000, 100000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=6, help="intrinsic dimension d of the sphere")
    parser.add_argument("--ambient", type=int, default=16, help="ambient dimension D")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {n: [] for n in args.sizes}
    for r in range(args.rounds):
        for n in args.sizes:  # alternate the sizes within each round
            runs[n].append(measure(n, args.dim, args.ambient, args.threads))
            first, warm = runs[n][-1]["first"], runs[n][-1]["warm"]
            print(
                f"round {r}: N={n}: first {first[0]:.2f} s, warm {warm[0]:.2f} s (wall)",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"S^{args.dim} in R^{args.ambient}, medians of {args.rounds} fresh processes"
        f" (torch threads: {args.threads or 'default'})\n"
    )
    print(
        "| N | estimate | first call wall (s) | warm call wall (s) | ratio | first call CPU (s)"
        " | warm call CPU (s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, rs in runs.items():
        med = {
            key: [statistics.median(r[key][i] for r in rs) for i in (0, 1)]
            for key in ("first", "warm")
        }
        (fw, fc), (ww, wc) = med["first"], med["warm"]
        print(
            f"| {n} | {rs[0]['estimate']:.2f} | {fw:.2f} | {ww:.2f} | {fw / ww:.2f}x | {fc:.2f}"
            f" | {wc:.2f} | {fc / wc:.2f}x |"
        )


if __name__ == "__main__":
    main()
