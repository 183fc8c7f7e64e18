"""The README's copy-paste commands and CI stay in sync; public names of the design card exist."""

from __future__ import annotations

import re
from pathlib import Path

import gapcallback as gc
from gapcallback import functional as F

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a bash block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    commands = readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert (
        "examples/sphere_diffusion.py" in main_job
        and (ROOT / "examples/sphere_diffusion.py").exists()
    )
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_design_card_public_names():
    for name in ["knn", "representation_gap", "memorization", "intrinsic_dimension"]:
        assert callable(getattr(F, name))
    for name in [
        "GapLaw",
        "RepresentationGap",
        "IntrinsicDimension",
        "GapCallback",
        "GapEarlyStopping",
        "GradientSNR",
    ]:
        assert hasattr(gc, name)
    from gapcallback.optim import PopulationRiskAdamW
    from gapcallback.symmetry import CyclicShifts, FiniteGroup, Permutations, RigidMotions

    assert all(
        callable(c)
        for c in (PopulationRiskAdamW, CyclicShifts, FiniteGroup, Permutations, RigidMotions)
    )
    assert isinstance(gc.__version__, str)
    # Added in December 2026: the offline evaluation and the command line, prediction tasks, the
    # k-NN family, sharpness and the NTK.
    for name in [
        "evaluate", "prepare_reference", "save_reference", "load_reference", "PredictionGap",
        "PredictionGapCallback", "PrecisionRecall", "DensityCoverage", "Authenticity",
        "GeneralizationDiagnostics",
    ]:  # fmt: skip
        assert callable(getattr(gc, name)), name
    for name in [
        "prediction_gap", "precision_recall", "density_coverage", "authenticity",
        "hessian_eigenvalues", "hessian_trace", "ntk_eigenvalues",
    ]:  # fmt: skip
        assert callable(getattr(F, name)), name
    import contextlib
    import io

    import pytest

    from gapcallback.cli.main import build_parser

    for command in ("evaluate", "plan", "checkpoints", "reference"):
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
