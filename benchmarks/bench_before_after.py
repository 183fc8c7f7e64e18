"""Every timed shape of benchmarks/README.md, before and after a change (issue 13's "no shape slower").

Usage::

    git worktree add /tmp/gc_before <commit>      # the tree before the change
    python benchmarks/bench_before_after.py --before /tmp/gc_before --after .

Each round runs every case in a fresh process per tree, the two trees back to back (before
first in even rounds, after first in odd ones), so a pair sees the same machine load seconds apart
and no case inherits another's process state (``--pairing suite`` runs the whole suite in one
process per tree instead, as earlier runs did; a shared 2-core machine drifts by 20-30% over its
minutes, which that pairing puts between the trees). Inside a process the case is warmed up once
and timed ``--repeats`` times, or more (up to 50) until the timings add up to about 0.5 s
(median). The table reports medians over rounds and the median of the per-round ratios
after / before, with their range. Where a case spends time in ``torch.linalg.svdvals``
(RigidMotions' screen: LAPACK on a million 3 x 3 matrices, one thread, code neither tree owns,
1.7-2.9 s across runs and processes), the table also gives the time outside that call, which is
the part a change to gapcallback can move. Only public API is used (``F.knn``,
``F.representation_gap``, ``F.memorization``, ``F.intrinsic_dimension``, ``GapLaw.fit``, the
symmetry classes), so any two versions of the package can be compared.

Writes ``benchmarks/results/before_after.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: Run inside a fresh process with the tree under test first on sys.path.
CHILD = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import gapcallback as gc
from gapcallback import functional as F
from gapcallback.symmetry import CyclicShifts, FiniteGroup, Permutations, RigidMotions
assert gc.__file__.startswith(sys.argv[1]), gc.__file__
repeats = int(sys.argv[2])
only = set(sys.argv[3].split(";")) if len(sys.argv) > 3 and sys.argv[3] else None
g = torch.Generator().manual_seed(0)
def rand(*s): return torch.randn(*s, generator=g)
def manifold(n, d, D):
    z = torch.rand(n, d, generator=g)
    return torch.sin(z @ torch.randn(d, D, generator=g))
def sphere(n, d, D):
    x = torch.randn(n, d + 1, generator=g); x = x / x.norm(dim=1, keepdim=True)
    return torch.cat([x, torch.zeros(n, D - d - 1)], 1)
a20, b20 = rand(20000, 64), rand(20000, 64)
a8, b8 = rand(8000, 784), rand(8000, 784)
low_a, low_b = torch.rand(20000, 3, generator=g), torch.rand(20000, 3, generator=g)
m10 = manifold(20000, 10, 64)
m25 = manifold(2500, 6, 12)
ref, train, samples = sphere(1000, 2, 8), sphere(1000, 2, 8), sphere(2000, 2, 8)
law_train, law_ref = manifold(20000, 6, 64), manifold(5000, 6, 64)
sig_q, sig_x = rand(1000, 64), rand(4000, 64)
img_q, img_x = rand(500, 1, 16, 16), rand(2000, 1, 16, 16)
img3_q, img3_x = rand(500, 3, 8, 8), rand(2000, 3, 8, 8)
cl_q, cl_x = rand(500, 32, 3), rand(2000, 32, 3)
set_q, set_x = rand(200, 8, 2), rand(1000, 8, 2)
cases = {
    "knn N=M=20000 D=64": lambda: F.knn(a20, b20, 1),
    "knn N=M=8000 D=784": lambda: F.knn(a8, b8, 1),
    "knn leave-one-out N=20000 D=64": lambda: F.knn(a20, a20, 1, exclude_self=True),
    "knn leave-one-out N=8000 D=784": lambda: F.knn(a8, a8, 1, exclude_self=True),
    "knn N=M=20000 D=3 k=10": lambda: F.knn(low_a, low_b, 10),
    "gap N=M=20000 D=64": lambda: F.representation_gap(a20, b20),
    "twonn N=20000 D=64": lambda: F.intrinsic_dimension(m10, method="twonn"),
    "calibrated ID N=2500": lambda: F.intrinsic_dimension(m25),
    "calibrated ID N=20000 D=64": lambda: F.intrinsic_dimension(m10),
    "GapLaw.fit n=20000+5000 D=64": lambda: gc.GapLaw.fit(law_train, law_ref),
    "README gap 1000 vs 2000 D=8": lambda: F.representation_gap(ref, samples),
    "README memorization 2000 vs 1000": lambda: F.memorization(samples, train),
    "README ID of 2000 samples": lambda: F.intrinsic_dimension(samples),
    "flips |G|=2 [64]": lambda: F.knn(sig_q, sig_x, 1, symmetry=FiniteGroup.flips((-1,))),
    "dihedral |G|=8 [1,16,16]": lambda: F.knn(img_q, img_x, 1, symmetry=FiniteGroup.dihedral()),
    "CyclicShifts |G|=64 [64]": lambda: F.knn(sig_q, sig_x, 1, symmetry=CyclicShifts()),
    "CyclicShifts 2-D |G|=64 [3,8,8]": lambda: F.knn(
        img3_q, img3_x, 1, symmetry=CyclicShifts((-2, -1))),
    "CyclicShifts fft [3,8,8]": lambda: F.knn(
        img3_q, img3_x, 1, symmetry=CyclicShifts((-2, -1), method="fft")),
    "RigidMotions [32,3]": lambda: F.knn(cl_q, cl_x, 1, symmetry=RigidMotions()),
    "Permutations [8,2]": lambda: F.knn(set_q, set_x, 1, symmetry=Permutations()),
}
if only == {"?"}:
    print(json.dumps({"names": list(cases)}))
    sys.exit()
in_svd = [0.0]
svdvals = torch.linalg.svdvals
def timed_svdvals(*args, **kwargs):
    t = time.perf_counter(); r = svdvals(*args, **kwargs); in_svd[0] += time.perf_counter() - t
    return r
torch.linalg.svdvals = timed_svdvals
out, outside_svd = {}, {}
for name, fn in cases.items():
    if only and name not in only:
        continue
    t = time.perf_counter(); fn(); warm = time.perf_counter() - t
    times, outside = [], []
    for _ in range(max(repeats, min(50, int(0.5 / max(warm, 1e-6))))):  # >= 0.5 s of timing
        in_svd[0] = 0.0
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
        outside.append(times[-1] - in_svd[0])
    out[name] = statistics.median(times)
    if in_svd[0] > 0:
        outside_svd[name] = statistics.median(outside)
print(json.dumps({"total": out, "outside_svd": outside_svd}))
"""


def run_tree(tree: Path, repeats: int, only: str, threads: int) -> dict[str, dict[str, float]]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree.resolve()), str(repeats), only],
        capture_output=True, text=True, env=env, cwd="/", check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path(__file__).parents[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="semicolon-separated case names")
    parser.add_argument("--pairing", choices=("case", "suite"), default="case")
    args = parser.parse_args()
    trees = {"before": args.before, "after": args.after}
    names = run_tree(args.after, 1, "?", args.threads)["names"]
    if args.only:
        names = [name for name in names if name in args.only.split(";")]
    groups = [names] if args.pairing == "suite" else [[name] for name in names]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for label in trees:
            runs[label].append({"total": {}, "outside_svd": {}})
        for g, group in enumerate(groups):
            for label in ("before", "after") if (r + g) % 2 == 0 else ("after", "before"):
                got = run_tree(trees[label], args.repeats, ";".join(group), args.threads)
                for part in ("total", "outside_svd"):
                    runs[label][-1][part].update(got[part])
        print(f"round {r + 1} done", file=sys.stderr)
    rows = []
    for name in names:
        row = {"case": name}
        for part, key in (("total", ""), ("outside_svd", "_outside_svd")):
            if any(name not in run[part] for label in runs for run in runs[label]):
                continue
            before = [run[part][name] for run in runs["before"]]
            after = [run[part][name] for run in runs["after"]]
            row[f"before{key}_s"] = statistics.median(before)
            row[f"after{key}_s"] = statistics.median(after)
            ratios = [a / b for a, b in zip(after, before, strict=True)]
            row[f"after_over_before{key}"] = statistics.median(ratios)
            row[f"ratio_range{key}"] = [min(ratios), max(ratios)]
        rows.append(row)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    result = {
        "cpu": cpu,
        "threads": args.threads,
        "rounds": args.rounds,
        "pairing": args.pairing,
        "repeats": args.repeats,
        "before": str(args.before),
        "after": str(args.after),
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "before_after.json").write_text(json.dumps(result, indent=2))
    print(
        f"{cpu}, {args.threads} threads, {args.rounds} alternating rounds x {args.repeats}, "
        f"paired by {args.pairing}\n"
    )
    print("| shape | before (s) | after (s) | after / before | per-round range |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        for label, key in ((r["case"], ""), (f"{r['case']} outside `svdvals`", "_outside_svd")):
            if f"after_over_before{key}" not in r:
                continue
            ratio, (low, high) = r[f"after_over_before{key}"], r[f"ratio_range{key}"]
            flag = " **slower**" if ratio > 1.05 else ""
            print(
                f"| {label} | {r[f'before{key}_s']:.4f} | {r[f'after{key}_s']:.4f} | "
                f"{ratio:.2f}x{flag} | {low:.2f}-{high:.2f}x |"
            )


if __name__ == "__main__":
    main()
