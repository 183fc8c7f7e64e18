"""Property-based test of the public API with bad and edge inputs (issue 12).

Every call of ``F.knn``, ``F.representation_gap``, ``F.memorization``, ``F.intrinsic_dimension``,
``gc.RepresentationGap``, ``gc.IntrinsicDimension`` and ``gc.GapLaw.fit`` (plain and with
``symmetry=``) on generated inputs must either

* return finite values equal to an independent float64 brute force (explicit differences, never
  ``torch.cdist``), in the documented dtype, or
* raise ``ValueError``/``TypeError`` whose message names, in backticks, one of the user's
  arguments that is actually wrong.

Inputs: shapes (1-D, zero features, mismatched D, trailing dims), empty sets, single points,
identical points, duplicates, NaN/Inf, int/bool/complex dtypes, numpy arrays, lists, meta tensors,
non-contiguous, strided and expanded tensors, ``requires_grad``, fp16/bf16/fp32/fp64, scales from
``1e-30`` to ``1e30``, bad ``k``/``p``/``ratio`` and options. Where the brute force has no closed
form (intrinsic dimension, the fitted law), the property is metamorphic: the same data at unit
scale in float64 gives the same answer.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import gapcallback as gc
from gapcallback import functional as F
from gapcallback.symmetry import CyclicShifts, FiniteGroup, Permutations, RigidMotions

FP32_MAX = torch.finfo(torch.float32).max
FP32_TINY = torch.finfo(torch.float32).tiny
SCALES = (1.0, 1.0, 1.0, 1e-30, 1e30, 1e-25, 1e19, 1e5, 2.0**-100, 2.0**100)
DTYPES = (torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16)
OK_FORMS = ("plain", "plain", "plain", "noncontiguous", "strided", "expanded", "grad")
BAD_FORMS = (
    "numpy", "list", "int", "bool", "complex", "1d", "no_features", "empty", "nan", "inf", "meta",
)  # fmt: skip
BACKTICKED = re.compile(r"`([A-Za-z_][A-Za-z_0-9]*)")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# generated arguments
# ------------------------------------------------------------------------------------------------


@dataclass
class Arg:
    """One generated argument: what is passed, and its float64 values when it is valid input."""

    value: Any
    values: torch.Tensor | None  # float64 copy of a valid point set, else None
    form: str
    dtype: torch.dtype | None = None  # dtype of a valid tensor

    @property
    def ok(self) -> bool:
        return self.values is not None


@st.composite
def base_values(draw: Any, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float64 points ``[n, *shape]`` of one of several structures, at one of several scales."""
    kind = draw(st.sampled_from(["normal", "normal", "integers", "duplicates", "identical"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if kind == "integers":  # many exact ties
        x = torch.randint(-2, 3, (n, *shape), generator=g).double()
    else:
        x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    if kind == "duplicates" and n > 1:
        x[n // 2 :] = x[: n - n // 2].clone()
    if kind == "identical":
        x[:] = x[:1]
    return x * draw(st.sampled_from(SCALES))


def as_form(base: torch.Tensor, form: str, dtype: torch.dtype) -> Arg:
    """Pass ``base`` (float64) as ``form`` in ``dtype``; the valid forms record their values."""
    x = base.to(dtype)
    if form == "plain":
        value = x
    elif form == "noncontiguous":
        value = x.reshape(x.shape[0], -1).T.contiguous().T.reshape(x.shape)
    elif form == "strided":
        value = torch.repeat_interleave(x, 2, dim=0)[::2]
    elif form == "expanded":
        value = x[:1].expand_as(x)
    elif form == "grad":
        value = x.clone().requires_grad_(True)
    else:
        return bad_form(base, form)
    values = value.detach().double()
    if not bool(torch.isfinite(values).all()):  # fp16/bf16 overflow at large scales
        return Arg(value, None, "non-finite", dtype)
    return Arg(value, values, form, dtype)


def bad_form(base: torch.Tensor, form: str) -> Arg:
    x = base.float()
    value: Any
    if form == "numpy":
        value = x.numpy()
    elif form == "list":
        value = x.tolist()
    elif form == "int":
        value = x.clamp(-1e9, 1e9).long()
    elif form == "bool":
        value = x > 0
    elif form == "complex":
        value = x.to(torch.complex64)
    elif form == "1d":
        value = x.reshape(-1)
    elif form == "no_features":
        value = x.reshape(x.shape[0], -1)[:, :0]
    elif form == "empty":
        value = x[:0]
    elif form == "nan":
        value = x.clone()
        value.reshape(-1)[0] = float("nan")
    elif form == "inf":
        value = x.clone()
        value.reshape(-1)[-1] = -float("inf")
    else:
        assert form == "meta"
        value = torch.empty(x.shape, device="meta")
    return Arg(value, None, form)


@st.composite
def point_sets(
    draw: Any,
    n: int,
    shape: tuple[int, ...],
    bad: float = 0.12,
    dtype: Any = None,
    base: torch.Tensor | None = None,
) -> Arg:
    """A point-set argument: usually valid (random dtype and memory layout), sometimes bad."""
    base = draw(base_values(n, shape)) if base is None else base
    if draw(st.integers(0, 99)) >= 100 * (1 - bad):
        return bad_form(base, draw(st.sampled_from(BAD_FORMS)))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    return as_form(base, draw(st.sampled_from(OK_FORMS)), dtype)


def out_dtype(*args: Arg) -> torch.dtype:
    return torch.float64 if any(a.dtype == torch.float64 for a in args) else torch.float32


# ------------------------------------------------------------------------------------------------
# independent float64 brute force
# ------------------------------------------------------------------------------------------------


def brute_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` squared distances by explicit differences in float64."""
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _rigid_sq(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` squared distances of 2-D clouds up to rotation and translation (numpy Kabsch)."""
    yn = y.double().numpy()
    zn = z.double().numpy()
    out = np.empty((len(yn), len(zn)))
    for i, a in enumerate(yn):
        a = a - a.mean(0)
        for j, b in enumerate(zn):
            b = b - b.mean(0)
            sv = np.linalg.svd(a.T @ b, compute_uv=False)
            sign = 1.0 if np.linalg.det(a.T @ b) >= 0 else -1.0
            out[i, j] = (a**2).sum() + (b**2).sum() - 2 * (sv[0] + sign * sv[1])
    return torch.from_numpy(out).clamp_min(0.0)


# Symmetries with their point shape and an independent orbit oracle (images of the points, or a
# pairwise function), and the absolute rounding of the oracle relative to the squared norms.
SYMMETRIES: dict[str, tuple[Any, tuple[int, ...], Any, float]] = {
    "flips": (
        lambda: FiniteGroup.flips((-1,)),
        (4,),
        lambda x: [x, x.flip(-1)],
        0.0,
    ),
    "rot90_set": (  # not a group: the minimum over the two maps given
        lambda: FiniteGroup([lambda x: torch.rot90(x, 1, (-2, -1))]),
        (1, 3, 3),
        lambda x: [x, torch.rot90(x, 1, (-2, -1))],
        0.0,
    ),
    "cyclic": (lambda: CyclicShifts(), (5,), lambda x: [x.roll(s, -1) for s in range(5)], 0.0),
    "cyclic_fft": (
        lambda: CyclicShifts(method="fft"),
        (2, 4),
        lambda x: [x.roll(s, -1) for s in range(4)],
        0.0,
    ),
    "permutations": (
        lambda: Permutations(),
        (3, 2),
        lambda x: [x[:, list(p)] for p in itertools.permutations(range(3))],
        0.0,
    ),
    "rigid": (lambda: RigidMotions(dim=2), (3, 2), _rigid_sq, 1e-9),
}


def orbit_sq(name: str | None, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Brute-force (orbit) squared distances ``[n, m]`` and the oracle's absolute tolerance."""
    if name is None:
        return brute_sq(q, x), 0.0
    _, _, oracle, rel = SYMMETRIES[name]
    if name == "rigid":
        d = oracle(q, x)
    else:
        d = torch.stack([brute_sq(q, img) for img in oracle(x)]).amin(dim=0)
    norms = (
        brute_sq(q, q.new_zeros(1, *q.shape[1:]))[:, :1]
        + brute_sq(x, x.new_zeros(1, *x.shape[1:]))[:, 0]
    )
    return d, rel * float(norms.max()) if rel else 0.0


# ------------------------------------------------------------------------------------------------
# the two outcomes
# ------------------------------------------------------------------------------------------------


def call(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # classified by the caller
        return None, err


def assert_clear_error(err: BaseException | None, allowed: set[str], what: str) -> None:
    """The call raised ValueError/TypeError naming (in backticks) one of ``allowed``."""
    assert err is not None, (
        f"{what}: expected an error naming one of {sorted(allowed)}, got a value"
    )
    assert isinstance(err, (ValueError, TypeError)), f"{what}: unclear crash {err!r}"
    named = set(BACKTICKED.findall(str(err)))
    assert named & allowed, f"{what}: error names {sorted(named)}, not {sorted(allowed)}: {err}"
    event(f"clear {type(err).__name__} naming {sorted(named & allowed)[0]}")


def assert_no_error(err: BaseException | None, what: str) -> None:
    if err is not None:
        raise AssertionError(f"{what}: valid input raised {err!r}") from err
    event("value checked against the brute force")


def assert_matches(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, atol: float, what: str
):
    """``got`` equals the float64 ``want`` to the output dtype's rounding; the dtype rule holds."""
    scale = float(want.abs().max())
    event(
        f"checked value: {got.dtype}, magnitude 1e{math.floor(math.log10(scale)) if scale else '-inf'}"
    )
    assert isinstance(got, torch.Tensor) and got.shape == want.shape, what
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite result {got}"
    if dtype == torch.float64:
        assert got.dtype == torch.float64, f"{what}: dtype {got.dtype}, expected float64"
        rtol = 1e-12
    else:
        # float32, or float64 exactly where float32 would flush a non-zero value to zero.
        tiny = (got > 0) & (got < FP32_TINY)
        if got.dtype == torch.float64:
            assert bool(tiny.any()), f"{what}: float64 output without a value below float32's range"
            rtol = 1e-12
        else:
            assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
            rtol = 2.0**-23
    g = got.detach().double().cpu()
    bad = (g - want).abs() > atol + rtol * want.abs()
    assert not bool(bad.any()), (
        f"{what}: {g[bad][:4].tolist()} != brute force {want[bad][:4].tolist()}"
    )
    if atol == 0.0:
        assert torch.equal(g == 0, want == 0), f"{what}: zeros differ: {g} vs {want}"
    else:  # a non-zero distance never comes back as 0
        assert not bool(((g == 0) & (want > 2 * atol)).any()), f"{what}: non-zero returned as 0"


def representable(value: float, dtype: torch.dtype, atol: float = 0.0) -> bool | None:
    """Whether ``value`` (known to ``atol``) fits ``dtype`` (``None``: too close to tell)."""
    top = torch.finfo(dtype).max
    if not math.isfinite(value) or value - atol > top * 1.001:
        return False
    return True if value + atol < top * 0.999 else None


# ------------------------------------------------------------------------------------------------
# F.knn and F.representation_gap, plain and with symmetry=
# ------------------------------------------------------------------------------------------------


@st.composite
def mostly(draw: Any, good: list, bad: list, p_bad: float = 0.2) -> Any:
    """One of ``good``, or with probability ``p_bad`` one of ``bad``."""
    return draw(st.sampled_from(bad if draw(st.integers(0, 99)) >= 100 * (1 - p_bad) else good))


K_VALUES = mostly([1, 1, 2, 3], [0, -1, 1.5, True, "2", None, 99])
P_VALUES = mostly(
    [2.0, 2.0, 2.0, 1.0, 0.5, 3.0, 4], [0.0, -1.0, float("nan"), float("inf"), "2", True, None]
)


def k_problem(k: Any, available: float) -> set[str] | None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return {"k"}
    return {"k"} if k > available else None


def p_problem(p: Any) -> bool:
    return isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < math.inf


@st.composite
def pair_case(draw: Any, symmetric: bool) -> tuple[str | None, Arg, Arg]:
    sym = draw(st.sampled_from(sorted(SYMMETRIES))) if symmetric else None
    shape = SYMMETRIES[sym][1] if sym else draw(st.sampled_from([(1,), (3,), (5,), (2, 2)]))
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7))
    q_base = draw(base_values(n, shape))
    q = draw(point_sets(n, shape, base=q_base))
    other = shape
    if sym is None and draw(st.integers(0, 99)) >= 92:
        other = (shape[0] + 1, *shape[1:])  # mismatched features
    x_base = draw(base_values(m, other))
    overlap = draw(st.sampled_from(["none", "none", "copies", "double copy"]))
    if other == shape and overlap == "copies":  # some points of one set are in the other
        c = min(n, m)
        x_base[:c] = q_base[:c]
    elif other == shape and overlap == "double copy" and m >= 2:  # a duplicated copy
        x_base[:2] = q_base[:1]
    x = draw(point_sets(m, other, base=x_base))
    return sym, q, x


def shared_problems(a: Arg, b: Arg, names: tuple[str, str], sym: str | None) -> set[str]:
    """Names the error may cite for argument-level problems of a pair of point sets."""
    problems = {name for arg, name in zip((a, b), names, strict=True) if not arg.ok}
    if not problems and a.values.shape[1:] != b.values.shape[1:]:
        problems = set(names)
    return problems


@settings(deadline=None, max_examples=250)
@given(case=pair_case(symmetric=False), k=K_VALUES, exclude_self=st.booleans())
def test_knn_plain(case, k, exclude_self):
    run_knn(case, k, exclude_self)


@settings(deadline=None, max_examples=200)
@given(case=pair_case(symmetric=True), k=st.integers(1, 3), exclude_self=st.booleans())
def test_knn_symmetry(case, k, exclude_self):
    run_knn(case, k, exclude_self)


def run_knn(case: tuple[str | None, Arg, Arg], k: Any, exclude_self: bool) -> None:
    sym, q, x = case
    if exclude_self:
        q = x  # a leave-one-out search of one set
    symmetry = SYMMETRIES[sym][0]() if sym else None
    what = f"knn({q.form}, {x.form}, k={k!r}, exclude_self={exclude_self}, symmetry={sym})"
    res, err = call(F.knn, q.value, x.value, k, exclude_self=exclude_self, symmetry=symmetry)
    problems = shared_problems(q, x, ("queries", "points"), sym)
    available = x.values.shape[0] - exclude_self if x.ok else math.inf
    problems |= k_problem(k, available) or set()
    if problems:
        return assert_clear_error(err, problems, what)
    want_all, atol = orbit_sq(sym, q.values, x.values)
    if exclude_self:
        want_all.fill_diagonal_(float("inf"))
    want = want_all.sort(dim=1).values[:, :k]
    dtype = out_dtype(q, x)
    fits = representable(float(want.max()), dtype, atol)
    if fits is False:
        return assert_clear_error(err, {"queries", "points"}, what)
    if fits is None and err is not None:
        return assert_clear_error(err, {"queries", "points"}, what)
    assert_no_error(err, what)
    assert_matches(res.sq_dists, want, dtype, atol, what)
    # The indices point at neighbours at the returned distances, distinct, never the query itself.
    idx = res.indices
    assert idx.dtype == torch.long and idx.shape == want.shape
    at = want_all.gather(1, idx)
    assert bool(((at - res.sq_dists.double()).abs() <= atol + 1e-6 * at.abs()).all()), what
    for row in idx.tolist():
        assert len(set(row)) == len(row), what
    if exclude_self:
        assert bool((idx != torch.arange(idx.shape[0])[:, None]).all()), what


@settings(deadline=None, max_examples=250)
@given(case=st.one_of(pair_case(symmetric=False), pair_case(symmetric=True)), p=P_VALUES)
def test_representation_gap(case, p):
    sym, ref, samples = case
    symmetry = SYMMETRIES[sym][0]() if sym else None
    what = f"representation_gap({ref.form}, {samples.form}, p={p!r}, symmetry={sym})"
    out, err = call(F.representation_gap, ref.value, samples.value, p=p, symmetry=symmetry)
    problems = shared_problems(ref, samples, ("reference", "samples"), sym)
    if p_problem(p):
        problems.add("p")
    if problems:
        return assert_clear_error(err, problems, what)
    d, atol = orbit_sq(sym, ref.values, samples.values)
    check_gap(out, err, d.amin(dim=1), out_dtype(ref, samples), atol, float(p), what)


def check_gap(out, err, nearest, dtype, atol, p, what) -> None:
    """``out`` is the mean of ``nearest ** (p / 2)`` (brute-force squared distances ``[m]``, known
    to ``atol``), or a clear error where the gap does not fit the output dtype."""
    want = nearest.pow(p / 2).mean()
    # How far the oracle's own rounding can move the gap.
    spread = max(
        float((nearest + atol).pow(p / 2).mean() - want),
        float(want - (nearest - atol).clamp_min(0).pow(p / 2).mean()),
    )
    fits = representable(float(want), dtype, spread)
    if fits is False or (fits is None and err is not None):
        return assert_clear_error(err, {"reference", "samples", "p"}, what)
    assert_no_error(err, what)
    assert out.ndim == 0, what
    assert_matches(out.reshape(1), want.reshape(1), dtype, spread, what)


@settings(deadline=None, max_examples=150)
@given(
    case=st.one_of(pair_case(symmetric=False), pair_case(symmetric=True)),
    p=P_VALUES,
    batches=st.integers(1, 3),
)
def test_representation_gap_metric(case, p, batches):
    sym, ref, samples = case
    symmetry = SYMMETRIES[sym][0]() if sym else None
    what = f"RepresentationGap({ref.form}, p={p!r}, symmetry={sym}).update({samples.form})"
    metric, err = call(gc.RepresentationGap, ref.value, p=p, symmetry=symmetry)
    problems = {"reference"} if not ref.ok else set()
    if p_problem(p):
        problems.add("p")
    if problems:
        return assert_clear_error(err, problems, what)
    assert_no_error(err, what)
    value = samples.value
    n_rows = len(value) if isinstance(value, (list, np.ndarray, torch.Tensor)) else 0
    chunks = max(1, min(batches, n_rows)) if samples.ok else 1
    for part in range(chunks):
        batch = value[part::chunks] if samples.ok else value
        _, err = call(metric.update, batch)
        if err is not None:
            break
    problems = shared_problems(ref, samples, ("reference", "samples"), sym)
    if problems:
        return assert_clear_error(err, problems, what)
    if err is None:
        out, err = call(metric.compute)
    d, atol = orbit_sq(sym, ref.values, samples.values)
    check_gap(
        out if err is None else None, err, d.amin(dim=1), out_dtype(ref), atol, float(p), what
    )


# ------------------------------------------------------------------------------------------------
# F.memorization
# ------------------------------------------------------------------------------------------------

RATIOS = mostly([1 / 3, 1 / 3, 0.5, 1.0, 1], [0.0, 1.5, -0.1, float("nan"), "x", True, None])


@settings(deadline=None, max_examples=250)
@given(case=st.one_of(pair_case(symmetric=False), pair_case(symmetric=True)), ratio=RATIOS)
def test_memorization(case, ratio):
    sym, samples, train = case
    symmetry = SYMMETRIES[sym][0]() if sym else None
    what = f"memorization({samples.form}, {train.form}, ratio={ratio!r}, symmetry={sym})"
    out, err = call(F.memorization, samples.value, train.value, ratio=ratio, symmetry=symmetry)
    problems = shared_problems(samples, train, ("samples", "train"), sym)
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float))
        or not 0 < ratio <= 1  # also NaN
    ):
        problems.add("ratio")
    if train.ok and train.values.shape[0] < 2:
        problems.add("train")
    if problems:
        return assert_clear_error(err, problems, what)
    d, atol = orbit_sq(sym, samples.values, train.values)
    two = d.sort(dim=1).values[:, :2]
    d1, d2 = two[:, 0].sqrt(), two[:, 1].sqrt()
    dtype = out_dtype(samples, train)
    if representable(float(d1.max()), dtype) is False:
        return assert_clear_error(err, {"samples", "train"}, what)
    assert_no_error(err, what)
    want = (d1 < ratio * d2) | ((d1 == 0) & (d2 > 0))
    # Exactly at the threshold, float64 rounding of the two searches may differ.
    close = ((d1 - ratio * d2).abs() <= 1e-9 * d2 + math.sqrt(atol)) & (d2 > 0)
    assert bool(((out.memorized == want) | close).all()), f"{what}: {out.memorized} vs {want}"
    assert out.fraction.ndim == 0 and out.fraction.dtype == dtype, what
    frac = float(out.memorized.double().mean())
    assert abs(float(out.fraction) - frac) <= 1e-6, what
    assert_matches(out.nearest_distances, d1, dtype, math.sqrt(atol), what)


# ------------------------------------------------------------------------------------------------
# F.intrinsic_dimension and gc.IntrinsicDimension
# ------------------------------------------------------------------------------------------------

ID_OPTIONS = mostly(
    [("twonn", {}), ("twonn", {"fit": "linear"}), ("mle", {}), ("mle", {"k": 3}), ("gap", {})],
    [
        ("mle", {"k": 0}),
        ("mle", {"k": "3"}),
        ("twonn", {"fit": "lsq"}),
        ("twonn", {"discard": 1.5}),
        ("twonn", {"dup_tol": -1.0}),
        ("twonn", {"bogus": 1}),
        ("twonnn", {}),
    ],
    p_bad=0.3,
)
ID_ARGS = {"x", "k", "fit", "discard", "dup_tol", "bogus", "method", "options", "sizes"}


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) times the power of two that brings its largest magnitude into [0.5, 1)."""
    top = float(x.abs().max())
    return x if top == 0 else x * 2.0 ** (-math.frexp(top)[1])


def id_reference(x: torch.Tensor, method: str, options: dict) -> tuple[float | None, bool]:
    """The estimate on ``x`` at unit scale in float64 (None where that errs), and whether the
    estimate there legitimately fails (too few distinct points, bad options)."""
    out, err = call(F.intrinsic_dimension, unit_scale(x), method, **options)
    return (None if err is not None else float(out)), err is not None


@st.composite
def id_case(draw: Any) -> tuple[Arg, str, dict]:
    n = draw(st.sampled_from([30, 30, 12, 12, 5, 3, 2, 1]))
    shape = draw(st.sampled_from([(2,), (3,), (1, 3)]))
    x = draw(point_sets(n, shape, bad=0.2))
    method, options = draw(ID_OPTIONS)
    return x, method, dict(options)


@settings(deadline=None, max_examples=200)
@given(case=id_case())
def test_intrinsic_dimension(case):
    x, method, options = case
    what = f"intrinsic_dimension({x.form} {x.dtype}, {method!r}, **{options})"
    out, err = call(F.intrinsic_dimension, x.value, method, **options)
    check_dimension(out, err, x, method, options, what)


@settings(deadline=None, max_examples=100)
@given(case=id_case(), batches=st.integers(1, 3))
def test_intrinsic_dimension_metric(case, batches):
    x, method, options = case
    what = f"IntrinsicDimension({method!r}, **{options}).update({x.form} {x.dtype})"
    metric, err = call(gc.IntrinsicDimension, method, **options)
    if err is not None:  # bad configuration: refused at construction
        _, ref_err = call(F.intrinsic_dimension, torch.randn(50, 3), method, **options)
        assert ref_err is not None, f"{what}: constructor refused a valid configuration: {err!r}"
        return assert_clear_error(err, ID_ARGS, what)
    value = x.value
    chunks = max(1, min(batches, len(value))) if x.ok else 1
    for part in range(chunks):
        _, err = call(metric.update, value[part::chunks] if x.ok else value)
        if err is not None:
            break
    if err is None:
        out, err = call(metric.compute)
    else:
        out = None
    # The reservoir orders points by a hash of their bytes: the random holdout split of "gap"
    # then depends on the scale, so only its finiteness is checked.
    check_dimension(out, err, x, method, options, what, compare=method != "gap")


def check_dimension(out, err, x: Arg, method, options, what, compare: bool = True) -> None:
    if not x.ok:
        return assert_clear_error(err, {"x"} | ID_ARGS, what)
    want, fails = id_reference(x.values, method, options)
    if fails:  # too few distinct points or bad options: the same clear error at any scale
        return assert_clear_error(err, ID_ARGS, what)
    assert_no_error(err, what)
    assert out.ndim == 0 and bool(torch.isfinite(out)), f"{what}: {out}"
    assert out.dtype == out_dtype(x), what
    # Scale-free: the same data at unit scale in float64 gives the same dimension.
    assert not compare or abs(float(out) - want) <= 1e-4 * max(1.0, abs(want)), (
        f"{what}: {float(out)} != {want}"
    )


@pytest.mark.parametrize("call_name", ["twonn", "mle", "GapLaw.fit"])
@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_float32_beyond_its_squared_range(call_name, scale):
    """Scale-free results on float32 data whose squared distances float32 cannot hold."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(60, 3, generator=g, dtype=torch.float64)
    x = (base * scale).float()
    unit = unit_scale(x.double())
    if call_name == "GapLaw.fit":
        fit = {"num_sizes": 3, "repeats": 1}
        out, err = call(gc.GapLaw.fit, x[:40], x[40:], **fit)
        if err is not None:
            assert_clear_error(err, {"train", "reference"}, f"GapLaw.fit(float32 x {scale:g})")
        want = gc.GapLaw.fit(unit[:40], unit[40:], **fit)
        assert abs(float(out.dimension) - float(want.dimension)) <= 1e-4 * float(want.dimension)
        return
    out, err = call(F.intrinsic_dimension, x, call_name)
    if err is not None:
        assert_clear_error(err, {"x"}, f"intrinsic_dimension(float32 x {scale:g})")
    want = float(F.intrinsic_dimension(unit, call_name))
    assert abs(float(out) - want) <= 1e-4 * want


CALIBRATED_CASES = [
    ("requires_grad", lambda x: x.float().requires_grad_(True)),
    ("float32 1e-30", lambda x: (x * 1e-30).float()),
    ("float64 1e30", lambda x: x * 1e30),
    ("bfloat16", lambda x: x.bfloat16()),
]


@pytest.mark.parametrize(("label", "make"), CALIBRATED_CASES, ids=[c[0] for c in CALIBRATED_CASES])
def test_calibrated_default_on_edge_inputs(label, make):
    """The default method (slow to simulate on a cold cache) on a few fixed edge inputs."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(400, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 5, generator=g, dtype=torch.float64
    )
    x = make(base)
    out = F.intrinsic_dimension(x)
    want = float(F.intrinsic_dimension(unit_scale(x.detach().double())))
    assert bool(torch.isfinite(out)) and abs(float(out) - want) <= 1e-4 * want, label
    with pytest.raises(TypeError, match="`x`"):
        F.intrinsic_dimension(x.detach().float().numpy())


# ------------------------------------------------------------------------------------------------
# gc.GapLaw.fit
# ------------------------------------------------------------------------------------------------


@st.composite
def law_case(draw: Any) -> tuple[Arg, Arg, Any]:
    shape = draw(st.sampled_from([(2,), (3,)]))
    train = draw(point_sets(draw(st.sampled_from([4, 40, 40, 40, 60])), shape, bad=0.15))
    reference = draw(point_sets(draw(st.sampled_from([1, 20, 20, 5])), shape, bad=0.15))
    p = draw(mostly([2.0, 1.0], [0.0, "2", None]))
    return train, reference, p


@settings(deadline=None, max_examples=8)
@given(case=law_case())
def test_gap_law_fit(case):
    train, reference, p = case
    what = f"GapLaw.fit({train.form} {train.dtype}, {reference.form} {reference.dtype}, p={p!r})"
    kwargs = {"p": p, "num_sizes": 3, "repeats": 1}
    law, err = call(gc.GapLaw.fit, train.value, reference.value, **kwargs)
    problems = {n for a, n in ((train, "train"), (reference, "reference")) if not a.ok}
    if p_problem(p):
        problems.add("p")
    if problems:
        return assert_clear_error(err, problems, what)
    # Metamorphic oracle: the same points at unit scale in float64 (one common power of two).
    scale = 2.0 ** (-math.frexp(float(torch.cat([train.values, reference.values]).abs().max()))[1])
    ref_law, ref_err = call(gc.GapLaw.fit, train.values * scale, reference.values * scale, **kwargs)
    if ref_err is not None:  # too few points, zero gaps...: the same clear error at any scale
        assert_clear_error(ref_err, {"train", "reference", "sizes", "num_sizes"}, "unit-scale")
        return assert_clear_error(err, {"train", "reference", "sizes", "num_sizes"}, what)
    # The law is fitted in float64 whatever the inputs' dtype (its values are Python floats).
    fits = representable(float(ref_law.constant) / scale**p, torch.float64)
    if fits is False or (err is not None and fits is None):
        return assert_clear_error(err, {"train", "reference", "p"}, what)
    assert_no_error(err, what)
    d, d_ref = float(law.dimension), float(ref_law.dimension)
    assert math.isfinite(d) and abs(d - d_ref) <= 1e-4 * abs(d_ref), f"{what}: d {d} != {d_ref}"
    c, c_ref = float(law.constant), float(ref_law.constant) / scale**p
    assert math.isfinite(c) and abs(c - c_ref) <= 1e-3 * abs(c_ref), f"{what}: J {c} != {c_ref}"
