"""Regression on a d-sphere in R^16: the lookup-table line follows the law; an MLP's gap vs its risk.

Task: inputs x uniform on the unit sphere S^d (d = 2, 4, 6), sampled in R^(d+1) and embedded in
R^16 by a fixed random orthogonal map; targets y = [sin(a.z), cos(b.z)] in R^2 (z the point in
R^(d+1), a and b fixed random vectors of norm ``freq``), so y varies O(1). Two tasks: freq = 2
(gentle: under one oscillation across the sphere) and freq = 6 (a few oscillations: a graph that
bends on the scale of the nearest-neighbour distances at n ~ 10^3). Loss p = 2, y_weight = 1; the
task's observation set {(x, g(x))} is a d-dimensional manifold in R^18.

(a) The memorization line follows the law. ``gc.GapLaw.fit`` on the joint vectors
    ``F.joint_points(train_x, train_y)`` of n = 2000 training pairs against 1000 held-out
    reference pairs predicts the gap at n = 16000; it is compared with the measured lookup-table
    gap ``F.prediction_gap(ref_x, ref_y, train_x16000, train_y16000)`` (the 1000 references) and,
    as the low-noise truth, the same gap of 16000 fresh references. ``--seeds`` independent draws
    per d. Target: relative error within 5%.

(b) An MLP regressor (16 -> 128 -> 128 -> 2, SiLU, AdamW + cosine, 2000 steps of 256) trained
    at n = 250 ... 8000 on d = 2 and 4: at the end of training the gap of its graph on the probes
    = reference inputs + training inputs (``F.prediction_gap`` with its predictions), the test
    risk ``F.prediction_risk(ref_y, model(ref_x))`` and the lookup-table line at that n. Checks
    gap <= risk at every point and reports gap / line.

Run:  python benchmarks/prediction/bench_regression.py      (a few minutes; gap searches on 2
      threads, the MLP steps on 1: ``--threads``, ``--train-threads``)
      python benchmarks/prediction/bench_regression.py --quick   (smoke test)
Writes ``benchmarks/results/prediction_regression.json`` and
``benchmarks/prediction/regression.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import HERE, RESULTS, environment, loglog_slope, mlp, train_steps, train_threads

import gapcallback as gc
from gapcallback import functional as F

AMBIENT = 16


class SphereTask:
    """x uniform on S^d embedded in R^16, y = [sin(a.z), cos(b.z)]."""

    def __init__(self, d: int, freq: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(AMBIENT, AMBIENT, generator=g, dtype=torch.float64))
        self.embed = (q * torch.sign(torch.diagonal(r)))[: d + 1]  # [d+1, 16], orthonormal rows
        a = torch.randn(d + 1, generator=g, dtype=torch.float64)
        b = torch.randn(d + 1, generator=g, dtype=torch.float64)
        self.a, self.b = freq * a / a.norm(), freq * b / b.norm()
        self.d = d

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.d + 1, generator=generator, dtype=torch.float64)
        z = z / z.norm(dim=1, keepdim=True)
        y = torch.stack([torch.sin(z @ self.a), torch.cos(z @ self.b)], dim=1)
        return (z @ self.embed).float(), y.float()


def part_a(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for freq, d in itertools.product(args.freqs, args.dims):
        task = SphereTask(d, freq, seed=100 + d)
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            gen = torch.Generator().manual_seed(1000 * d + seed)
            ref_x, ref_y = task.sample(args.n_ref, gen)
            big_x, big_y = task.sample(args.n_target, gen)  # train_x16000 (first n_fit: the fit)
            fresh_x, fresh_y = task.sample(args.n_fresh, gen)
            train_x, train_y = big_x[: args.n_fit], big_y[: args.n_fit]
            law = gc.GapLaw.fit(
                F.joint_points(train_x, train_y),
                F.joint_points(ref_x, ref_y),
                p=2.0,
                seed=seed,
            )
            predicted = float(law.predict(args.n_target))
            low, high = law.predict_interval(args.n_target, 0.9)
            # The same anchor with the true d (what the slope's finite-size bias costs).
            true_d = law.anchor_gap * (law.anchor_size / args.n_target) ** (2.0 / d)
            measured = float(F.prediction_gap(ref_x, ref_y, big_x, big_y))
            fresh = float(F.prediction_gap(fresh_x, fresh_y, big_x, big_y))
            row = {
                "freq": freq,
                "d": d,
                "seed": seed,
                "law_dimension": law.dimension,
                "law_dimension_std": law.dimension_std,
                "law_constant": law.constant,
                "law_local_dimensions": law.local_dimensions.tolist(),
                "gap_at_fit_n": float(F.prediction_gap(ref_x, ref_y, train_x, train_y)),
                "predicted": predicted,
                "band_90": [float(low), float(high)],
                "measured_ref": measured,
                "measured_fresh": fresh,
                "rel_error_ref": predicted / measured - 1,
                "rel_error_fresh": predicted / fresh - 1,
                "predicted_true_d": true_d,
                "rel_error_fresh_true_d": true_d / fresh - 1,
                "fresh_in_band": bool(low <= fresh <= high),
                "law": law.state_dict(),
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"(a) freq={freq:g} d={d} seed={seed} law d={law.dimension:.2f}±{law.dimension_std:.2f} "
                f"pred R_{args.n_target}={predicted:.4g} meas(ref {args.n_ref})={measured:.4g} "
                f"({100 * row['rel_error_ref']:+.1f}%) meas(fresh {args.n_fresh})={fresh:.4g} "
                f"({100 * row['rel_error_fresh']:+.1f}%) in band={row['fresh_in_band']} "
                f"true-d slope: {100 * row['rel_error_fresh_true_d']:+.1f}% "
                f"({row['seconds']:.1f}s)",
                flush=True,
            )
    return rows


def part_b(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for freq, d in itertools.product(args.freqs, args.mlp_dims):
        task = SphereTask(d, freq, seed=100 + d)
        gen = torch.Generator().manual_seed(7000 + d)
        ref_x, ref_y = task.sample(args.n_ref, gen)
        pool_x, pool_y = task.sample(max(args.sizes), gen)
        for n in args.sizes:
            t0 = time.perf_counter()
            train_x, train_y = pool_x[:n], pool_y[:n]
            torch.manual_seed(n + 31 * d)
            model = mlp(AMBIENT, 2, hidden=args.hidden, depth=3)
            with train_threads(args.train_threads):
                loss = train_steps(
                    model,
                    lambda i, m=model, x=train_x, y=train_y: (
                        (m(x[i]) - y[i]).square().sum(1).mean()
                    ),
                    n,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    generator=torch.Generator().manual_seed(n),
                )
            with torch.no_grad():
                probe_x = torch.cat([ref_x, train_x])
                probe_y = model(probe_x)
                pred_ref = model(ref_x)
            gap = float(F.prediction_gap(ref_x, ref_y, probe_x, probe_y))
            gap_ref_only = float(F.prediction_gap(ref_x, ref_y, ref_x, pred_ref))
            risk = float(F.prediction_risk(ref_y, pred_ref))
            train_risk = float(F.prediction_risk(train_y, probe_y[args.n_ref :]))
            line = float(F.prediction_gap(ref_x, ref_y, train_x, train_y))
            row = {
                "freq": freq,
                "d": d,
                "n": n,
                "gap": gap,
                "gap_reference_probes_only": gap_ref_only,
                "risk": risk,
                "train_risk": train_risk,
                "final_loss": loss,
                "line": line,
                "gap_le_risk": gap <= risk,
                "gap_over_risk": gap / risk,
                "gap_over_line": gap / line,
                "risk_over_line": risk / line,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"(b) freq={freq:g} d={d} n={n:5d} gap={gap:.4g} risk={risk:.4g} line={line:.4g} "
                f"gap<=risk={gap <= risk} gap/risk={gap / risk:.3f} gap/line={gap / line:.3g} "
                f"train risk={train_risk:.3g} ({row['seconds']:.1f}s)",
                flush=True,
            )
    return rows


def summary(a_rows: list[dict], b_rows: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    per_d = {}
    for freq, d in itertools.product(args.freqs, args.dims):
        rs = [r for r in a_rows if r["d"] == d and r["freq"] == freq]
        per_d[f"freq={freq:g}, d={d}"] = {
            "freq": freq,
            "d": d,
            "law_dimension_median": statistics.median(r["law_dimension"] for r in rs),
            "worst_rel_error_ref": max((r["rel_error_ref"] for r in rs), key=abs),
            "worst_rel_error_fresh": max((r["rel_error_fresh"] for r in rs), key=abs),
            "median_rel_error_fresh": statistics.median(r["rel_error_fresh"] for r in rs),
            "within_5pct_fresh": sum(abs(r["rel_error_fresh"]) <= 0.05 for r in rs),
            "within_5pct_ref": sum(abs(r["rel_error_ref"]) <= 0.05 for r in rs),
            "fresh_in_band_90": sum(r["fresh_in_band"] for r in rs),
            "worst_rel_error_fresh_true_d": max((r["rel_error_fresh_true_d"] for r in rs), key=abs),
            "fits": len(rs),
        }
    mlp_summary = {}
    for freq, d in itertools.product(args.freqs, args.mlp_dims):
        rs = [r for r in b_rows if r["d"] == d and r["freq"] == freq]
        if not rs:
            continue
        mlp_summary[f"freq={freq:g}, d={d}"] = {
            "freq": freq,
            "d": d,
            "gap_le_risk_everywhere": all(r["gap_le_risk"] for r in rs),
            "gap_slope": loglog_slope([r["n"] for r in rs], [r["gap"] for r in rs]),
            "risk_slope": loglog_slope([r["n"] for r in rs], [r["risk"] for r in rs]),
            "line_slope": loglog_slope([r["n"] for r in rs], [r["line"] for r in rs]),
            "gap_over_risk": [r["gap_over_risk"] for r in rs],
            "gap_over_line": [r["gap_over_line"] for r in rs],
        }
    return {"memorization_line": per_d, "mlp": mlp_summary}


def figure(a_rows: list[dict], b_rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims, freqs = list(args.dims), list(args.freqs)
    fig, axes = plt.subplots(
        len(freqs), len(dims), figsize=(4.6 * len(dims), 4.0 * len(freqs)), squeeze=False
    )
    for (i, freq), (j, d) in itertools.product(enumerate(freqs), enumerate(dims)):
        ax = axes[i][j]
        a0 = next(r for r in a_rows if r["d"] == d and r["freq"] == freq and r["seed"] == 0)
        law = gc.GapLaw.from_state_dict(a0["law"])
        sizes = law.sizes.tolist()
        ax.plot(sizes, law.gaps.tolist(), "o", ms=4, color="0.4", label="line: measured (fit)")
        lo = min(min(sizes), min(args.sizes)) / 1.3
        grid = torch.logspace(math.log10(lo), math.log10(args.n_target * 1.3), 50)
        ax.plot(
            grid,
            law.predict(grid),
            "-",
            color="0.2",
            lw=1.2,
            label=f"law (n={args.n_fit}, d={law.dimension:.2f})",
        )
        ax.plot(
            [args.n_target],
            [a0["measured_fresh"]],
            "*",
            ms=11,
            color="k",
            label=f"line measured, n={args.n_target} ({100 * a0['rel_error_fresh']:+.1f}%)",
        )
        bs = [r for r in b_rows if r["d"] == d and r["freq"] == freq]
        if bs:
            ns = [r["n"] for r in bs]
            ax.plot(
                ns,
                [r["line"] for r in bs],
                "s--",
                ms=4,
                color="0.55",
                lw=0.8,
                label="line at the MLP's n",
            )
            ax.plot(ns, [r["gap"] for r in bs], "o-", color="C0", label="MLP gap")
            ax.plot(ns, [r["risk"] for r in bs], "^:", color="C3", label="MLP test risk")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training pairs n")
        ax.set_ylabel("gap (p = 2)")
        ax.set_title(f"S^{d} in R^16 -> R^2, freq = {freq:g} (seed 0)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--mlp-dims", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, default=3, help="independent fits per d in (a)")
    parser.add_argument("--freqs", type=float, nargs="+", default=[2.0, 6.0], help="norms of a, b")
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--n-ref", type=int, default=1000)
    parser.add_argument("--n-target", type=int, default=16000)
    parser.add_argument("--n-fresh", type=int, default=16000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000, 8000])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (gap searches)")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads (MLP steps)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, few steps")
    parser.add_argument("--out", type=Path, default=RESULTS / "prediction_regression.json")
    parser.add_argument("--figure", type=Path, default=HERE / "regression.png")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.mlp_dims = 1, 200, [2]
        args.sizes = [250, 1000]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    a_rows = part_a(args)
    t_a = time.perf_counter() - t0
    b_rows = part_b(args)
    t_b = time.perf_counter() - t0 - t_a
    result = {
        "benchmark": "prediction/bench_regression.py",
        "environment": environment(args.threads),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary(a_rows, b_rows, args),
        "memorization_line": a_rows,
        "mlp": b_rows,
        "seconds": {"a": t_a, "b": t_b, "total": time.perf_counter() - t0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    figure(a_rows, b_rows, args, args.figure)
    s = result["summary"]
    print(f"\nmemorization line, predicted R_{args.n_target} vs measured (fresh refs / 1000 refs):")
    for d, v in s["memorization_line"].items():
        print(
            f"  {d}: law d={v['law_dimension_median']:.2f}, worst error {100 * v['worst_rel_error_fresh']:+.1f}% "
            f"(fresh) / {100 * v['worst_rel_error_ref']:+.1f}% (ref); within 5%: "
            f"{v['within_5pct_fresh']}/{v['fits']} (fresh), {v['within_5pct_ref']}/{v['fits']} (ref); "
            f"in 90% band {v['fresh_in_band_90']}/{v['fits']}; true-d slope worst "
            f"{100 * v['worst_rel_error_fresh_true_d']:+.1f}%"
        )
    for d, v in s["mlp"].items():
        print(
            f"  MLP {d}: gap <= risk everywhere: {v['gap_le_risk_everywhere']}; slopes gap "
            f"{v['gap_slope']:.2f}, risk {v['risk_slope']:.2f}, line {v['line_slope']:.2f}"
        )
    print(f"wrote {args.out} and {args.figure} ({result['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
