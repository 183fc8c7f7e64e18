"""Real data: a small flow-matching model on scikit-learn's bundled digits (1797 x 64), GapCallback attached.

    pip install scikit-learn        # for the bundled data set (no download)
    python examples/digits_diffusion.py

Trains on CPU in a few minutes, logs to ./runs/digits_diffusion (CSV and TensorBoard), prints
predicted vs observed generalization and saves the figure next to the logs. The digits sit on a
manifold of intrinsic dimension ~7-10 in R^64: the law predicts how slowly the gap falls with n.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=1500)
    parser.add_argument("--out", default="runs/digits_diffusion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise SystemExit("This example needs scikit-learn: pip install scikit-learn") from err

    L.seed_everything(args.seed, verbose=False)
    data = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0  # pixels in [0, 1]
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    if not 10 <= args.n_train < len(data) - 10:
        parser.error(f"--n-train must be in [10, {len(data) - 10})")
    train, reference = data[perm[: args.n_train]], data[perm[args.n_train :]]

    callback = gc.GapCallback(
        reference,
        train=train,
        num_samples=args.num_samples,
        every_n_epochs=args.every,
        seed=args.seed,
    )
    trainer = cpu_trainer(args.out, args.epochs, [callback])
    model = FlowMatching(64, hidden=512, depth=3, lr=1e-3)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(TensorDataset(train), batch_size=128, shuffle=True))
    elapsed = time.perf_counter() - start

    law = callback.law
    print(
        f"\n=== gapcallback summary: digits, n_train={len(train)}, references={len(reference)}, "
        f"{args.epochs} epochs in {elapsed:.0f} s ==="
    )
    print(f"law: {law}")
    print(
        f"id/data = {callback.data_dimension:.2f}; law dimension = {law.dimension:.2f} ± "
        f"{law.dimension_std:.2f}"
    )
    for n in (len(train) // 4, len(train) // 2, len(train), 2 * len(train)):
        low, high = law.predict_interval(n)
        print(
            f"  predicted gap with n={n:>5}: {law.predict(n):.4g}  (90% band {low:.4g} - {high:.4g})"
        )
    print(f"memorization line: {callback.memorization_gap:.4g}")
    print(
        f"\n{'epoch':>5} {'observed':>10} {'predicted':>10} {'ratio':>7} {'memorized':>9} {'id/samples':>10}"
    )
    for h in callback.history:
        if h["skipped"]:
            print(f"{h['epoch']:>5}  skipped: {h['reason']}")
            continue
        print(
            f"{h['epoch']:>5} {h['gap/observed']:>10.4g} {h['gap/predicted']:>10.4g} "
            f"{h['gap/ratio']:>7.2f} {h['gap/memorized_fraction']:>9.1%} "
            f"{h.get('id/samples', math.nan):>10.2f}"
        )
    print(f"figure: {Path(trainer.log_dir or args.out) / 'gap_callback.png'}")


if __name__ == "__main__":
    main()
