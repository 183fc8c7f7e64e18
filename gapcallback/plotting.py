"""Figures (matplotlib is an optional dependency: ``pip install gapcallback[plot]``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gapcallback.law import GapLaw

__all__ = ["gap_history_figure", "require_matplotlib"]


def require_matplotlib(what: str = "Plotting") -> Any:
    """Import ``matplotlib.pyplot`` or raise an ImportError saying how to install it.

    ``what`` names the caller in the message (e.g. ``"GapLaw.plot"``).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            f"{what} needs matplotlib; install it with `pip install gapcallback[plot]`."
        ) from err
    return plt


def gap_history_figure(
    history: Sequence[dict[str, Any]],
    *,
    law: GapLaw | None,
    n_train: int | None,
    memorization_gap: float | None,
    prefix: str = "",
) -> Any:
    """Two panels: the law (gap vs training-set size, log-log) and the observed gap over training.

    Left: the fitted law :math:`R_n = J n^{-p/d}` with its band and measured subsample gaps, the
    training set's own gap (the memorization line) at ``n_train``, and each observed model gap
    placed at its *effective* size :math:`n_\\text{eff} = (J / R)^{d/p}` (the training-set size a
    perfectly trained model would need to reach it). Right: observed, predicted and memorization
    gaps against the global step.

    Returns:
        the matplotlib ``Figure``.
    """
    plt = require_matplotlib("GapCallback.figure")
    fig, (ax_law, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    done = [h for h in history if not h.get("skipped")]
    observed = [h[f"{prefix}gap/observed"] for h in done]
    steps = [h["step"] for h in done]
    if law is not None:
        upper = max([float(law.sizes.max()) if law.sizes.numel() else 1.0, float(n_train or 1)])
        effective = [float(law.samples_for(v)) for v in observed if v > 0]
        n_hi = max([4.0 * upper, *[e for e in effective if math.isfinite(e)]])
        law.plot(ax=ax_law, n_max=min(n_hi, 1e4 * upper))
        if effective:
            colours = range(len(effective))
            ax_law.scatter(
                effective,
                [v for v in observed if v > 0],
                c=list(colours),
                cmap="viridis",
                marker="x",
                zorder=5,
                label="model (at effective n)",
            )
    if n_train and memorization_gap:
        ax_law.scatter(
            [n_train],
            [memorization_gap],
            color="C3",
            marker="s",
            zorder=6,
            label=f"training set (n={n_train})",
        )
    if law is None and not (n_train and memorization_gap):
        ax_law.text(
            0.5, 0.5, "no law: pass train= to GapCallback", ha="center", transform=ax_law.transAxes
        )
    ax_law.set_xscale("log")
    ax_law.set_yscale("log")
    ax_law.set_xlabel("training-set size n")
    ax_law.set_ylabel("representation gap")
    ax_law.legend(fontsize=7)
    ax_law.set_title("gap law")

    ax_time.plot(steps, observed, "o-", color="C2", label="observed")
    if law is not None:
        ax_time.axhline(
            float(law.predict(n_train or law.n_train)),
            color="C0",
            ls="--",
            label="predicted (law at n_train)",
        )
    if memorization_gap:
        ax_time.axhline(memorization_gap, color="C3", ls=":", label="memorization (train set)")
    skipped = [h["step"] for h in history if h.get("skipped")]
    for s in skipped:
        ax_time.axvline(s, color="0.7", lw=0.8)
    if observed and min(observed) > 0:
        ax_time.set_yscale("log")
    ax_time.set_xlabel("global step")
    ax_time.set_ylabel("representation gap")
    ax_time.set_title("during training" + (f" ({len(skipped)} skipped)" if skipped else ""))
    ax_time.legend(fontsize=7)
    fig.tight_layout()
    return fig
