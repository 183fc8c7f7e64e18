"""Tests of the streaming IntrinsicDimension metric: reservoir, reproducibility, DDP (gloo, 2 CPUs)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gapcallback.functional.dimension import (
    METHOD_OPTIONS,
    METHODS,
    check_dimension_method,
    intrinsic_dimension,
)
from gapcallback.metrics.intrinsic_dimension import IntrinsicDimension, reservoir_keys

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 1200, d: int = 3, big_d: int = 6, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((big_d, d)))
    return torch.from_numpy(rng.uniform(size=(n, d)) @ q.T).float()


@pytest.mark.parametrize("method", ["calibrated", "twonn", "mle"])
def test_streaming_equals_functional_when_reservoir_holds_everything(method: str) -> None:
    x = _data()
    metric = IntrinsicDimension(method, max_points=5000)
    for batch in x.split(100):
        metric.update(batch)
    assert metric.points[0].shape[0] == x.shape[0]
    assert float(metric.compute()) == pytest.approx(float(intrinsic_dimension(x, method)), rel=1e-5)
    assert metric.last_estimate.std > 0


def test_reservoir_is_bounded_and_order_independent() -> None:
    x = _data(3000)
    a = IntrinsicDimension("twonn", max_points=500, seed=3)
    b = IntrinsicDimension("twonn", max_points=500, seed=3)
    for batch in x.split(250):
        a.update(batch)
        assert a.points[0].shape[0] <= 500 and a.keys[0].shape[0] <= 500
    for batch in x[torch.randperm(3000, generator=torch.Generator().manual_seed(1))].split(77):
        b.update(batch)
    assert torch.equal(a.points[0], b.points[0])
    assert torch.equal(a.compute(), b.compute())
    # The kept points are the bottom-500 keys of the whole stream.
    keys = reservoir_keys(x, seed=3)
    assert torch.equal(a.keys[0], keys.sort().values[:500])


def test_seeds_select_different_reproducible_subsets() -> None:
    x = _data(2000)
    subsets = []
    for seed in (0, 0, 1):
        m = IntrinsicDimension("mle", max_points=300, seed=seed)
        m.update(x)
        subsets.append(m.points[0])
    assert torch.equal(subsets[0], subsets[1])
    assert not torch.equal(subsets[0], subsets[2])
    # A uniform subsample: the mean of the kept points is close to the data mean.
    assert torch.allclose(subsets[2].mean(0), x.mean(0), atol=0.1)


def test_reset_and_errors() -> None:
    m = IntrinsicDimension("twonn", max_points=100)
    with pytest.raises(RuntimeError, match="update"), pytest.warns(UserWarning):
        m.compute()
    m.update(_data(50))
    m.reset()
    assert m.points == []
    with pytest.raises(ValueError, match="`method` must be one of"):
        IntrinsicDimension("pca")
    with pytest.raises(ValueError, match="max_points"):
        IntrinsicDimension(max_points=2)
    m.update(_data(50))
    with pytest.raises(ValueError, match="features"):
        m.update(torch.rand(10, 7))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.rand(10))


def test_options_reach_the_estimator_and_metric_kwargs_the_base_class() -> None:
    x = _data(600)
    m = IntrinsicDimension("mle", k=4, sync_on_compute=False)
    m.update(x)
    assert float(m.compute()) == pytest.approx(float(intrinsic_dimension(x, "mle", k=4)), rel=1e-5)
    assert m.last_estimate.details["k"] == 4


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        ("twonnn", {}, ValueError, r"`method` must be one of .*Did you mean 'twonn'\?"),
        ("PCA", {}, ValueError, r"'calibrated', 'twonn', 'mle', 'gap'"),
        (None, {}, ValueError, "`method` must be one of"),
        ("twonn", {"k": 5}, TypeError, r"\['k'\] in `options of method='twonn'`.*\['dup_tol'"),
        ("mle", {"kk": 5}, TypeError, r"'kk' -> 'k'\?"),
        ("calibrated", {"holdout": 0.2}, TypeError, "holdout"),
        ("mle", {"k": 1}, ValueError, "`k` must be >= 2"),
        ("mle", {"k": 2.5}, TypeError, "`k` must be an int"),
        ("calibrated", {"seed": -1}, ValueError, "`seed` must be >= 0"),
        ("calibrated", {"references": ("sphere", "klein")}, ValueError, "references"),
        ("calibrated", {"references": "sphere"}, TypeError, "references"),
        ("twonn", {"fit": "lsq"}, ValueError, "`fit` must be one of 'mle', 'linear'"),
        ("twonn", {"discard": 1.0}, ValueError, "discard"),
        ("twonn", {"dup_tol": float("nan")}, ValueError, "`dup_tol` must be a finite"),
        ("twonn", {"dup_tol": -1e-3}, ValueError, "`dup_tol` must be >= 0"),
        ("gap", {"holdout": 1.0}, ValueError, "`holdout` must be > 0 and < 1"),
        ("gap", {"p": 0}, ValueError, "`p` must be"),
        ("gap", {"repeats": 0}, ValueError, "`repeats` must be >= 1"),
        ("gap", {"sizes": [10, 2.5]}, TypeError, r"sizes\[i\]"),
        ("gap", {"sizes": "10"}, TypeError, "`sizes` must be None or a sequence"),
        ("gap", {"generator": 0}, TypeError, "generator"),
    ],
)
def test_bad_method_or_options_fail_at_construction(method, options, error, match) -> None:
    """No data needed: a bad configuration never reaches the first ``compute()``."""
    with pytest.raises(error, match=match):
        IntrinsicDimension(method, **options)
    with pytest.raises(error, match=match):
        check_dimension_method(method, options)


def test_bad_max_points_and_seed_fail_at_construction() -> None:
    for bad, error in ((2, ValueError), (10.5, TypeError), (True, TypeError), (None, TypeError)):
        with pytest.raises(error, match="max_points"):
            IntrinsicDimension(max_points=bad)
    for bad, error in ((-1, ValueError), (1.0, TypeError), ("0", TypeError)):
        with pytest.raises(error, match="seed"):
            IntrinsicDimension(seed=bad)


def test_every_documented_option_is_accepted_by_the_check_and_the_estimator() -> None:
    """``METHOD_OPTIONS`` and the estimator agree: each valid option passes both."""
    valid = {
        "dup_tol": 0.0,
        "k": 4,
        "seed": 1,
        "references": ("sphere",),
        "fit": "linear",
        "discard": 0.2,
        "p": 1.0,
        "holdout": 0.25,
        "sizes": [20, 40, 80],
        "repeats": 2,
        "generator": torch.Generator().manual_seed(0),
    }
    assert set(METHOD_OPTIONS) == set(METHODS)
    x = _data(400)
    for method, names in METHOD_OPTIONS.items():
        options = {name: valid[name] for name in names}
        assert check_dimension_method(method, options) == options
        metric = IntrinsicDimension(method, max_points=1000, **options)
        metric.update(x)
        assert torch.isfinite(metric.compute())


def test_plot() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    m = IntrinsicDimension("twonn")
    m.update(_data(300))
    fig, ax = m.plot([m.compute(), m.compute()])
    assert fig is not None and ax is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = (("calibrated", 5000), ("twonn", 700))  # reservoir holding everything / a subset


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = _data(1600)
        values = []
        for method, max_points in CONFIGS:
            metric = IntrinsicDimension(method, max_points=max_points)
            for batch in x[rank::world].split(150):  # each rank sees half, interleaved
                metric.update(batch)
            values.append(metric.compute())
        if rank == 0:
            torch.save(torch.stack(values), out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path) -> None:
    out = str(tmp_path / "values.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp_values = torch.load(out)
    for (method, max_points), ddp_value in zip(CONFIGS, ddp_values, strict=True):
        single = IntrinsicDimension(method, max_points=max_points)
        single.update(_data(1600))
        assert float(ddp_value) == pytest.approx(float(single.compute()), rel=1e-6)
