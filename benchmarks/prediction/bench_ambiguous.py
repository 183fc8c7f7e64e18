"""An ambiguous task: an MSE regressor's gap stays on a floor, a conditional flow's gap falls with n.

Task: x uniform on the unit 2-sphere in R^3, a random sign s in {-1, +1} (probability 1/2 each,
independent of x) and y = s * g(x) in R^2 with g(x) = 0.5 * [1 + 0.4 sin(2 a.x), cos(2 b.x)]
(a, b fixed random unit vectors; |g| >= 0.3, so the two branches never meet). The observation set
{(x, +-g(x))} is two 2-dimensional sheets in R^5: the lookup-table line (the training pairs as the
prediction space) follows the law with d = 2. Loss p = 2, y_weight = 1.

Per n in 250 ... 4000 (1000 held-out reference pairs, training sets nested):

* an MSE regressor (MLP 3 -> 128 -> 128 -> 2): it learns the conditional mean E[y | x] = 0, so
  its prediction space {(x', f(x'))} stays at distance ~|g(x)| from every observation: its gap has
  a floor, the spread E|y - E[y|x]|^2 = E|g(x)|^2 (computed on the references), whatever n;
* a conditional flow-matching model: an MLP v(x, y_t, t) (6 -> 256 -> 256 -> 256 -> 2) trained
  with the rectified-flow loss |v(x, (1 - t) y0 + t y, t) - (y - y0)|^2, y0 ~ N(0, I), sampled
  with ``--euler-steps`` (20) Euler steps, ``--samples`` (4) samples per probe input: its
  prediction space is the set of its samples (x', y'_s);
* the exact conditional sampler (the true sign at random times g(x'), same probes and samples per
  input): what a perfect generator scores with these probes;
* the lookup-table line ``F.prediction_gap(ref_x, ref_y, train_x, train_y)`` and the law fitted on
  ``--n-fit`` training pairs (``gc.GapLaw.fit`` on ``F.joint_points``), extrapolated.

Probes are the reference inputs + the training inputs (as ``gc.PredictionGapCallback``'s default);
each gap is also reported on the training inputs alone as probes (the lookup table's own inputs),
where a sampler is compared with the line on equal inputs.
The flow's numbers are reported as measured, whether or not they follow the law.

Run:  python benchmarks/prediction/bench_ambiguous.py      (a few minutes; gap searches on 2
      threads, the MLP steps on 1)
Writes ``benchmarks/results/prediction_ambiguous.json`` and ``benchmarks/prediction/ambiguous.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from _common import HERE, RESULTS, environment, loglog_slope, mlp, train_steps, train_threads
from torch import Tensor

import gapcallback as gc
from gapcallback import functional as F


class AmbiguousTask:
    def __init__(self, seed: int = 5) -> None:
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
        self.a, self.b = a / a.norm(), b / b.norm()

    def g(self, x: Tensor) -> Tensor:
        return 0.5 * torch.stack(
            [1 + 0.4 * torch.sin(2 * x @ self.a), torch.cos(2 * x @ self.b)], dim=1
        )

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 3, generator=generator)
        x = x / x.norm(dim=1, keepdim=True)
        sign = torch.randint(0, 2, (n, 1), generator=generator).float() * 2 - 1
        return x, sign * self.g(x)

    def exact_samples(self, x: Tensor, generator: torch.Generator) -> Tensor:
        sign = torch.randint(0, 2, (x.shape[0], 1), generator=generator).float() * 2 - 1
        return sign * self.g(x)


class ConditionalFlow(torch.nn.Module):
    """Rectified flow for y given x: v(x, y_t, t), y_t = (1 - t) y0 + t y."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = mlp(3 + 2 + 1, 2, hidden=hidden, depth=3)

    def forward(self, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, y, t[:, None]], dim=1))

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        y0 = torch.randn_like(y)
        t = torch.rand(y.shape[0])
        yt = (1 - t[:, None]) * y0 + t[:, None] * y
        return (self(x, yt, t) - (y - y0)).square().sum(1).mean()

    @torch.no_grad()
    def sample(self, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        y = torch.randn(x.shape[0], 2, generator=generator)
        for i in range(steps):
            t = torch.full((x.shape[0],), i / steps)
            y = y + self(x, y, t) / steps
        return y


def sampler_gap(
    ref_x: Tensor, ref_y: Tensor, probe_x: Tensor, draw: Any, samples: int
) -> dict[str, float]:
    """Gap of a sampler's probe pairs (``samples`` draws per probe input), the risk of one draw at
    the reference inputs, and the best-of-``samples`` risk (the gap's bound from the probes at
    the reference inputs themselves)."""
    ys = [draw(probe_x) for _ in range(samples)]
    gap = float(F.prediction_gap(ref_x, ref_y, probe_x.repeat(samples, 1), torch.cat(ys)))
    m = ref_x.shape[0]
    train_only = float(
        F.prediction_gap(
            ref_x, ref_y, probe_x[m:].repeat(samples, 1), torch.cat([y[m:] for y in ys])
        )
    )
    per_draw = torch.stack([(y[:m] - ref_y).double().square().sum(1) for y in ys])
    return {
        "gap": gap,
        "gap_train_probes": train_only,
        "risk_one_sample": float(F.prediction_risk(ref_y, ys[0][:m])),
        "risk_best_of_samples": float(per_draw.min(0).values.mean()),
    }


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    task = AmbiguousTask()
    gen = torch.Generator().manual_seed(args.seed)
    ref_x, ref_y = task.sample(args.n_ref, gen)
    pool_x, pool_y = task.sample(max(args.sizes), gen)
    spread = float(task.g(ref_x).double().square().sum(1).mean())
    t0 = time.perf_counter()
    law = gc.GapLaw.fit(
        F.joint_points(pool_x[: args.n_fit], pool_y[: args.n_fit]),
        F.joint_points(ref_x, ref_y),
        p=2.0,
        seed=args.seed,
    )
    law_info = {
        "n_fit": args.n_fit,
        "dimension": law.dimension,
        "dimension_std": law.dimension_std,
        "constant": law.constant,
        "state": law.state_dict(),
        "spread": spread,
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"law on {args.n_fit} training pairs: d={law.dimension:.2f}±{law.dimension_std:.2f}; "
        f"spread E|g|^2 = {spread:.4f}",
        flush=True,
    )
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        train_x, train_y = pool_x[:n], pool_y[:n]
        probe_x = torch.cat([ref_x, train_x])
        line = float(F.prediction_gap(ref_x, ref_y, train_x, train_y))
        low, high = law.predict_interval(n, 0.9)

        torch.manual_seed(args.seed * 1000 + n)
        regressor = mlp(3, 2, hidden=args.reg_hidden, depth=3)
        with train_threads(args.train_threads):
            train_steps(
                regressor,
                lambda i, m=regressor, x=train_x, y=train_y: (
                    (m(x[i]) - y[i]).square().sum(1).mean()
                ),
                n,
                steps=args.reg_steps,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                generator=torch.Generator().manual_seed(n),
            )
        t_reg = time.perf_counter() - t0
        with torch.no_grad():
            pred = regressor(probe_x)
        reg_gap = float(F.prediction_gap(ref_x, ref_y, probe_x, pred))
        reg_gap_train = float(F.prediction_gap(ref_x, ref_y, train_x, pred[args.n_ref :]))
        reg_risk = float(F.prediction_risk(ref_y, pred[: args.n_ref]))
        reg_mean_norm = float(pred[: args.n_ref].double().square().sum(1).mean())

        t1 = time.perf_counter()
        torch.manual_seed(args.seed * 1000 + n + 1)
        flow = ConditionalFlow(args.flow_hidden)
        with train_threads(args.train_threads):
            flow_loss = train_steps(
                flow,
                lambda i, m=flow, x=train_x, y=train_y: m.loss(x[i], y[i]),
                n,
                steps=args.flow_steps,
                batch_size=args.batch_size,
                lr=args.lr,
                generator=torch.Generator().manual_seed(n + 1),
            )
        t_flow = time.perf_counter() - t1
        sample_gen = torch.Generator().manual_seed(args.seed * 7 + n)
        flow_vals = sampler_gap(
            ref_x,
            ref_y,
            probe_x,
            lambda x, m=flow, g=sample_gen: m.sample(x, args.euler_steps, g),
            args.samples,
        )
        exact_gen = torch.Generator().manual_seed(args.seed * 11 + n)
        exact_vals = sampler_gap(
            ref_x, ref_y, probe_x, lambda x, g=exact_gen: task.exact_samples(x, g), args.samples
        )
        row = {
            "n": n,
            "line": line,
            "law": float(law.predict(n)),
            "law_band_90": [float(low), float(high)],
            "regressor_gap": reg_gap,
            "regressor_gap_train_probes": reg_gap_train,
            "regressor_risk": reg_risk,
            "regressor_mean_sq_prediction": reg_mean_norm,
            "regressor_gap_over_spread": reg_gap / spread,
            "flow_gap": flow_vals["gap"],
            "flow_gap_train_probes": flow_vals["gap_train_probes"],
            "flow_gap_train_probes_over_line": flow_vals["gap_train_probes"] / line,
            "flow_risk_one_sample": flow_vals["risk_one_sample"],
            "flow_risk_best_of_samples": flow_vals["risk_best_of_samples"],
            "flow_final_loss": flow_loss,
            "flow_gap_over_line": flow_vals["gap"] / line,
            "flow_effective_n": law.effective_size(flow_vals["gap"]),
            "exact_sampler_gap": exact_vals["gap"],
            "exact_sampler_gap_over_line": exact_vals["gap"] / line,
            "exact_sampler_gap_train_probes": exact_vals["gap_train_probes"],
            "exact_sampler_gap_train_probes_over_line": exact_vals["gap_train_probes"] / line,
            "flow_gap_over_exact_sampler": flow_vals["gap"] / exact_vals["gap"],
            "regressor_gap_le_risk": reg_gap <= reg_risk,
            "flow_gap_le_best_of_samples": flow_vals["gap"] <= flow_vals["risk_best_of_samples"],
            "seconds_regressor": t_reg,
            "seconds_flow": t_flow,
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"n={n:5d} line={line:.4g} law={row['law']:.4g} | regressor gap={reg_gap:.4g} "
            f"(/spread {reg_gap / spread:.3f}) risk={reg_risk:.4g} |f|^2={reg_mean_norm:.3g} | "
            f"flow gap={flow_vals['gap']:.4g} (/line {row['flow_gap_over_line']:.2f}, "
            f"eff. n {row['flow_effective_n']:.0f}) one-sample risk="
            f"{flow_vals['risk_one_sample']:.3g}; train probes only {flow_vals['gap_train_probes']:.4g} "
            f"(/line {flow_vals['gap_train_probes'] / line:.2f}) | exact sampler gap="
            f"{exact_vals['gap']:.4g}, train probes only {exact_vals['gap_train_probes']:.4g} "
            f"({row['seconds']:.0f}s)",
            flush=True,
        )
    return rows, law_info


def summarize(rows: list[dict], law_info: dict) -> dict[str, Any]:
    ns = [r["n"] for r in rows]
    return {
        "spread": law_info["spread"],
        "law_dimension": law_info["dimension"],
        "slope_line": loglog_slope(ns, [r["line"] for r in rows]),
        "slope_regressor_gap": loglog_slope(ns, [r["regressor_gap"] for r in rows]),
        "slope_flow_gap": loglog_slope(ns, [r["flow_gap"] for r in rows]),
        "slope_exact_sampler_gap": loglog_slope(ns, [r["exact_sampler_gap"] for r in rows]),
        "slope_flow_gap_train_probes": loglog_slope(ns, [r["flow_gap_train_probes"] for r in rows]),
        "slope_exact_sampler_gap_train_probes": loglog_slope(
            ns, [r["exact_sampler_gap_train_probes"] for r in rows]
        ),
        "slope_flow_gap_from_second_size": loglog_slope(ns[1:], [r["flow_gap"] for r in rows[1:]]),
        "flow_gap_over_exact_sampler": [r["flow_gap_over_exact_sampler"] for r in rows],
        "flow_gap_train_probes_over_line": [r["flow_gap_train_probes_over_line"] for r in rows],
        "law_slope": -2.0 / law_info["dimension"],
        "flow_gap_over_line": [r["flow_gap_over_line"] for r in rows],
        "regressor_gap_over_spread": [r["regressor_gap_over_spread"] for r in rows],
        "regressor_gap_le_risk_everywhere": all(r["regressor_gap_le_risk"] for r in rows),
        "flow_gap_decreasing": all(
            b["flow_gap"] < a["flow_gap"] for a, b in itertools.pairwise(rows)
        ),
    }


def figure(rows: list[dict], law_info: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = gc.GapLaw.from_state_dict(law_info["state"])
    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(9.6, 4.8))
    grid = torch.logspace(math.log10(min(ns) / 1.3), math.log10(max(ns) * 1.3), 50)
    ax.plot(
        grid,
        law.predict(grid),
        "-",
        color="0.2",
        lw=1.2,
        label=f"law (fit on n={args.n_fit}, d={law.dimension:.2f})",
    )
    ax.plot(ns, [r["line"] for r in rows], "s", color="0.3", label="lookup-table line (measured)")
    ax.plot(ns, [r["regressor_gap"] for r in rows], "o-", color="C3", label="MSE regressor gap")
    ax.plot(
        ns,
        [r["regressor_gap_train_probes"] for r in rows],
        "o--",
        color="C3",
        mfc="none",
        lw=0.8,
        label="regressor gap, training-input probes only",
    )
    ax.axhline(
        law_info["spread"],
        color="C3",
        ls=":",
        lw=1,
        label=f"spread E|g(x)|^2 = {law_info['spread']:.3f}",
    )
    ax.plot(
        ns,
        [r["flow_gap"] for r in rows],
        "o-",
        color="C0",
        label=f"flow matching gap ({args.samples} samples/input, {args.euler_steps} Euler steps)",
    )
    ax.plot(
        ns,
        [r["exact_sampler_gap"] for r in rows],
        "x--",
        color="C2",
        lw=0.8,
        label="exact conditional sampler gap (same probes)",
    )
    ax.plot(
        ns,
        [r["flow_gap_train_probes"] for r in rows],
        "o--",
        color="C0",
        mfc="none",
        lw=0.8,
        label="flow gap, training-input probes only",
    )
    ax.plot(
        ns,
        [r["exact_sampler_gap_train_probes"] for r in rows],
        "x:",
        color="C2",
        lw=0.8,
        label="exact sampler gap, training-input probes only",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training pairs n")
    ax.set_ylabel("gap (p = 2)")
    ax.set_title("y = s g(x), s = +-1: x on S^2, y in R^2")
    ax.grid(True, which="both", alpha=0.25)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--n-ref", type=int, default=1000)
    parser.add_argument("--n-fit", type=int, default=1000, help="training pairs of the law's fit")
    parser.add_argument("--samples", type=int, default=4, help="flow samples per probe input")
    parser.add_argument("--euler-steps", type=int, default=20)
    parser.add_argument("--reg-steps", type=int, default=2000)
    parser.add_argument("--flow-steps", type=int, default=5000)
    parser.add_argument("--reg-hidden", type=int, default=128)
    parser.add_argument("--flow-hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (gap searches)")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads (MLP steps)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true", help="redraw the figure from --out")
    parser.add_argument("--out", type=Path, default=RESULTS / "prediction_ambiguous.json")
    parser.add_argument("--figure", type=Path, default=HERE / "ambiguous.png")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reg_steps, args.flow_steps = [250, 1000], 200, 300
    if args.replot:
        saved = json.loads(args.out.read_text())
        figure(saved["runs"], saved["law"], args, args.figure)
        return
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    t0 = time.perf_counter()
    rows, law_info = run(args)
    summary = summarize(rows, law_info)
    result = {
        "benchmark": "prediction/bench_ambiguous.py",
        "environment": environment(args.threads),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "law": {k: v for k, v in law_info.items()},
        "runs": rows,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    figure(rows, law_info, args, args.figure)
    print(
        f"\nslopes (log gap vs log n): line {summary['slope_line']:.2f} (law "
        f"{summary['law_slope']:.2f}), regressor {summary['slope_regressor_gap']:.2f}, flow "
        f"{summary['slope_flow_gap']:.2f}, exact sampler {summary['slope_exact_sampler_gap']:.2f}"
    )
    print(f"flow gap / line: {[round(v, 3) for v in summary['flow_gap_over_line']]}")
    print(
        "flow gap (training-input probes) / line: "
        f"{[round(v, 3) for v in summary['flow_gap_train_probes_over_line']]}"
    )
    print(
        f"flow gap / exact sampler gap: "
        f"{[round(v, 2) for v in summary['flow_gap_over_exact_sampler']]}"
    )
    print(f"regressor gap / spread: {[round(v, 3) for v in summary['regressor_gap_over_spread']]}")
    print(f"wrote {args.out} and {args.figure} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
