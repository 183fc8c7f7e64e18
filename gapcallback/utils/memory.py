"""Large scratch buffers that do not pay a page fault per 4 KiB on CPU.

A fresh CPU tensor from ``torch.empty`` is mapped lazily by the kernel: its first write faults
once per 4 KiB page, and for a block buffer used once per search that costs more than reading it
(a 32 MiB float32 buffer: 11 ms to fill fresh against 2.5 ms to refill, on the benchmarks' CPU).
numpy's allocator asks Linux for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on every
allocation of at least :data:`HUGE_PAGE_THRESHOLD` bytes, so such a buffer faults once per 2 MiB
(4.8 ms). :func:`empty_buffer` allocates large CPU buffers through numpy and wraps them without a
copy; it changes nothing else (no cache, no global setting), and where the kernel gives no huge
pages it is an ordinary allocation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["BUFFER_ALIGNMENT", "HUGE_PAGE_THRESHOLD", "empty_buffer"]

HUGE_PAGE_THRESHOLD = 1 << 22
"""Bytes from which numpy (>= 1.22, on Linux) advises huge pages; smaller buffers use torch."""

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


def empty_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, as ``torch.empty(shape, dtype=dtype,
    device=device)``; on CPU, of at least :data:`HUGE_PAGE_THRESHOLD` bytes and a dtype numpy
    has, allocated by numpy (huge pages, module docstring) and aligned to
    :data:`BUFFER_ALIGNMENT` bytes."""
    device = torch.device(device)
    np_dtype = _NUMPY_DTYPES.get(dtype)
    count = 1
    for size in shape:
        count *= size
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or np_dtype is None or count * itemsize < HUGE_PAGE_THRESHOLD:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = np.empty(count * itemsize + BUFFER_ALIGNMENT, dtype=np.uint8)
    skip = -raw.ctypes.data % BUFFER_ALIGNMENT
    array = raw[skip : skip + count * itemsize].view(np_dtype).reshape(shape)
    return torch.from_numpy(array)
