"""Main job: a small flow-matching model on a d-sphere in R^D, with GapCallback attached.

    python examples/sphere_diffusion.py                   # d=2 sphere in R^8, 1000 training points
    python examples/sphere_diffusion.py --dim 4 --ambient 16 --n-train 2000 --epochs 60

Trains on CPU in a few minutes, logs to ./runs/sphere_diffusion (CSV and TensorBoard), prints
predicted vs observed generalization and saves the figure (law + history) next to the logs.
Watch gap/observed fall towards gap/memorization (the training set's own gap, which the law
predicts); gap/memorized_fraction tells whether the model got there by copying training points.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import torch
from _flow_matching import FlowMatching, cpu_trainer
from torch.utils.data import DataLoader, TensorDataset

import gapcallback as gc


def sphere(n: int, dim: int, ambient: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` uniform points on the unit ``dim``-sphere, randomly rotated into R^ambient."""
    x = torch.randn(n, dim + 1, generator=generator)
    x = x / x.norm(dim=1, keepdim=True)
    rotation, _ = torch.linalg.qr(
        torch.randn(ambient, ambient, generator=torch.Generator().manual_seed(1234))
    )
    return torch.cat([x, torch.zeros(n, ambient - dim - 1)], dim=1) @ rotation.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=2, help="intrinsic dimension d of the sphere")
    parser.add_argument("--ambient", type=int, default=8, help="ambient dimension D")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-reference", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="evaluate every n epochs")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--out", default="runs/sphere_diffusion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 1 <= args.dim < args.ambient:
        parser.error("need 1 <= --dim < --ambient")

    L.seed_everything(args.seed, verbose=False)
    g = torch.Generator().manual_seed(args.seed)
    train = sphere(args.n_train, args.dim, args.ambient, g)
    reference = sphere(args.n_reference, args.dim, args.ambient, g)

    callback = gc.GapCallback(
        reference,
        train=train,
        num_samples=args.num_samples,
        every_n_epochs=args.every,
        seed=args.seed,
    )
    trainer = cpu_trainer(args.out, args.epochs, [callback])
    model = FlowMatching(args.ambient)
    loader = DataLoader(TensorDataset(train), batch_size=64, shuffle=True)
    start = time.perf_counter()
    trainer.fit(model, loader)
    elapsed = time.perf_counter() - start

    law = callback.law
    print(
        f"\n=== gapcallback summary: {args.dim}-sphere in R^{args.ambient}, n={args.n_train}, "
        f"{args.epochs} epochs in {elapsed:.0f} s ==="
    )
    print(f"law: {law}")
    print(
        f"id/data = {callback.data_dimension:.2f} (true d = {args.dim}),  "
        f"law dimension = {law.dimension:.2f} ± {law.dimension_std:.2f}"
    )
    print(
        f"memorization line (references -> training set): {callback.memorization_gap:.4g};  "
        f"law at n={args.n_train}: {law.predict(args.n_train):.4g}"
    )
    print(
        f"\n{'epoch':>5} {'observed':>10} {'predicted':>10} {'ratio':>7} {'memorized':>9} "
        f"{'id/samples':>10} {'effective n':>11}"
    )
    for h in callback.history:
        if h["skipped"]:
            print(f"{h['epoch']:>5}  skipped: {h['reason']}")
            continue
        eff = h.get("gap/effective_n", math.nan)
        print(
            f"{h['epoch']:>5} {h['gap/observed']:>10.4g} {h['gap/predicted']:>10.4g} "
            f"{h['gap/ratio']:>7.2f} {h['gap/memorized_fraction']:>9.1%} "
            f"{h.get('id/samples', math.nan):>10.2f} {eff:>11.0f}"
        )
    last = callback.latest
    if last is not None:
        verdict = (
            "at the memorization line (the model reproduces its training set)"
            if last["gap/memorized_fraction"] > 0.5
            else "below the memorization line: it generalizes beyond its training set"
            if last["gap/ratio"] < 1
            else "still above the law's optimum"
        )
        print(f"\nfinal: observed/predicted = {last['gap/ratio']:.2f}, {verdict}.")
    figure = Path(trainer.log_dir or args.out) / "gap_callback.png"
    print(f"figure: {figure}\nlogs: {args.out}/csv (CSV), {args.out}/tensorboard (TensorBoard)")


if __name__ == "__main__":
    main()
