"""What a reference file saves, and what the offline evaluation costs (issue 14).

At two shapes (the README job's: a 2-sphere in R^8 with 1000 training and 1000 reference points
and 2000 samples; a larger one: a 6-manifold in R^64 with 20000 training and 2000 reference
points and 5000 samples), in one process, medians of alternating rounds:

* ``prepare``: ``gc.prepare_reference`` (the fit-start preparation of ``GapCallback``: the law,
  ``id/data``, the memorization line);
* ``save`` / ``load``: ``gc.save_reference`` / ``gc.load_reference`` of the same (with the hash
  check), and the file's size;
* ``evaluate``: ``gc.evaluate(prepared, samples)`` (every key), against one
  ``F.representation_gap(reference, samples)``;
* ``cli``: the wall time of ``gapcallback evaluate --reference FILE --samples S.npy --json`` in a
  fresh process (interpreter start and imports included), once per round.

    python benchmarks/offline/bench_offline.py [--rounds 3] [--json benchmarks/results/offline.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gapcallback as gc
from gapcallback import functional as F


def manifold(n: int, dim: int, ambient: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points of a curved ``dim``-manifold (a sphere) in R^ambient, randomly rotated."""
    x = torch.randn(n, dim + 1, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    rotation = torch.linalg.qr(
        torch.randn(ambient, ambient, generator=torch.Generator().manual_seed(7))
    )[0]
    return torch.cat([x, torch.zeros(n, ambient - dim - 1)], dim=1) @ rotation.T


SHAPES = {
    "readme": {"dim": 2, "ambient": 8, "train": 1000, "reference": 1000, "samples": 2000},
    "large": {"dim": 6, "ambient": 64, "train": 20000, "reference": 2000, "samples": 5000},
}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_shape(name: str, shape: dict, rounds: int, folder: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    train = manifold(shape["train"], shape["dim"], shape["ambient"], g)
    reference = manifold(shape["reference"], shape["dim"], shape["ambient"], g)
    samples = manifold(shape["samples"], shape["dim"], shape["ambient"], g) + 0.01 * torch.randn(
        shape["samples"], shape["ambient"], generator=g
    )
    np.save(folder / f"{name}_samples.npy", samples.numpy())
    path = folder / f"{name}.gapref"
    times: dict[str, list[float]] = {
        k: [] for k in ("prepare", "save", "load", "evaluate", "gap", "cli")
    }
    for _ in range(rounds):
        t, prepared = timed(lambda: gc.prepare_reference(reference, train=train))
        times["prepare"].append(t)
        t, _ = timed(lambda p=prepared: gc.save_reference(p, path))
        times["save"].append(t)
        t, loaded = timed(lambda: gc.load_reference(path))
        times["load"].append(t)
        t, values = timed(lambda r=loaded: gc.evaluate(r, samples))
        times["evaluate"].append(t)
        t, _ = timed(lambda: F.representation_gap(reference, samples))
        times["gap"].append(t)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "gapcallback", "evaluate", "--reference", str(path),
             "--samples", str(folder / f"{name}_samples.npy"), "--json"],
            check=True, capture_output=True,
        )  # fmt: skip
        times["cli"].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "shape": shape,
        "median_s": medians,
        "all_s": times,
        "file_bytes": path.stat().st_size,
        "evaluate_over_gap": medians["evaluate"] / medians["gap"],
        "load_over_prepare": medians["load"] / medians["prepare"],
        "values": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    out = {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "shapes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            result = run_shape(name, SHAPES[name], args.rounds, Path(tmp))
            out["shapes"][name] = result
            m = result["median_s"]
            print(
                f"{name}: prepare {m['prepare']:.2f} s, save {m['save'] * 1e3:.1f} ms, load "
                f"{m['load'] * 1e3:.1f} ms ({result['file_bytes'] / 1e6:.2f} MB), evaluate "
                f"{m['evaluate'] * 1e3:.1f} ms = {result['evaluate_over_gap']:.1f}x one gap "
                f"({m['gap'] * 1e3:.1f} ms), CLI {m['cli']:.2f} s wall",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
