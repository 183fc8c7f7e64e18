"""Grokking benchmark: AdamW vs PopulationRiskAdamW gates on modular arithmetic.

Each run trains a one-hidden-layer MLP on embedded (a, b) pairs with minibatches drawn without
replacement from a fixed training split, evaluates held-out accuracy every ``--eval-every`` steps and
records the first step at which it reaches ``--target`` (``None`` when it never does within
``--max-steps``). Results are appended as JSON lines so an interrupted sweep can be resumed.

    python benchmarks/grokking/grokking.py --out benchmarks/grokking/results.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gapcallback.optim.population_risk_adamw import PopulationRiskAdamW

TASKS = {
    # name: (modulus, train fraction)
    "div97": (97, 0.25),
    "add113": (113, 0.40),
}


def make_data(task: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Return ``(x_train [n, 2], y_train [n], x_test [m, 2], y_test [m])`` for ``task``."""
    p, frac = TASKS[task]
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.flatten(), b.flatten()
    if task.startswith("div"):
        keep = b != 0
        a, b = a[keep], b[keep]
        b_inv = torch.tensor([pow(int(v), p - 2, p) for v in b])
        y = (a * b_inv) % p
    else:
        y = (a + b) % p
    x = torch.stack([a, b], dim=1)
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(x), generator=g)
    n_train = round(frac * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


class MLP(nn.Module):
    """Embed a and b (shared table), concatenate, one hidden ReLU layer, logits over Z_p."""

    def __init__(self, p: int, dim: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, dim)
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(x).flatten(1))


def make_optimizer(name: str, params, lr: float, wd: float, n: int, b: int):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.98), foreach=False)
    gate, _, alpha = name.partition("-")  # e.g. "soft-finite", "hard-online"
    return PopulationRiskAdamW(
        params,
        lr=lr,
        weight_decay=wd,
        betas=(0.9, 0.98),
        gate=gate,
        alpha=alpha or "finite",
        dataset_size=n,
        batch_size=b,
    )


def run(
    task: str,
    opt_name: str,
    lr: float,
    wd: float,
    seed: int,
    *,
    batch_size: int,
    max_steps: int,
    eval_every: int,
    target: float,
) -> dict:
    p, _ = TASKS[task]
    xtr, ytr, xte, yte = make_data(task, seed)
    torch.manual_seed(seed)
    model = MLP(p)
    n = len(xtr)
    opt = make_optimizer(opt_name, model.parameters(), lr, wd, n, batch_size)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    order, pos = torch.randperm(n, generator=g), 0
    hit, hit_train, curve = None, None, []
    t0 = time.perf_counter()
    for step in range(1, max_steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        loss = loss_fn(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0:
            with torch.no_grad():
                acc = (model(xte).argmax(-1) == yte).float().mean().item()
                tr_acc = (model(xtr).argmax(-1) == ytr).float().mean().item()
            of = opt.open_gate_fraction() if hasattr(opt, "open_gate_fraction") else 1.0
            mg = opt.mean_gate() if hasattr(opt, "mean_gate") else 1.0
            curve.append((step, round(tr_acc, 4), round(acc, 4), round(of, 4), round(mg, 4)))
            if hit_train is None and tr_acc >= 0.99:
                hit_train = step
            if acc >= target:
                hit = step
                break
    return {
        "task": task,
        "opt": opt_name,
        "lr": lr,
        "wd": wd,
        "seed": seed,
        "batch_size": batch_size,
        "max_steps": max_steps,
        "target": target,
        "steps_to_target": hit,
        "steps_to_train_99": hit_train,
        "final_test_acc": curve[-1][2] if curve else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "curve": curve,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument(
        "--opts", nargs="+", default=["adamw", "hard-finite", "soft-finite", "snr-finite"]
    )
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3])
    ap.add_argument("--wds", nargs="+", type=float, default=[0.3, 1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-steps", type=int, default=10_000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", type=str, default="0/1", help="k/K: run every K-th config from k")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # gated coordinates decay towards 0 under weight decay; denormals would slow CPUs ~10x
    torch.set_flush_denormal(True)
    k, K = map(int, args.shard.split("/"))
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["opt"], r["lr"], r["wd"], r["seed"]))
    configs = list(itertools.product(args.seeds, args.tasks, args.lrs, args.wds, args.opts))
    for i, (seed, task, lr, wd, opt) in enumerate(configs):
        if i % K != k or (task, opt, lr, wd, seed) in done:
            continue
        r = run(
            task,
            opt,
            lr,
            wd,
            seed,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            eval_every=args.eval_every,
            target=args.target,
        )
        with open(args.out, "a", buffering=1 << 20) as f:  # one write() per line
            f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(
            f"{task} {opt} lr={lr} wd={wd} seed={seed}: steps={r['steps_to_target']} "
            f"train99={r['steps_to_train_99']} acc={r['final_test_acc']} ({r['seconds']}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
