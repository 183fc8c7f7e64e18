"""Summarize ``results.jsonl``: pick each optimizer's best grid point, tabulate medians and ratios.

python benchmarks/grokking/summarize.py                 # writes results.csv, table.md, figure
python benchmarks/grokking/summarize.py --select-only   # prints "task opt lr wd" lines
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(r: dict) -> tuple[float, float]:
    """Lower is better: steps to target (inf when not reached), then minus final accuracy."""
    s = r["steps_to_target"]
    return (math.inf if s is None else s, -(r["final_test_acc"] or 0.0))


def best_configs(
    rows: list[dict], tune_seed: int = 0
) -> dict[tuple[str, str], tuple[float, float]]:
    by = defaultdict(list)
    for r in rows:
        if r["seed"] == tune_seed:
            by[(r["task"], r["opt"])].append(r)
    best = {}
    for k, v in by.items():
        r = min(v, key=score)
        best[k] = (r["lr"], r["wd"])
    return best


def median_steps(steps: list[int | None]) -> float:
    """Median with 'did not reach' counted as +inf (so the median is inf if half did not reach)."""
    vals = sorted(math.inf if s is None else s for s in steps)
    return statistics.median(vals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    ap.add_argument("--select-only", action="store_true")
    args = ap.parse_args()
    rows = load(args.results)
    best = best_configs(rows)
    if args.select_only:
        for (task, opt), (lr, wd) in sorted(best.items()):
            print(task, opt, lr, wd)
        return
    table = []
    for (task, opt), (lr, wd) in sorted(best.items()):
        runs = sorted(
            (r for r in rows if (r["task"], r["opt"], r["lr"], r["wd"]) == (task, opt, lr, wd)),
            key=lambda r: r["seed"],
        )
        steps = [r["steps_to_target"] for r in runs]
        table.append(
            {
                "task": task,
                "opt": opt,
                "lr": lr,
                "wd": wd,
                "seeds": len(runs),
                "steps": steps,
                "median": median_steps(steps),
                "train99": [r["steps_to_train_99"] for r in runs],
                "final_acc": [r["final_test_acc"] for r in runs],
                "max_steps": runs[0]["max_steps"],
            }
        )
    base = {t["task"]: t["median"] for t in table if t["opt"] == "adamw"}
    for t in table:
        b = base.get(t["task"])
        t["speedup_vs_adamw"] = (
            (b / t["median"]) if b is not None and math.isfinite(t["median"]) else 0.0
        )
    with open(HERE / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "task",
                "optimizer",
                "lr",
                "weight_decay",
                "seeds",
                "steps_per_seed",
                "median_steps",
                "speedup_vs_adamw",
                "train99_per_seed",
                "final_test_acc",
            ]
        )
        for t in table:
            w.writerow(
                [
                    t["task"],
                    t["opt"],
                    t["lr"],
                    t["wd"],
                    t["seeds"],
                    t["steps"],
                    t["median"],
                    round(t["speedup_vs_adamw"], 3),
                    t["train99"],
                    t["final_acc"],
                ]
            )
    lines = [
        "| task | optimizer | lr | wd | steps to 95% (per seed) | median | AdamW median / median |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table:
        per = ", ".join("n.r." if s is None else str(s) for s in t["steps"])
        med = "not reached" if not math.isfinite(t["median"]) else f"{t['median']:.0f}"
        ratio = (
            "-"
            if t["opt"] == "adamw"
            else (f"{t['speedup_vs_adamw']:.2f}x" if t["speedup_vs_adamw"] else "n/a")
        )
        lines.append(
            f"| {t['task']} | {t['opt']} | {t['lr']:g} | {t['wd']:g} | {per} | {med} | {ratio} |"
        )
    grid = defaultdict(dict)
    for r in rows:
        if r["seed"] == 0:
            grid[(r["task"], r["opt"])][(r["lr"], r["wd"])] = r["steps_to_target"]
    lines += [
        "",
        "Tuning grid (seed 0, steps to 95%; n.r. = not reached):",
        "",
        "| task | optimizer | "
        + " | ".join(f"lr={lr:g}, wd={wd:g}" for lr, wd in sorted(next(iter(grid.values()))))
        + " |",
        "|---|---|" + "---|" * len(next(iter(grid.values()))),
    ]
    for (task, opt), g in sorted(grid.items()):
        lines.append(
            f"| {task} | {opt} | "
            + " | ".join("n.r." if g.get(k) is None else str(g[k]) for k in sorted(g))
            + " |"
        )
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = sorted({t["task"] for t in table})
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        for t in (t for t in table if t["task"] == task):
            run = next(
                r
                for r in rows
                if (r["task"], r["opt"], r["lr"], r["wd"], r["seed"])
                == (task, t["opt"], t["lr"], t["wd"], 0)
            )
            c = run["curve"]
            lab = f"{t['opt']} (lr={t['lr']:g}, wd={t['wd']:g})"
            axes[0, j].plot([p[0] for p in c], [p[2] for p in c], label=lab)
            axes[1, j].plot([p[0] for p in c], [p[3] for p in c], label=lab)
        axes[0, j].set(
            title=f"{task}: held-out accuracy (seed 0)", xlabel="step", ylabel="accuracy"
        )
        axes[1, j].set(title=f"{task}: fraction of open gates", xlabel="step", ylabel="open gates")
        axes[0, j].axhline(0.95, color="k", lw=0.5, ls="--")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "grokking.png", dpi=110)


if __name__ == "__main__":
    main()
