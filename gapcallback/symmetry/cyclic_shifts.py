r"""All circular shifts of signals or images: translation equivariance of circular convolutions.

For points of shape ``[*other, *S]`` whose axes ``dims`` (sizes :math:`S`) are shifted circularly,

.. math::

    d_G(y, z)^2 = \min_{s} \lVert y - \operatorname{roll}(z, s) \rVert^2
                = \lVert y \rVert^2 + \lVert z \rVert^2 - 2 \max_s c_s(y, z),
    \qquad c_s(y, z) = \langle y, \operatorname{roll}(z, s) \rangle ,

and all :math:`\prod S` correlations :math:`c_s` of a pair come from one FFT,
:math:`c = \mathcal F^{-1}\big(\sum_{\text{other}} \hat y \, \overline{\hat z}\big)`. The group is
finite (``order`` :math:`= \prod S`, ``dimension`` 0).

Two exact searches, chosen by a cost model (``method="auto"``) or by hand:

* ``"gemm"``: the shifts form a group, so :math:`\min_s \lVert y - \operatorname{roll}(z, s)\rVert =
  \min_s \lVert \operatorname{roll}(y, s) - z\rVert` and the stacked query orbit (all
  :math:`\prod S` shifted copies) is searched against the points in one exact blocked-GEMM search
  (:func:`gapcallback.symmetry.orbit_search.stacked_orbit_knn`, exact float64 re-check by direct
  difference). Each axis of even size :math:`n` adds a central involution (the half shift by
  :math:`n/2`), and :mod:`gapcallback.symmetry.central_split` screens the :math:`2^r` images of
  such a subgroup with one GEMM of length :math:`D`: cost per pair :math:`\propto |G| D / 2^r`, at
  GEMM speed, about :math:`|G| / 2^r` plain searches.
* ``"fft"``: an FFT screen of all pairs, cost per pair :math:`O(C F + S \log S)` with :math:`F` the
  rfft size, at FFT speed. The screening runs in the inputs' precision (float32, or float64 when an
  input is) on data centred by a shift-invariant constant (the per-channel mean of ``points``), and
  every pair within the FFT's rounding-error bound of the running k-th distance is re-checked
  exactly: a float64 FFT picks the pair's candidate shifts, which are applied with an index gather,
  and the distance is recomputed by direct difference from the raw inputs.

Both are exact (shifted duplicates give exactly 0); memory is bounded by blocks. The cost model
(per pair, microseconds, calibrated on one x86 CPU thread; see ``benchmarks/symmetry/results.md``)
compares :math:`0.04 + 1.1 \cdot 10^{-4}\, |G| D / 2^r` for ``"gemm"`` with
:math:`a_{n} + w_C F + c_{n} S \log_2 S` for ``"fft"`` (:math:`a_1 = 0.1`, :math:`c_1 = 7 \cdot
10^{-4}` for 1-D shifts, :math:`a_2 = 0.3`, :math:`c_2 = 1.3 \cdot 10^{-3}` for 2-D and more;
:math:`w_1 = 0.002`, :math:`w_C = 0.006\,C` for :math:`C > 1` channels). In practice: short signals
and small images (:math:`|G| D` up to a few thousand) use the GEMM, long signals and large images the
FFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from gapcallback.search import KNNResult, ldexp, screen_exponent
from gapcallback.symmetry.base import Symmetry, point_dims
from gapcallback.symmetry.central_split import MAX_INVOLUTIONS, MIN_WIDTH
from gapcallback.symmetry.orbit_search import bounded_search, stacked_orbit_knn
from gapcallback.utils.checks import compute_dtype
from gapcallback.utils.precision import full_precision

__all__ = ["CyclicShifts"]

_PAIR_BUDGET = 1 << 22  # complex/real float64 elements per block of pairs (~64 MiB)


class CyclicShifts(Symmetry):
    r"""Circular shifts along the per-point axes ``dims`` (all :math:`\prod_d S_d` of them).

    Args:
        dims: per-point axes shifted circularly, counted from the end: ``(-1,)`` for 1-D signals
            ``[N, L]`` or ``[N, C, L]``; ``(-2, -1)`` for images ``[N, C, H, W]``. Other axes
            (channels) move together.
        method: ``"auto"`` (default: the cost model in the module docstring picks per call),
            ``"gemm"`` (stacked shifted copies of the queries, one exact blocked-GEMM search) or
            ``"fft"`` (FFT cross-correlation screen). All three give the same exact result.

    Attributes:
        dimension: 0 (the shifts of a discrete signal form a finite group).
        order: ``None``: the number of shifts :math:`\prod_d S_d` depends on the point shape; read
            it with :meth:`order_on` (checking a shape never changes the object).

    Example:
        >>> import torch
        >>> from gapcallback.functional import knn
        >>> from gapcallback.symmetry import CyclicShifts
        >>> x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> knn(x.roll(1, -1), x, symmetry=CyclicShifts()).sq_dists
        tensor([[0.]])
    """

    def __init__(
        self, dims: Sequence[int] = (-1,), *, method: Literal["auto", "gemm", "fft"] = "auto"
    ):
        self.dims = point_dims(dims, "dims")
        if method not in ("auto", "gemm", "fft"):
            raise ValueError(f"`method` must be 'auto', 'gemm' or 'fft', got {method!r}.")
        self.method = method

    def order_on(self, x: Tensor) -> int:
        r"""Number of shifts :math:`\prod_d S_d` of points shaped like ``x`` ``[N, *shape]``."""
        self.check_shape(x, "x")
        return math.prod(int(x.shape[d]) for d in self.dims)

    def check_shape(self, x: Tensor, name: str) -> None:
        need = max(-d for d in self.dims)
        if x.ndim - 1 < need:
            raise ValueError(
                f"CyclicShifts(dims={self.dims}) shifts axis {min(self.dims)} of each point, but "
                f"`{name}` has points of shape {tuple(x.shape[1:])} ({x.ndim - 1} axes). Pass "
                f"[N, L] signals for dims=(-1,) or [N, C, H, W] images for dims=(-2, -1)."
            )

    def _layout(self, x: Tensor) -> Tensor:
        """``[N, C, *S]``: shifted axes last, every other per-point axis flattened into C."""
        nd = len(self.dims)
        moved = x.movedim(self.dims, tuple(range(-nd, 0)))
        return moved.reshape(x.shape[0], -1, *moved.shape[moved.ndim - nd :])

    def roll(self, x: Tensor, shifts: Sequence[int] | Tensor) -> Tensor:
        """``roll(x, s)`` for every point (same shift) with ``s`` one int per axis of ``dims``."""
        shifts = [int(s) for s in shifts]
        if len(shifts) != len(self.dims):
            raise ValueError(f"`shifts` needs {len(self.dims)} entries (one per axis of `dims`).")
        return torch.roll(x, shifts, self.dims)

    def orbit(self, x: Tensor) -> Tensor:
        """``[order * N, *shape]``: row ``s * N + i`` holds ``x_i`` shifted by the ``s``-th shift
        (C order over the axes of ``dims``; shift 0 first)."""
        self.check_shape(x, "x")
        sizes = [int(x.shape[d]) for d in self.dims]
        grids = torch.cartesian_prod(*[torch.arange(s) for s in sizes]).reshape(-1, len(sizes))
        return torch.cat([self.roll(x, s.tolist()) for s in grids], dim=0)

    @torch.no_grad()
    def align(self, queries: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest point of each query and the shift attaining it.

        Returns:
            ``(indices [N], shifts [N, len(dims)])`` with
            ``queries[i] ~ roll(points[indices[i]], shifts[i])``.
        """
        res = self.knn(queries, points, 1)
        j = res.indices[:, 0]
        q = self._layout(queries).double()
        z = self._layout(points).double()[j]
        _, best_shift = self._pair_exact(q, z)
        return j, best_shift

    def choose_method(self, x: Tensor) -> Literal["gemm", "fft"]:
        """The search :meth:`knn` runs on points shaped like ``x`` (``method`` unless ``"auto"``).

        ``"auto"`` compares the per-pair cost estimates of the module docstring.
        """
        if self.method != "auto":
            return self.method  # type: ignore[return-value]
        self.check_shape(x, "x")
        sizes = [int(x.shape[d]) for d in self.dims]
        n_shifts = math.prod(sizes)
        dim = x[0].numel()
        channels = dim // n_shifts
        f_size = n_shifts // sizes[-1] * (sizes[-1] // 2 + 1)
        gemm = 0.04 + 1.1e-4 * n_shifts * dim / 2 ** _central_involutions(sizes, dim)
        a, c = (0.1, 7e-4) if len(sizes) == 1 else (0.3, 1.3e-3)
        w = 0.002 if channels == 1 else 0.006 * channels
        fft = a + w * f_size + c * n_shifts * math.log2(max(n_shifts, 2))
        return "gemm" if gemm <= fft else "fft"

    def _shift_sources(self, sizes: Sequence[int], device: torch.device) -> Tensor:
        """``[prod S, prod S]`` long: row ``s`` holds, for each flat output position ``t``, the flat
        source position of ``roll(., shift s)`` (shifts in C order, shift 0 first)."""
        nd = len(sizes)
        n_shifts = math.prod(sizes)
        strides = [math.prod(sizes[i + 1 :]) for i in range(nd)]
        pos = torch.arange(n_shifts, device=device)
        src = torch.zeros(n_shifts, n_shifts, dtype=torch.long, device=device)
        for i in range(nd):
            t_i = (pos // strides[i]) % sizes[i]
            src += ((t_i[None, :] - t_i[:, None]) % sizes[i]) * strides[i]
        return src

    def knn(
        self, queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False
    ) -> KNNResult:
        self.check_shape(queries, "queries")
        self.check_shape(points, "points")
        if self.choose_method(points) == "gemm":
            return self._knn_gemm(queries, points, k, exclude_self)
        return self._knn_fft(queries, points, k, exclude_self)

    def _knn_gemm(self, queries: Tensor, points: Tensor, k: int, exclude_self: bool) -> KNNResult:
        """Stacked shifted copies of the queries, one exact GEMM search (module docstring)."""
        q = self._layout(queries)
        x = self._layout(points)
        sizes = tuple(q.shape[2:])
        n_shifts = math.prod(sizes)
        src = self._shift_sources(sizes, q.device)

        def shifted(chunk: Tensor) -> Tensor:  # [B, C, *S] -> [n_shifts, B, C, prod S]
            flat = chunk.reshape(chunk.shape[0], chunk.shape[1], n_shifts)
            return flat[:, :, src].permute(2, 0, 1, 3)

        channels = q.shape[1]
        offsets = torch.arange(channels, device=q.device)[:, None] * n_shifts  # [C, 1]
        perms = (offsets[None] + src[:, None, :]).reshape(n_shifts, channels * n_shifts)
        return stacked_orbit_knn(q, x, k, exclude_self, shifted, n_shifts, permutations=perms)

    def _knn_fft(self, queries: Tensor, points: Tensor, k: int, exclude_self: bool) -> KNNResult:
        """FFT cross-correlation screen with an exact re-check (module docstring)."""
        n, m = queries.shape[0], points.shape[0]
        with full_precision(points.device.type):
            q_raw = self._layout(queries).double()
            x_raw = self._layout(points).double()
            sizes = tuple(q_raw.shape[2:])
            nd = len(sizes)
            sdims = tuple(range(-nd, 0))
            # Shift-invariant centring: per-channel mean over points and positions.
            centre = x_raw.mean(dim=(0, *range(2, 2 + nd)), keepdim=True)
            q_c = q_raw - centre
            x_c = x_raw - centre
            # Screen in units scaled by a power of two when the centred magnitudes are extreme
            # (exact), so that the screening FFTs neither overflow nor underflow; bounds are
            # returned in the data's units and re-checks use the raw inputs.
            exponent = screen_exponent(float(q_c.abs().amax()), float(x_c.abs().amax()))
            q_c, x_c = ldexp(q_c, exponent), ldexp(x_c, exponent)
            q_norm = q_c.square().sum(dim=tuple(range(1, q_c.ndim)))
            x_norm = x_c.square().sum(dim=tuple(range(1, x_c.ndim)))
            n_shifts = math.prod(sizes)
            channels = q_raw.shape[1]
            # Screening FFTs in the inputs' precision (float32 unless one is float64), with a
            # rounding-error slack to match; re-checks always in float64.
            screen_dtype = compute_dtype(queries, points)
            growth = (16 * math.log2(max(n_shifts, 2)) + 16 + channels) * math.sqrt(n_shifts)
            factor = growth * torch.finfo(torch.float64).eps
            screen_factor = growth * torch.finfo(screen_dtype).eps
            q_hat = torch.fft.rfftn(q_c.to(screen_dtype), dim=sdims)
            f_size = q_hat[0].numel() // channels
            pairs = max(1, _PAIR_BUDGET // max(n_shifts + 2 * f_size, channels * f_size))
            qb = max(1, min(n, int(math.sqrt(pairs))))
            pb = max(1, min(m, pairs // qb))

            def screen(qs: int, qe: int, ps: int, pe: int) -> tuple[Tensor, Tensor]:
                x_hat = torch.fft.rfftn(x_c[ps:pe].to(screen_dtype), dim=sdims)
                # [b, c, *S] correlations of all pairs, channels summed in the frequency domain.
                if channels == 1:
                    prod = q_hat[qs:qe, None, 0] * x_hat[None, :, 0].conj()
                else:
                    prod = torch.einsum("bk...,ck...->bc...", q_hat[qs:qe], x_hat.conj())
                corr = torch.fft.irfftn(prod, s=sizes, dim=sdims)
                best = corr.reshape(qe - qs, pe - ps, -1).amax(dim=2).double()
                total = q_norm[qs:qe, None] + x_norm[None, ps:pe]
                approx = total - 2.0 * best
                slack = screen_factor * total
                return ldexp(approx - slack, -2 * exponent), ldexp(approx + slack, -2 * exponent)

            def exact(rows: Tensor, cols: Tensor) -> Tensor:
                out = torch.empty(rows.numel(), dtype=torch.float64, device=points.device)
                step = max(1, pairs)
                for s in range(0, rows.numel(), step):
                    r, c = rows[s : s + step], cols[s : s + step]
                    d, _ = self._pair_exact(
                        q_raw[r], x_raw[c], q_c=q_c[r], x_c=x_c[c], factor=factor
                    )
                    out[s : s + step] = d
                return out

            dists, idx = bounded_search(
                n, m, k, exclude_self, points.device, screen, exact,
                query_block=qb, point_block=pb,
            )  # fmt: skip
        return KNNResult(dists, idx)

    def _pair_exact(
        self,
        y: Tensor,
        z: Tensor,
        *,
        q_c: Tensor | None = None,
        x_c: Tensor | None = None,
        factor: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Exact ``min_s ||y_t - roll(z_t, s)||^2`` for paired rows ``[T, C, *S]`` (float64).

        All shifts whose FFT estimate is within twice its rounding error of the best are evaluated
        by direct difference. Returns ``(distances [T], best shifts [T, len(S)])``.
        """
        sizes = tuple(y.shape[2:])
        nd = len(sizes)
        sdims = tuple(range(-nd, 0))
        n_shifts = math.prod(sizes)
        if q_c is None or x_c is None:
            q_c, x_c = y, z
        if factor is None:
            eps = torch.finfo(torch.float64).eps
            factor = (
                (16 * math.log2(max(n_shifts, 2)) + 16 + y.shape[1]) * math.sqrt(n_shifts) * eps
            )
        t = y.shape[0]
        corr = torch.fft.irfftn(
            (torch.fft.rfftn(q_c, dim=sdims) * torch.fft.rfftn(x_c, dim=sdims).conj()).sum(dim=1),
            s=sizes,
            dim=sdims,
        ).reshape(t, n_shifts)
        total = q_c.square().flatten(1).sum(1) + x_c.square().flatten(1).sum(1)
        approx = total[:, None] - 2.0 * corr
        slack = factor * total
        ok = approx <= approx.amin(dim=1, keepdim=True) + 4.0 * slack[:, None]
        pair, shift = ok.nonzero(as_tuple=True)
        # Source position of each output position under each candidate shift.
        strides = [math.prod(sizes[i + 1 :]) for i in range(nd)]
        pos = torch.arange(n_shifts, device=y.device)
        src = torch.zeros(pair.numel(), n_shifts, dtype=torch.long, device=y.device)
        for i in range(nd):
            t_i = (pos // strides[i]) % sizes[i]
            s_i = (shift // strides[i]) % sizes[i]
            src += ((t_i[None, :] - s_i[:, None]) % sizes[i]) * strides[i]
        best = torch.full((t,), float("inf"), dtype=torch.float64, device=y.device)
        best_shift = torch.zeros(t, dtype=torch.long, device=y.device)
        y_flat = y.reshape(t, y.shape[1], n_shifts)
        z_flat = z.reshape(t, z.shape[1], n_shifts)
        chunk = max(1, _PAIR_BUDGET // max(1, y_flat[0].numel()))
        for s in range(0, pair.numel(), chunk):
            p, sr = pair[s : s + chunk], src[s : s + chunk]
            rolled = torch.gather(z_flat[p], 2, sr[:, None, :].expand(-1, z_flat.shape[1], -1))
            d = (y_flat[p] - rolled).square().flatten(1).sum(1)
            # Per pair minimum; ties resolved towards the smaller shift index.
            for_pair = torch.full_like(best, float("inf")).scatter_reduce(0, p, d, "amin")
            improved = for_pair < best
            best = torch.where(improved, for_pair, best)
            hit = d == for_pair[p]
            first_shift = torch.full_like(best_shift, n_shifts).scatter_reduce(
                0, p[hit], shift[s : s + chunk][hit], "amin"
            )
            best_shift = torch.where(improved, first_shift, best_shift)
        unravel = torch.stack([(best_shift // strides[i]) % sizes[i] for i in range(nd)], dim=1)
        return best, unravel

    def __repr__(self) -> str:
        return f"CyclicShifts(dims={self.dims})"


def _central_involutions(sizes: Sequence[int], dim: int) -> int:
    """``r``: independent half shifts (one per even axis) the central split uses for this shape."""
    r = min(sum(1 for n in sizes if n % 2 == 0), MAX_INVOLUTIONS)
    while r and 2**r > dim // MIN_WIDTH:
        r -= 1
    return r
