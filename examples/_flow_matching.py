"""A small flow-matching generative model shared by the examples (not part of the library).

Flow matching (Lipman et al. 2023) with the linear path x_t = (1 - t) x_0 + t x_1, x_0 ~ N(0, I):
the network regresses the velocity x_1 - x_0 and samples by integrating dx/dt = v(x, t) with Euler
steps. Enough to train on a laptop CPU in minutes, and it memorizes when trained long enough on a
small set, which is what the gap callback is there to show.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import Tensor, nn


def local_loggers(out: str) -> list[Logger]:
    """CSV and TensorBoard loggers writing under ``out`` (CSV only if tensorboard is missing)."""
    loggers: list[Logger] = [CSVLogger(out, name="csv")]
    try:
        loggers.append(TensorBoardLogger(out, name="tensorboard"))
    except ModuleNotFoundError:
        warnings.warn(
            "tensorboard is not installed: logging to CSV only (pip install -e '.[examples]').",
            stacklevel=2,
        )
    return loggers


def cpu_trainer(out: str, epochs: int, callbacks: list[L.Callback]) -> L.Trainer:
    """A CPU ``Trainer`` logging to CSV and TensorBoard under ``out`` (no checkpoints)."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=local_loggers(out),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )


class VelocityMLP(nn.Module):
    def __init__(self, dim: int, hidden: int = 256, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(dim + 1, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


class FlowMatching(L.LightningModule):
    """Flow-matching model with a ``sample(n, generator=None)`` method for :class:`GapCallback`."""

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        lr: float = 2e-3,
        sampling_steps: int = 50,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.velocity = VelocityMLP(dim, hidden, depth)

    def training_step(self, batch: Tensor | list[Tensor], batch_idx: int) -> Tensor:
        x1 = batch[0] if isinstance(batch, (list, tuple)) else batch
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = (self.velocity(xt, t) - (x1 - x0)).square().mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        x = torch.randn(n, self.hparams.dim, generator=generator, device=self.device)
        steps = self.hparams.sampling_steps
        for i in range(steps):
            t = torch.full((n,), i / steps, device=self.device)
            x = x + self.velocity(x, t) / steps
        return x
