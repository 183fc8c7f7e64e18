"""Supervised regression with PredictionGapCallback: an MLP on a 2-d manifold in R^8 -> R^2.

    python examples/supervised_regression.py                  # ~1 minute on a laptop CPU
    python examples/supervised_regression.py --epochs 40 --out runs/my_run

Inputs x lie on a 2-dimensional manifold in R^8 (a flat torus, (cos u, sin u, cos v, sin v),
randomly rotated); the targets y = [sin(u + 2 v), cos(2 u - v)] + small noise are smooth in R^2.
An MLP regressor is trained with ``gc.PredictionGapCallback``: at each evaluation the model
predicts at the probe inputs (the reference inputs and the training inputs) and the callback logs

* ``gap/observed``: the gap of the model's graph {(x', f(x'))} to the reference pairs,
* ``gap/risk``: the test risk at the same loss (never below ``gap/observed``),
* ``gap/memorization``: the lookup-table line (the training pairs as the prediction space),
* ``gap/predicted``: the law fitted on the training pairs against the references at n_train.

``gc.GapEarlyStopping(monitor="gap/risk")`` stops once the risk stops improving. Logs go to
``--out`` (default ./runs/supervised_regression): CSV, and TensorBoard if it is installed.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gapcallback as gc


def make_task(n: int, generator: torch.Generator, noise: float = 0.02) -> tuple[Tensor, Tensor]:
    """``n`` pairs (x in R^8 on a rotated flat 2-torus, y in R^2 smooth in the angles + noise)."""
    u, v = (2 * math.pi * torch.rand(n, 2, generator=generator)).unbind(1)
    x = torch.stack([u.cos(), u.sin(), v.cos(), v.sin()], dim=1)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(7)))
    x = torch.cat([x, torch.zeros(n, 4)], dim=1) @ rotation.T
    y = torch.stack([torch.sin(u + 2 * v), torch.cos(2 * u - v)], dim=1)
    return x, y + noise * torch.randn(n, 2, generator=generator)


class Regressor(L.LightningModule):
    def __init__(self, d_in: int = 8, d_out: int = 2, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, d_out),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = (self(x) - y).square().sum(1).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loggers(out: str) -> list[Logger]:
    result: list[Logger] = [CSVLogger(out, name="csv")]
    try:
        result.append(TensorBoardLogger(out, name="tensorboard"))
    except ModuleNotFoundError:
        warnings.warn("tensorboard is not installed: logging to CSV only.", stacklevel=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--every", type=int, default=2, help="evaluate every n epochs")
    parser.add_argument("--patience", type=int, default=4, help="evaluations without progress")
    parser.add_argument("--out", default="runs/supervised_regression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)

    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = make_task(args.n_train, g)
    x_val, y_val = make_task(args.n_val, g)

    gap = gc.PredictionGapCallback(
        reference=(x_val, y_val),
        train=(x_train, y_train),
        every_n_epochs=args.every,
        law_options={"num_sizes": 7, "repeats": 3},
        seed=args.seed,
    )
    stop = gc.GapEarlyStopping(monitor="gap/risk", patience=args.patience, min_delta=1e-5)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=loggers(args.out),
        callbacks=[gap, stop],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=128, shuffle=True)
    start = time.perf_counter()
    trainer.fit(Regressor(), loader)
    elapsed = time.perf_counter() - start

    law = gap.law
    print(
        f"\n=== supervised regression: 2-d manifold in R^8 -> R^2, n={args.n_train}, "
        f"{trainer.current_epoch} epochs in {elapsed:.0f} s ==="
    )
    if law is not None:
        print(f"law (joint pairs [x, y]): d = {law.dimension:.2f} ± {law.dimension_std:.2f}")
    print(f"\n{'epoch':>5} {'observed':>10} {'risk':>10} {'memorization':>12} {'predicted':>10}")
    for h in gap.history:
        if h["skipped"]:
            print(f"{h['epoch']:>5}  skipped: {h['reason']}")
            continue
        print(
            f"{h['epoch']:>5} {h['gap/observed']:>10.4g} {h['gap/risk']:>10.4g} "
            f"{h['gap/memorization']:>12.4g} {h.get('gap/predicted', math.nan):>10.4g}"
        )
    last = gap.latest
    if last is None:
        print("no evaluation ran (too few epochs?)")
        return
    observed, risk = last["gap/observed"], last["gap/risk"]
    memorization = last["gap/memorization"]
    print(
        f"\nlast evaluation (epoch {last['epoch']}): gap/observed = {observed:.4g}, gap/risk = "
        f"{risk:.4g}, gap/predicted = {last.get('gap/predicted', math.nan):.4g}, "
        f"gap/memorization = {memorization:.4g}"
    )
    print(f"observed <= risk: {observed <= risk}")
    print(
        f"the model's gap is {observed / memorization:.3g}x the lookup-table line: "
        + (
            "it generalizes beyond its training pairs."
            if observed < memorization
            else "no better than looking up the nearest training pair."
        )
    )
    if stop.stopped_epoch:
        print(f"early stopping: {stop.stopping_reason_message}")
    print(f"logs: {args.out}/csv (CSV), {args.out}/tensorboard (TensorBoard)")


if __name__ == "__main__":
    main()
