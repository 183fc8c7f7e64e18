"""Ours against clovaai/prdc at one size: alternating timed runs of the same four values.

Issue 16's speed target (>= 5x faster than prdc at N = M = 10000, D = 64) compares
``F.precision_recall_density_coverage(real, fake, k=5)`` with prdc's ``compute_prdc(real, fake,
nearest_k=5)``: the same four numbers from the same Gaussian features (those of
``bench_knn_family.py``'s cost part). Each round times ours, then prdc, in one process after a
warm-up call of each; the figure is the median of the per-round ratios (the machine is shared and
noisy: a ratio of neighbouring runs is steadier than a ratio of medians).

    pip install --no-deps --target /tmp/peers torch-fidelity prdc
    python benchmarks/knn_family/bench_speed_ratio.py [--n 10000] [--rounds 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_knn_family as family  # the peers' loader, the features and the wrappers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--peers", default="/tmp/peers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peers = family.load_peers(args.peers)
    if "prdc" not in peers:
        raise SystemExit(f"prdc not found in {args.peers}: pip install --no-deps --target ... prdc")
    blas = family.blas_report()
    real, fake = family.gaussian(args.n, args.dim, seed=args.n)
    ours_values = family.ours_all(real, fake, family.K_DC)  # warm-up, and the values compared
    prdc_values = family.prdc_all(peers, real, fake, family.K_DC)
    ours_t, prdc_t = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        family.ours_all(real, fake, family.K_DC)
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        family.prdc_all(peers, real, fake, family.K_DC)
        prdc_t.append(time.perf_counter() - start)
    ratios = [p / o for o, p in zip(ours_t, prdc_t, strict=True)]
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "blas": blas,
        "n": args.n,
        "dim": args.dim,
        "k": family.K_DC,
        "ours_seconds": ours_t,
        "prdc_seconds": prdc_t,
        "median_ratio": statistics.median(ratios),
        "ours_values": ours_values,
        "prdc_values": prdc_values,
    }
    print(f"N = M = {args.n}, D = {args.dim}, k = {family.K_DC}, {args.rounds} alternating rounds")
    print(
        f"ours all four: median {statistics.median(ours_t):.3f} s  {[round(t, 3) for t in ours_t]}"
    )
    print(
        f"prdc:          median {statistics.median(prdc_t):.3f} s  {[round(t, 3) for t in prdc_t]}"
    )
    print(f"prdc / ours, median of per-round ratios: {result['median_ratio']:.2f}x (target >= 5x)")
    print(f"values: ours {ours_values}\n        prdc {prdc_values}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
