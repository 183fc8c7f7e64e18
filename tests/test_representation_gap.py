"""Representation gap: functional vs oracle, Metric streaming == functional, DDP == single process."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gapcallback as gc
from gapcallback.functional import memorization, representation_gap
from tests.ddp_utils import run_ddp


def oracle_gap(reference, samples, p):
    d = torch.cdist(reference.flatten(1).double(), samples.flatten(1).double())
    return d.min(dim=1).values.pow(p).mean()


@given(
    st.integers(1, 30),
    st.integers(1, 40),
    st.integers(1, 6),
    st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    st.integers(0, 10_000),
)
def test_gap_matches_oracle(m, n, dim, p, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(m, dim, generator=g, dtype=torch.float64)
    samples = torch.randn(n, dim, generator=g, dtype=torch.float64)
    got = representation_gap(ref, samples, p=p)
    assert got.ndim == 0
    torch.testing.assert_close(got, oracle_gap(ref, samples, p), rtol=1e-10, atol=1e-12)


def test_gap_is_exactly_zero_when_references_are_sampled():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 8, generator=g) * 100 + 1000
    samples = torch.cat([torch.randn(80, 8, generator=g), ref.flip(0)])
    assert representation_gap(ref, samples).item() == 0.0
    assert representation_gap(ref, samples, p=1.0).item() == 0.0


def test_gap_closed_form_grid():
    # References on a line at integer points, samples at the even ones: half the distances are 1.
    ref = torch.arange(10.0)[:, None]
    samples = torch.arange(0.0, 10.0, 2.0)[:, None]
    assert representation_gap(ref, samples).item() == 0.5
    assert representation_gap(ref, samples, p=3.0).item() == 0.5


@pytest.mark.parametrize("bad_p", [0, -1.0, float("inf"), float("nan")])
def test_bad_p(bad_p):
    with pytest.raises(ValueError, match="positive"):
        representation_gap(torch.randn(3, 2), torch.randn(3, 2), p=bad_p)
    with pytest.raises(ValueError, match="positive"):
        gc.RepresentationGap(torch.randn(3, 2), p=bad_p)


def test_bad_p_type():
    with pytest.raises(TypeError, match="positive number"):
        representation_gap(torch.randn(3, 2), torch.randn(3, 2), p="2")


@given(st.integers(1, 6), st.integers(0, 10_000), st.sampled_from([1.0, 2.0]))
def test_metric_streaming_equals_functional(n_batches, seed, p):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(37, 2, 3, generator=g)
    samples = torch.randn(120, 2, 3, generator=g)
    metric = gc.RepresentationGap(ref, p=p)
    for chunk in samples.chunk(n_batches):
        metric.update(chunk)
    torch.testing.assert_close(
        metric.compute(), representation_gap(ref, samples, p=p), rtol=1e-6, atol=0
    )


def test_metric_reset_keeps_reference_and_forward_works():
    ref = torch.tensor([[0.0], [10.0]])
    metric = gc.RepresentationGap(ref)
    batch_value = metric(torch.tensor([[1.0]]))  # forward: value of this batch alone
    assert batch_value.item() == pytest.approx((1 + 81) / 2)
    metric.update(torch.tensor([[9.0]]))
    assert metric.compute().item() == pytest.approx(1.0)
    metric.reset()
    assert torch.equal(metric.reference, ref)
    with pytest.raises(RuntimeError, match="before any samples"):
        metric.compute()
    metric.update(torch.tensor([[10.0]]))
    assert metric.compute().item() == pytest.approx(50.0)


def test_metric_attributes_and_state_size():
    metric = gc.RepresentationGap(torch.randn(11, 4))
    assert metric.higher_is_better is False and metric.full_state_update is False
    for _ in range(5):
        metric.update(torch.randn(100, 4))
    assert metric.nearest_sq_dists.shape == (11,)  # O(len(reference)) whatever was streamed
    assert "reference" not in metric.state_dict()


def test_metric_rejects_bad_samples():
    metric = gc.RepresentationGap(torch.randn(5, 3))
    with pytest.raises(ValueError, match="same space"):
        metric.update(torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        metric.update(torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="device"):
        metric.update(torch.randn(4, 3, device="meta"))


def test_metric_plot():
    metric = gc.RepresentationGap(torch.randn(5, 3))
    metric.update(torch.randn(7, 3))
    fig, ax = metric.plot()
    assert fig is not None and ax is not None
    values = [metric.compute() for _ in range(3)]
    fig, ax = metric.plot(values)
    assert len(ax.lines) >= 1


def _ddp_gap(rank, world_size, ref, samples, out_dir):
    metric = gc.RepresentationGap(ref)
    metric.update(samples[rank::world_size])  # each rank sees half the samples
    value = metric.compute()
    torch.save(value, f"{out_dir}/rank{rank}.pt")


def test_ddp_two_processes_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 5, generator=g)
    samples = torch.randn(301, 5, generator=g)
    run_ddp(_ddp_gap, ref, samples, str(tmp_path))
    expected = representation_gap(ref, samples)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


# --- memorization --------------------------------------------------------------------------


def test_memorization_counts_copies_and_near_copies():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.tensor(
        [
            [0.0, 0.0],  # exact copy
            [10.1, 0.0],  # d1 = 0.1, d2 ~ 10: memorized
            [5.0, 5.0],  # equidistant: not memorized
            [3.0, 0.0],  # d1 = 3, d2 = 7: 3/7 > 1/3: not memorized
        ]
    )
    result = memorization(samples, train)
    assert result.memorized.tolist() == [True, True, False, False]
    assert result.fraction.item() == 0.5
    torch.testing.assert_close(result.nearest_distances, torch.tensor([0.0, 0.1, 50**0.5, 3.0]))


@given(st.integers(3, 40), st.integers(1, 40), st.integers(0, 1000))
def test_memorization_matches_oracle(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n, 3, generator=g, dtype=torch.float64)
    samples = torch.randn(m, 3, generator=g, dtype=torch.float64)
    d = torch.cdist(samples, train).sort(dim=1).values
    expected = (d[:, 0] < d[:, 1] / 3) | (d[:, 0] == 0)
    result = memorization(samples, train)
    assert torch.equal(result.memorized, expected)
    torch.testing.assert_close(result.fraction, expected.double().mean())


def test_memorization_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        memorization(torch.randn(3, 2), torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        memorization(torch.randn(3, 2), torch.randn(4, 2), ratio=0.0)
