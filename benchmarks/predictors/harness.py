"""Rank every generalization predictor of gapcallback (and WeightWatcher's alpha) on a family of
small models trained on CPU: Kendall's tau against the observed gap, overall and conditional.

Families
--------
* **Classifiers** on scikit-learn's digits (8 x 8, features / 16, a fixed held-out test split of
  297 images, training sets nested in the other 1500): MLPs (ReLU, ``depth`` hidden layers of
  ``width`` units) and tiny CNNs (one 3 x 3 convolution of ``width`` channels, a 32-unit hidden
  layer, the head). SGD with momentum 0.9, trained until the cross-entropy on the (possibly
  noisy) training set is below 0.05, checked every 50 steps, or a step cap (8000; 1500 with
  ``--quick``). Label noise: that fraction of the training labels replaced by a uniformly drawn
  *other* class (test labels stay clean). Observed gap: test cross-entropy minus training
  cross-entropy on the labels trained on (``gap_loss``, the target of the table), and test error
  minus training error (``gap_error``).
* **Flow-matching generators** on a 2-sphere embedded in R^8 (a random orthonormal 3-frame, radius
  1; 1000 held-out points): a velocity MLP ``v(x_t, t)`` (two SiLU hidden layers of ``width``)
  trained with the rectified-flow loss ``||v(x_t, t) - (x_1 - x_0)||^2``, ``x_t = (1 - t) x_0 +
  t x_1``, AdamW with a cosine schedule for ``steps`` steps; 1000 samples by 50 Euler steps from
  a fixed noise draw. Observed gap: the held-out representation gap ``R(test, samples)``
  (``gap_test``, the target); also ``R(test, samples) - R(train, samples)``.

Design: one-factor-at-a-time sweeps around a few *anchors* (hyper-parameter settings; each
anchor's value of a factor is one of that factor's levels), so that every factor is varied with
everything else fixed, around several different settings.

Predictors (each ``None`` where it fails, with the error recorded in the model's ``errors``)
-------------------------------------------------------------------------------------------
``prediction_gap``   classifiers: ``F.prediction_gap(test x, onehot(test y), probes, softmax)``,
                     probes = test inputs + training inputs (needs held-out labels)
``gap_ratio_law``    that gap (flows: ``R(test, samples)``) over ``GapLaw.predict(n_train)``, the
                     law fitted on the training points vs the test points (classifiers: joint
                     ``[x, onehot(y)]`` vectors, training labels as trained on, ``pooled=False``
                     since label noise makes the two sets differ; flows: ``pooled=True``)
``law_predicted``    the law's prediction itself (the data's memorization line at ``n_train``)
``id_data``          ``F.intrinsic_dimension`` of the training points (classifiers: joint pairs)
``id_hidden``        classifiers: of the last hidden layer's activations on the training inputs
``id_samples``       flows: of the generated samples
``gsnr``             mean per-coordinate gradient SNR ``F.gradient_snr`` (finite coordinates) of
                     per-sample gradients on 256 training samples
``osgr``             ``F.one_step_generalization_ratio(r, n_train, F.osgr_weights(...))``
``sharpness``        ``F.hessian_eigenvalues(model, loss, batch, k=1)`` of the training loss on
                     512 training samples (flows: 256 fixed (x_0, t, x_1) triples)
``hessian_trace``    ``F.hessian_trace`` (Hutchinson, 20 vectors), same batch
``ntk_decay``        ``F.ntk_spectrum(model, x, k=10).decay_exponent`` on 64 training inputs
                     (flows: 32 probe inputs ``(x_t, t)``)
``ntk_eff_rank``     its participation-ratio effective rank
``ww_alpha``         WeightWatcher's mean layer ``alpha`` (``weightwatcher`` from PyPI, imported
                     from ``--ww-path``; ``alpha_weighted`` as ``ww_alpha_weighted``)
``param_norm``       sum of squared Frobenius norms of the weights (a classic baseline)

Statistics
----------
* overall: ``scipy.stats.kendalltau`` (tau-b, NaN omitted) of each predictor against the
  observed gap across all models of a family;
* conditional (the PGDL competition's / Jiang et al. 2020's granulated view): for a factor,
  the *groups* are the sets of models sharing every other hyper-parameter (architecture
  included); ``tau_factor`` is the mean over groups of the tau within the group, a predictor
  constant within a group scoring 0 there (it ranks nothing); ``mean_conditional`` is the mean
  of ``tau_factor`` over factors;
* intervals: 2.5 and 97.5 percentiles over 1000 bootstrap resamples of the models (with
  replacement); a resample recomputes every statistic on the drawn multiset (duplicates tie in
  both variables and drop out of tau-b), groups with fewer than 2 distinct drawn models are
  skipped. The bootstrap uses a vectorised tau-b checked equal to scipy's on the point estimates.

Timing: every predictor call and the training are timed (CPU seconds, one thread) for every
model; on the first model of each family each predictor is repeated 5 times and one training
step 20 times (medians), the figures ``docs/predictors.md`` quotes.

Run::

    python benchmarks/predictors/harness.py --quick     # 9 models, about 2 CPU minutes
    python benchmarks/predictors/harness.py             # 73 models, the committed results

Writes ``--out`` (default ``benchmarks/results/predictors.json``; ``predictors_quick.json`` with
``--quick``) and the figure ``--fig`` (``benchmarks/predictors/predictors.png`` /
``predictors_quick.png``), and prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau
from threadpoolctl import threadpool_limits
from torch import Tensor, nn
from torch.nn import functional as TF

import gapcallback as gc
from gapcallback import functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"

# ----------------------------------------------------------------------------------------------
# design
# ----------------------------------------------------------------------------------------------

CLS_LEVELS: dict[str, list[Any]] = {
    "width": [16, 48, 128],
    "depth": [1, 2, 3],
    "lr": [0.003, 0.01, 0.03],
    "batch_size": [16, 64, 256],
    "weight_decay": [0.0, 5e-4, 5e-3],
    "n_train": [200, 600, 1500],
    "label_noise": [0.0, 0.15, 0.3],
}
MLP_ANCHORS = [
    {
        "width": 48,
        "depth": 2,
        "lr": 0.01,
        "batch_size": 64,
        "weight_decay": 5e-4,
        "n_train": 600,
        "label_noise": 0.0,
    },
    {
        "width": 128,
        "depth": 1,
        "lr": 0.03,
        "batch_size": 16,
        "weight_decay": 0.0,
        "n_train": 200,
        "label_noise": 0.15,
    },
    {
        "width": 128,
        "depth": 3,
        "lr": 0.03,
        "batch_size": 256,
        "weight_decay": 5e-3,
        "n_train": 1500,
        "label_noise": 0.0,
    },
]
CNN_LEVELS: dict[str, list[Any]] = {
    "width": [4, 8, 16],
    "n_train": [200, 600, 1500],
    "label_noise": [0.0, 0.15, 0.3],
}
CNN_ANCHOR = {
    "width": 8,
    "depth": 1,
    "lr": 0.01,
    "batch_size": 64,
    "weight_decay": 5e-4,
    "n_train": 600,
    "label_noise": 0.0,
}

FLOW_LEVELS: dict[str, list[Any]] = {
    "n_train": [25, 100, 400],
    "width": [32, 128, 256],
    "steps": [1000, 3000, 8000],
}
FLOW_ANCHORS = [
    {"n_train": 100, "width": 128, "steps": 3000},
    {"n_train": 25, "width": 256, "steps": 8000},
    {"n_train": 400, "width": 32, "steps": 1000},
]

CLS_FACTORS = list(CLS_LEVELS)
FLOW_FACTORS = list(FLOW_LEVELS)

CLS_PREDICTORS = [
    "prediction_gap",
    "gap_ratio_law",
    "law_predicted",
    "id_data",
    "id_hidden",
    "gsnr",
    "osgr",
    "sharpness",
    "hessian_trace",
    "ntk_decay",
    "ntk_eff_rank",
    "ww_alpha",
    "ww_alpha_weighted",
    "param_norm",
]
FLOW_PREDICTORS = [
    "gap_ratio_law",
    "law_predicted",
    "id_data",
    "id_samples",
    "gsnr",
    "osgr",
    "sharpness",
    "hessian_trace",
    "ntk_decay",
    "ntk_eff_rank",
    "ww_alpha",
    "ww_alpha_weighted",
    "param_norm",
]
TARGETS = {"classifier": ["gap_loss", "gap_error"], "flow": ["gap_test", "gap_test_minus_train"]}
#: Predictors that read held-out data (the others use the training data and the model only).
HELD_OUT = {"prediction_gap", "gap_ratio_law"}


def sweeps(anchors: list[dict], levels: dict[str, list], factors: list[str], base: dict) -> list:
    """One-factor-at-a-time sweeps around each anchor, deduplicated, in a stable order."""
    out: dict[str, dict] = {}
    for anchor in anchors:
        for factor in factors:
            for value in levels[factor]:
                cfg = base | anchor | {factor: value}
                out.setdefault(config_key(cfg), cfg)
    return list(out.values())


def config_key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def config_seed(cfg: dict) -> int:
    return int(hashlib.md5(config_key(cfg).encode()).hexdigest()[:8], 16)


def design(quick: bool) -> tuple[list[dict], list[dict]]:
    if quick:
        mlp = sweeps(MLP_ANCHORS[:1], CLS_LEVELS, ["n_train", "label_noise"], {"arch": "mlp"})
        cnn = [{"arch": "cnn"} | CNN_ANCHOR]
        flow = sweeps(FLOW_ANCHORS[:1], FLOW_LEVELS, ["n_train"], {"arch": "flow"})
        return mlp + cnn, flow
    mlp = sweeps(MLP_ANCHORS, CLS_LEVELS, CLS_FACTORS, {"arch": "mlp"})
    cnn = sweeps([CNN_ANCHOR], CNN_LEVELS, list(CNN_LEVELS), {"arch": "cnn"})
    flow = sweeps(FLOW_ANCHORS, FLOW_LEVELS, FLOW_FACTORS, {"arch": "flow"})
    return mlp + cnn, flow


# ----------------------------------------------------------------------------------------------
# timing helper
# ----------------------------------------------------------------------------------------------


class Timer:
    """CPU and wall seconds of each named call; ``repeats`` calls, medians kept."""

    def __init__(self, repeats: int = 1) -> None:
        self.repeats = repeats
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        cpu, wall, out = [], [], None
        for _ in range(self.repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            out = fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        self.cpu[name] = statistics.median(cpu)
        self.wall[name] = statistics.median(wall)
        return out


#: CPU seconds of the data-only computations (once per training set, memoised), per family.
DATA_ONLY_CPU: dict[str, dict[str, list[float]]] = {}


def data_only(family: str, name: str, fn: Callable[[], Any]) -> Any:
    c0 = time.process_time()
    out = fn()
    DATA_ONLY_CPU.setdefault(family, {}).setdefault(name, []).append(time.process_time() - c0)
    return out


def attempt(record: dict, name: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``None`` with the error (and any warning) recorded under ``name``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as err:  # recorded, reported in the README when it happens
            record["errors"][name] = f"{type(err).__name__}: {err}"[:400]
            out = None
    messages = sorted(
        {
            f"{w.category.__name__}: {w.message}"[:300]
            for w in caught
            if not issubclass(w.category, DeprecationWarning)
        }  # torch's own, not the measurement's
    )
    if messages:
        record["warnings"][name] = messages
    return out


def finite(value: Any) -> float | None:
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------
# WeightWatcher (the peer), imported from its own path
# ----------------------------------------------------------------------------------------------

_WW: Any = None


def load_weightwatcher(path: str) -> Any:
    global _WW
    if path and path not in sys.path:
        sys.path.insert(0, path)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            import weightwatcher
    except Exception as err:  # reported: the peer's column is then empty
        print(f"weightwatcher not importable from {path!r} ({err}); ww_alpha will be None")
        return None
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    _WW = weightwatcher
    return weightwatcher


def ww_alpha(model: nn.Module) -> tuple[float, float]:
    """WeightWatcher's mean layer alpha and alpha_weighted (layers with a valid fit)."""
    if _WW is None:
        raise RuntimeError("weightwatcher is not importable")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = _WW.WeightWatcher(model=model).analyze()
    alpha = details["alpha"].to_numpy(dtype=float)
    weighted = details["alpha_weighted"].to_numpy(dtype=float)
    ok = np.isfinite(alpha) & (alpha > 0)
    if not ok.any():
        raise RuntimeError(f"no layer with a valid power-law fit ({len(alpha)} layers)")
    return float(alpha[ok].mean()), float(weighted[ok].mean())


def param_norm(model: nn.Module) -> float:
    return float(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))


def gradient_signal(model: nn.Module, loss_ps: Callable, batch: Any, n: int) -> tuple:
    """(mean finite per-coordinate GSNR, OSGR with Liu et al.'s weights at n)."""
    grads = F.per_sample_gradients(model, loss_ps, batch)
    mean, var = F.gradient_moments(grads)
    r = F.gradient_snr(grads)
    flat = torch.cat([t.reshape(-1) for t in r.values()]).double()
    gsnr = float(flat[torch.isfinite(flat)].mean())
    osgr = float(F.one_step_generalization_ratio(r, n, F.osgr_weights(mean, var, n)))
    return gsnr, osgr


def curvature_and_ntk(
    rec: dict, timer: Timer, model: nn.Module, loss: Callable, batch: Any, ntk_x: Tensor
) -> None:
    p = rec["predictors"]
    top = attempt(
        rec,
        "sharpness",
        lambda: timer("sharpness", lambda: F.hessian_eigenvalues(model, loss, batch, k=1)),
    )
    p["sharpness"] = finite(top[0]) if top is not None else None
    tr = attempt(
        rec,
        "hessian_trace",
        lambda: timer("hessian_trace", lambda: F.hessian_trace(model, loss, batch, samples=20)),
    )
    p["hessian_trace"] = finite(tr.trace) if tr is not None else None
    rec["extra"]["hessian_trace_std"] = finite(tr.std) if tr is not None else None
    spec = attempt(rec, "ntk", lambda: timer("ntk", lambda: F.ntk_spectrum(model, ntk_x, k=10)))
    p["ntk_decay"] = finite(spec.decay_exponent) if spec is not None else None
    p["ntk_eff_rank"] = finite(spec.effective_rank) if spec is not None else None
    ww = attempt(rec, "ww_alpha", lambda: timer("ww_alpha", lambda: ww_alpha(model)))
    p["ww_alpha"], p["ww_alpha_weighted"] = ww if ww is not None else (None, None)
    p["param_norm"] = timer("param_norm", lambda: param_norm(model))


# ----------------------------------------------------------------------------------------------
# classifiers on digits
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.fc = nn.Linear(channels * 36, hidden)
        self.head = nn.Linear(hidden, 10)

    def features(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8)))
        return torch.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Digits:
    """The fixed split, nested training sets and their noisy labels (memoised per (n, noise))."""

    N_TEST = 297

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(data.target, dtype=torch.long)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        test, pool = perm[: self.N_TEST], perm[self.N_TEST :]
        self.test_x, self.test_y = x[test], y[test]
        self.pool_x, self.pool_y = x[pool], y[pool]
        self.test_onehot = TF.one_hot(self.test_y, 10).float()
        self._laws: dict[tuple, Any] = {}
        self._ids: dict[tuple, float | None] = {}

    def train(self, n: int, noise: float) -> tuple[Tensor, Tensor]:
        x, y = self.pool_x[:n], self.pool_y[:n].clone()
        if noise > 0:
            g = torch.Generator().manual_seed(1000 + n)
            flip = torch.rand(n, generator=g) < noise
            shift = torch.randint(1, 10, (n,), generator=g)
            y[flip] = (y[flip] + shift[flip]) % 10
        return x, y

    def joint_train(self, n: int, noise: float) -> Tensor:
        x, y = self.train(n, noise)
        return F.joint_points(x, TF.one_hot(y, 10).float())

    def law(self, n: int, noise: float) -> Any:
        key = (n, noise)
        if key not in self._laws:
            ref = F.joint_points(self.test_x, self.test_onehot)
            train = self.joint_train(n, noise)
            self._laws[key] = data_only(
                "classifier", "law_fit", lambda: gc.GapLaw.fit(train, ref, pooled=False)
            )
        return self._laws[key]


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, cfg: dict, max_steps: int) -> dict:
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"]
    )
    n, bs = x.shape[0], min(cfg["batch_size"], x.shape[0])
    g = torch.Generator().manual_seed(config_seed(cfg) + 1)
    step, train_loss, stop = 0, math.inf, False
    c0 = time.process_time()
    model.train()
    while not stop:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - bs + 1, bs):
            idx = perm[i : i + bs]
            loss = TF.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step >= max_steps:
                with torch.no_grad():
                    train_loss = float(TF.cross_entropy(model(x), y))
                # below the target, diverged (NaN), or out of steps
                stop = not train_loss >= 0.05 or step >= max_steps
                if stop:
                    break
    converged = train_loss < 0.05
    model.eval()
    cpu = time.process_time() - c0
    return {"steps": step, "converged": converged, "train_cpu_s": cpu, "step_cpu_s": cpu / step}


def time_train_step(
    model: nn.Module, loss: Callable[[nn.Module], Tensor], lr: float, repeats: int
) -> dict:
    """Median CPU and wall seconds of one optimiser step (forward, backward, SGD update) on a
    copy of ``model`` (the measured model is untouched)."""
    import copy

    clone = copy.deepcopy(model)
    clone.train()
    opt = torch.optim.SGD(clone.parameters(), lr=lr * 1e-3, momentum=0.9)
    cpu, wall = [], []
    for _ in range(repeats + 2):
        c0, w0 = time.process_time(), time.perf_counter()
        value = loss(clone)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu": statistics.median(cpu[2:]), "wall": statistics.median(wall[2:])}


def run_classifier(cfg: dict, data: Digits, max_steps: int, repeats: int) -> dict:
    rec: dict[str, Any] = {
        "family": "classifier",
        "config": cfg,
        "predictors": {},
        "extra": {},
        "errors": {},
        "warnings": {},
    }
    torch.manual_seed(config_seed(cfg))
    model = MLP(cfg["width"], cfg["depth"]) if cfg["arch"] == "mlp" else CNN(cfg["width"])
    x, y = data.train(cfg["n_train"], cfg["label_noise"])
    rec["training"] = train_classifier(model, x, y, cfg, max_steps)

    with torch.no_grad():
        train_logits, test_logits = model(x), model(data.test_x)
    train_loss = float(TF.cross_entropy(train_logits, y))
    test_loss = float(TF.cross_entropy(test_logits, data.test_y))
    train_err = float((train_logits.argmax(1) != y).float().mean())
    test_err = float((test_logits.argmax(1) != data.test_y).float().mean())
    rec["observed"] = {
        "train_loss": train_loss,
        "test_loss": test_loss,
        "train_error": train_err,
        "test_error": test_err,
        "gap_loss": test_loss - train_loss,
        "gap_error": test_err - train_err,
    }

    timer = Timer(repeats)
    p = rec["predictors"]
    n = cfg["n_train"]
    probe_x = torch.cat([data.test_x, x])

    def pred_gap() -> float:
        with torch.no_grad():
            probs = model(probe_x).softmax(-1)
        return float(F.prediction_gap(data.test_x, data.test_onehot, probe_x, probs))

    p["prediction_gap"] = attempt(rec, "prediction_gap", lambda: timer("prediction_gap", pred_gap))
    law = attempt(rec, "law", lambda: data.law(n, cfg["label_noise"]))
    if law is not None:
        p["law_predicted"] = float(law.predict(n))
        rec["extra"]["law_dimension"] = float(law.dimension)
        if p["prediction_gap"] is not None:
            p["gap_ratio_law"] = p["prediction_gap"] / p["law_predicted"]
    key = (n, cfg["label_noise"])
    if key not in data._ids:
        data._ids[key] = attempt(
            rec,
            "id_data",
            lambda: data_only(
                "classifier",
                "id_data",
                lambda: float(F.intrinsic_dimension(data.joint_train(*key))),
            ),
        )
    p["id_data"] = data._ids[key]

    def id_hidden() -> float:
        with torch.no_grad():
            h = model.features(x)
        return float(F.intrinsic_dimension(h))

    p["id_hidden"] = finite(attempt(rec, "id_hidden", lambda: timer("id_hidden", id_hidden)))

    def loss_ps(m: nn.Module, b: tuple) -> Tensor:
        return TF.cross_entropy(m(b[0]), b[1], reduction="none")

    def loss_mean(m: nn.Module, b: tuple) -> Tensor:
        return TF.cross_entropy(m(b[0]), b[1])

    gs = attempt(
        rec,
        "gradient_snr",
        lambda: timer(
            "gradient_snr", lambda: gradient_signal(model, loss_ps, (x[:256], y[:256]), n)
        ),
    )
    p["gsnr"], p["osgr"] = gs if gs is not None else (None, None)
    curvature_and_ntk(rec, timer, model, loss_mean, (x[:512], y[:512]), x[:64])

    bs = min(cfg["batch_size"], n)
    step = time_train_step(
        model, lambda m: loss_mean(m, (x[:bs], y[:bs])), cfg["lr"], repeats=20 if repeats > 1 else 3
    )
    rec["timing"] = {"train_step": step, "cpu": timer.cpu, "wall": timer.wall, "repeats": repeats}
    return rec


# ----------------------------------------------------------------------------------------------
# flow matching on a 2-sphere in R^8
# ----------------------------------------------------------------------------------------------


class Velocity(nn.Module):
    """``v([x_t, t])``: input ``[N, 9]`` (so the NTK sees one input tensor), output ``[N, 8]``."""

    def __init__(self, width: int, dim: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, xt: Tensor) -> Tensor:
        return self.net(xt)


class Sphere:
    DIM = 8
    N_TEST = 1000
    N_POOL = 400

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        frame, _ = torch.linalg.qr(torch.randn(self.DIM, 3, generator=g))
        u = torch.randn(self.N_TEST + self.N_POOL, 3, generator=g)
        points = (u / u.norm(dim=1, keepdim=True)) @ frame.T
        self.test, self.pool = points[: self.N_TEST], points[self.N_TEST :]
        self._laws: dict[int, Any] = {}
        self._ids: dict[int, float | None] = {}

    def law(self, n: int) -> Any:
        if n not in self._laws:
            self._laws[n] = data_only(
                "flow", "law_fit", lambda: gc.GapLaw.fit(self.pool[:n], self.test)
            )
        return self._laws[n]


def fm_inputs(x1: Tensor, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    xt = (1 - t) * x0 + t * x1
    return torch.cat([xt, t], dim=1), x1 - x0


def fm_loss_ps(m: nn.Module, b: tuple) -> Tensor:
    inp, target = fm_inputs(*b)
    return ((m(inp) - target) ** 2).sum(1)


def fm_loss(m: nn.Module, b: tuple) -> Tensor:
    return fm_loss_ps(m, b).mean()


def train_flow(model: nn.Module, train: Tensor, cfg: dict) -> dict:
    steps = cfg["steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(config_seed(cfg) + 1)
    n, bs = train.shape[0], 128
    c0 = time.process_time()
    model.train()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        x1 = train[torch.randint(0, n, (bs,), generator=g)]
        x0 = torch.randn(bs, train.shape[1], generator=g)
        t = torch.rand(bs, 1, generator=g)
        loss = fm_loss(model, (x1, x0, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    cpu = time.process_time() - c0
    return {
        "steps": steps,
        "final_loss": float(loss.detach()),
        "train_cpu_s": cpu,
        "step_cpu_s": cpu / steps,
    }


@torch.no_grad()
def sample_flow(model: nn.Module, m: int = 1000, dim: int = 8, euler: int = 50) -> Tensor:
    x = torch.randn(m, dim, generator=torch.Generator().manual_seed(99))
    for i in range(euler):
        t = torch.full((m, 1), i / euler)
        x = x + model(torch.cat([x, t], dim=1)) / euler
    return x


def run_flow(cfg: dict, data: Sphere, repeats: int) -> dict:
    rec: dict[str, Any] = {
        "family": "flow",
        "config": cfg,
        "predictors": {},
        "extra": {},
        "errors": {},
        "warnings": {},
    }
    torch.manual_seed(config_seed(cfg))
    model = Velocity(cfg["width"])
    n = cfg["n_train"]
    train = data.pool[:n]
    rec["training"] = train_flow(model, train, cfg)
    timer = Timer(repeats)
    samples = timer("sampling", lambda: sample_flow(model))
    gap_test = float(F.representation_gap(data.test, samples))
    gap_train = float(F.representation_gap(train, samples))
    rec["observed"] = {
        "gap_test": gap_test,
        "gap_train": gap_train,
        "gap_test_minus_train": gap_test - gap_train,
    }
    p = rec["predictors"]
    law = attempt(rec, "law", lambda: data.law(n))
    if law is not None:
        p["law_predicted"] = float(law.predict(n))
        p["gap_ratio_law"] = gap_test / p["law_predicted"]
        rec["extra"]["law_dimension"] = float(law.dimension)
    if n not in data._ids:
        data._ids[n] = attempt(
            rec,
            "id_data",
            lambda: data_only("flow", "id_data", lambda: float(F.intrinsic_dimension(train))),
        )
    p["id_data"] = data._ids[n]
    p["id_samples"] = finite(
        attempt(
            rec,
            "id_samples",
            lambda: timer("id_samples", lambda: float(F.intrinsic_dimension(samples))),
        )
    )

    g = torch.Generator().manual_seed(5)
    idx = torch.arange(256) % n
    batch = (train[idx], torch.randn(256, Sphere.DIM, generator=g), torch.rand(256, 1, generator=g))
    gs = attempt(
        rec,
        "gradient_snr",
        lambda: timer("gradient_snr", lambda: gradient_signal(model, fm_loss_ps, batch, n)),
    )
    p["gsnr"], p["osgr"] = gs if gs is not None else (None, None)
    ntk_x = fm_inputs(*(b[:32] for b in batch))[0]
    curvature_and_ntk(rec, timer, model, fm_loss, batch, ntk_x)
    step_batch = tuple(b[:128] for b in batch)
    step = time_train_step(
        model, lambda m: fm_loss(m, step_batch), 2e-3, repeats=20 if repeats > 1 else 3
    )
    rec["timing"] = {"train_step": step, "cpu": timer.cpu, "wall": timer.wall, "repeats": repeats}
    return rec


# ----------------------------------------------------------------------------------------------
# Kendall's tau, overall and conditional, with the bootstrap
# ----------------------------------------------------------------------------------------------


def tau_b(values: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row of ``values [P, k]`` against ``target [k]``, NaN omitted
    pairwise (as ``scipy.stats.kendalltau(nan_policy="omit")``); NaN where undefined."""
    k = target.shape[0]
    if k < 2:
        return np.full(values.shape[0], np.nan)
    i, j = np.triu_indices(k, 1)
    sx = np.sign(values[:, i] - values[:, j])
    sy = np.broadcast_to(np.sign(target[i] - target[j]), sx.shape)
    valid = ~(np.isnan(sx) | np.isnan(sy))
    sx, sy = np.where(valid, sx, 0.0), np.where(valid, sy, 0.0)
    num = (sx * sy).sum(1)
    den = np.sqrt((sx * sx).sum(1) * (sy * sy).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def groups_for(configs: list[dict], factors: list[str]) -> dict[str, list[list[int]]]:
    """For each factor, the index groups of models sharing every other hyper-parameter."""
    out: dict[str, list[list[int]]] = {}
    for factor in factors:
        by_rest: dict[str, list[int]] = {}
        for i, cfg in enumerate(configs):
            if factor not in cfg:
                continue
            rest = {k: v for k, v in cfg.items() if k != factor}
            by_rest.setdefault(config_key(rest), []).append(i)
        out[factor] = [g for g in by_rest.values() if len(g) >= 2]
    return out


def conditional(
    values: np.ndarray,
    target: np.ndarray,
    groups: list[list[int]],
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Mean over groups of the within-group tau (0 where a predictor is constant in a group);
    with ``counts`` (bootstrap multiplicities) each group is its drawn multiset and groups with
    fewer than 2 distinct drawn models are skipped. NaN when no group is left."""
    taus = []
    for g in groups:
        members = np.asarray(g)
        if counts is not None:
            members = members[counts[members] > 0]
            if members.size < 2:
                continue
            members = np.repeat(members, counts[members])
        t = tau_b(values[:, members], target[members])
        taus.append(np.nan_to_num(t, nan=0.0))
    if not taus:
        return np.full(values.shape[0], np.nan)
    return np.mean(taus, axis=0)


def interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(samples, 2.5, axis=0), np.nanpercentile(samples, 97.5, axis=0)


def rank_predictors(
    records: list[dict],
    predictors: list[str],
    factors: list[str],
    target: str,
    resamples: int,
    seed: int,
) -> dict:
    configs = [r["config"] for r in records]
    y = np.array([r["observed"][target] for r in records], dtype=float)
    x = np.array(
        [
            [np.nan if r["predictors"].get(p) is None else r["predictors"][p] for r in records]
            for p in predictors
        ],
        dtype=float,
    )
    groups = groups_for(configs, factors)
    overall = tau_b(x, y)
    # the point estimates with scipy, which the vectorised tau-b must reproduce
    for row, mine in zip(x, overall, strict=True):
        ok = ~np.isnan(row)
        ref = kendalltau(row[ok], y[ok]).statistic if ok.sum() >= 2 else np.nan
        assert (np.isnan(ref) and np.isnan(mine)) or abs(ref - mine) < 1e-9, (ref, mine)
    cond = {f: conditional(x, y, groups[f]) for f in factors if groups[f]}
    rng = np.random.default_rng(seed)
    n = len(records)
    boot_overall = np.empty((resamples, len(predictors)))
    boot_cond = {f: np.empty((resamples, len(predictors))) for f in cond}
    for b in range(resamples):
        idx = rng.integers(0, n, n)
        counts = np.bincount(idx, minlength=n)
        boot_overall[b] = tau_b(x[:, idx], y[idx])
        for f in cond:
            boot_cond[f][b] = conditional(x, y, groups[f], counts)
    mean_cond = np.mean([cond[f] for f in cond], axis=0) if cond else None
    boot_mean = np.nanmean(np.stack([boot_cond[f] for f in cond]), axis=0) if cond else None

    out: dict[str, Any] = {"n_models": n, "groups": {f: groups[f] for f in cond}, "predictors": {}}
    lo, hi = interval(boot_overall)
    cond_ci = {f: interval(boot_cond[f]) for f in cond}
    mean_ci = interval(boot_mean) if boot_mean is not None else None
    for k, name in enumerate(predictors):
        entry: dict[str, Any] = {
            "n": int((~np.isnan(x[k])).sum()),
            "overall": {"tau": finite(overall[k]), "lo": finite(lo[k]), "hi": finite(hi[k])},
            "conditional": {
                f: {
                    "tau": finite(cond[f][k]),
                    "lo": finite(cond_ci[f][0][k]),
                    "hi": finite(cond_ci[f][1][k]),
                    "groups": len(groups[f]),
                }
                for f in cond
            },
        }
        if mean_cond is not None and mean_ci is not None:
            entry["mean_conditional"] = {
                "tau": finite(mean_cond[k]),
                "lo": finite(mean_ci[0][k]),
                "hi": finite(mean_ci[1][k]),
            }
        out["predictors"][name] = entry
    return out


# ----------------------------------------------------------------------------------------------
# tables, figure
# ----------------------------------------------------------------------------------------------


def fmt(cell: dict | None) -> str:
    if not cell or cell.get("tau") is None:
        return "n/a"
    lo, hi = cell.get("lo"), cell.get("hi")
    ci = "" if lo is None or hi is None else f" [{lo:+.2f}, {hi:+.2f}]"
    return f"{cell['tau']:+.2f}{ci}"


def table(ranking: dict, second: dict | None, factors: list[str], second_name: str) -> str:
    fs = [f for f in factors if f in ranking["groups"]]
    head = ["predictor", "overall", f"overall vs {second_name}", "mean conditional", *fs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in ranking["predictors"].items():
        label = name + (" (held-out)" if name in HELD_OUT else "")
        row = [
            label,
            fmt(e["overall"]),
            fmt(second["predictors"][name]["overall"]) if second else "n/a",
            fmt(e.get("mean_conditional")),
            *(fmt(e["conditional"].get(f)) for f in fs),
        ]
        lines.append("| " + " | ".join(row) + " |")
    groups = ", ".join(f"{f} {len(ranking['groups'][f])}" for f in fs)
    lines.append("")
    lines.append(f"{ranking['n_models']} models; groups per factor: {groups}.")
    return "\n".join(lines)


def figure(rankings: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in ("classifier", "flow") if f in rankings]
    fig, axes = plt.subplots(
        len(fams),
        2,
        figsize=(13, 4.2 * len(fams)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.0, 1.3]},
    )
    for row, fam in enumerate(fams):
        rk = rankings[fam]
        names = list(rk["predictors"])
        ypos = np.arange(len(names))[::-1]
        ax = axes[row][0]
        for shift, key, colour, label in (
            (0.15, "overall", "C0", "overall"),
            (-0.15, "mean_conditional", "C3", "mean conditional"),
        ):
            tau = [rk["predictors"][n].get(key, {}).get("tau") for n in names]
            lo = [rk["predictors"][n].get(key, {}).get("lo") for n in names]
            hi = [rk["predictors"][n].get(key, {}).get("hi") for n in names]
            t = np.array([np.nan if v is None else v for v in tau])
            lo_a = np.array([np.nan if v is None else v for v in lo])
            hi_a = np.array([np.nan if v is None else v for v in hi])
            err = np.vstack([t - lo_a, hi_a - t])
            ax.errorbar(
                t,
                ypos + shift,
                xerr=np.nan_to_num(err),
                fmt="o",
                color=colour,
                capsize=2,
                label=label,
                ms=4,
            )
        ax.axvline(0, color="0.6", lw=0.8)
        ax.set_yticks(ypos)
        ax.set_yticklabels([n + (" *" if n in HELD_OUT else "") for n in names])
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1.9, len(names) - 0.5)  # a blank band at the bottom for the legend
        ax.set_xlabel(f"Kendall tau vs {TARGETS[fam][0]} (95% bootstrap interval)")
        ax.set_title(f"{fam}: {rk['n_models']} models (* reads held-out data)")
        ax.legend(loc="lower center", fontsize=8, ncol=2)
        ax2 = axes[row][1]
        factors = list(rk["groups"])
        grid = np.array(
            [
                [
                    np.nan
                    if rk["predictors"][n]["conditional"][f]["tau"] is None
                    else rk["predictors"][n]["conditional"][f]["tau"]
                    for f in factors
                ]
                for n in names
            ]
        )
        im = ax2.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax2.set_xticks(range(len(factors)))
        ax2.set_xticklabels(factors, rotation=30, ha="right")
        ax2.set_yticks(range(len(names)))
        ax2.set_yticklabels(names)
        for i in range(len(names)):
            for j in range(len(factors)):
                if np.isfinite(grid[i, j]):
                    ax2.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=7)
        ax2.set_title("conditional tau per varied factor (mean over groups)")
        fig.colorbar(im, ax=ax2, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timing_summary(records: list[dict]) -> dict:
    """Per family: the repeated timing of the first model, and medians over all models of each
    predictor's CPU time over one training step's."""
    out: dict[str, Any] = {}
    for fam in ("classifier", "flow"):
        recs = [r for r in records if r["family"] == fam]
        if not recs:
            continue
        first = recs[0]["timing"]
        step = first["train_step"]["cpu"]
        names = sorted({k for r in recs for k in r["timing"]["cpu"]})
        ratios = {
            k: statistics.median(
                r["timing"]["cpu"][k] / r["timing"]["train_step"]["cpu"]
                for r in recs
                if k in r["timing"]["cpu"]
            )
            for k in names
        }
        out[fam] = {
            "reference_model": recs[0]["config"],
            "train_step_cpu_s": step,
            "train_step_wall_s": first["train_step"]["wall"],
            "predictor_cpu_s": first["cpu"],
            "predictor_wall_s": first["wall"],
            "predictor_over_step": {k: v / step for k, v in first["cpu"].items()},
            "median_over_models_predictor_over_step": ratios,
            "data_only_median_cpu_s": {
                k: statistics.median(v) for k, v in DATA_ONLY_CPU.get(fam, {}).items()
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="9 models, about 2 CPU minutes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--fig", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--ww-path", default="/tmp/ww", help="where weightwatcher is installed")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the figure and tables from --out only"
    )
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    out = args.out or RESULTS / f"predictors{suffix}.json"
    fig = args.fig or HERE / f"predictors{suffix}.png"
    if args.replot:
        saved = json.loads(out.read_text())
        figure({k: v for k, v in saved["rankings"].items() if "/" not in k}, fig)
        for fam, text in saved["tables"].items():
            print(f"\n## {fam}: Kendall tau vs {TARGETS[fam][0]}\n\n{text}")
        print(f"\nredrew {fig} from {out}")
        return
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):  # numpy / scipy BLAS (WeightWatcher's SVDs)
        run(args, out, fig)


def run(args: argparse.Namespace, out: Path, fig: Path) -> None:
    c_start, w_start = time.process_time(), time.perf_counter()
    ww = load_weightwatcher(args.ww_path)
    max_steps = 1500 if args.quick else 8000
    cls_cfgs, flow_cfgs = design(args.quick)
    if args.quick:
        for cfg in flow_cfgs:
            cfg["steps"] = min(cfg["steps"], 1000)
    print(f"{len(cls_cfgs)} classifiers, {len(flow_cfgs)} flows; {args.threads} thread(s)")

    records: list[dict] = []
    digits = Digits()
    for i, cfg in enumerate(cls_cfgs):
        rec = run_classifier(cfg, digits, max_steps, repeats=5 if i == 0 else 1)
        records.append(rec)
        o, t = rec["observed"], rec["training"]
        print(
            f"[cls {i + 1}/{len(cls_cfgs)}] {cfg['arch']} w={cfg['width']} d={cfg['depth']} "
            f"lr={cfg['lr']} bs={cfg['batch_size']} wd={cfg['weight_decay']} "
            f"n={cfg['n_train']} noise={cfg['label_noise']}: steps {t['steps']} "
            f"gap_loss {o['gap_loss']:.3f} test_err {o['test_error']:.3f} "
            f"({t['train_cpu_s']:.1f}s train) errors={list(rec['errors'])}",
            flush=True,
        )
    sphere = Sphere()
    for i, cfg in enumerate(flow_cfgs):
        rec = run_flow(cfg, sphere, repeats=5 if i == 0 else 1)
        records.append(rec)
        o = rec["observed"]
        print(
            f"[flow {i + 1}/{len(flow_cfgs)}] n={cfg['n_train']} w={cfg['width']} "
            f"steps={cfg['steps']}: gap_test {o['gap_test']:.4f} gap_train "
            f"{o['gap_train']:.4f} ({rec['training']['train_cpu_s']:.1f}s train) "
            f"errors={list(rec['errors'])}",
            flush=True,
        )

    rankings: dict[str, dict] = {}
    tables: dict[str, str] = {}
    for fam, preds, factors in (
        ("classifier", CLS_PREDICTORS, CLS_FACTORS),
        ("flow", FLOW_PREDICTORS, FLOW_FACTORS),
    ):
        recs = [r for r in records if r["family"] == fam]
        first, second = TARGETS[fam]
        rankings[fam] = rank_predictors(recs, preds, factors, first, args.resamples, seed=0)
        rankings[fam + "/" + second] = rank_predictors(
            recs, preds, factors, second, args.resamples, seed=1
        )
        tables[fam] = table(rankings[fam], rankings[fam + "/" + second], factors, second)
        print(f"\n## {fam}: Kendall tau vs {first}\n\n{tables[fam]}")
    figure({k: v for k, v in rankings.items() if "/" not in k}, fig)
    timing = timing_summary(records)
    print("\n## time per call / one training step (CPU, first model of each family)")
    for fam, tinfo in timing.items():
        ratios = ", ".join(f"{k} {v:.0f}x" for k, v in tinfo["predictor_over_step"].items())
        print(f"{fam} (step {tinfo['train_step_cpu_s'] * 1e3:.2f} ms): {ratios}")

    meta = {
        "mode": "quick" if args.quick else "full",
        "cpu": cpu_model(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "weightwatcher": getattr(ww, "__version__", None) if ww is not None else None,
        "weightwatcher_path": args.ww_path,
        "resamples": args.resamples,
        "max_steps_classifier": max_steps,
        "cpu_s": time.process_time() - c_start,
        "wall_s": time.perf_counter() - w_start,
        "levels": {"classifier": CLS_LEVELS, "cnn": CNN_LEVELS, "flow": FLOW_LEVELS},
        "anchors": {"mlp": MLP_ANCHORS, "cnn": [CNN_ANCHOR], "flow": FLOW_ANCHORS},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "meta": meta,
                "rankings": rankings,
                "tables": tables,
                "timing": timing,
                "models": records,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out} and {fig}; {meta['cpu_s']:.0f} CPU s, {meta['wall_s']:.0f} wall s")


if __name__ == "__main__":
    main()
