"""utils.memory.empty_buffer: the search's large scratch buffers (huge pages through numpy)."""

from __future__ import annotations

import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.functional import knn
from gapcallback.utils.memory import BUFFER_ALIGNMENT, HUGE_PAGE_FROM_BYTES, empty_buffer

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from(DTYPES),
)
def test_small_buffers_are_what_torch_empty_gives(shape, dtype):
    out = empty_buffer(shape, dtype, torch.device("cpu"))
    reference = torch.empty(shape, dtype=dtype)
    assert out.shape == reference.shape
    assert out.dtype == dtype
    assert out.device.type == "cpu"
    assert out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4097, 4099), (HUGE_PAGE_FROM_BYTES // 2 + 3,), (3, 2400, 2401)])
def test_large_buffers_are_contiguous_aligned_writable_and_independent(shape, dtype):
    first = empty_buffer(shape, dtype, "cpu")
    second = empty_buffer(shape, dtype, "cpu")
    for out in (first, second):
        assert out.shape == shape
        assert out.dtype == dtype
        assert out.is_contiguous()
        assert out.data_ptr() % BUFFER_ALIGNMENT == 0
        assert out.numel() * out.element_size() >= HUGE_PAGE_FROM_BYTES  # numpy's path
    first.fill_(1)
    second.fill_(2)
    assert bool((first == 1).all()) and bool((second == 2).all())
    # A view and an in-place op behave as on any tensor.
    flat = first.view(-1)
    flat[-1] = 3
    assert first.reshape(-1)[-1].item() == 3


def test_a_large_buffer_keeps_its_memory_while_the_tensor_lives():
    out = empty_buffer((HUGE_PAGE_FROM_BYTES,), torch.float32, "cpu")
    out.fill_(7.0)
    gc.collect()
    empty_buffer((HUGE_PAGE_FROM_BYTES,), torch.float32, "cpu").fill_(-1.0)  # reuses freed memory
    assert bool((out == 7.0).all())


def test_the_search_on_large_buffers_is_exact():
    """At D = 784 the plain search takes its 2048 x 4096 float32 product block (32 MiB: numpy's
    path) from empty_buffer: neighbours and distances match float64 brute force (ties by lower
    index; duplicated points give exact zeros)."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(2048, 784, generator=g)
    points = torch.cat([torch.randn(4000, 784, generator=g), queries[:100]])
    ours = knn(queries, points, 3)
    order = torch.sort(torch.cdist(queries.double(), points.double()), dim=1, stable=True)
    assert torch.equal(ours.indices, order.indices[:, :3])
    # The distances of the found pairs by direct difference in float64.
    direct = (queries.double()[:, None, :] - points.double()[ours.indices]).square().sum(-1)
    assert torch.equal(ours.sq_dists[:100, 0], torch.zeros(100, dtype=ours.sq_dists.dtype))
    torch.testing.assert_close(ours.sq_dists.double(), direct, rtol=2**-24, atol=0)


def test_other_devices_get_torch_empty():
    out = empty_buffer((2048, 1024), torch.float32, torch.device("meta"))
    assert out.device.type == "meta"
    assert out.shape == (2048, 1024)
