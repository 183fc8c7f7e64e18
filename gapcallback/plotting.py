"""Figures (matplotlib is an optional dependency: ``pip install gapcallback[plot]``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gapcallback.law import GapLaw

__all__ = [
    "gap_history_figure",
    "new_figure",
    "plot_law",
    "render_rgb",
    "require_matplotlib",
    "save_png",
]


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


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` with its own Agg canvas, outside pyplot's global figure registry.

    Nothing to close afterwards and no interactive backend involved, so figures can be made from
    a training loop (or another thread) without leaking or switching the user's backend.
    """
    require_matplotlib("Plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def render_rgb(fig: Any, dpi: float = 100) -> Any:
    """Render ``fig`` once and return its pixels as a ``[H, W, 3]`` uint8 numpy array.

    Loggers take arrays (TensorBoard ``add_image``, W&B, MLflow ``log_image``) and the PNG file
    is written from the same array, so one figure costs one render however many places it goes.
    """
    import numpy as np

    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(rgb: Any, path: str | Path) -> None:
    """Write a ``[H, W, 3]`` uint8 array as a PNG (Pillow, which matplotlib installs; no
    re-render, light compression: a figure is written often and read rarely)."""
    from PIL import Image

    Image.fromarray(rgb).save(path, format="png", compress_level=1)


def plot_law(
    law: GapLaw, ax: Axes | None = None, n_max: float | None = None, *, level: float = 0.9
) -> tuple[Figure, Axes]:
    """Log-log plot of a law's measured gaps (with error bars), the fitted line and its band.

    :meth:`GapLaw.plot <gapcallback.law.GapLaw.plot>` calls this.

    Args:
        law: the fitted :class:`~gapcallback.law.GapLaw`.
        ax: matplotlib ``Axes`` to draw on; a new pyplot figure when ``None``.
        n_max: right end of the fitted line (default ``4 * max(law.sizes)``).
        level: probability of the uncertainty band (:meth:`GapLaw.predict_interval
            <gapcallback.law.GapLaw.predict_interval>`).

    Returns:
        ``(figure, axes)``.
    """
    import torch

    plt = require_matplotlib("GapLaw.plot")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 4))
    else:
        fig = ax.figure
    lo = float(law.sizes.min()) if law.sizes.numel() else 1.0
    hi_default = 4.0 * float(law.sizes.max()) if law.sizes.numel() else 1e4
    hi = hi_default if n_max is None else float(n_max)
    if not hi > lo:
        raise ValueError(f"`n_max` must exceed the smallest size {lo:g}, got {n_max}.")
    grid = torch.logspace(math.log10(lo), math.log10(hi), 100, dtype=torch.float64)
    low, high = law.predict_interval(grid, level)
    ax.fill_between(
        grid.numpy(),
        low.numpy(),
        high.numpy(),
        alpha=0.25,
        color="C0",
        label=f"{round(level * 100)}% band",
    )
    ax.plot(
        grid.numpy(),
        law.predict(grid).numpy(),
        color="C0",
        label=f"$R_n = {law.constant:.3g}\\,n^{{-{law.p:g}/{law.dimension:.2f}}}$",
    )
    if law.sizes.numel():
        ax.errorbar(
            law.sizes.numpy(),
            law.gaps.numpy(),
            yerr=law.gaps_std.numpy(),
            fmt="o",
            color="C1",
            ms=4,
            label="measured",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training-set size n")
    ax.set_ylabel(f"representation gap $R_n$ (p={law.p:g})")
    ax.legend()
    return fig, ax


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
    perfectly trained model would need to reach it), coloured by global step (the legend names
    the first and the last); gaps whose effective size the law does not support
    (``gap/effective_n`` is ``nan``) are left out.
    Right: observed, predicted and memorization gaps against the global step, and the memorized
    fraction of samples on a second axis.

    Returns:
        the matplotlib ``Figure`` (its own Agg canvas; see :func:`new_figure`).
    """
    fig = new_figure((11, 4))
    ax_law, ax_time = fig.subplots(1, 2)
    done = [h for h in history if not h.get("skipped")]
    observed = [h[f"{prefix}gap/observed"] for h in done]
    steps = [h["step"] for h in done]
    if law is not None:
        upper = max([float(law.sizes.max()) if law.sizes.numel() else 1.0, float(n_train or 1)])
        effective = [law.effective_size(v) for v in observed]
        placed = [
            (i, e, v)
            for i, (e, v) in enumerate(zip(effective, observed, strict=True))
            if math.isfinite(e)
        ]
        n_hi = max([4.0 * upper, *[e for _, e, _ in placed]])
        plot_law(law, ax=ax_law, n_max=min(n_hi, 1e4 * upper))
        if placed:
            # Coloured by global step (viridis, dark = early); the legend names the two ends of
            # the ramp. A colour bar would be a third axes: a fifth of the figure's render time.
            placed_steps = [steps[i] for i, _, _ in placed]
            first, last = min(placed_steps), max(placed_steps)
            ax_law.scatter(
                [e for _, e, _ in placed],
                [v for _, _, v in placed],
                c=placed_steps,
                cmap="viridis",
                vmin=first,
                vmax=max(last, first + 1),
                marker="x",
                zorder=5,
            )
            ends = [(first, 0.0), (last, 1.0)] if last > first else [(first, 0.0)]
            for step, shade in ends:
                ax_law.scatter([], [], color=_viridis(shade), marker="x",
                               label=f"model at effective n, step {step}")  # fmt: skip
    _finish_law_panel(ax_law, law, n_train, memorization_gap, "no law: pass train= to GapCallback")

    ax_time.plot(steps, observed, "o-", color="C2", label="observed")
    risk = [(h["step"], h[f"{prefix}gap/risk"]) for h in done if f"{prefix}gap/risk" in h]
    if risk:  # a predictor's test risk at the gap's loss (PredictionGapCallback): >= observed
        ax_time.plot([s for s, _ in risk], [r for _, r in risk], "^-", color="C1", ms=4,
                     label="test risk (gap/risk)")  # fmt: skip
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
    handles, labels = ax_time.get_legend_handles_labels()
    fraction_key = f"{prefix}gap/memorized_fraction"
    memorized = [(h["step"], h[fraction_key]) for h in done if fraction_key in h]
    if memorized:
        ax_frac = ax_time.twinx()
        line = ax_frac.plot(
            [s for s, _ in memorized],
            [f for _, f in memorized],
            "s--",
            color="C4",
            ms=3,
            label="memorized fraction (right)",
        )
        ax_frac.set_ylim(-0.02, 1.02)
        ax_frac.set_ylabel("memorized fraction of samples")
        handles, labels = [*handles, *line], [*labels, line[0].get_label()]
    ax_time.legend(handles, labels, fontsize=7)
    for ax in fig.axes:
        _plain_log_ticks(ax)
    # Fixed margins: tight_layout measures every tick label first and costs more than the render.
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.13, top=0.92, wspace=0.28)
    return fig


def evaluation_values_figure(
    values: dict[str, float],
    *,
    law: GapLaw | None,
    n_train: int | None,
    memorization_gap: float | None,
    title: str = "",
) -> Any:
    """One evaluation (``gc.evaluate``, ``gapcallback evaluate``): the law panel with the model's
    gap at its effective size and the training set's own gap, and the values as a table.

    Args:
        values: the evaluation's keys (:func:`gapcallback.evaluate`).
        law, n_train, memorization_gap: as in :func:`gap_history_figure`.
        title: a title over the figure (e.g. the samples' file).

    Returns:
        the matplotlib ``Figure`` (its own Agg canvas).
    """
    fig = new_figure((10, 4))
    ax_law, ax_text = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    observed = values.get("gap/observed")
    effective = values.get("gap/effective_n", math.nan)
    if law is not None:
        upper = max(float(law.sizes.max()) if law.sizes.numel() else 1.0, float(n_train or 1))
        n_hi = max(4.0 * upper, effective if math.isfinite(effective) else 0.0)
        plot_law(law, ax=ax_law, n_max=min(n_hi, 1e4 * upper))
        if observed is not None and math.isfinite(effective):
            ax_law.scatter(
                [effective], [observed], color="C2", marker="x", s=60, zorder=5,
                label=f"model (at effective n = {effective:.3g})",
            )  # fmt: skip
    if observed is not None:
        ax_law.axhline(observed, color="C2", ls=":", lw=1, label="observed gap")
    _finish_law_panel(ax_law, law, n_train, memorization_gap, "no law: pass a training set")
    ax_text.axis("off")
    lines = [f"{key:<24}{value:>12.5g}" for key, value in values.items()]
    ax_text.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=9, va="top",
                 transform=ax_text.transAxes)  # fmt: skip
    ax_text.set_title("values")
    if title:
        fig.suptitle(title, fontsize=9)
    _plain_log_ticks(ax_law)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.88, wspace=0.15)
    return fig


def _finish_law_panel(
    ax: Any, law: GapLaw | None, n_train: int | None, memorization_gap: float | None, hint: str
) -> None:
    """The law panel's common part: the training set's own gap at ``n_train``, the axes, the
    legend (``hint`` when there is nothing to draw)."""
    if n_train and memorization_gap:
        ax.scatter(
            [n_train], [memorization_gap], color="C3", marker="s", zorder=6,
            label=f"training set (n={n_train})",
        )  # fmt: skip
    if law is None and not (n_train and memorization_gap):
        ax.text(0.5, 0.5, hint, ha="center", transform=ax.transAxes)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training-set size n")
    ax.set_ylabel("representation gap")
    ax.legend(fontsize=7)
    ax.set_title("gap law")


def _viridis(shade: float) -> Any:
    """The RGBA colour at ``shade`` in [0, 1] of matplotlib's ``viridis`` colour map."""
    from matplotlib import colormaps

    return colormaps["viridis"](shade)


def _plain_log_ticks(ax: Any) -> None:
    """Plain-text labels on log axes (``0.001``, ``1e+04``), at most 6 major ticks, no minor ticks.

    Matplotlib's default log labels are mathtext (``$10^{-3}$``), whose parser dominated the cost
    of rendering a figure that is redrawn during training, and every minor tick is an artist.
    """
    from matplotlib import ticker

    for axis in (ax.xaxis, ax.yaxis):
        if axis.get_scale() == "log":
            axis.set_major_locator(ticker.LogLocator(numticks=6))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            axis.set_minor_locator(ticker.NullLocator())
