"""Tiny real Lightning models for callback tests (module level so that ddp_spawn can pickle them)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def circle_data(n: int, seed: int, dim: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * torch.pi
    x = torch.zeros(n, dim)
    x[:, 0], x[:, 1] = angle.cos(), angle.sin()
    return x


class PointCloudModel(L.LightningModule):
    """A 'generator' holding K learnable points; samples are points plus Gaussian noise.

    Training pulls each point towards the data (chamfer loss), so the gap falls over epochs.
    """

    def __init__(self, k: int = 48, dim: int = 3, noise: float = 0.02, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.points = nn.Parameter(torch.randn(k, dim) * 0.5)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        d = torch.cdist(x, self.points)
        loss = d.min(dim=1).values.square().mean() + 0.1 * d.min(dim=0).values.square().mean()
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(self.hparams.k, (n,), generator=generator, device=self.device)
        noise = torch.randn(n, self.hparams.dim, generator=generator, device=self.device)
        return self.points[idx] + self.hparams.noise * noise


class GlobalRNGModel(PointCloudModel):
    """Samples with the global RNG (no generator argument): the callback must isolate it."""

    def sample(self, n: int) -> Tensor:  # type: ignore[override]
        idx = torch.randint(self.hparams.k, (n,))
        return self.points[idx] + self.hparams.noise * torch.randn(n, self.hparams.dim)


def loader(data: Tensor, batch_size: int = 50, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=shuffle)
