"""Pure tensor functions (no state), torchmetrics style. Where each formula lives:

=================================  ==========================================================
``knn``                            ``functional/nearest_neighbours.py``: exact k nearest neighbours
``representation_gap``             ``functional/gap.py``
``prediction_gap`` (+ risk, joint) ``functional/prediction.py``: the gap of a prediction task on
                                   joint vectors ``[x, w y]``
``memorization``                   ``functional/memorized.py`` (Gu et al. 2023)
``intrinsic_dimension`` (+ ...)    ``functional/dimension.py``: TwoNN, MLE, gap
                                   slope, calibrated default, multiscale view
(its calibrated default)           ``functional/dimension_calibration.py`` (matching against
                                   references), ``functional/dimension_references.py``
                                   (simulated reference families, memoised),
                                   ``functional/calibration_table.py`` (the shipped table)
``measure_gap_curve`` (+ ...)      ``functional/gap_curve.py``: the gap at a grid of training-set
                                   sizes (``GapLaw.fit`` and ``method="gap"``), its size grid and
                                   slope
``gradient_snr`` (+ ...)           ``functional/gradient_signal.py``: per-sample gradients, SNR,
                                   one-step generalization ratio (Liu et al. 2020)
``precision_recall`` (+ all four)  ``functional/precision_and_recall.py``: k-NN manifolds
                                   (Kynkäänniemi et al. 2019)
``density_coverage``               ``functional/density_and_coverage.py`` (Naeem et al. 2020)
``authenticity``                   ``functional/authentic.py`` (Alaa et al. 2022)
``data_copying_statistic``         ``functional/data_copying.py``: C_T (Meehan et al. 2020)
(their k-NN balls)                 ``functional/knn_balls.py``: k-NN radii, exact blocked counts
                                   of the balls containing each point
``hessian_eigenvalues`` (+ trace)  ``functional/curvature.py``: sharpness by Lanczos on
                                   Hessian-vector products, Hutchinson's trace (torch.func)
``ntk_eigenvalues`` (+ spectrum)   ``functional/ntk.py``: the empirical NTK ``J J^T``, chunked
=================================  ==========================================================

No function keeps state between calls, except two bounded, documented memos of deterministic
results: the simulated references of the calibrated estimator
(``dimension_references.reference_stats``, an ``lru_cache`` of 4096 entries) and the loaded table
(``calibration_table.load_table``, one entry); each has ``cache_info()`` and ``cache_clear()``.
"""

from gapcallback.functional.authentic import authenticity
from gapcallback.functional.curvature import HessianTrace, hessian_eigenvalues, hessian_trace
from gapcallback.functional.data_copying import DataCopyingResult, data_copying_statistic
from gapcallback.functional.density_and_coverage import DensityCoverageResult, density_coverage
from gapcallback.functional.dimension import (
    DimensionEstimate,
    GapSlope,
    MultiscaleDimension,
    deduplicate,
    gap_slope_dimension,
    intrinsic_dimension,
    intrinsic_dimension_estimate,
    multiscale_dimension,
)
from gapcallback.functional.gap import gap_from_sq_dists, representation_gap
from gapcallback.functional.gap_curve import GapCurve, gap_size_grid, measure_gap_curve
from gapcallback.functional.gradient_signal import (
    StreamingGradientMoments,
    gradient_moments,
    gradient_snr,
    one_step_generalization_ratio,
    osgr_weights,
    per_sample_gradients,
    predicted_gap_growth,
)
from gapcallback.functional.memorized import MemorizationResult, memorization
from gapcallback.functional.nearest_neighbours import KNNResult, knn
from gapcallback.functional.ntk import NTKSpectrum, empirical_ntk, ntk_eigenvalues, ntk_spectrum
from gapcallback.functional.precision_and_recall import (
    PRDCResult,
    PrecisionRecallResult,
    precision_recall,
    precision_recall_density_coverage,
)
from gapcallback.functional.prediction import joint_points, prediction_gap, prediction_risk

__all__ = [
    "DataCopyingResult",
    "DensityCoverageResult",
    "DimensionEstimate",
    "GapCurve",
    "GapSlope",
    "HessianTrace",
    "KNNResult",
    "MemorizationResult",
    "MultiscaleDimension",
    "NTKSpectrum",
    "PRDCResult",
    "PrecisionRecallResult",
    "StreamingGradientMoments",
    "authenticity",
    "data_copying_statistic",
    "deduplicate",
    "density_coverage",
    "empirical_ntk",
    "gap_from_sq_dists",
    "gap_size_grid",
    "gap_slope_dimension",
    "gradient_moments",
    "gradient_snr",
    "hessian_eigenvalues",
    "hessian_trace",
    "intrinsic_dimension",
    "intrinsic_dimension_estimate",
    "joint_points",
    "knn",
    "measure_gap_curve",
    "memorization",
    "multiscale_dimension",
    "ntk_eigenvalues",
    "ntk_spectrum",
    "one_step_generalization_ratio",
    "osgr_weights",
    "per_sample_gradients",
    "precision_recall",
    "precision_recall_density_coverage",
    "predicted_gap_growth",
    "prediction_gap",
    "prediction_risk",
    "representation_gap",
]
