"""Classification on scikit-learn's digits: the classifier's gap, the 1-NN line, test error and risk.

Data: ``load_digits`` (1797 images, 8 x 8), features / 16 (in [0, 1]^64), targets one-hot in
R^10, y_weight = 1, p = 2: an observation is the joint vector [x, onehot(label)] in R^74. A fixed
held-out reference split of 297 images; training sets of n = 100, 200, 400, 800, 1500 drawn from
the other 1500 (nested, per seed).

Per n and seed, a small MLP classifier (64 -> 128 -> 128 -> 10, SiLU, cross-entropy, AdamW with
weight decay + cosine, a fixed number of steps) is trained; its predictions are its softmax
probabilities. Reported:

* the classifier's gap ``F.prediction_gap(ref_x, ref_y, probe_x, softmax(model(probe_x)))`` with
  probes = reference inputs + training inputs;
* the 1-NN lookup table's gap ``F.prediction_gap(ref_x, ref_y, train_x, train_y)`` (the
  memorization line: the training pairs as the prediction space);
* the test error (misclassification rate on the references) and the risk
  ``F.prediction_risk(ref_y, softmax(model(ref_x)))`` (the Brier score summed over classes);
* the Spearman rank correlation (``scipy.stats.spearmanr``) between the classifier's gap and its
  test error across the sweep (all runs, and the per-n means over seeds), whatever it is.

Run:  python benchmarks/prediction/bench_digits.py      (about a minute on 2 threads)
Writes ``benchmarks/results/prediction_digits.json`` and ``benchmarks/prediction/digits.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import HERE, RESULTS, environment, loglog_slope, mlp, train_steps, train_threads
from scipy.stats import spearmanr

from gapcallback import functional as F


def load(n_ref: int, split_seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    ref, pool = perm[:n_ref], perm[n_ref:]
    return x[ref], labels[ref], x[pool], labels[pool]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    ref_x, ref_labels, pool_x, pool_labels = load(args.n_ref, args.split_seed)
    ref_y = torch.nn.functional.one_hot(ref_labels, 10).float()
    rows = []
    for seed in range(args.seeds):
        order = torch.randperm(pool_x.shape[0], generator=torch.Generator().manual_seed(seed))
        for n in args.sizes:
            t0 = time.perf_counter()
            idx = order[:n]
            train_x, train_labels = pool_x[idx], pool_labels[idx]
            train_y = torch.nn.functional.one_hot(train_labels, 10).float()
            torch.manual_seed(1000 * seed + n)
            model = mlp(64, 10, hidden=args.hidden, depth=3)
            with train_threads(args.train_threads):
                loss = train_steps(
                    model,
                    lambda i, m=model, x=train_x, c=train_labels: torch.nn.functional.cross_entropy(
                        m(x[i]), c[i]
                    ),
                    n,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    weight_decay=args.weight_decay,
                    generator=torch.Generator().manual_seed(seed * 7 + n),
                )
            with torch.no_grad():
                probe_x = torch.cat([ref_x, train_x])
                probe_y = model(probe_x).softmax(-1)
                pred_ref = probe_y[: args.n_ref]
            gap = float(F.prediction_gap(ref_x, ref_y, probe_x, probe_y))
            risk = float(F.prediction_risk(ref_y, pred_ref))
            line = float(F.prediction_gap(ref_x, ref_y, train_x, train_y))
            error = float((pred_ref.argmax(1) != ref_labels).float().mean())
            train_error = float((probe_y[args.n_ref :].argmax(1) != train_labels).float().mean())
            # The 1-NN classifier's own test error, for reference (nearest training image in x).
            nn_index = torch.cdist(ref_x, train_x).argmin(1)
            nn_error = float((train_labels[nn_index] != ref_labels).float().mean())
            row = {
                "seed": seed,
                "n": n,
                "classifier_gap": gap,
                "lookup_gap": line,
                "test_error": error,
                "risk": risk,
                "train_error": train_error,
                "final_loss": loss,
                "nn_test_error": nn_error,
                "gap_le_risk": gap <= risk,
                "gap_over_risk": gap / risk,
                "gap_over_line": gap / line,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"seed={seed} n={n:5d} gap={gap:.4f} 1-NN gap={line:.4f} test error={error:.4f} "
                f"risk={risk:.4f} gap<=risk={gap <= risk} gap/line={gap / line:.3f} "
                f"(1-NN error {nn_error:.4f}, train error {train_error:.3f}, "
                f"{row['seconds']:.1f}s)",
                flush=True,
            )
    return rows


def summarize(rows: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    means = []
    for n in args.sizes:
        rs = [r for r in rows if r["n"] == n]
        means.append(
            {
                "n": n,
                **{
                    key: statistics.mean(r[key] for r in rs)
                    for key in (
                        "classifier_gap",
                        "lookup_gap",
                        "test_error",
                        "risk",
                        "nn_test_error",
                        "gap_over_line",
                    )
                },
            }
        )

    def rho(a: list[float], b: list[float]) -> dict[str, float]:
        result = spearmanr(a, b)
        return {"rho": float(result.statistic), "pvalue": float(result.pvalue), "points": len(a)}

    return {
        "per_n_mean": means,
        "spearman_gap_vs_test_error_all_runs": rho(
            [r["classifier_gap"] for r in rows], [r["test_error"] for r in rows]
        ),
        "spearman_gap_vs_test_error_per_n_means": rho(
            [m["classifier_gap"] for m in means], [m["test_error"] for m in means]
        ),
        "spearman_gap_vs_risk_all_runs": rho(
            [r["classifier_gap"] for r in rows], [r["risk"] for r in rows]
        ),
        "spearman_lookup_gap_vs_test_error_all_runs": rho(
            [r["lookup_gap"] for r in rows], [r["test_error"] for r in rows]
        ),
        "gap_le_risk_everywhere": all(r["gap_le_risk"] for r in rows),
        "slope_lookup_gap": loglog_slope([m["n"] for m in means], [m["lookup_gap"] for m in means]),
        "slope_classifier_gap": loglog_slope(
            [m["n"] for m in means], [m["classifier_gap"] for m in means]
        ),
    }


def figure(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = summary["per_n_mean"]
    ns = [m["n"] for m in means]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax.plot(
        ns,
        [m["lookup_gap"] for m in means],
        "s--",
        color="0.4",
        label="1-NN lookup table gap (line)",
    )
    ax.plot(ns, [m["classifier_gap"] for m in means], "o-", color="C0", label="classifier gap")
    ax.plot(ns, [m["risk"] for m in means], "^-", color="C3", label="classifier risk (Brier)")
    ax.plot(ns, [m["test_error"] for m in means], "d-", color="C2", label="test error")
    ax.plot(ns, [m["nn_test_error"] for m in means], "d:", color="0.6", label="1-NN test error")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training images n")
    ax.set_title("load_digits: means over seeds")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    sc = bx.scatter(
        [r["classifier_gap"] for r in rows],
        [r["test_error"] for r in rows],
        c=[r["n"] for r in rows],
        cmap="viridis",
        norm=matplotlib.colors.LogNorm(),
    )
    fig.colorbar(sc, ax=bx, label="n")
    s = summary["spearman_gap_vs_test_error_all_runs"]
    bx.set_xlabel("classifier gap")
    bx.set_ylabel("test error")
    bx.set_title(f"gap vs test error (Spearman rho = {s['rho']:.2f}, {s['points']} runs)")
    bx.grid(True, alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 800, 1500])
    parser.add_argument("--n-ref", type=int, default=297)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (gap searches)")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads (MLP steps)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "prediction_digits.json")
    parser.add_argument("--figure", type=Path, default=HERE / "digits.png")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps = 1, 100
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    rows = run(args)
    summary = summarize(rows, args)
    result = {
        "benchmark": "prediction/bench_digits.py",
        "environment": environment(args.threads),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "runs": rows,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    figure(rows, summary, args.figure)
    print("\nper-n means over seeds:")
    for m in summary["per_n_mean"]:
        print(
            f"  n={m['n']:5d} gap={m['classifier_gap']:.4f} 1-NN gap={m['lookup_gap']:.4f} "
            f"error={m['test_error']:.4f} risk={m['risk']:.4f} gap/line={m['gap_over_line']:.3f}"
        )
    for key in (
        "spearman_gap_vs_test_error_all_runs",
        "spearman_gap_vs_test_error_per_n_means",
        "spearman_gap_vs_risk_all_runs",
        "spearman_lookup_gap_vs_test_error_all_runs",
    ):
        s = summary[key]
        print(f"  {key}: rho={s['rho']:.3f} (p={s['pvalue']:.2g}, {s['points']} points)")
    print(f"  gap <= risk everywhere: {summary['gap_le_risk_everywhere']}")
    print(f"wrote {args.out} and {args.figure} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
