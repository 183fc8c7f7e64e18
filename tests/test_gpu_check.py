"""The GPU check script (benchmarks/gpu_check.py) runs end to end in its CPU dry-run mode.

No GPU is at hand in CI, so the dry run exercises the same code paths on the CPU at tiny sizes;
this keeps the script from rotting until a CUDA machine runs it for real.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
EXPECTED_CHECKS = {
    "knn_vs_float64_oracle",
    "exact_duplicates_zero",
    "half_precision_inputs",
    "tf32_setting_does_not_leak",
    "autocast_does_not_leak",
    "metrics_on_device",
    "callback_in_trainer",
    "cuda_marked_tests",
    "timings_completed",
}


def finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_cpu_dry_run_writes_json_and_markdown_with_every_check_passed(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# gapcallback GPU check (cpu dry run)")
    assert "## Checks" in table and "## Timings" in table and "## Estimators" in table
    assert "| knn_vs_float64_oracle | pass |" in table
    assert "## Checks" in proc.stdout  # the table is printed too

    assert report["meta"]["mode"] == "cpu dry run"
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == EXPECTED_CHECKS
    failed = {name: c["error"] for name, c in checks.items() if not c["passed"]}
    assert not failed, failed
    assert report["meta"]["checks_failed"] == []
    # On the CPU the CUDA-marked tests are found and skipped, not failed.
    cuda_tests = checks["cuda_marked_tests"]["details"]
    assert "tests/test_knn.py::test_cuda_matches_cpu" in cuda_tests["node_ids"]
    assert cuda_tests["failed"] == 0 and cuda_tests["errors"] == 0
    # The user's precision setting is back to where it started.
    assert report["meta"]["precision_at_end"] == report["meta"]["precision_at_start"]

    rows = report["timings"]
    assert {(r["n"], r["dim"]) for r in rows} == {(300, 8), (300, 32), (1500, 8), (1500, 32)}
    for row in rows:
        assert not row["errors"], row["errors"]
        assert finite(row["queries_timed"]) and finite(row["scale_to_full"])
        for name in ("plain torch.mm", "F.knn", "F.representation_gap"):
            entry = row["methods"][name]
            assert finite(entry["median_s"]) and entry["median_s"] > 0, (row["shape"], name)
            assert all(finite(t) for t in entry["runs_s"])
        for name in ("F.knn", "F.representation_gap"):
            assert finite(row["methods"][name]["ratio_to_plain_mm"]), (row["shape"], name)
    # A subset of the queries was timed and scaled for the larger shape, and said so.
    big = [r for r in rows if r["n"] == 1500]
    assert all(r["queries_timed"] < r["n"] for r in big)
    assert any("1500 queries" in s["why"] for s in report["skipped"])

    estimators = {e["name"]: e for e in report["estimators"]}
    assert set(estimators) == {"F.intrinsic_dimension (calibrated)", "gc.GapLaw.fit"}
    for entry in estimators.values():
        assert finite(entry["median_s"]) and finite(entry["value"]), entry
