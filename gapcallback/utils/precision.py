"""Keep reduced-precision matmuls (TF32, bf16 via oneDNN) and autocast out of distance code.

Users commonly call ``torch.set_float32_matmul_precision("high")`` on GPUs, and callbacks may run
inside an ``autocast`` region. Either would make the GEMM used to pre-select neighbour candidates
far less accurate than the error bound :func:`gapcallback.functional.knn` relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _backends() -> list[object]:
    found = []
    for name in ("cuda", "mkldnn"):
        backend = getattr(torch.backends, name, None)
        matmul = getattr(backend, "matmul", None)
        if matmul is not None and hasattr(matmul, "fp32_precision"):
            found.append(matmul)
    return found


@contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Context manager: IEEE fp32 matmuls and no autocast on ``device_type``; restores settings.

    Uses the per-backend ``fp32_precision`` API where torch has it (>= 2.9) and falls back to the
    legacy ``set_float32_matmul_precision`` / ``allow_tf32`` flags otherwise.
    """
    backends = _backends()
    autocast_device = device_type if device_type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    with torch.autocast(device_type=autocast_device, enabled=False):
        if backends:
            previous = [b.fp32_precision for b in backends]  # type: ignore[attr-defined]
            try:
                for b in backends:
                    b.fp32_precision = "ieee"  # type: ignore[attr-defined]
                yield
            finally:
                for b, value in zip(backends, previous, strict=True):
                    b.fp32_precision = value  # type: ignore[attr-defined]
        else:  # pragma: no cover - torch < 2.9
            previous_precision = torch.get_float32_matmul_precision()
            previous_tf32 = torch.backends.cuda.matmul.allow_tf32
            try:
                torch.set_float32_matmul_precision("highest")
                torch.backends.cuda.matmul.allow_tf32 = False
                yield
            finally:
                torch.set_float32_matmul_precision(previous_precision)
                torch.backends.cuda.matmul.allow_tf32 = previous_tf32
