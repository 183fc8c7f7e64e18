"""One-command GPU check of gapcallback: CUDA tests, exactness checks on the GPU, and timings.

Prepared in advance (issue 18) for the day a CUDA machine is at hand, so that a short lease is
spent running, not writing. On a CUDA machine, from the repository root::

    OUT=/path/to/results python benchmarks/gpu_check.py

On the project's lent device machine, the exact command (the tool runs it in the repository root
with ``$OUT`` set and brings back what is written there; give it ``timeout_s=560``)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py

It installs nothing: that machine's image already has torch, lightning, torchmetrics, numpy,
scipy, matplotlib, pytest and hypothesis, and the script imports gapcallback (and the tiny models
of ``tests/lightning_models.py``) from the working tree by putting the repository root on
``sys.path`` (``PYTHONPATH`` for its pytest subprocess). faiss-gpu and cuVS are not in that image
and are not installable offline: they are timed only where importable, else reported as
"not installed". The default sizes aim at about 5 minutes on an H200 (well under 10).

Without a GPU, ``--cpu-dry-run`` runs the same code paths on the CPU at tiny sizes (N = M = 300
and 1500 at D = 8 and 32, ``128 x 256`` blocks so that several blocks and a query subset are
exercised, one thread, faiss-cpu standing in for faiss-gpu, ``Trainer(accelerator="cpu")``), about
20 s in all; ``tests/test_gpu_check.py`` runs it, so the script cannot rot while no GPU is at
hand::

    python benchmarks/gpu_check.py --cpu-dry-run

What it does, in order (a failing part is recorded with its error and the script goes on):

1. Checks (each passes or fails):

   * ``knn_vs_float64_oracle``: ``F.knn`` (Gaussian data at D = 64 and 768, near-duplicates far
     from the origin, ``exclude_self=True``, float64 input, small blocks) against an explicit
     float64 brute force on the same device, ``((a[:, None] - b[None]) ** 2).sum(-1)`` in blocks
     (never ``torch.cdist``): distances to 1e-6 relative (1e-12 for float64), and the returned
     indices at the oracle's nearest distances;
   * ``exact_duplicates_zero``: copies of points give exactly 0 (``knn``, self-search,
     ``representation_gap``, ``RepresentationGap``, fp16 input);
   * ``half_precision_inputs``: fp16 and bf16 inputs against the oracle on the same values;
   * ``tf32_setting_does_not_leak``: with TF32 switched on by the user
     (``torch.backends.cuda.matmul.allow_tf32 = True``, ``set_float32_matmul_precision("high")``
     and ``"medium"``, ``torch.backends.cuda.matmul.fp32_precision = "tf32"``), distances on
     near-duplicates still match the float64 oracle and the user's setting is unchanged
     afterwards; the error of a plain ``torch.mm`` under each setting is recorded to show the
     setting was in effect (on CPU, ``"medium"`` switches oneDNN to bf16);
   * ``autocast_does_not_leak``: the same inside ``torch.autocast`` (fp16 on CUDA, bf16 on CPU);
   * ``metrics_on_device``: ``gc.RepresentationGap`` (moved with ``.to`` and built on the device)
     and ``gc.IntrinsicDimension`` (calibrated, TwoNN) on device tensors match the CPU results;
   * ``callback_in_trainer``: ``gc.GapCallback`` in ``lightning.Trainer(accelerator="gpu",
     devices=1)`` on the tiny point-cloud model of ``tests/lightning_models.py`` trains on the
     GPU, logs finite ``gap/observed`` every epoch, skips no evaluation and warns nothing;
   * ``cuda_marked_tests``: the tests of ``tests/`` marked to need CUDA (a test whose name or
     decorators mention CUDA or GPU), run by pytest in a subprocess, counts recorded; on a CUDA
     machine at least one must pass and none fail (on CPU all are skipped, which passes);
   * ``timings_completed``: every timing of gapcallback and of the plain product below ran.

2. Timings: ``F.knn`` (k=1) and ``F.representation_gap`` against the plain blocked ``torch.mm``
   the engine runs (augmented ``K = D + 1`` fp32 operands built beforehand, the engine's blocks,
   ``2048 x 4096`` by default, one reused buffer, IEEE fp32 under the library's own precision
   guard: the floor of the engine), and against faiss-gpu (``GpuIndexFlatL2``, build + search)
   or cuVS (``brute_force``, build + search) when importable. Shapes N = M in ``--sizes`` at D in
   ``--dims`` (default 20000, 100000, 1000000 at 64 and 768). Gaussian data made on the device;
   a warm-up, then ``--repeats`` alternating runs; medians, and medians of per-run ratios
   (target: F.knn within 1.3x of the plain product; ``F.representation_gap`` takes no
   ``block_size``, so it always runs at the engine's default blocks). Times come from
   ``time.perf_counter`` between two ``torch.cuda.synchronize()`` calls (device-wide, so the
   peers' own streams are covered too). Peak GPU memory: ``torch.cuda.max_memory_allocated``
   (reset before each call) minus the memory allocated before it. At most ``--max-queries``
   queries (default 32768) are timed against all M points and the times scaled by
   ``N / queries`` to the full shape (every query block costs the same; the per-call costs on
   the points, a few ms, are then counted ``N / queries`` times, so scaled times are slight
   upper bounds), which the row and the "skipped or shrunk" list say. A probe of one query
   block sizes each shape to its share of ``--time-budget`` (fewer repeats first, down to 3,
   then fewer queries); shapes that do not fit in GPU memory or in the budget are skipped,
   with the reason.
   Then the calibrated ``F.intrinsic_dimension`` and ``gc.GapLaw.fit`` on ``--estimator-n``
   points of a 6-dimensional manifold in D = the first ``--dims`` (default 20000 in 64) on the
   device: median time, peak memory, the value.

3. Writes ``gpu_check.json`` (everything, raw runs included) and ``gpu_check.md`` (the tables)
   under ``$OUT`` when it is set, else under ``--out`` (default: a new temporary folder), and
   prints the tables.

Options (defaults for CUDA; dry run in brackets): ``--sizes`` (20000 100000 1000000 [300
1500]), ``--dims`` (64 768 [8 32]), ``--max-queries`` (32768 [512]), ``--repeats`` (5 [3]),
``--time-budget`` seconds for all timed shapes (200 [20]), ``--skip-shape N:D`` (repeatable),
``--block-size QB PB`` (the engine's [128 256]), ``--estimator-n`` (20000 [300]),
``--pytest-timeout`` (120), ``--no-tests``, ``--no-timings``, ``--out``, ``--cpu-dry-run``.

Exit code 1 if any check failed, 0 otherwise (a missed 1.3x target is a measured figure, not a
failed check); 2 without CUDA and without ``--cpu-dry-run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # gapcallback and tests/ from the working tree (nothing installed)
    sys.path.insert(0, str(ROOT))

import gapcallback as gc  # noqa: E402
from gapcallback import functional as F  # noqa: E402
from gapcallback.search import DEFAULT_POINT_BLOCK, DEFAULT_QUERY_BLOCK  # noqa: E402

#: The engine's default blocks (rows of queries, rows of points per product).
ENGINE_BLOCKS = (DEFAULT_QUERY_BLOCK, DEFAULT_POINT_BLOCK)
#: Blocks of the dry run: small, so that its tiny shapes still span several blocks and a subset.
DRY_BLOCKS = (128, 256)
TARGET_RATIO = 1.3
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"


# ------------------------------------------------------------------------------------------------
# bookkeeping
# ------------------------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One pass/fail check: its name, outcome, duration, details and (on failure) the error."""

    name: str
    passed: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Report:
    """Everything the run found; serialised to the JSON file."""

    meta: dict[str, Any]
    checks: list[CheckResult] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    estimators: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, what: str, why: str) -> None:
        """Record (and print) something that was not run or was shrunk, with the reason."""
        self.skipped.append({"what": what, "why": why})
        log(f"  skipped/shrunk: {what}: {why}")


def log(message: str) -> None:
    """Print a progress line at once (the device tool returns the output tail)."""
    print(message, flush=True)


def run_check(report: Report, name: str, fn: Callable[[], dict[str, Any]]) -> CheckResult:
    """Run ``fn`` (it raises on failure, returns details on success) and record the outcome."""
    start = time.perf_counter()
    try:
        details = fn()
        result = CheckResult(name, True, time.perf_counter() - start, details)
    except Exception as err:  # a failing check must not stop the script
        tb = traceback.format_exc(limit=6)
        result = CheckResult(
            name,
            False,
            time.perf_counter() - start,
            {"traceback": tb},
            f"{type(err).__name__}: {err}",
        )
    report.checks.append(result)
    status = "PASS" if result.passed else f"FAIL ({result.error})"
    log(f"[check] {name}: {status} in {result.seconds:.1f} s")
    return result


def sync(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (every stream: ``cudaDeviceSynchronize``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clean(value: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to floats, non-finite floats to ``None``."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, Tensor):
        return clean(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckSizes:
    """Problem sizes of the correctness checks (small on purpose: the oracle is brute force)."""

    n: int
    m: int
    dims: tuple[int, ...]
    big_dim: int
    k: int
    trainer_epochs: int


GPU_SIZES = CheckSizes(n=2000, m=5000, dims=(64, 768), big_dim=768, k=5, trainer_epochs=3)
DRY_SIZES = CheckSizes(n=300, m=300, dims=(8, 32), big_dim=32, k=3, trainer_epochs=2)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on ``device``."""
    return torch.Generator(device=device).manual_seed(seed)


def randn(shape: tuple[int, ...], device: torch.device, seed: int, **kw: Any) -> Tensor:
    """Seeded Gaussian tensor created directly on ``device``."""
    return torch.randn(shape, generator=generator(device, seed), device=device, **kw)


# ------------------------------------------------------------------------------------------------
# the float64 oracle
# ------------------------------------------------------------------------------------------------


def brute_force(
    q: Tensor, x: Tensor, k: int, exclude_self: bool = False, max_elements: int = 1 << 25
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by explicit float64 differences, block by block, on q's device.

    ``((a[:, None] - b[None]) ** 2).sum(-1)`` for blocks of rows ``a`` of ``q`` (never a GEMM,
    never ``torch.cdist``); rows sorted stably, so ties go to the lower index.
    """
    q64, x64 = q.double().reshape(q.shape[0], -1), x.double().reshape(x.shape[0], -1)
    m, dim = x64.shape
    rows = max(1, max_elements // max(1, m * dim))
    out_d, out_i = [], []
    for s in range(0, q64.shape[0], rows):
        a = q64[s : s + rows]
        d = ((a[:, None, :] - x64[None]) ** 2).sum(-1)
        if exclude_self:
            r = torch.arange(a.shape[0], device=d.device)
            d[r, r + s] = float("inf")
        vals, idx = torch.sort(d, dim=1, stable=True)
        out_d.append(vals[:, :k])
        out_i.append(idx[:, :k])
    return torch.cat(out_d), torch.cat(out_i)


def exact_pair_dists(q: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """Float64 ``||q_i - x_{idx[i, j]}||^2`` by direct difference, ``[n, k]``."""
    q64, x64 = q.double().reshape(q.shape[0], -1), x.double().reshape(x.shape[0], -1)
    return ((q64[:, None, :] - x64[idx]) ** 2).sum(-1)


def compare_with_oracle(
    label: str, q: Tensor, x: Tensor, k: int, exclude_self: bool = False, **knn_kw: Any
) -> dict[str, Any]:
    """Run ``F.knn`` on ``q, x`` and assert it equals the float64 oracle; return error figures.

    Asserted: the returned squared distances equal the oracle's k smallest to the output dtype's
    rounding (relative 1e-6 for float32, 1e-12 for float64, no absolute slack), and the returned
    indices really are at those distances (the oracle's distance of each returned pair), so ties
    cannot fail the check. Exact zeros of the oracle must be exact zeros.
    """
    res = F.knn(q, x, k, exclude_self=exclude_self, **knn_kw)
    ref_d, ref_i = brute_force(q, x, k, exclude_self=exclude_self)
    got = res.sq_dists.double()
    rtol = 1e-12 if res.sq_dists.dtype == torch.float64 else 1e-6
    denom = ref_d.abs().clamp_min(torch.finfo(torch.float64).tiny)
    rel = ((got - ref_d).abs() / denom).max().item()
    pair = exact_pair_dists(q, x, res.indices)
    pair_rel = ((pair - ref_d).abs() / denom).max().item()
    zeros_ok = bool((got[ref_d == 0] == 0).all())
    same_idx = float((res.indices == ref_i).double().mean())
    assert res.sq_dists.device == q.device, f"{label}: result on {res.sq_dists.device}"
    assert rel <= rtol, f"{label}: max relative error of distances {rel:.3g} > {rtol:g}"
    assert pair_rel <= 1e-12, f"{label}: returned indices are not the nearest ({pair_rel:.3g})"
    assert zeros_ok, f"{label}: an exact duplicate got a non-zero distance"
    return {"max_rel_err": rel, "index_agreement": same_idx, "dtype": str(res.sq_dists.dtype)}


def near_duplicates(
    n: int, m: int, dim: int, device: torch.device, seed: int, offset: float = 100.0
) -> tuple[Tensor, Tensor]:
    """Points far from the origin and queries that are near-copies of some of them (noise 1e-3).

    The memorization regime where a GEMM expansion in fp32 (or TF32) gets distances wrong.
    """
    x = randn((m, dim), device, seed) + offset
    pick = torch.randperm(m, generator=generator(device, seed + 1), device=device)[:n]
    q = x[pick] + 1e-3 * randn((n, dim), device, seed + 2)
    return q, x


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


def check_knn_oracle(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """F.knn against the float64 brute force: plain, near-duplicates, self-search, float64."""
    out: dict[str, Any] = {}
    for dim in sz.dims:
        q = randn((sz.n, dim), device, 10 + dim) + 3.0
        x = randn((sz.m, dim), device, 20 + dim) + 3.0
        out[f"gaussian_D{dim}"] = compare_with_oracle(f"gaussian D={dim}", q, x, sz.k)
    q, x = near_duplicates(sz.n, sz.m, sz.dims[0], device, 30)
    out["near_duplicates"] = compare_with_oracle("near-duplicates", q, x, sz.k)
    x = randn((sz.m, sz.dims[0]), device, 40)
    out["exclude_self"] = compare_with_oracle("exclude_self", x, x, sz.k, exclude_self=True)
    q64 = randn((sz.n, sz.dims[0]), device, 50, dtype=torch.float64)
    x64 = randn((sz.m, sz.dims[0]), device, 51, dtype=torch.float64)
    out["float64"] = compare_with_oracle("float64", q64, x64, sz.k)
    small = (256, 512)  # several blocks on both sides, whatever the sizes
    out["small_blocks"] = compare_with_oracle(
        "small blocks", q64.float(), x64.float(), sz.k, block_size=small
    )
    return out


def check_duplicates(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """Exact copies give exactly 0 in every entry point."""
    dim = sz.dims[-1]
    x = randn((sz.m, dim), device, 60) * 10 + 1e3
    pick = torch.randperm(sz.m, generator=generator(device, 61), device=device)[: sz.n]
    q = x[pick]
    res = F.knn(q, x, 2)
    assert bool((res.sq_dists[:, 0] == 0).all()), "knn: a copy got a non-zero distance"
    assert bool((x[res.indices[:, 0]] == q).all()), "knn: a copy's neighbour is another point"
    assert bool((res.sq_dists[:, 1] > 0).all()), "knn: a second neighbour at distance 0"
    doubled = torch.cat([x, x])
    self_res = F.knn(doubled, doubled, 1, exclude_self=True)
    assert bool((self_res.sq_dists == 0).all()), "self-search: a duplicate got a non-zero distance"
    gap = F.representation_gap(q, x)
    assert float(gap) == 0.0, f"representation_gap of copies is {float(gap)!r}"
    metric = gc.RepresentationGap(q).to(device)
    metric.update(x[: sz.m // 2])
    metric.update(x[sz.m // 2 :])
    value = metric.compute()
    assert float(value) == 0.0, f"RepresentationGap of copies is {float(value)!r}"
    half = F.knn(q.half(), x.half(), 1)
    assert bool((half.sq_dists == 0).all()), "fp16 copies got a non-zero distance"
    return {"copies": sz.n, "offset": 1e3, "scale": 10.0}


def check_half_precision(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """fp16 / bf16 inputs: exact on the values given (the oracle sees the same rounded values)."""
    out: dict[str, Any] = {}
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        q = (randn((sz.n, sz.dims[-1]), device, 70) + 2).to(dtype)
        x = (randn((sz.m, sz.dims[-1]), device, 71) + 2).to(dtype)
        details = compare_with_oracle(name, q, x, sz.k)
        assert details["dtype"] == "torch.float32", f"{name}: output dtype {details['dtype']}"
        gap = float(F.representation_gap(q, x))
        ref = float(brute_force(q, x, 1)[0].mean())
        assert math.isclose(gap, ref, rel_tol=1e-5), f"{name}: gap {gap} vs oracle {ref}"
        details["gap_rel_err"] = abs(gap - ref) / ref
        out[name] = details
    return out


def precision_state() -> dict[str, str]:
    """The user-visible matmul precision settings (each read guarded: mixed APIs can raise)."""
    reads: dict[str, Callable[[], object]] = {
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "cuda.matmul.fp32_precision": lambda: torch.backends.cuda.matmul.fp32_precision,
        "mkldnn.matmul.fp32_precision": lambda: torch.backends.mkldnn.matmul.fp32_precision,  # type: ignore[attr-defined]
        "fp32_precision": lambda: torch.backends.fp32_precision,  # type: ignore[attr-defined]
    }
    state = {}
    for key, read in reads.items():
        try:
            state[key] = str(read())
        except Exception as err:  # torch raises on some mixes of the legacy and new APIs
            state[key] = f"<error: {type(err).__name__}>"
    return state


@contextlib.contextmanager
def restored_precision() -> Iterator[None]:
    """Put torch's matmul precision back to the defaults afterwards, whatever was set inside."""
    try:
        yield
    finally:
        torch.set_float32_matmul_precision("highest")
        backends: list[Any] = [torch.backends.cuda.matmul]
        backends.append(getattr(torch.backends.mkldnn, "matmul", None))
        for backend in backends:
            if hasattr(backend, "fp32_precision"):
                backend.fp32_precision = "none"


def plain_mm_rel_err(device: torch.device) -> float:
    """Relative error of a plain fp32 ``torch.mm`` (under the current settings) vs float64."""
    a = randn((256, 1024), device, 80)
    b = randn((1024, 256), device, 81)
    ref = a.double() @ b.double()
    return float(((a @ b).double() - ref).abs().max() / ref.abs().max())


TF32_SETTINGS: dict[str, Callable[[], None]] = {
    "allow_tf32=True": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    'set_float32_matmul_precision("high")': lambda: torch.set_float32_matmul_precision("high"),
    'set_float32_matmul_precision("medium")': lambda: torch.set_float32_matmul_precision("medium"),
    'cuda.matmul.fp32_precision="tf32"': lambda: setattr(
        torch.backends.cuda.matmul, "fp32_precision", "tf32"
    ),
}


def check_tf32(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """Reduced-precision matmul settings of the user do not leak into distances, and survive."""
    q, x = near_duplicates(sz.n, sz.m, sz.big_dim, device, 90)
    baseline = plain_mm_rel_err(device)
    out: dict[str, Any] = {"plain_mm_rel_err_ieee": baseline}
    failures = []
    for label, apply in TF32_SETTINGS.items():
        with restored_precision():
            apply()
            before = precision_state()
            entry: dict[str, Any] = {"plain_mm_rel_err": plain_mm_rel_err(device)}
            try:
                entry.update(compare_with_oracle(label, q, x, sz.k))
                gap = float(F.representation_gap(q, x))
                ref = float(brute_force(q, x, 1)[0].mean())
                entry["gap_rel_err"] = abs(gap - ref) / ref
                if entry["gap_rel_err"] > 1e-5:
                    failures.append(f"{label}: gap off by {entry['gap_rel_err']:.3g}")
            except Exception as err:
                entry["error"] = f"{type(err).__name__}: {err}"
                failures.append(f"{label}: {entry['error']}")
            after = precision_state()
            entry["setting"] = before
            if after != before:
                entry["setting_after"] = after
                failures.append(f"{label}: setting changed from {before} to {after}")
            out[label] = entry
    out["restored_to_defaults"] = precision_state()
    assert not failures, "; ".join(failures)
    return out


def check_autocast(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """Inside ``torch.autocast`` (fp16 on CUDA, bf16 on CPU) distances are still exact."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    q, x = near_duplicates(sz.n, sz.m, sz.big_dim, device, 100)
    with torch.autocast(device_type=device.type, dtype=dtype):
        details = compare_with_oracle("autocast", q, x, sz.k)
        gap = float(F.representation_gap(q, x))
    ref = float(brute_force(q, x, 1)[0].mean())
    assert math.isclose(gap, ref, rel_tol=1e-5), f"autocast: gap {gap} vs oracle {ref}"
    details["autocast_dtype"] = str(dtype)
    return details


def check_metrics(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """RepresentationGap and IntrinsicDimension on device tensors match the CPU results."""
    cpu = torch.device("cpu")
    dim = sz.dims[0]
    ref = randn((sz.n, dim), cpu, 110)
    samples = randn((sz.m, dim), cpu, 111)
    cpu_metric = gc.RepresentationGap(ref)
    dev_metric = gc.RepresentationGap(ref).to(device)  # a CPU reference moved with .to()
    built_on_device = gc.RepresentationGap(ref.to(device))
    for part in samples.chunk(3):
        cpu_metric.update(part)
        dev_metric.update(part.to(device))
        built_on_device.update(part.to(device))
    g_cpu, g_dev, g_dev2 = cpu_metric.compute(), dev_metric.compute(), built_on_device.compute()
    assert g_dev.device.type == device.type, f"RepresentationGap result on {g_dev.device}"
    for name, value in (("moved", g_dev), ("built on device", g_dev2)):
        assert math.isclose(float(value), float(g_cpu), rel_tol=1e-6), (
            f"RepresentationGap {name}: {float(value)} vs CPU {float(g_cpu)}"
        )
    functional = float(F.representation_gap(ref.to(device), samples.to(device)))
    assert math.isclose(functional, float(g_cpu), rel_tol=1e-6), "metric != functional"

    basis = randn((4, dim), cpu, 112)
    manifold = torch.rand(sz.m, 4, generator=torch.Generator().manual_seed(113)) @ basis
    out: dict[str, Any] = {"gap_cpu": float(g_cpu), "gap_device": float(g_dev)}
    for method in ("calibrated", "twonn"):
        m_cpu = gc.IntrinsicDimension(method=method, max_points=sz.m)
        m_dev = gc.IntrinsicDimension(method=method, max_points=sz.m).to(device)
        for part in manifold.chunk(2):
            m_cpu.update(part)
            m_dev.update(part.to(device))
        d_cpu, d_dev = m_cpu.compute(), m_dev.compute()
        assert d_dev.device.type == device.type, f"IntrinsicDimension result on {d_dev.device}"
        assert math.isclose(float(d_dev), float(d_cpu), rel_tol=1e-4), (
            f"IntrinsicDimension({method}): device {float(d_dev)} vs CPU {float(d_cpu)}"
        )
        out[f"id_{method}_cpu"], out[f"id_{method}_device"] = float(d_cpu), float(d_dev)
    return out


def check_callback(device: torch.device, sz: CheckSizes) -> dict[str, Any]:
    """GapCallback in a real Trainer on the device: finite gap/observed, no skipped evaluation."""
    import lightning as L

    from tests.lightning_models import PointCloudModel, circle_data, loader

    class DeviceRecorder(L.Callback):
        """Remembers where the model trained."""

        device = "unknown"

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            DeviceRecorder.device = str(pl_module.device)

    L.seed_everything(0, verbose=False)
    train, reference = circle_data(200, seed=0), circle_data(120, seed=1)
    callback = gc.GapCallback(
        reference,
        train=loader(train),
        num_samples=300,
        sample_batch_size=128,
        law_options={"num_sizes": 4, "repeats": 2},
        dimension_points=200,
        log_figure=False,
        progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gc.GapEvaluationWarning)
        trainer = L.Trainer(
            max_epochs=sz.trainer_epochs,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            logger=False,
            callbacks=[callback, DeviceRecorder()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.fit(PointCloudModel(), loader(train))
    gap_warnings = [
        str(w.message) for w in caught if issubclass(w.category, gc.GapEvaluationWarning)
    ]
    observed = [h.get("gap/observed") for h in callback.history if not h.get("skipped")]
    logged = trainer.callback_metrics.get("gap/observed")
    details = {
        "trained_on": DeviceRecorder.device,
        "evaluations": len(callback.history),
        "skipped": callback.num_skipped,
        "gap_observed": observed,
        "logged_gap_observed": None if logged is None else float(logged),
        "gap_predicted_last": callback.history[-1].get("gap/predicted")
        if callback.history
        else None,
        "warnings": gap_warnings,
    }
    assert DeviceRecorder.device.startswith(device.type), f"trained on {DeviceRecorder.device}"
    assert callback.num_skipped == 0, f"skipped evaluations: {callback.history}"
    assert len(observed) == sz.trainer_epochs, f"{len(observed)} evaluations"
    assert all(v is not None and math.isfinite(float(v)) for v in observed), (
        f"gap/observed {observed}"
    )
    assert logged is not None and math.isfinite(float(logged)), "gap/observed not logged"
    assert not gap_warnings, f"GapEvaluationWarning: {gap_warnings}"
    return details


def cuda_test_ids(tests_dir: Path) -> list[str]:
    """Node ids of the tests marked to need CUDA: a test function or class whose name or any of
    whose decorators mentions CUDA or GPU, in the files of ``tests_dir`` that mention CUDA."""
    import ast

    ids = []
    for path in sorted(tests_dir.glob("test_*.py")):
        if path.name == "test_gpu_check.py":  # runs this script: never recurse
            continue
        text = path.read_text()
        if "cuda" not in text.lower():
            continue
        for node in ast.parse(text).body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if not node.name.lower().startswith("test"):
                continue
            decorators = " ".join(
                ast.get_source_segment(text, d) or "" for d in node.decorator_list
            )
            marked = any(w in (node.name + decorators).lower() for w in ("cuda", "gpu"))
            if marked:
                ids.append(f"{path.relative_to(ROOT).as_posix()}::{node.name}")
    return ids


def check_cuda_tests(device: torch.device, timeout: float) -> dict[str, Any]:
    """Run the CUDA-marked tests with pytest in a subprocess; count passed/failed/skipped."""
    ids = cuda_test_ids(ROOT / "tests")
    if not ids:
        return {"tests": [], "note": "no CUDA-marked tests found"}
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = Path(tmp) / "junit.xml"
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            f"--junitxml={xml_path}",
            *ids,
        ]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        skip_reasons: list[str] = []
        if xml_path.exists():
            root = ET.parse(xml_path).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            if suite is not None:
                counts = {k: int(suite.get(k, 0)) for k in counts}
                for case in suite.iter("testcase"):
                    for sk in case.iter("skipped"):
                        skip_reasons.append(f"{case.get('name')}: {sk.get('message', '')}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    details: dict[str, Any] = {
        "node_ids": ids,
        "returncode": proc.returncode,
        "passed": passed,
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "skip_reasons": skip_reasons,
        "output_tail": (proc.stdout + proc.stderr)[-3000:],
    }
    assert counts["tests"] > 0, (
        f"pytest ran nothing (exit {proc.returncode}): {details['output_tail']}"
    )
    assert counts["failures"] == 0 and counts["errors"] == 0, (
        f"{counts['failures']} failed, {counts['errors']} errors: {details['output_tail'][-1500:]}"
    )
    if device.type == "cuda":
        assert passed > 0, f"no CUDA test passed on a CUDA machine: {skip_reasons}"
    return details


# ------------------------------------------------------------------------------------------------
# timings
# ------------------------------------------------------------------------------------------------


def plain_blocked_mm(q: Tensor, x: Tensor, blocks: tuple[int, int]) -> Callable[[], None]:
    """The engine's product alone: augmented fp32 operands built now, one buffer, IEEE fp32.

    Returns a function that runs ``[q - c, 1] @ [-2 (x - c), ||x - c||^2].T`` block by block
    (``blocks`` = rows of queries, rows of points) into one reused buffer.
    """
    qb, pb = blocks
    centre = x.mean(dim=0)
    q_aug = torch.cat([q - centre, torch.ones(q.shape[0], 1, device=q.device)], dim=1)
    xc = x - centre
    x_aug = torch.cat([-2 * xc, xc.square().sum(1, keepdim=True)], dim=1)
    del xc
    buffer = torch.empty(min(qb, q.shape[0]) * min(pb, x.shape[0]), device=q.device)

    def run() -> None:
        with gc_full_precision(q.device.type):
            for s in range(0, q_aug.shape[0], qb):
                rows = q_aug[s : s + qb]
                for t in range(0, x_aug.shape[0], pb):
                    cols = x_aug[t : t + pb]
                    out = buffer[: rows.shape[0] * cols.shape[0]].view(rows.shape[0], cols.shape[0])
                    torch.mm(rows, cols.T, out=out)

    return run


def gc_full_precision(device_type: str) -> contextlib.AbstractContextManager[None]:
    """The library's own IEEE-fp32 guard, so the plain product runs at the engine's precision."""
    from gapcallback.utils.precision import full_precision

    return full_precision(device_type)


def peer_factories(device: torch.device, dry_run: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Peers available here: ``{name: factory(dim) -> run(q, x)}`` and ``{name: status}``."""
    factories: dict[str, Any] = {}
    status: dict[str, str] = {}
    try:
        import faiss

        if (
            device.type == "cuda"
            and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus()
        ):
            import faiss.contrib.torch_utils  # search on torch GPU tensors

            resources = faiss.StandardGpuResources()

            def faiss_gpu(dim: int) -> Callable[[Tensor, Tensor], None]:
                def run(q: Tensor, x: Tensor) -> None:
                    index = faiss.GpuIndexFlatL2(resources, dim)
                    index.add(x)
                    index.search(q, 1)

                return run

            factories["faiss-gpu GpuIndexFlatL2"] = faiss_gpu
            status["faiss-gpu"] = f"faiss {faiss.__version__}, {faiss.get_num_gpus()} GPU(s)"
        elif dry_run:

            def faiss_cpu(dim: int) -> Callable[[Tensor, Tensor], None]:
                def run(q: Tensor, x: Tensor) -> None:
                    index = faiss.IndexFlatL2(dim)
                    index.add(x.cpu().numpy())
                    index.search(q.cpu().numpy(), 1)

                return run

            factories["faiss-cpu IndexFlatL2 (dry-run stand-in)"] = faiss_cpu
            status["faiss-gpu"] = f"not on CPU; faiss-cpu {faiss.__version__} stands in (dry run)"
        else:
            status["faiss-gpu"] = (
                f"not installed (faiss {faiss.__version__} has no GPU support here)"
            )
    except ImportError:
        status["faiss-gpu"] = "not installed"
    try:
        from cuvs.neighbors import brute_force as cuvs_bf

        if device.type == "cuda":

            def cuvs(dim: int) -> Callable[[Tensor, Tensor], None]:
                def run(q: Tensor, x: Tensor) -> None:
                    index = cuvs_bf.build(x, metric="sqeuclidean")
                    cuvs_bf.search(index, q, 1)

                return run

            factories["cuVS brute_force"] = cuvs
            status["cuVS"] = "installed"
        else:
            status["cuVS"] = "installed, needs CUDA"
    except Exception:  # ImportError, or a broken CUDA runtime of the package
        status["cuVS"] = "not installed"
    return factories, status


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """Seconds of one call (synchronised) and its peak extra GPU memory in bytes (None on CPU)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - start
    del result
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return seconds, peak


@dataclass(frozen=True)
class TimingPlan:
    """Sizes and budget of the timing part."""

    sizes: tuple[int, ...]
    dims: tuple[int, ...]
    max_queries: int
    repeats: int
    budget_s: float
    blocks: tuple[int, int]
    skip: frozenset[tuple[int, int]]


def bind_peer(
    run: Callable[[Tensor, Tensor], None], x: Tensor
) -> Callable[[Tensor], Callable[[], None]]:
    """A peer's ``run(q, x)`` as a method factory ``q -> (() -> None)`` over the points ``x``."""

    def make(q: Tensor) -> Callable[[], None]:
        return lambda: run(q, x)

    return make


def store(holder: list[Any], job: Callable[[], Any]) -> None:
    """Run ``job`` and keep its result in ``holder`` (a timed call that still yields a value)."""
    holder.append(job())


def time_shape(
    report: Report,
    device: torch.device,
    n: int,
    dim: int,
    plan: TimingPlan,
    budget: float,
    peers: dict[str, Any],
) -> dict[str, Any]:
    """Time every method on one shape N = M = ``n`` at ``dim``; returns the row."""
    label = f"N=M={n}, D={dim}"
    qb = plan.blocks[0]
    n_q = n if n <= plan.max_queries else min(n, max(qb, plan.max_queries // qb * qb))
    if n_q < n:
        report.skip(
            label,
            f"timing {n_q} of {n} queries against all {n} points, times scaled by {n / n_q:.3g}"
            f" (--max-queries {plan.max_queries})",
        )
    x = randn((n, dim), device, 1000 + dim)
    q_all = randn((n_q, dim), device, 2000 + dim)
    methods: dict[str, Callable[[Tensor], Callable[[], object]]] = {
        "plain torch.mm": lambda q: plain_blocked_mm(q, x, plan.blocks),
        "F.knn": lambda q: lambda: F.knn(q, x, 1, block_size=plan.blocks),
        "F.representation_gap": lambda q: lambda: F.representation_gap(q, x),
    }
    for name, factory in peers.items():
        run = factory(dim)
        methods[name] = bind_peer(run, x)
    errors: dict[str, str] = {}

    # Probe: one query block of every method (also the warm-up of this shape's kernels).
    n_probe = min(n_q, qb)
    probe: dict[str, float] = {}
    for name, make in methods.items():
        try:
            fn = make(q_all[:n_probe])
            fn()
            probe[name] = timed(fn, device)[0]
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {err}"
            log(f"  {label} {name}: {errors[name]}")
    per_query = sum(probe.values()) / n_probe
    repeats = plan.repeats
    needed = per_query * n_q * (repeats + 1)  # warm-up + repeats
    if needed > budget and repeats > 3:
        repeats = max(3, int(budget / (per_query * n_q)) - 1)
        report.skip(f"{label} repeats", f"{plan.repeats} -> {repeats} to fit the time budget")
        needed = per_query * n_q * (repeats + 1)
    if needed > budget and n_q > qb:
        fit = max(qb, int(budget / (per_query * (repeats + 1)) // qb * qb))
        if fit < n_q:
            report.skip(
                f"{label} queries",
                f"{n_q} -> {fit} queries to fit the time budget "
                f"(projected {needed:.0f} s > {budget:.0f} s)",
            )
            n_q = fit
    q = q_all[:n_q]
    scale = n / n_q
    runners: dict[str, Callable[[], object]] = {}
    for name, make in methods.items():
        if name in errors:
            continue
        try:
            runners[name] = make(q)
            runners[name]()  # warm-up at the timed size
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {err}"
            log(f"  {label} {name}: {errors[name]}")
            runners.pop(name, None)
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, int | None] = {name: None for name in runners}
    for _ in range(repeats):
        for name, fn in list(runners.items()):
            try:
                seconds, peak = timed(fn, device)
            except Exception as err:
                errors[name] = f"{type(err).__name__}: {err}"
                runners.pop(name)
                continue
            times[name].append(seconds)
            if peak is not None:
                peaks[name] = max(peaks[name] or 0, peak)
    del runners
    base = times.get("plain torch.mm", [])
    row: dict[str, Any] = {
        "shape": label,
        "n": n,
        "m": n,
        "dim": dim,
        "queries_timed": n_q,
        "scale_to_full": scale,
        "repeats": repeats,
        "methods": {},
        "errors": errors,
    }
    flops = 2.0 * n_q * n * (dim + 1)
    for name, ts in times.items():
        if not ts:
            continue
        peak = peaks[name]
        entry: dict[str, Any] = {
            "median_s": statistics.median(ts) * scale,
            "measured_median_s": statistics.median(ts),
            "runs_s": ts,
            "peak_extra_mem_mb": None if peak is None else peak / 2**20,
        }
        if len(base) == len(ts) and name != "plain torch.mm":
            entry["ratio_to_plain_mm"] = statistics.median(
                a / b for a, b in zip(ts, base, strict=True)
            )
        if name == "plain torch.mm":
            entry["tflops"] = flops / statistics.median(ts) / 1e12
        row["methods"][name] = entry
    knn_ratio = row["methods"].get("F.knn", {}).get("ratio_to_plain_mm")
    row["knn_within_target"] = None if knn_ratio is None else bool(knn_ratio <= TARGET_RATIO)
    for name in peers:
        if name in times and len(times[name]) == len(times.get("F.knn", [])) and times[name]:
            row["methods"][name]["knn_over_peer"] = statistics.median(
                a / b for a, b in zip(times["F.knn"], times[name], strict=True)
            )
    return row


def run_timings(report: Report, device: torch.device, plan: TimingPlan, dry_run: bool) -> None:
    """All shapes, cheapest first, within ``plan.budget_s`` seconds."""
    peers, status = peer_factories(device, dry_run)
    report.meta["peers"] = status
    log(f"[timing] peers: {status}")
    # Global warm-up: CUDA context, cuBLAS handles, the engine's kernels.
    warm = randn((min(2048, max(plan.sizes)), 16), device, 5)
    F.knn(warm, warm, 1)
    F.representation_gap(warm, warm)
    plain_blocked_mm(warm, warm, plan.blocks)()
    sync(device)
    shapes = sorted(
        ((n, d) for n in plan.sizes for d in plan.dims), key=lambda s: s[0] * s[0] * (s[1] + 1)
    )
    start = time.perf_counter()
    for i, (n, dim) in enumerate(shapes):
        label = f"N=M={n}, D={dim}"
        if (n, dim) in plan.skip:
            report.skip(label, "skipped by --skip-shape")
            continue
        memory = 4.0 * n * dim * 2 + 4.0 * n * (dim + 2)  # points, queries, augmented operands
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if memory * 1.5 > free:
                report.skip(label, f"needs about {memory / 2**30:.1f} GiB, {free / 2**30:.1f} free")
                continue
        left = plan.budget_s - (time.perf_counter() - start)
        if left <= 0:
            report.skip(label, f"time budget of {plan.budget_s:.0f} s spent (--time-budget)")
            continue
        budget = left / (len(shapes) - i)
        log(f"[timing] {label} (budget {budget:.0f} s)")
        try:
            row = time_shape(report, device, n, dim, plan, budget, peers)
        except Exception as err:  # e.g. out of memory while making the data
            row = {
                "shape": label,
                "n": n,
                "m": n,
                "dim": dim,
                "methods": {},
                "errors": {"shape": f"{type(err).__name__}: {err}"},
            }
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report.timings.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for name, entry in row["methods"].items():
            ratio = entry.get("ratio_to_plain_mm")
            extra = f", {ratio:.2f}x plain mm" if ratio is not None else ""
            log(f"  {name}: {entry['median_s']:.4g} s{extra}")


def run_estimators(
    report: Report, device: torch.device, n: int, dim: int, repeats: int, budget_s: float
) -> None:
    """Time the calibrated ``F.intrinsic_dimension`` and ``gc.GapLaw.fit`` on the device.

    Data: a 6-dimensional linear manifold (uniform in a cube) in ``dim`` dimensions, ``n``
    training points and ``n / 4`` references. One warm-up call gives the value; then up to
    ``repeats`` timed calls, fewer when the warm-up says they would exceed ``budget_s`` each.
    """
    cpu_gen = torch.Generator().manual_seed(7)
    basis = torch.randn(6, dim, generator=cpu_gen)
    data = (torch.rand(n + n // 4, 6, generator=cpu_gen) @ basis).to(device)
    train, reference = data[:n], data[n:]
    jobs: dict[str, Callable[[], Any]] = {
        "F.intrinsic_dimension (calibrated)": lambda: F.intrinsic_dimension(train),
        "gc.GapLaw.fit": lambda: gc.GapLaw.fit(train, reference),
    }
    for name, job in jobs.items():
        entry: dict[str, Any] = {"name": name, "n": n, "dim": dim, "true_dimension": 6}
        try:
            holder: list[Any] = []
            warm = timed(partial(store, holder, job), device)  # the warm-up, and the value
            value = holder[0]
            fit = min(repeats, int(budget_s / max(warm[0], 1e-9)))
            if fit < repeats:
                report.skip(
                    f"{name} repeats",
                    f"{repeats} -> {fit} (warm-up {warm[0]:.1f} s; with 0 the warm-up is the time)",
                )
            runs = [timed(job, device) for _ in range(fit)] or [warm]
            entry["median_s"] = statistics.median(r[0] for r in runs)
            peaks = [r[1] for r in runs if r[1] is not None]
            entry["peak_extra_mem_mb"] = max(peaks) / 2**20 if peaks else None
            entry["value"] = float(value if isinstance(value, Tensor) else value.dimension)
            entry["repeats"] = max(fit, 1)
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"
        report.estimators.append(entry)
        log(f"[estimator] {name}: {entry.get('median_s', entry.get('error'))}")


def check_timings(report: Report) -> dict[str, Any]:
    """Every timing of gapcallback and of the plain product ran (peers may fail: noted only)."""
    own = ("plain torch.mm", "F.knn", "F.representation_gap", "shape")
    problems = []
    for row in report.timings:
        for name, err in row.get("errors", {}).items():
            if name in own:
                problems.append(f"{row['shape']} {name}: {err}")
        for name in own[:3]:
            entry = row["methods"].get(name)
            if entry is None and name not in row.get("errors", {}):
                problems.append(f"{row['shape']} {name}: no runs")
            elif entry is not None and not math.isfinite(entry["median_s"]):
                problems.append(f"{row['shape']} {name}: non-finite time")
    for entry in report.estimators:
        if "error" in entry:
            problems.append(f"{entry['name']}: {entry['error']}")
    assert report.timings, "no shape was timed"
    assert not problems, "; ".join(problems)
    return {"shapes": len(report.timings), "estimators": len(report.estimators)}


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".4g") -> str:
    """A number for a table cell; ``-`` for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def markdown(report: Report) -> str:
    """The markdown tables of the run."""
    m = report.meta
    lines = [
        f"# gapcallback GPU check ({m['mode']})",
        "",
        f"Device: {m['device_name']}; torch {m['torch']} (CUDA {m['cuda']}); gapcallback "
        f"{m['gapcallback']}; {m['started']}; {m['elapsed_s']:.0f} s after start-up. "
        f"Peers: {', '.join(f'{k}: {v}' for k, v in m.get('peers', {}).items()) or '-'}.",
        "",
        "## Checks",
        "",
        "| check | result | time (s) | note |",
        "|---|---|---:|---|",
    ]
    for c in report.checks:
        note = (c.error or "").replace("|", "\\|").replace("\n", " ")[:300]
        if c.name == "cuda_marked_tests" and c.passed:
            d = c.details
            counts = (d.get("passed", 0), d.get("failed", 0), d.get("skipped", 0))
            note = "{} passed, {} failed, {} skipped".format(*counts)
        lines.append(
            f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.seconds:.1f} | {note} |"
        )
    peer_names = sorted(
        {n for r in report.timings for n in r["methods"]}
        - {"plain torch.mm", "F.knn", "F.representation_gap"}
    )
    lines += [
        "",
        f"## Timings (k=1; target: F.knn within {TARGET_RATIO}x of the plain blocked product)",
        "",
        "Times are medians scaled to the full shape when a subset of queries was timed; ratios "
        "are medians of per-run ratios; memory is the peak extra GPU memory of one call.",
        "",
        "| shape | queries timed | repeats | plain mm (s) | mm TFLOP/s | F.knn (s) | knn / mm | "
        "gap (s) | gap / mm | knn mem (MB) | mm mem (MB) | "
        + "".join(f"{p} (s) | knn / {p.split()[0]} | " for p in peer_names),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(peer_names),
    ]
    for r in report.timings:
        ms = r["methods"]
        mm, kn, gp = (ms.get(k, {}) for k in ("plain torch.mm", "F.knn", "F.representation_gap"))
        cells = [
            r["shape"],
            fmt(r.get("queries_timed")),
            fmt(r.get("repeats")),
            fmt(mm.get("median_s")),
            fmt(mm.get("tflops"), ".1f"),
            fmt(kn.get("median_s")),
            fmt(kn.get("ratio_to_plain_mm"), ".2f"),
            fmt(gp.get("median_s")),
            fmt(gp.get("ratio_to_plain_mm"), ".2f"),
            fmt(kn.get("peak_extra_mem_mb"), ".0f"),
            fmt(mm.get("peak_extra_mem_mb"), ".0f"),
        ]
        for p in peer_names:
            cells += [
                fmt(ms.get(p, {}).get("median_s")),
                fmt(ms.get(p, {}).get("knn_over_peer"), ".2f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(r["shape"], n, e) for r in report.timings for n, e in r.get("errors", {}).items()]
    if errors:
        lines += ["", "Timing errors:", ""]
        lines += [f"- {shape}, {name}: {err[:300]}" for shape, name, err in errors]
    lines += [
        "",
        "## Estimators on the device",
        "",
        "| estimator | N | D | median (s) | peak mem (MB) | value (true 6) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in report.estimators:
        lines.append(
            f"| {e['name']} | {e['n']} | {e['dim']} | {fmt(e.get('median_s'))} | "
            f"{fmt(e.get('peak_extra_mem_mb'), '.0f')} | "
            f"{fmt(e.get('value'), '.3f') if 'error' not in e else e['error'][:200]} |"
        )
    if report.skipped:
        lines += ["", "## Skipped or shrunk", ""]
        lines += [f"- {s['what']}: {s['why']}" for s in report.skipped]
    return "\n".join(lines) + "\n"


def output_dir(cli_out: str | None) -> Path:
    """``$OUT`` when set (what the device tool brings back), else ``--out``, else a temp folder."""
    env = os.environ.get("OUT")
    if env:
        if cli_out and Path(cli_out).resolve() != Path(env).resolve():
            log(f"note: $OUT is set, writing to {env} (not --out {cli_out})")
        path = Path(env)
    elif cli_out:
        path = Path(cli_out)
    else:
        path = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_shape(text: str) -> tuple[int, int]:
    """``"N:D"`` -> ``(N, D)``."""
    n, _, dim = text.partition(":")
    return int(n), int(dim)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="same code paths on the CPU at tiny sizes (what the test suite runs)",
    )
    p.add_argument("--out", help="output folder when $OUT is not set (default: a temp folder)")
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        help="N = M of the timed shapes (default 20000 100000 1000000; dry run 300 1500)",
    )
    p.add_argument(
        "--dims", type=int, nargs="+", help="D of the timed shapes (default 64 768; dry run 8 32)"
    )
    p.add_argument(
        "--max-queries",
        type=int,
        help="queries timed per shape at most, the rest scaled (default 32768; dry run 512)",
    )
    p.add_argument("--repeats", type=int, help="timed runs per method (default 5; dry run 3)")
    p.add_argument(
        "--time-budget", type=float, help="seconds for all timed shapes (default 200; dry run 20)"
    )
    p.add_argument(
        "--skip-shape",
        action="append",
        default=[],
        metavar="N:D",
        help="do not time this shape (repeatable), e.g. 1000000:768",
    )
    p.add_argument(
        "--block-size",
        type=int,
        nargs=2,
        metavar=("QB", "PB"),
        help=f"blocks of F.knn and the plain mm (default {ENGINE_BLOCKS}; dry run {DRY_BLOCKS})",
    )
    p.add_argument(
        "--estimator-n",
        type=int,
        help="points for the ID / GapLaw timings (default 20000; dry run 300)",
    )
    p.add_argument(
        "--pytest-timeout", type=float, default=120.0, help="seconds for the CUDA tests (120)"
    )
    p.add_argument("--no-tests", action="store_true", help="skip the pytest run of CUDA tests")
    p.add_argument("--no-timings", action="store_true", help="checks only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run everything; return the exit code (1 if any check failed)."""
    args = parse_args(argv)
    dry = args.cpu_dry_run
    started = time.perf_counter()
    if not dry and not torch.cuda.is_available():
        log("No CUDA device: run on a CUDA machine, or pass --cpu-dry-run.")
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)  # tiny problems: threads only contend on a loaded machine
    out = output_dir(args.out)
    sizes = DRY_SIZES if dry else GPU_SIZES

    def pick(value: Any, gpu: Any, cpu: Any) -> Any:
        return value if value is not None else (cpu if dry else gpu)

    plan = TimingPlan(
        sizes=tuple(pick(args.sizes, [20000, 100000, 1000000], [300, 1500])),
        dims=tuple(pick(args.dims, [64, 768], [8, 32])),
        max_queries=pick(args.max_queries, 32768, 512),
        repeats=pick(args.repeats, 5, 3),
        budget_s=pick(args.time_budget, 200.0, 20.0),
        blocks=tuple(args.block_size)
        if args.block_size
        else (DRY_BLOCKS if dry else ENGINE_BLOCKS),  # type: ignore[arg-type]
        skip=frozenset(parse_shape(s) for s in args.skip_shape),
    )
    report = Report(
        meta={
            "mode": "cpu dry run" if dry else "cuda",
            "device_name": torch.cuda.get_device_name(0)
            if not dry
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "gapcallback": gc.__version__,
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "args": vars(args),
            "engine_blocks": list(plan.blocks),
            "timing_sizes": list(plan.sizes),
            "timing_dims": list(plan.dims),
            "precision_at_start": precision_state(),
            "threads": torch.get_num_threads(),
        }
    )
    log(
        f"gapcallback GPU check ({report.meta['mode']}) on {report.meta['device_name']}; out: {out}"
    )
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("knn_vs_float64_oracle", lambda: check_knn_oracle(device, sizes)),
        ("exact_duplicates_zero", lambda: check_duplicates(device, sizes)),
        ("half_precision_inputs", lambda: check_half_precision(device, sizes)),
        ("tf32_setting_does_not_leak", lambda: check_tf32(device, sizes)),
        ("autocast_does_not_leak", lambda: check_autocast(device, sizes)),
        ("metrics_on_device", lambda: check_metrics(device, sizes)),
        ("callback_in_trainer", lambda: check_callback(device, sizes)),
    ]
    if not args.no_tests:
        checks.append(("cuda_marked_tests", lambda: check_cuda_tests(device, args.pytest_timeout)))
    for name, fn in checks:
        run_check(report, name, fn)
    if not args.no_timings:
        try:
            run_timings(report, device, plan, dry)
        except Exception as err:
            report.skip("timings", f"stopped: {type(err).__name__}: {err}")
        try:
            run_estimators(
                report,
                device,
                pick(args.estimator_n, 20000, 300),
                plan.dims[0],
                repeats=3 if not dry else 1,
                budget_s=30.0,
            )
        except Exception as err:
            report.skip("estimators", f"stopped: {type(err).__name__}: {err}")
        run_check(report, "timings_completed", lambda: check_timings(report))
    report.meta["elapsed_s"] = time.perf_counter() - started
    report.meta["precision_at_end"] = precision_state()
    failed = [c.name for c in report.checks if not c.passed]
    report.meta["checks_failed"] = failed
    payload = clean(
        {
            "meta": report.meta,
            "checks": [c.__dict__ for c in report.checks],
            "timings": report.timings,
            "estimators": report.estimators,
            "skipped": report.skipped,
        }
    )
    (out / JSON_NAME).write_text(json.dumps(payload, indent=2, allow_nan=False))
    table = markdown(report)
    (out / MD_NAME).write_text(table)
    print(table, flush=True)
    log(
        f"wrote {out / JSON_NAME} and {out / MD_NAME}; "
        f"{len(report.checks) - len(failed)}/{len(report.checks)} checks passed"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
