"""What one GapCallback evaluation costs, against one gap computation of the same shapes (issue 12).

The README main job's shapes: a 2-sphere in R^8, 1000 training and 1000 reference points,
``num_samples=2000`` per evaluation. The sampler returns precomputed samples, so everything timed
is the callback's own work. A real ``lightning.Trainer`` (CPU, CSV + TensorBoard loggers) runs 10
evaluations (one per epoch, one training batch per epoch); each evaluation is timed inside the
callback (``_evaluate``, plus the figure at fit end), and the whole run is repeated, alternating
with the single ``F.representation_gap(reference, samples)`` it is compared to.

    python benchmarks/callback/bench_evaluation_cost.py [--runs 5] [--json out.json]

Run it against another checkout (e.g. the code before a change) with
``PYTHONPATH=/path/to/checkout python benchmarks/callback/bench_evaluation_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gapcallback as gc
from gapcallback import functional as F

NUM_SAMPLES = 2000
EVALUATIONS = 10


def sphere(n: int, dim: int, rotation: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``n`` uniform points of the unit ``dim``-sphere, rotated into R^D by ``rotation``."""
    x = torch.randn(n, dim + 1, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    pad = torch.zeros(n, rotation.shape[0] - dim - 1)
    return torch.cat([x, pad], dim=1) @ rotation.T


class Idle(L.LightningModule):
    """One parameter, one cheap step: the run's time is the callback's."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Timed(gc.GapCallback):
    """GapCallback that records the wall time of each evaluation and of the fit-end figure."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.fit_end = 0.0

    def _evaluate(self, trainer, pl_module, *, on_step):
        start, cpu = time.perf_counter(), time.process_time()
        super()._evaluate(trainer, pl_module, on_step=on_step)
        self.times.append(time.perf_counter() - start)
        self.cpu.append(time.process_time() - cpu)

    def on_fit_end(self, trainer, pl_module):
        start = time.perf_counter()
        if hasattr(super(), "on_fit_end"):
            super().on_fit_end(trainer, pl_module)
        self.fit_end = time.perf_counter() - start


def run_callback(reference, train, samples, root) -> tuple[list[float], float, list[float]]:
    def sampler(module, n, generator=None):
        start = sampler.offset
        sampler.offset = (start + n) % NUM_SAMPLES
        return samples[start : start + n]

    sampler.offset = 0
    callback = Timed(reference, train=train, sampler=sampler, num_samples=NUM_SAMPLES)
    trainer = L.Trainer(
        max_epochs=EVALUATIONS,
        accelerator="cpu",
        logger=[CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")],
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Idle(), DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1))
    assert len(callback.times) == EVALUATIONS, (len(callback.times), len(callback.history))
    assert callback.num_skipped == 0, [h.get("reason") for h in callback.history]
    return callback.times, callback.fit_end, callback.cpu


def time_gap(reference, samples, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.representation_gap(reference, samples)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(reference, train, samples) -> dict[str, float]:
    """The parts of one evaluation, each timed alone on the same inputs (median of 5)."""
    from gapcallback.metrics import IntrinsicDimension, RepresentationGap

    def med(fn, repeats=5):
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return statistics.median(out)

    # The callback gathers sampler batches into blocks of up to 4M values: one block here.
    batches = [samples]
    metric = RepresentationGap(reference)

    def gap():
        metric.reset()
        for b in batches:
            metric.update(b)
        metric.compute()

    def memorization():
        for b in batches:
            F.memorization(b, train)

    def dimension():
        m = IntrinsicDimension(max_points=2000)
        for b in batches:
            m.update(b)
        m.compute()

    parts = {
        "gap metric": med(gap),
        "memorization": med(memorization),
        "id/samples": med(dimension),
    }
    try:
        from gapcallback.plotting import render_rgb, save_png

        cb = gc.GapCallback(reference, train=train)
        cb.prepare_data()
        cb.history = [
            {"evaluation": i, "epoch": i, "step": i + 1, "skipped": False, "gap/observed": 0.01}
            for i in range(EVALUATIONS)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            parts["figure (one render + PNG)"] = med(
                lambda: save_png(render_rgb(cb.figure()), os.path.join(tmp, "f.png")), 3
            )
    except ImportError:  # an older checkout without render_rgb
        pass
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    train = sphere(1000, 2, rotation, g)
    reference = sphere(1000, 2, rotation, g)
    samples = sphere(NUM_SAMPLES, 2, rotation, g) + 0.01 * torch.randn(NUM_SAMPLES, 8, generator=g)
    per_eval, on_thread, gaps, fit_ends, cpu_each = [], [], [], [], []
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.runs):
            times, fit_end, cpu = run_callback(
                reference, train, samples, os.path.join(root, str(r))
            )
            # The fit-end figure belongs to the run: spread it over its evaluations.
            per_eval.append((sum(times) + fit_end) / EVALUATIONS)
            # ... and without it: what each evaluation costs the training loop.
            on_thread.append(sum(times) / EVALUATIONS)
            cpu_each.append(sum(cpu) / EVALUATIONS)
            fit_ends.append(fit_end)
            gaps.append(time_gap(reference, samples))
    one_gap = statistics.median(gaps)
    each = statistics.median(per_eval)
    result = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "gapcallback": getattr(gc, "__file__", "?"),
        "one_gap_ms": 1e3 * one_gap,
        "per_evaluation_ms": 1e3 * each,
        "ratio": each / one_gap,
        # The evaluations alone (the training thread; the periodic figure renders on a worker
        # thread, the fit end's wait for it is fit_end_ms).
        "per_evaluation_training_thread_ms": 1e3 * statistics.median(on_thread),
        "ratio_training_thread": statistics.median(on_thread) / one_gap,
        "fit_end_ms": 1e3 * statistics.median(fit_ends),
        # CPU time of the whole process during the evaluations (the figure thread included).
        "cpu_per_evaluation_ms": 1e3 * statistics.median(cpu_each),
        "runs": [1e3 * t for t in per_eval],
        "runs_training_thread": [1e3 * t for t in on_thread],
        "breakdown_ms": {k: 1e3 * v for k, v in breakdown(reference, train, samples).items()},
    }
    print(f"gapcallback from {result['gapcallback']}, {result['torch_threads']} torch threads")
    print("| quantity | ms |\n|---|---:|")
    print(
        f"| one F.representation_gap(reference [1000, 8], samples [2000, 8]) | {result['one_gap_ms']:.2f} |"
    )
    print(
        f"| one callback evaluation (mean of {EVALUATIONS}, fit-end figure included; median of {args.runs} runs) | {result['per_evaluation_ms']:.1f} |"
    )
    print(f"| ratio | {result['ratio']:.1f}x |")
    print(
        f"| one evaluation on the training thread (fit-end figure left out) | "
        f"{result['per_evaluation_training_thread_ms']:.1f} ({result['ratio_training_thread']:.1f}x) |"
    )
    print(f"| the fit end (waits for the figure's render, sends it) | {result['fit_end_ms']:.0f} |")
    print(
        f"| process CPU per evaluation (figure thread included) | {result['cpu_per_evaluation_ms']:.1f} |"
    )
    for k, v in result["breakdown_ms"].items():
        print(f"| part: {k} | {v:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    assert math.isfinite(result["ratio"])


if __name__ == "__main__":
    main()
