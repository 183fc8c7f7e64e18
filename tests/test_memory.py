"""utils.memory: the search's large scratch buffers (huge pages through numpy; the reused block)."""

from __future__ import annotations

import gc
import os
import select
import signal
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.functional import knn
from gapcallback.utils.memory import (
    BUFFER_ALIGNMENT,
    HUGE_PAGE_FROM_BYTES,
    MAX_IDLE_BYTES,
    empty_buffer,
    idle_buffer_bytes,
    release_buffers,
    reused_buffer,
)

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


LARGE = HUGE_PAGE_FROM_BYTES // 4  # float32 elements of a buffer the pool keeps


@pytest.fixture
def no_idle_buffers():
    release_buffers()
    yield
    release_buffers()


def test_a_large_buffer_is_lent_again_to_the_next_request(no_idle_buffers):
    with reused_buffer(LARGE + 1000, torch.float32, "cpu") as first:
        assert first.shape == (LARGE + 1000,) and first.dtype == torch.float32
        assert first.is_contiguous() and first.data_ptr() % BUFFER_ALIGNMENT == 0
        first.fill_(5.0)
        address = first.data_ptr()
    assert idle_buffer_bytes() == (LARGE + 1000) * 4
    with reused_buffer(LARGE, torch.float32, "cpu") as second:  # the same memory
        assert second.data_ptr() == address and second.shape == (LARGE,)
        assert bool((second == 5.0).all())  # not initialised
        assert idle_buffer_bytes() == 0  # lent
    with reused_buffer(LARGE // 2, torch.float64, "cpu") as wider:  # any dtype: raw bytes
        assert wider.dtype == torch.float64 and wider.data_ptr() == address
        assert wider.shape == (LARGE // 2,) and wider.data_ptr() % BUFFER_ALIGNMENT == 0
    assert idle_buffer_bytes() == (LARGE + 1000) * 4


def test_the_smallest_idle_buffer_that_fits_is_lent(no_idle_buffers):
    with reused_buffer(LARGE, torch.float32, "cpu") as small:
        with reused_buffer(2 * LARGE, torch.float32, "cpu") as large:
            small_address, large_address = small.data_ptr(), large.data_ptr()
    assert idle_buffer_bytes() == 3 * LARGE * 4
    with reused_buffer(LARGE, torch.float32, "cpu") as again:
        assert again.data_ptr() == small_address
    with reused_buffer(LARGE + 1, torch.float32, "cpu") as bigger:
        assert bigger.data_ptr() == large_address


def test_the_pool_keeps_its_largest_buffers_up_to_its_bound(no_idle_buffers):
    per_buffer = MAX_IDLE_BYTES // 16  # float32 elements of a quarter: the largest three fit
    with reused_buffer(per_buffer, torch.float32, "cpu"):
        with reused_buffer(per_buffer + 16, torch.float32, "cpu"):
            with reused_buffer(per_buffer + 32, torch.float32, "cpu"):
                with reused_buffer(per_buffer + 48, torch.float32, "cpu"):
                    pass
    assert idle_buffer_bytes() == (3 * per_buffer + 96) * 4 <= MAX_IDLE_BYTES
    with reused_buffer(per_buffer + 1, torch.float32, "cpu"):  # the smallest kept: 16 more
        assert idle_buffer_bytes() == (2 * per_buffer + 80) * 4
    with reused_buffer(MAX_IDLE_BYTES // 4 + 1, torch.float32, "cpu") as huge:
        assert huge.shape == (MAX_IDLE_BYTES // 4 + 1,)
    assert idle_buffer_bytes() == (3 * per_buffer + 96) * 4  # served, never kept


def test_nested_and_concurrent_requests_never_share_a_buffer(no_idle_buffers):
    with reused_buffer(LARGE, torch.float32, "cpu") as outer:
        outer.fill_(1.0)
        with reused_buffer(LARGE, torch.float32, "cpu") as inner:
            assert inner.data_ptr() != outer.data_ptr()
            inner.fill_(2.0)
            seen = {}

            def other_thread():
                with reused_buffer(LARGE, torch.float32, "cpu") as buf:
                    buf.fill_(3.0)
                    seen["address"] = buf.data_ptr()

            worker = threading.Thread(target=other_thread)
            worker.start()
            worker.join()
            assert seen["address"] not in (outer.data_ptr(), inner.data_ptr())
            assert bool((outer == 1.0).all()) and bool((inner == 2.0).all())
            assert idle_buffer_bytes() == LARGE * 4  # the other thread's, back in the pool
    assert idle_buffer_bytes() == 3 * LARGE * 4


def test_many_threads_searching_at_once_get_exact_results(no_idle_buffers):
    """Four threads share the pool while each runs plain searches (32 MiB blocks)."""
    g = torch.Generator().manual_seed(2)
    sets = [torch.randn(2048, 200, generator=g) for _ in range(4)]
    points = torch.randn(4096, 200, generator=g)
    expected = [torch.cdist(s.double(), points.double()).argmin(dim=1) for s in sets]
    results = {}

    def search(i):
        results[i] = [
            knn(sets[i], points, 1, block_size=(2048, 4096)).indices[:, 0] for _ in range(3)
        ]

    threads = [threading.Thread(target=search, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for found in results[i]:
            assert torch.equal(found, expected[i])
    assert 0 < idle_buffer_bytes() <= MAX_IDLE_BYTES


def test_a_buffer_is_returned_when_the_block_raises(no_idle_buffers):
    with pytest.raises(RuntimeError, match="inside"):
        with reused_buffer(LARGE, torch.float32, "cpu"):
            raise RuntimeError("inside")
    assert idle_buffer_bytes() == LARGE * 4


@pytest.mark.parametrize(
    ("numel", "dtype", "device"),
    [
        (LARGE - 1, torch.float32, "cpu"),  # below 32 MiB: the heap reuses it already
        (LARGE, torch.float32, "meta"),  # not CPU
        (HUGE_PAGE_FROM_BYTES // 2 - 1, torch.bfloat16, "cpu"),  # small in any dtype
    ],
)
def test_other_requests_are_fresh_and_never_kept(no_idle_buffers, numel, dtype, device):
    with reused_buffer(numel, dtype, device) as buf:
        assert buf.shape == (numel,) and buf.dtype == dtype and buf.device.type == device
    assert idle_buffer_bytes() == 0


def test_release_frees_the_idle_buffers(no_idle_buffers):
    with reused_buffer(2 * LARGE, torch.bfloat16, "cpu") as buf:  # a dtype numpy lacks: raw bytes
        assert buf.dtype == torch.bfloat16 and buf.shape == (2 * LARGE,)
    assert idle_buffer_bytes() == LARGE * 4
    release_buffers()
    assert idle_buffer_bytes() == 0


def test_searches_on_a_dirty_reused_block_are_exact(no_idle_buffers):
    """The plain search at D = 784 takes its 2048 x 4096 product block from reused_buffer: an
    idle block full of NaN and -inf from elsewhere changes no result."""
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(2048, 784, generator=g)
    points = torch.cat([torch.randn(4000, 784, generator=g), queries[:50]])
    with reused_buffer(2048 * 4096, torch.float32, "cpu") as block:
        block[::2] = float("nan")
        block[1::2] = -float("inf")
    assert idle_buffer_bytes() == 2048 * 4096 * 4
    ours = knn(queries, points, 2)
    order = torch.sort(torch.cdist(queries.double(), points.double()), dim=1, stable=True)
    assert torch.equal(ours.indices, order.indices[:, :2])
    assert torch.equal(ours.sq_dists[:50, 0], torch.zeros(50, dtype=ours.sq_dists.dtype))
    # A second search of another shape reuses the same block, left dirty by the first.
    again = knn(points[:3000], queries, 1)
    order = torch.sort(torch.cdist(points[:3000].double(), queries.double()), dim=1, stable=True)
    assert torch.equal(again.indices, order.indices[:, :1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_with_an_empty_pool(no_idle_buffers):
    with reused_buffer(LARGE, torch.float32, "cpu"):
        pass
    assert idle_buffer_bytes() == LARGE * 4
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its pool, then use it (no torch kernel: OpenMP after fork)
        try:
            before = idle_buffer_bytes()
            with reused_buffer(LARGE, torch.float32, "cpu") as buf:
                assert buf.shape == (LARGE,)
            os.write(write, f"{before} {idle_buffer_bytes()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 60.0)  # never hang the suite on a stuck child
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read) as pipe:
        report = pipe.read() if ready else "the child did not answer in 60 s"
    os.waitpid(pid, 0)
    assert report == f"0 {LARGE * 4}"
    assert idle_buffer_bytes() == LARGE * 4  # the parent's pool is untouched
