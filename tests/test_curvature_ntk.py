"""Tests for functional.curvature (Hessian eigenvalues, trace), functional.ntk (empirical NTK) and
callbacks.curvature_diagnostics (GeneralizationDiagnostics in a real Trainer).

Oracles: closed forms (a quadratic loss 0.5 w^T A w has Hessian A; a linear model has NTK X X^T;
an exact power-law spectrum has decay exponent alpha) and dense matrices
(``torch.autograd.functional.hessian`` / ``jacobian`` on the flattened parameter vector).
"""

from __future__ import annotations

import csv
import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.func import functional_call

from gapcallback.callbacks.curvature_diagnostics import GeneralizationDiagnostics
from gapcallback.evaluation.prepared import GapEvaluationWarning
from gapcallback.functional.curvature import HessianTrace, hessian_eigenvalues, hessian_trace
from gapcallback.functional.ntk import (
    NTKSpectrum,
    empirical_ntk,
    ntk_eigenvalues,
    ntk_spectrum,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# oracles and models
# ----------------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """A single parameter vector w; the loss 0.5 w^T A w has Hessian A everywhere."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=torch.float64))


def quadratic_loss(model: nn.Module, a: Tensor) -> Tensor:
    return 0.5 * model.w @ a @ model.w


def symmetric_with_spectrum(lam: Tensor, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=torch.float64))
    return q @ torch.diag(lam) @ q.T


def mse_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean()


def ce_loss(model: nn.Module, batch) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def _unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in _trainable(model):
        out[k] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in _trainable(model)])


def dense_hessian(model: nn.Module, loss_fn, batch) -> Tensor:
    """[P, P] Hessian on the flattened trainable parameters (model in eval mode)."""
    was = model.training
    model.eval()
    consts = {k: v for k, v in model.named_buffers()}
    consts |= {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, b):
            return loss_fn(self.m, b)

    wrap = Wrap()

    def f(flat: Tensor) -> Tensor:
        state = {f"m.{k}": v for k, v in (_unflatten(model, flat) | consts).items()}
        return functional_call(wrap, state, (batch,))

    h = torch.autograd.functional.hessian(f, _flat(model))
    model.train(was)
    return h


def dense_ntk(model: nn.Module, x: Tensor) -> Tensor:
    was = model.training
    model.eval()
    consts = {k: v for k, v in model.named_buffers()}

    def f(flat: Tensor) -> Tensor:
        return functional_call(model, _unflatten(model, flat) | consts, (x,)).reshape(-1)

    j = torch.autograd.functional.jacobian(f, _flat(model))
    model.train(was)
    return j @ j.T


def mlp(out: int = 1, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).to(dtype)


# ----------------------------------------------------------------------------------------------
# Hessian eigenvalues
# ----------------------------------------------------------------------------------------------


def test_quadratic_eigenvalues_closed_form() -> None:
    lam = torch.tensor([7.0, 5.0, 3.0, 2.5, 1.0, 0.5, 0.1, -0.2, -1.0, -4.0], dtype=torch.float64)
    a = symmetric_with_spectrum(lam)
    model = Quadratic(10)
    for k in (1, 3, 10):
        got = hessian_eigenvalues(model, quadratic_loss, a, k=k, tol=1e-10)
        assert got.shape == (k,) and got.dtype == torch.float64
        torch.testing.assert_close(got, lam[:k], rtol=1e-9, atol=1e-9)
    # k = P: the full spectrum, negative curvature included, exact after P steps
    full = hessian_eigenvalues(model, quadratic_loss, a, k=10, iterations=10)
    torch.testing.assert_close(full, lam, rtol=1e-9, atol=1e-9)


def test_repeated_eigenvalues_found_with_multiplicity() -> None:
    """A Krylov space holds one vector per distinct eigenvalue; restarts recover multiplicity."""
    lam = torch.tensor([4.0, 4.0, 4.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    a = symmetric_with_spectrum(lam, seed=3)
    got = hessian_eigenvalues(Quadratic(8), quadratic_loss, a, k=5, tol=1e-10)
    torch.testing.assert_close(got, lam[:5], rtol=1e-8, atol=1e-8)
    ident = hessian_eigenvalues(Quadratic(6), quadratic_loss, 2 * torch.eye(6).double(), k=6)
    torch.testing.assert_close(ident, torch.full((6,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("method", ["forward-over-reverse", "reverse-over-reverse"])
def test_mlp_eigenvalues_match_dense_hessian(method: str) -> None:
    model = mlp(out=3)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,)))
    dense = torch.linalg.eigvalsh(dense_hessian(model, ce_loss, batch)).flip(0)
    got = hessian_eigenvalues(model, ce_loss, batch, k=3, tol=1e-9, method=method)
    torch.testing.assert_close(got, dense[:3], rtol=1e-7, atol=1e-9)


def test_float32_model_gives_float32_and_frozen_parameters_are_constants() -> None:
    model = mlp(dtype=torch.float32, seed=2)
    model[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(10, 4, generator=g), torch.randn(10, generator=g))
    h = dense_hessian(model, mse_loss, batch).double()
    assert h.shape == (6 + 6 + 1, 6 + 6 + 1)  # 0.bias, 2.weight, 2.bias
    top = hessian_eigenvalues(model, mse_loss, batch, k=2, tol=1e-6)
    assert top.dtype == torch.float32
    torch.testing.assert_close(
        top.double(), torch.linalg.eigvalsh(h).flip(0)[:2], rtol=1e-4, atol=1e-5
    )


def test_non_convergence_warns() -> None:
    lam = torch.linspace(1.0, 2.0, 200, dtype=torch.float64).flip(0)
    a = symmetric_with_spectrum(lam)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        got = hessian_eigenvalues(Quadratic(200), quadratic_loss, a, k=1, iterations=5, tol=1e-12)
    assert float(got[0]) <= 2.0 + 1e-12  # Ritz values never exceed lambda_1


def test_seeded_and_global_rng_untouched() -> None:
    model = mlp(seed=4)
    g = torch.Generator().manual_seed(4)
    batch = (torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, generator=g))
    state = torch.get_rng_state()
    a = hessian_eigenvalues(model, mse_loss, batch, k=2, seed=5, tol=1e-6)
    b = hessian_eigenvalues(model, mse_loss, batch, k=2, seed=5, tol=1e-6)
    t1 = hessian_trace(model, mse_loss, batch, samples=5, seed=1)
    t2 = hessian_trace(model, mse_loss, batch, samples=5, seed=1)
    t3 = hessian_trace(model, mse_loss, batch, samples=5, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and t1 == t2 and not torch.equal(t1.trace, t3.trace)


# ----------------------------------------------------------------------------------------------
# Hessian trace
# ----------------------------------------------------------------------------------------------


def test_trace_of_diagonal_hessian_is_exact() -> None:
    """Rademacher vectors: v^T D v = tr D for every v, so the standard error is exactly 0."""
    d = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0], dtype=torch.float64)
    out = hessian_trace(Quadratic(5), quadratic_loss, torch.diag(d), samples=4)
    assert isinstance(out, HessianTrace)
    torch.testing.assert_close(out.trace, d.sum())
    assert float(out.std) == 0.0


def test_trace_within_its_standard_error() -> None:
    lam = torch.linspace(-1.0, 3.0, 30, dtype=torch.float64)
    a = symmetric_with_spectrum(lam, seed=5)
    z = []
    for seed in range(4):
        out = hessian_trace(Quadratic(30), quadratic_loss, a, samples=200, seed=seed)
        assert float(out.std) > 0
        z.append((float(out.trace) - float(lam.sum())) / float(out.std))
    assert max(abs(v) for v in z) < 4.0, z
    # the standard error matches the closed-form variance 2 sum_{i != j} A_ij^2
    want = math.sqrt(2 * float((a**2).sum() - (a.diag() ** 2).sum()) / 200)
    assert 0.7 * want < float(out.std) < 1.3 * want


def test_mlp_trace_within_standard_error_of_dense() -> None:
    model = mlp(out=3, seed=6)
    g = torch.Generator().manual_seed(6)
    batch = (torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,)))
    exact = float(dense_hessian(model, ce_loss, batch).trace())
    out = hessian_trace(model, ce_loss, batch, samples=300, seed=0)
    assert abs(float(out.trace) - exact) < 4 * float(out.std)
    rev = hessian_trace(model, ce_loss, batch, samples=300, seed=0, method="reverse-over-reverse")
    torch.testing.assert_close(rev.trace, out.trace)


# ----------------------------------------------------------------------------------------------
# batch norm and modes
# ----------------------------------------------------------------------------------------------


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.body = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh())
        self.frozen = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))
        self.head = nn.Linear(4, 2)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.frozen(self.body(x)))


def test_batch_norm_statistics_untouched_and_modes_restored() -> None:
    model = BNNet()
    model.train()
    model.frozen.eval()  # a submodule the user keeps in eval mode
    with torch.no_grad():  # non-trivial running statistics
        model.body[1].running_mean.uniform_(-1, 1)
        model.body[1].running_var.uniform_(0.5, 2)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = {name: m.training for name, m in model.named_modules()}
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    batch = (x, torch.randint(0, 2, (9,), generator=g))

    eig = hessian_eigenvalues(model, ce_loss, batch, k=2, tol=1e-9)
    trace = hessian_trace(model, ce_loss, batch, samples=3)
    theta = empirical_ntk(model, x, chunk_size=4)
    spectrum = ntk_spectrum(model, x, 3)

    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert {name: m.training for name, m in model.named_modules()} == modes
    # the probes differentiate the eval-mode function (running statistics, no dropout)
    dense = torch.linalg.eigvalsh(dense_hessian(model, ce_loss, batch)).flip(0)
    torch.testing.assert_close(eig, dense[:2], rtol=1e-7, atol=1e-9)
    assert torch.isfinite(trace.trace)
    torch.testing.assert_close(theta, dense_ntk(model, x))
    torch.testing.assert_close(spectrum.eigenvalues, ntk_eigenvalues(model, x, 3))
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


# ----------------------------------------------------------------------------------------------
# NTK
# ----------------------------------------------------------------------------------------------


def test_linear_model_ntk_is_gram_matrix() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    lin = nn.Linear(4, 1, bias=False).double()
    torch.testing.assert_close(empirical_ntk(lin, x), x @ x.T)
    torch.testing.assert_close(
        ntk_eigenvalues(lin, x, k=4), torch.linalg.eigvalsh(x @ x.T).flip(0)[:4]
    )
    biased = nn.Linear(4, 1).double()
    torch.testing.assert_close(empirical_ntk(biased, x, chunk_size=4), x @ x.T + 1.0)
    # O outputs: Theta[(n, o), (m, o')] = delta_oo' x_n . x_m, rows input-major
    multi = nn.Linear(4, 3, bias=False).double()
    want = torch.kron(x @ x.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(empirical_ntk(multi, x, chunk_size=1), want)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 50])
def test_mlp_ntk_matches_dense_jacobian(chunk_size: int | None) -> None:
    model = mlp(out=2, seed=10)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    want = dense_ntk(model, x)
    got = empirical_ntk(model, x, chunk_size=chunk_size)
    assert got.shape == (14, 14) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, got.T)
    ev = ntk_eigenvalues(model, x, k=14, chunk_size=chunk_size)
    torch.testing.assert_close(
        ev, torch.linalg.eigvalsh(want).flip(0).clamp_min(0), atol=1e-10, rtol=1e-9
    )
    assert bool((ev[:-1] >= ev[1:]).all())


def test_float32_ntk() -> None:
    model = mlp(out=2, dtype=torch.float32, seed=11)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(11))
    got = empirical_ntk(model, x, chunk_size=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(), dense_ntk(model.double(), x.double()), rtol=1e-5, atol=1e-5
    )


def test_spectrum_closed_forms() -> None:
    """X = U diag(sqrt(lambda)) V^T with lambda_i = i^-alpha: the linear model's NTK has exactly
    that spectrum, so the fitted exponent is alpha and the effective ranks are closed forms."""
    n, d, alpha = 12, 16, 1.5
    lam = torch.arange(1, n + 1, dtype=torch.float64) ** -alpha
    g = torch.Generator().manual_seed(12)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
    x = u @ torch.diag(lam.sqrt()) @ v.T
    lin = nn.Linear(d, 1, bias=False).double()
    out = ntk_spectrum(lin, x)
    assert isinstance(out, NTKSpectrum)
    torch.testing.assert_close(out.eigenvalues, lam)
    torch.testing.assert_close(out.decay_exponent, torch.tensor(alpha, dtype=torch.float64))
    torch.testing.assert_close(out.effective_rank, lam.sum() ** 2 / (lam**2).sum())
    p = lam / lam.sum()
    entropy = ntk_spectrum(lin, x, 4, rank="entropy")
    torch.testing.assert_close(entropy.effective_rank, torch.exp(-(p * p.log()).sum()))
    assert entropy.eigenvalues.shape == (4,)
    torch.testing.assert_close(entropy.decay_exponent, torch.tensor(alpha, dtype=torch.float64))
    # flat spectrum: effective rank n, exponent 0; rank one: effective rank 1, exponent NaN
    flat = ntk_spectrum(lin, torch.eye(n, d, dtype=torch.float64))
    torch.testing.assert_close(flat.effective_rank, torch.tensor(float(n), dtype=torch.float64))
    assert abs(float(flat.decay_exponent)) < 1e-12
    one = ntk_spectrum(lin, torch.ones(n, d, dtype=torch.float64))
    torch.testing.assert_close(one.effective_rank, torch.tensor(1.0, dtype=torch.float64))
    assert math.isnan(float(one.decay_exponent))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------


class ComplexOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.complex(self.lin(x), self.lin(x))


class IntOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).argmax(-1, keepdim=True)


def test_loss_fn_failures_name_loss_fn_with_original_type() -> None:
    model = mlp(seed=13)
    wrong = (torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    for fn in (hessian_eigenvalues, hessian_trace):
        with pytest.raises(RuntimeError, match=r"`loss_fn\(model, batch\)` raised RuntimeError"):
            fn(model, mse_loss, wrong)

    def keyed(m, b):
        return mse_loss(m, (b["x"], b["y"]))

    with pytest.raises(KeyError, match=r"loss_fn.*KeyError"):
        hessian_eigenvalues(model, keyed, {"x": wrong[0]})


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (
            lambda m, b: m(b[0]).squeeze(-1),
            ValueError,
            r"`loss_fn\(model, batch\)` must return a scalar",
        ),
        (lambda m, b: mse_loss(m, b).to(torch.complex128), TypeError, "loss_fn.*real floating"),
        (lambda m, b: mse_loss(m, b).long(), TypeError, "loss_fn.*real floating"),
        (lambda m, b: 1.0, TypeError, "loss_fn.*Tensor"),
        (lambda m, b: mse_loss(m, b) * float("nan"), ValueError, "loss_fn.*non-finite"),
    ],
)
def test_bad_loss_values(loss_fn, error, match) -> None:
    model = mlp(seed=14)
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    with pytest.raises(error, match=match):
        hessian_eigenvalues(model, loss_fn, batch)
    with pytest.raises(error, match=match):
        hessian_trace(model, loss_fn, batch)


def test_bad_arguments() -> None:
    model = mlp(seed=15)
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64))
    x = batch[0]
    frozen = mlp(seed=15).requires_grad_(False)
    cases = [
        (lambda: hessian_eigenvalues(frozen, mse_loss, batch), ValueError, "`model` has no param"),
        (lambda: hessian_trace(frozen, mse_loss, batch), ValueError, "`model` has no param"),
        (lambda: ntk_eigenvalues(frozen, x), ValueError, "`model` has no param"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, k=38), ValueError, "`k` = 38"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, k=0), ValueError, "`k`"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, k=2.0), TypeError, "`k`"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, k=3, iterations=2), ValueError, "`iterations`"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, tol=0.0), ValueError, "`tol`"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, seed=None), TypeError, "`seed`"),
        (lambda: hessian_eigenvalues(model, mse_loss, batch, method="jvp"), ValueError, "`method`"),
        (lambda: hessian_eigenvalues(model, "mse", batch), TypeError, "`loss_fn`"),
        (lambda: hessian_eigenvalues(lambda x: x, mse_loss, batch), TypeError, "`model`"),
        (lambda: hessian_trace(model, mse_loss, batch, samples=1), ValueError, "`samples`"),
        (lambda: ntk_eigenvalues(model, x, k=6), ValueError, "`k` = 6"),
        (lambda: ntk_spectrum(model, x, 0), ValueError, "`k`"),
        (lambda: ntk_spectrum(model, x, rank="stable"), ValueError, "`rank`"),
        (lambda: ntk_eigenvalues(model, x.numpy()), TypeError, "`x`"),
        (lambda: ntk_eigenvalues(model, x[:0]), ValueError, "`x`"),
        (lambda: empirical_ntk(model, x, chunk_size=0), ValueError, "`chunk_size`"),
        (lambda: empirical_ntk(ComplexOut(), torch.randn(4, 3)), TypeError, "`model\\(x\\)`.*complex"),
        (lambda: empirical_ntk(IntOut(), torch.randn(4, 3)), TypeError, "`model\\(x\\)`.*int64"),
        (lambda: empirical_ntk(model, torch.randn(4, 3, dtype=torch.float64)), RuntimeError, "`model\\(x\\)` raised RuntimeError"),
    ]  # fmt: skip
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_complex_parameters_refused() -> None:
    model = nn.Linear(2, 1, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"`model` parameter 'weight' has dtype torch\.complex64"):
        hessian_eigenvalues(
            model, lambda m, b: m(b).abs().sum(), torch.ones(1, 2, dtype=torch.complex64)
        )
    with pytest.raises(TypeError, match="`model` parameter"):
        ntk_eigenvalues(model, torch.ones(3, 2, dtype=torch.complex64), k=1)


# ----------------------------------------------------------------------------------------------
# the callback in a real Trainer
# ----------------------------------------------------------------------------------------------


class Regressor(L.LightningModule):
    """MLP with batch norm; training_step logs (the probes must silence that) and may return a
    dict, draw noise (the probes must fix it) or record the modes it runs in."""

    def __init__(self, returns: str = "tensor", noise: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.returns = returns
        self.noise = noise
        self.modes: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        loss = ((self(x).squeeze(-1) - y) ** 2).mean()
        self.log("train_loss", loss)
        self.modes.append(self.training)
        return {"loss": loss} if self.returns == "dict" else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * torch.randn(48, generator=g)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True
    )
    return x, y, loader


def _fit(tmp_path, model, callbacks, max_steps=6, logger=False) -> L.Trainer:
    torch.manual_seed(123)
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="logs") if logger else False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    _, _, loader = _data()
    trainer.fit(model, loader)
    return trainer


KEYS = (
    "sharpness/top_eigenvalue",
    "sharpness/eigenvalue_2",
    "sharpness/trace",
    "sharpness/trace_std",
    "ntk/top_eigenvalue",
    "ntk/effective_rank",
    "ntk/decay_exponent",
)


def test_callback_logs_every_key_and_matches_functional(tmp_path) -> None:
    x, y, _ = _data()
    probe = (x[:16], y[:16])
    cb = GeneralizationDiagnostics(
        probe, every_n_train_steps=3, hessian_k=2, trace_samples=6, ntk_inputs=x[:10],
        ntk_k=5, prefix="diag/", hessian_tol=1e-5,
    )  # fmt: skip
    model = Regressor(returns="dict")
    trainer = _fit(tmp_path, model, [cb], max_steps=6, logger=True)
    with open(trainer.logger.log_dir + "/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [h["step"] for h in cb.history] == [3.0, 6.0]
    for key in KEYS:
        # Lightning repeats a callback's last on_step value in later rows until it is logged again;
        # the CSV's step column is the batch index (global_step - 1).
        logged = {int(r["step"]): float(r[f"diag/{key}"]) for r in rows if r.get(f"diag/{key}")}
        assert min(logged) == 2, (key, logged)
        assert [logged[2], logged[5]] == pytest.approx([h[key] for h in cb.history]), key
    assert cb.failures == []
    last = cb.history[-1]
    # the last report saw the final parameters: the pure functions give the same numbers
    eig = hessian_eigenvalues(model, mse_loss, probe, k=2, tol=1e-5)
    torch.testing.assert_close(torch.tensor([last["sharpness/top_eigenvalue"], last["sharpness/eigenvalue_2"]]), eig, rtol=1e-4, atol=1e-6)  # fmt: skip
    tr = hessian_trace(model, mse_loss, probe, samples=6)
    assert last["sharpness/trace"] == pytest.approx(float(tr.trace), rel=1e-4)
    spec = ntk_spectrum(model, x[:10], 5)
    assert last["ntk/top_eigenvalue"] == pytest.approx(float(spec.eigenvalues[0]), rel=1e-5)
    assert last["ntk/effective_rank"] == pytest.approx(float(spec.effective_rank), rel=1e-5)
    assert last["ntk/decay_exponent"] == pytest.approx(float(spec.decay_exponent), rel=1e-5)
    assert last["sharpness/trace_std"] >= 0


def test_callback_does_not_perturb_training(tmp_path) -> None:
    """Same final parameters and buffers with and without the callback (RNG isolated, BN stats
    untouched, modes restored, training_step's logs silenced), and training_step ran in train
    mode after each report."""
    x, y, _ = _data()
    plain = Regressor(noise=0.1)
    _fit(tmp_path / "a", plain, [])
    probed = Regressor(noise=0.1)
    cb = GeneralizationDiagnostics((x[:16], y[:16]), every_n_train_steps=2, trace_samples=3,
                                   ntk_inputs=x[:4], ntk_k=3)  # fmt: skip
    trainer = _fit(tmp_path / "b", probed, [cb])
    assert len(cb.history) == 3 and cb.failures == []
    for (k, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # training_step: 2 training calls (train mode), then the report's probe calls (eval), x 3
    runs = [m for i, m in enumerate(probed.modes) if i == 0 or m != probed.modes[i - 1]]
    assert runs == [True, False] * 3 and probed.modes.count(True) == 6
    assert "train_loss" in trainer.callback_metrics


def test_noisy_loss_is_fixed_during_a_report() -> None:
    x, y, _ = _data()
    model = Regressor(noise=0.3)
    cb = GeneralizationDiagnostics((x[:16], y[:16]), hessian_k=1, trace_samples=4, hessian_tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # Lanczos converges on a fixed function
        first = cb.measure(model, step=5)
        again = cb.measure(model, step=5)
    assert first == again and set(first) == {"sharpness/top_eigenvalue", "sharpness/trace", "sharpness/trace_std"}  # fmt: skip


def test_failures_warn_and_training_continues(tmp_path) -> None:
    x, y, _ = _data()

    def broken(model, batch):
        raise ZeroDivisionError("boom")

    cb = GeneralizationDiagnostics((x[:8], y[:8]), loss_fn=broken, every_n_train_steps=2,
                                   trace_samples=2, ntk_inputs=x[:4], ntk_k=50)  # fmt: skip
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, Regressor(), [cb], max_steps=4)
    messages = [str(w.message) for w in rec if issubclass(w.category, GapEvaluationWarning)]
    assert messages[0].startswith("GeneralizationDiagnostics skipped hessian_eigenvalues at step 2")
    assert trainer.global_step == 4
    parts = [f["part"] for f in cb.failures]
    assert parts == ["hessian_eigenvalues", "hessian_trace", "ntk_spectrum"] * 2
    assert (
        "ZeroDivisionError" in cb.failures[0]["reason"] and "`k` = 50" in cb.failures[2]["reason"]
    )
    assert len(messages) == 6 and ".." not in messages[0]
    assert cb.history == []

    raising = GeneralizationDiagnostics((x[:8], y[:8]), loss_fn=broken, every_n_train_steps=2,
                                        on_error="raise")  # fmt: skip
    with pytest.raises(
        RuntimeError, match="hessian_eigenvalues at step 2 failed: ZeroDivisionError"
    ):
        _fit(tmp_path, Regressor(), [raising], max_steps=4)


class Manual(Regressor):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_setup_errors(tmp_path) -> None:
    x, y, _ = _data()
    with pytest.raises(ValueError, match="manual optimization"):
        _fit(tmp_path, Manual(), [GeneralizationDiagnostics((x[:8], y[:8]))])
    with pytest.raises(ValueError, match="`hessian_k` = 500"):
        _fit(tmp_path, Regressor(), [GeneralizationDiagnostics((x[:8], y[:8]), hessian_k=500)])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_train_steps": 0}, ValueError, "`every_n_train_steps`"),
        ({"hessian_k": -1}, ValueError, "`hessian_k`"),
        ({"hessian_k": 1.5}, TypeError, "`hessian_k`"),
        ({"trace_samples": 1}, ValueError, "`trace_samples`"),
        ({"ntk_k": 0}, ValueError, "`ntk_k`"),
        ({"on_error": "ignore"}, ValueError, "`on_error`"),
        ({"prefix": 3}, TypeError, "`prefix`"),
        ({"seed": "0"}, TypeError, "`seed`"),
        ({"loss_fn": "mse"}, TypeError, "`loss_fn`"),
        ({"ntk_inputs": [1.0, 2.0]}, TypeError, "`ntk_inputs`"),
        ({"ntk_inputs": torch.zeros(0, 3)}, ValueError, "`ntk_inputs`"),
        ({"hessian_k": 0, "trace_samples": 0}, ValueError, "Nothing to measure"),
        ({"probe_batch": None}, ValueError, "`probe_batch`"),
        ({"probe_batch": "batch"}, TypeError, "`probe_batch`"),
        ({"probe_batch": (torch.tensor(1.0),)}, ValueError, "`probe_batch`"),
        ({"hessian_iterations": 2, "hessian_k": 3}, ValueError, "`hessian_iterations`"),
        ({"hessian_tol": -1.0}, ValueError, "`hessian_tol`"),
        ({"ntk_chunk_size": 0}, ValueError, "`ntk_chunk_size`"),
    ],
)
def test_constructor_errors(kwargs, error, match) -> None:
    args = {"probe_batch": (torch.randn(4, 3), torch.randn(4))} | kwargs
    with pytest.raises(error, match=match):
        GeneralizationDiagnostics(**args)


def test_ntk_only_without_probe_and_state() -> None:
    x, _, loader = _data()
    cb = GeneralizationDiagnostics(None, hessian_k=0, trace_samples=0, ntk_inputs=x[:5], ntk_k=4)
    assert set(cb.measure(Regressor())) == {"ntk/top_eigenvalue", "ntk/effective_rank", "ntk/decay_exponent"}  # fmt: skip
    from_loader = GeneralizationDiagnostics(loader)
    assert isinstance(from_loader.probe_batch, list) and len(from_loader.probe_batch[0]) == 8
    keys = {
        GeneralizationDiagnostics(loader).state_key,
        GeneralizationDiagnostics(loader, every_n_train_steps=5).state_key,
        GeneralizationDiagnostics(loader, prefix="b/").state_key,
        GeneralizationDiagnostics(loader, hessian_k=2).state_key,
        GeneralizationDiagnostics(loader, ntk_inputs=x[:3]).state_key,
        GeneralizationDiagnostics(loader, loss_fn=mse_loss).state_key,
    }
    assert len(keys) == 6
    cb.history = [{"step": 3.0, "ntk/top_eigenvalue": 1.0}]
    cb.failures = [{"step": 3, "part": "ntk_spectrum", "reason": "x"}]
    cb._last_reported_step = 3
    other = GeneralizationDiagnostics(None, hessian_k=0, trace_samples=0, ntk_inputs=x[:5])
    other.load_state_dict(cb.state_dict())
    assert other.state_dict() == cb.state_dict()


class _NoFunctorch(torch.autograd.Function):
    """An old-style autograd.Function: fine eagerly, refused by torch.func transforms."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos()


def test_failing_hessian_vector_product_is_reported() -> None:
    model = mlp(seed=16)
    batch = (torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64))

    def loss(m, b):
        return _NoFunctorch.apply(m(b[0])).pow(2).mean()

    with pytest.raises(RuntimeError, match=r"Hessian-vector product.*reverse-over-reverse"):
        hessian_eigenvalues(model, loss, batch)
