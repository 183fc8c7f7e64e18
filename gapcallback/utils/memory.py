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

Even huge pages fault on every call, and where the kernel's ``defrag`` setting is ``madvise`` (the
usual default) a fault may first compact memory: a fresh 32 MiB block then costs tens of
milliseconds. :func:`reused_buffer` lends a search its product block for the duration of a
``with`` block and keeps it afterwards for the next search in the same thread: one idle buffer per
dtype and thread, of at most :data:`MAX_REUSED_BYTES`, on CPU and from
:data:`HUGE_PAGE_FROM_BYTES` on (smaller ones the heap already reuses). It is the only cache here:
:func:`idle_buffer_bytes` says what it holds and :func:`release_buffers` frees it (a thread's idle
buffers are also freed when the thread ends).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BUFFER_ALIGNMENT",
    "HUGE_PAGE_FROM_BYTES",
    "MAX_REUSED_BYTES",
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

MAX_REUSED_BYTES = 1 << 28
"""Largest buffer :func:`reused_buffer` keeps once its ``with`` block ends (256 MiB); larger ones
are freed then."""

_NUMPY_DTYPES = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int32: np.int32,
    torch.int64: np.int64,
}


def _nbytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of ``numel`` values of ``dtype`` (0 for a dtype numpy lacks: never numpy's path)."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    return 0 if np_dtype is None else numel * np.dtype(np_dtype).itemsize


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, as ``torch.empty(shape, dtype=dtype,
    device=device)``; on CPU, of at least :data:`HUGE_PAGE_FROM_BYTES` bytes and a dtype numpy
    has, allocated by numpy (huge pages, module docstring) and aligned to
    :data:`BUFFER_ALIGNMENT` bytes."""
    device = torch.device(device)
    nbytes = _nbytes(math.prod(shape), dtype)
    if device.type != "cpu" or nbytes < HUGE_PAGE_FROM_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    np_dtype = _NUMPY_DTYPES[dtype]
    raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    array = raw[skip : skip + nbytes].view(np_dtype).reshape(shape)
    return torch.from_numpy(array)


class _IdleBuffers(threading.local):
    """Per thread: the idle buffer of each dtype (:func:`reused_buffer`)."""

    def __init__(self) -> None:
        self.by_dtype: dict[torch.dtype, Tensor] = {}


_IDLE = _IdleBuffers()


@contextmanager
def reused_buffer(numel: int, dtype: torch.dtype, device: torch.device | str) -> Iterator[Tensor]:
    """A contiguous uninitialised ``[numel]`` scratch buffer, valid inside the ``with`` block.

    On CPU, from :data:`HUGE_PAGE_FROM_BYTES` to :data:`MAX_REUSED_BYTES` bytes, the calling
    thread's idle buffer of ``dtype`` is lent when it is large enough (a view of its first
    ``numel`` elements: no allocation, no page faults), else a new one from :func:`empty_buffer`;
    when the block ends the larger of the two is kept as the thread's idle buffer (module
    docstring). A nested request, or one from another thread, never gets a buffer already lent.
    Elsewhere (other devices, smaller or larger sizes) it is :func:`empty_buffer`, freed as usual.

    The caller must not keep the buffer, or a view of it, past the ``with`` block.
    """
    device = torch.device(device)
    nbytes = _nbytes(numel, dtype)
    if device.type != "cpu" or not HUGE_PAGE_FROM_BYTES <= nbytes <= MAX_REUSED_BYTES:
        yield empty_buffer((numel,), dtype, device)
        return
    idle = _IDLE.by_dtype.pop(dtype, None)  # lent: a nested request finds none
    if idle is not None and idle.numel() >= numel:
        buffer = idle
    else:
        buffer = empty_buffer((numel,), dtype, device)
    try:
        yield buffer[:numel]
    finally:
        # Keep the larger of this buffer (never smaller than the idle one it replaced) and one
        # a nested request returned meanwhile.
        current = _IDLE.by_dtype.get(dtype)
        if current is None or current.numel() < buffer.numel():
            _IDLE.by_dtype[dtype] = buffer


def idle_buffer_bytes() -> int:
    """Bytes the calling thread's idle buffers hold (:func:`reused_buffer`)."""
    return sum(_nbytes(b.numel(), b.dtype) for b in _IDLE.by_dtype.values())


def release_buffers() -> None:
    """Free the calling thread's idle buffers (:func:`reused_buffer`); searches then allocate
    their blocks afresh until they have run once more."""
    _IDLE.by_dtype.clear()
