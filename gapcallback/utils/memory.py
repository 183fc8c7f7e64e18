"""Large scratch buffers that do not pay a page fault per 4 KiB on CPU.

glibc serves a request below its mmap threshold from its heap, reusing memory already mapped, but
maps every request of at least 32 MiB (the threshold's largest dynamic value on 64-bit systems)
afresh, and the kernel then faults once per 4 KiB page on first write: for the plain search's
2048 x 4096 float32 product block (exactly 32 MiB) that costs more than reading it (10.6-11.1 ms
to fill fresh against 2.4 ms to refill, on the benchmarks' CPU). numpy's allocator asks Linux for
transparent huge pages (``madvise(MADV_HUGEPAGE)``) on its large allocations, so such a buffer
faults once per 2 MiB (4.8-5.5 ms). :func:`empty_buffer` allocates buffers of at least
:data:`HUGE_PAGE_FROM_BYTES` through numpy and wraps them without a copy; smaller ones come from
``torch.empty`` (through numpy they were 3% slower at 8 MiB: heap memory is already mapped). It
changes nothing else (no cache, no global setting), and where the kernel gives no huge pages it
is an ordinary allocation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["BUFFER_ALIGNMENT", "HUGE_PAGE_FROM_BYTES", "empty_buffer"]

HUGE_PAGE_FROM_BYTES = 1 << 25
"""Bytes from which a buffer is allocated through numpy (32 MiB: glibc maps such requests afresh;
numpy >= 1.22 advises huge pages from 4 MiB on Linux)."""

BUFFER_ALIGNMENT = 64
"""Byte alignment of a buffer's first element, as ``torch.empty`` gives (a cache line; numpy
guarantees 16)."""

_NUMPY_DTYPES = {
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
