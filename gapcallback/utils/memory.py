"""Large scratch buffers that do not pay a page fault per 4 KiB on CPU.

glibc serves a request below its mmap threshold from its heap, reusing memory already mapped, but
maps every request of at least 32 MiB (the threshold's largest dynamic value on 64-bit systems)
afresh, and the kernel then faults once per 4 KiB page on first write: for the plain search's
2048 x 4096 float32 product block (exactly 32 MiB) that costs more than reading it (10.6-11.1 ms
to fill fresh against 2.4 ms to refill, on the benchmarks' CPU). numpy's allocator asks Linux for
transparent huge pages (``madvise(MADV_HUGEPAGE)``) on its large allocations, so such a buffer
faults once per 2 MiB (4.8-5.5 ms). :func:`empty_buffer` allocates buffers of at least
:data:`HUGE_PAGE_FROM_BYTES` through numpy and wraps them without a copy; smaller ones come from
``torch.empty`` (through numpy they were 3% slower at 8 MiB: heap memory is already mapped).
:func:`empty_buffer` changes nothing else (no cache, no global setting), and where the kernel
gives no huge pages it is an ordinary allocation.

Even huge pages fault on every call: zeroing a fresh 32 MiB block costs a few milliseconds a
search (3-13 ms at N = M = 8000, D = 784 on the benchmarks' guest; more in its first minutes,
when first products took 100 ms instead of 48 ms). :func:`reused_buffer` lends a search its
product block for the duration of a ``with`` block and takes it back afterwards for the next
search: one pool for the process, of raw CPU buffers from :data:`HUGE_PAGE_FROM_BYTES` on
(smaller ones the heap already reuses), holding at most :data:`MAX_IDLE_BYTES` in all (the
largest buffers are kept), safe across threads (a buffer is lent to one ``with`` block at a
time). It is the only cache here: :func:`idle_buffer_bytes` says what it holds and
:func:`release_buffers` frees it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUFFER_ALIGNMENT",
    "HUGE_PAGE_FROM_BYTES",
    "MAX_IDLE_BYTES",
    "empty_buffer",
    "idle_buffer_bytes",
    "release_buffers",
    "reused_buffer",
]

HUGE_PAGE_FROM_BYTES = 1 << 25
"""Bytes from which a buffer is allocated through numpy (32 MiB: glibc maps such requests afresh;
numpy >= 1.22 advises huge pages from 4 MiB on Linux)."""

BUFFER_ALIGNMENT = 64
"""Byte alignment of a buffer's first element, as ``torch.empty`` gives (a cache line; numpy
guarantees 16)."""

MAX_IDLE_BYTES = 1 << 27
"""Bytes the pool of :func:`reused_buffer` keeps idle at most (128 MiB: four 2048 x 4096 float32
product blocks); a larger request is served but not kept."""

_NUMPY_DTYPES = {
    torch.uint8: np.uint8,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int32: np.int32,
    torch.int64: np.int64,
}


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, as ``torch.empty(shape, dtype=dtype,
    device=device)``; on CPU, of at least :data:`HUGE_PAGE_FROM_BYTES` bytes and a dtype numpy
    has, allocated by numpy (huge pages, module docstring) and aligned to
    :data:`BUFFER_ALIGNMENT` bytes."""
    device = torch.device(device)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    nbytes = 0 if np_dtype is None else math.prod(shape) * np.dtype(np_dtype).itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE_FROM_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    array = raw[skip : skip + nbytes].view(np_dtype).reshape(shape)
    return torch.from_numpy(array)


_POOL_LOCK = threading.Lock()
_IDLE: list[Tensor] = []  # raw uint8 CPU buffers, largest first; guarded by _POOL_LOCK


def _reset_pool_after_fork() -> None:
    """A forked child (a DataLoader worker) starts with an empty pool and a fresh lock: the
    parent's lock may have been held by another thread at the fork."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _IDLE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


@contextmanager
def reused_buffer(numel: int, dtype: torch.dtype, device: torch.device | str) -> Iterator[Tensor]:
    """A contiguous uninitialised ``[numel]`` scratch buffer of ``dtype``, valid inside the
    ``with`` block.

    On CPU, for :data:`HUGE_PAGE_FROM_BYTES` bytes or more, the smallest idle buffer of the pool
    that is large enough is lent (a view of its first bytes, aligned to
    :data:`BUFFER_ALIGNMENT`: no allocation, no page faults), else a new one comes from
    :func:`empty_buffer`; when the block ends (normally or by an exception) it returns to the pool,
    which then keeps its largest buffers up to :data:`MAX_IDLE_BYTES` in all (module docstring).
    A buffer is lent to one ``with`` block at a time: nested blocks and other threads get others.
    Elsewhere (other devices, smaller sizes) it is :func:`empty_buffer`, freed as usual.

    The caller must not keep the buffer, or a view of it, past the ``with`` block.
    """
    device = torch.device(device)
    nbytes = numel * torch.empty((), dtype=dtype, device="meta").element_size()
    if device.type != "cpu" or nbytes < HUGE_PAGE_FROM_BYTES:
        yield empty_buffer((numel,), dtype, device)
        return
    with _POOL_LOCK:
        fits = [i for i, raw in enumerate(_IDLE) if raw.numel() >= nbytes]
        raw = _IDLE.pop(fits[-1]) if fits else None  # largest first: the last fit is smallest
    if raw is None:
        raw = empty_buffer((nbytes,), torch.uint8, device)
    try:
        yield raw[:nbytes].view(dtype)
    finally:
        with _POOL_LOCK:
            _IDLE.append(raw)
            _IDLE.sort(key=Tensor.numel, reverse=True)
            kept, total = [], 0
            for buffer in _IDLE:
                if total + buffer.numel() <= MAX_IDLE_BYTES:
                    kept.append(buffer)
                    total += buffer.numel()
            _IDLE[:] = kept


def idle_buffer_bytes() -> int:
    """Bytes the pool of :func:`reused_buffer` holds idle."""
    with _POOL_LOCK:
        return sum(raw.numel() for raw in _IDLE)


def release_buffers() -> None:
    """Free the idle buffers of :func:`reused_buffer` (a buffer lent meanwhile returns to the pool
    when its ``with`` block ends); searches then allocate their blocks afresh until they have run
    once more."""
    with _POOL_LOCK:
        _IDLE.clear()
