"""Tests for gapcallback.functional.gradient_signal and gapcallback.callbacks.gradient_snr."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gapcallback.callbacks.gradient_snr import GradientSNR
from gapcallback.functional.gradient_signal import (
    StreamingGradientMoments,
    gradient_moments,
    gradient_snr,
    one_step_generalization_ratio,
    osgr_weights,
    per_sample_gradients,
    predicted_gap_growth,
)
from gapcallback.optim import PopulationRiskAdamW


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def explicit_loop_grads(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Independent oracle: one plain backward per sample."""
    x, y = batch
    out = {k: [] for k, _ in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            out[k].append(p.grad.detach().clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# per-sample gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_gradients_match_explicit_loop(method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    batch = (torch.randn(9, 5), torch.randint(0, 3, (9,)))
    got = per_sample_gradients(model, ce_loss, batch, method=method)
    want = explicit_loop_grads(model, batch)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == (9, *dict(model.named_parameters())[k].shape)
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # the mean of per-sample gradients is the batch gradient
    model.zero_grad()
    ce_loss(model, batch).mean().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k].mean(0), p.grad, rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_dict_batch_frozen_params_and_chunks() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    batch = {"x": torch.randn(6, 3), "y": torch.randint(0, 2, (6,))}

    def loss(m, b):
        return nn.functional.cross_entropy(m(b["x"]), b["y"], reduction="none")

    g = per_sample_gradients(model, loss, batch, chunk_size=2)
    assert "0.weight" not in g and set(g) == {"0.bias", "2.weight", "2.bias"}
    g_loop = per_sample_gradients(model, loss, batch, method="loop")
    for k in g:
        torch.testing.assert_close(g[k], g_loop[k], rtol=1e-5, atol=1e-6)


def test_per_sample_gradients_errors() -> None:
    model = nn.Linear(2, 1)
    batch = (torch.randn(4, 2), torch.randn(4))
    with pytest.raises(ValueError, match="one loss per sample"):
        per_sample_gradients(model, lambda m, b: m(b[0]).sum() * torch.ones(2), batch)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        per_sample_gradients(lambda x: x, lambda m, b: m(b), batch)
    with pytest.raises(ValueError, match="method"):
        per_sample_gradients(model, lambda m, b: m(b[0]).squeeze(-1), batch, method="jvp")
    with pytest.raises(ValueError, match="leading"):
        per_sample_gradients(model, lambda m, b: m(b[0]), (torch.randn(4, 2), torch.randn(3)))


@pytest.mark.parametrize("method", ["vmap", "loop"])
def test_per_sample_gradients_batch_norm_in_train_mode_is_refused_with_the_fix(method) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    batch = (torch.randn(6, 3), torch.randn(6))

    def loss(m, b):
        return (m(b[0]).squeeze(-1) - b[1]) ** 2

    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"train mode.*'1'.*model\.eval\(\)"):
        per_sample_gradients(model, loss, batch, method=method)
    assert torch.equal(model[1].running_mean, before)  # refused before any forward pass
    model.eval()
    grads = per_sample_gradients(model, loss, batch, method=method)
    assert grads["0.weight"].shape == (6, 4, 3)
    assert torch.equal(model[1].running_mean, before)


# ----------------------------------------------------------------------------------------------
# SNR, OSGR
# ----------------------------------------------------------------------------------------------


def test_gradient_snr_hand_computed_and_degenerate() -> None:
    g = torch.tensor([[1.0, 1.0, 2.0, 0.0], [3.0, -1.0, 2.0, 0.0], [2.0, 0.0, 2.0, 0.0]])
    # means (2, 0, 2, 0); unbiased variances (1, 1, 0, 0)
    r = gradient_snr(g)
    assert r.tolist() == [4.0, 0.0, math.inf, 0.0]
    mean, var = gradient_moments({"a": g})
    assert mean["a"].tolist() == [2.0, 0.0, 2.0, 0.0]
    assert var["a"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert isinstance(gradient_snr([g, g]), list)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 12).flatmap(
        lambda b: st.lists(
            st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3),
            min_size=b,
            max_size=b,
        )
    )
)
def test_gradient_snr_matches_numpy(rows) -> None:
    g = np.asarray(rows, dtype=np.float64)
    mean, var = g.mean(0), g.var(0, ddof=1)
    r = gradient_snr(torch.tensor(g)).numpy()
    # Identical rows have variance exactly 0 (SNR inf); numpy's two-pass var leaves rounding noise
    # ~ (eps * mean)^2 there, so compare only where the variance is above that noise floor.
    ok = var > (1e-12 * mean) ** 2 + 1e-300
    np.testing.assert_allclose(r[ok], mean[ok] ** 2 / var[ok], rtol=1e-8)
    assert (r >= 0).all() and not np.isnan(r).any()


def test_gradient_snr_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        gradient_snr(torch.ones(1, 3))
    with pytest.raises(TypeError, match="mapping"):
        gradient_snr("grads")


def test_osgr_formula_and_closed_form() -> None:
    assert float(one_step_generalization_ratio(torch.tensor([1.0, 1.0]), n=1)) == pytest.approx(0.5)
    # common r: OSGR = 1 - (1/n) / (r + 1/n)
    r, n = 3.0, 4
    got = one_step_generalization_ratio(torch.full((5,), r), n)
    assert float(got) == pytest.approx(1 - (1 / n) / (r + 1 / n))
    # infinite SNR is pure signal, zero SNR pure noise
    assert float(one_step_generalization_ratio(torch.tensor([math.inf]), 10)) == 1.0
    assert float(one_step_generalization_ratio(torch.tensor([0.0]), 10)) == pytest.approx(0.0)
    # Liu weights: OSGR == sum mean^2 / sum (mean^2 + var / n)
    torch.manual_seed(0)
    g = torch.randn(16, 50) + torch.linspace(-1, 1, 50)
    mean, var = gradient_moments(g)
    w = osgr_weights(mean, var, 16)
    assert float(w.sum()) == pytest.approx(1.0)
    expected = (mean**2).sum() / (mean**2 + var / 16).sum()
    assert float(one_step_generalization_ratio(gradient_snr(g), 16, w)) == pytest.approx(
        float(expected)
    )
    assert float(predicted_gap_growth(0.75, 2.0)) == pytest.approx(0.5)


def test_osgr_errors() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        one_step_generalization_ratio(torch.ones(3), 0)
    with pytest.raises(ValueError, match="one entry per coordinate"):
        one_step_generalization_ratio(torch.ones(3), 2, torch.ones(4))
    with pytest.raises(ValueError, match="non-negative"):
        one_step_generalization_ratio(torch.tensor([-1.0]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        one_step_generalization_ratio(torch.ones(2), 2, torch.tensor([1.0, -1.0]))


# ----------------------------------------------------------------------------------------------
# streaming estimate
# ----------------------------------------------------------------------------------------------


def test_streaming_welford_matches_batch_statistics() -> None:
    torch.manual_seed(0)
    G = torch.randn(20, 7, dtype=torch.float64) * 0.3 + 1.0
    acc = StreamingGradientMoments()
    for g in G:
        acc.update([g[:3], g[3:].reshape(2, 2)], batch_size=8)
    mean, var = acc.moments()
    torch.testing.assert_close(mean[0], G[:, :3].mean(0))
    torch.testing.assert_close(var[1].reshape(-1), 8 * G[:, 3:].var(0, correction=1))
    state = acc.state_dict()
    acc2 = StreamingGradientMoments()
    acc2.load_state_dict(state)
    torch.testing.assert_close(acc2.snr()[0], acc.snr()[0])


def test_streaming_estimates_per_sample_snr() -> None:
    """Minibatch means of b i.i.d. samples: variance x b recovers the per-sample variance."""
    gen = torch.Generator().manual_seed(0)
    mu, sigma, b = torch.tensor([0.5, 0.0, 2.0]), torch.tensor([1.0, 1.0, 0.5]), 16
    acc = StreamingGradientMoments()
    for _ in range(4000):
        batch = mu + sigma * torch.randn(b, 3, generator=gen)
        acc.update([batch.mean(0)], batch_size=b)
    r = acc.snr()[0]
    torch.testing.assert_close(r, (mu / sigma) ** 2, rtol=0.15, atol=0.02, check_dtype=False)


def test_streaming_errors() -> None:
    acc = StreamingGradientMoments()
    with pytest.raises(ValueError, match="at least 2"):
        acc.moments()
    with pytest.raises(ValueError, match="batch_size"):
        acc.update([torch.ones(2)], batch_size=0)
    acc.update([torch.ones(2), None], batch_size=2)
    with pytest.raises(ValueError, match="Expected 2"):
        acc.update([torch.ones(2)], batch_size=2)


# ----------------------------------------------------------------------------------------------
# callback with a real Trainer
# ----------------------------------------------------------------------------------------------


class Regressor(L.LightningModule):
    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.optimizer = optimizer

    def per_sample_loss(self, batch):
        x, y = batch
        return (self.net(x).squeeze(-1) - y) ** 2

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.per_sample_loss(batch).mean())

    def configure_optimizers(self):
        if self.optimizer == "population":
            return PopulationRiskAdamW(
                self.parameters(), lr=1e-2, alpha="finite", dataset_size=64, batch_size=16
            )
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 4, generator=gen)
    y = x[:, 0] - x[:, 1] + 0.3 * torch.randn(80, generator=gen)
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True
    )
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[64:], y[64:]), batch_size=16)
    return x, y, train, val


def _trainer(tmp_path, callbacks, max_epochs=4, **kw) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_callback_logs_keys(tmp_path, mode: str) -> None:
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    x, y, train, val = _data()
    probe = (x[:32], y[:32]) if mode == "exact" else None
    fig_path = tmp_path / "snr.png"
    cb = GradientSNR(probe_batch=probe, every_n_steps=4, figure_path=fig_path)
    assert cb.streaming is (mode == "streaming")
    trainer = _trainer(tmp_path, [cb])
    trainer.fit(Regressor("population"), train, val)
    m = trainer.callback_metrics
    for key in ("snr/median", "snr/p95", "snr/osgr", "snr/predicted_gap_growth", "snr/open_gates"):
        assert key in m, key
    assert 0.0 <= float(m["snr/osgr"]) <= 1.0
    assert float(m["snr/p95"]) >= float(m["snr/median"]) >= 0.0
    assert len(cb.history) == 4  # 16 steps / 4
    assert len(cb.observed) == 4  # one per validation epoch
    assert fig_path.exists()


def test_callback_exact_matches_functional(tmp_path) -> None:
    torch.manual_seed(0)
    x, y, train, _ = _data()
    probe = (x[:16], y[:16])
    cb = GradientSNR(probe_batch=probe, every_n_steps=4, n=16)
    model = Regressor()
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    trainer.fit(model, train)
    model.eval()
    grads = per_sample_gradients(model, lambda m, b: m.per_sample_loss(b), probe)
    r = torch.cat([v.reshape(-1) for v in gradient_snr(grads).values()])
    mean, var = gradient_moments(grads)
    osgr = one_step_generalization_ratio(r, 16, osgr_weights(mean, var, 16))
    assert cb.history[-1]["snr/osgr"] == pytest.approx(float(osgr), rel=1e-5)
    assert cb.history[-1]["snr/median"] == pytest.approx(float(r.double().median()), rel=1e-4)


def test_callback_loss_fn_argument_and_missing_loss_error(tmp_path) -> None:
    x, y, train, _ = _data()

    class NoPerSample(Regressor):
        per_sample_loss = None  # type: ignore[assignment]

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return ((self.net(xb).squeeze(-1) - yb) ** 2).mean()

    with pytest.raises(ValueError, match="per_sample_loss"):
        _trainer(tmp_path, [GradientSNR(probe_batch=(x[:8], y[:8]))], max_epochs=1).fit(
            NoPerSample(), train
        )
    cb = GradientSNR(
        probe_batch=torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x[:8], y[:8]), batch_size=8
        ),
        every_n_steps=2,
        loss_fn=lambda m, b: (m.net(b[0]).squeeze(-1) - b[1]) ** 2,
    )
    _trainer(tmp_path, [cb], max_epochs=1).fit(NoPerSample(), train)
    assert len(cb.history) == 2


def test_callback_never_crashes_training(tmp_path) -> None:
    x, y, train, _ = _data()

    def broken(model, batch):
        raise RuntimeError("boom")

    cb = GradientSNR(probe_batch=(x[:8], y[:8]), every_n_steps=2, loss_fn=broken)
    trainer = _trainer(tmp_path, [cb], max_epochs=1)
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer.fit(Regressor(), train)
    assert trainer.global_step == 4 and cb.history == []


def test_callback_state_dict_round_trip(tmp_path) -> None:
    _, _, train, val = _data()
    cb = GradientSNR(every_n_steps=3)
    _trainer(tmp_path, [cb], max_epochs=2).fit(Regressor(), train, val)
    state = cb.state_dict()
    cb2 = GradientSNR(every_n_steps=3)
    cb2.load_state_dict(state)
    assert cb2.history == cb.history and cb2.observed == cb.observed
    assert cb2.state_dict()["predicted_gap"] == state["predicted_gap"]
    assert cb2.stream.count == cb.stream.count


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be >= 1"),
        ({"every_n_steps": 2.5}, TypeError, "`every_n_steps` must be an int"),
        ({"every_n_steps": True}, TypeError, "`every_n_steps`"),
        ({"loss_fn": "mse"}, TypeError, "`loss_fn` must be callable"),
        ({"probe_batch": 3}, TypeError, "`probe_batch` must be None"),
        ({"probe_batch": (torch.ones(1, 2), torch.ones(1))}, ValueError, "at least 2 samples"),
        ({"n": 0}, ValueError, "`n` must be >= 1"),
        ({"n": 1.5}, TypeError, "`n` must be None or an int"),
        ({"val_loss_key": 3}, TypeError, "`val_loss_key`"),
        ({"val_loss_key": ""}, TypeError, "`val_loss_key`"),
        ({"train_loss_key": 5}, TypeError, "`train_loss_key`"),
        ({"figure_path": 3}, TypeError, "`figure_path`"),
        ({"method": "vmapp"}, ValueError, r"`method` must be one of 'vmap', 'loop'.*'vmap'\?"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be >= 1"),
        ({"chunk_size": "8"}, TypeError, "`chunk_size`"),
        ({"log_open_gates": "yes"}, TypeError, "`log_open_gates` must be True or False"),
    ],
)
def test_callback_constructor_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GradientSNR(**kwargs)


class FrozenPart(Regressor):
    """A regressor whose dropout 'encoder' the user keeps frozen in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Dropout(0.5)
        self.encoder.requires_grad_(False)
        self.modes: list[tuple[bool, bool]] = []

    def on_train_start(self) -> None:
        self.encoder.eval()

    def per_sample_loss(self, batch):
        x, y = batch
        return (self.net(self.encoder(x)).squeeze(-1) - y) ** 2

    def training_step(self, batch, batch_idx):
        self.modes.append((self.training, self.encoder.training))
        return super().training_step(batch, batch_idx)


def test_exact_probe_keeps_each_submodule_mode(tmp_path) -> None:
    """After each probe the model trains again, but a frozen eval submodule stays in eval."""
    x, y, train, _ = _data()
    cb = GradientSNR(probe_batch=(x[:16], y[:16]), every_n_steps=1)
    model = FrozenPart()
    _trainer(tmp_path, [cb], max_epochs=1).fit(model, train)
    assert len(cb.history) == 4  # a report after every step
    assert model.modes == [(True, False)] * 4


def test_two_instances_have_their_own_checkpoint_slot(tmp_path) -> None:
    x, y, train, val = _data()

    def callbacks():
        return [
            GradientSNR(every_n_steps=2),
            GradientSNR(probe_batch=(x[:16], y[:16]), every_n_steps=3),
        ]

    first = callbacks()
    assert first[0].state_key != first[1].state_key
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [*first, ckpt], max_epochs=2, enable_checkpointing=True)
    trainer.fit(Regressor(), train, val)
    assert first[0].history != first[1].history and len(first[1].history) == 2

    second = callbacks()
    resumed = _trainer(tmp_path, second, max_epochs=2)
    resumed.fit(Regressor(), train, val, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for before, after in zip(first, second, strict=True):
        assert after.history == before.history
        assert after.observed == before.observed
        assert after.state_dict() == before.state_dict()
