r"""The asymptotic gap law :math:`R_n \approx J\,n^{-p/d}`, fitted from data.

For ``n`` i.i.d. training points with density :math:`q` and references with density :math:`\pi` on
a ``d``-dimensional manifold, the representation gap (mean distance to the nearest training point,
to the power ``p``) follows the nearest-neighbour / random-quantization law

.. math::

    R_n \;\sim\; J\, n^{-p/d}, \qquad
    J = \Gamma\!\left(1 + \tfrac{p}{d}\right) V_d^{-p/d} \int \pi(y)\, q(y)^{-p/d}\, d\mathrm{vol},
    \qquad V_d = \frac{\pi^{d/2}}{\Gamma(d/2 + 1)} .

:class:`GapLaw` measures the gap at a geometric grid of training-set sizes (each pass cuts the points
into disjoint random subsets of the size; several passes), reads the dimension off the slope of
:math:`\log R_n` against :math:`\log n` on the upper part of the grid (the slope at small ``n`` is
biased by finite-size effects, relative size :math:`\propto n^{-2/d}`), and pins the constant
with the Leonenko-Pronzato-Savani (LPS) ``k``-nearest-neighbour estimator at the largest size
available. From ``N`` points whose ``k``-th neighbour distances are :math:`\rho_{k,i}`,

.. math::

    \hat R(n) = \Gamma\!\left(1 + \tfrac{p}{d}\right)
        \frac{\Gamma(k)}{\Gamma(k + p/d)} \left(\frac{N_\mathrm{eff}}{n}\right)^{p/d}
        \frac{1}{N} \sum_i \rho_{k,i}^{\,p}

(the ball volume :math:`V_d` cancels; for ``k = 1`` and :math:`n = N_\mathrm{eff}` it is exactly the
measured gap). Extrapolation to another size follows
:math:`R(n') = R(n) (n / n')^{p/d}`, whose sensitivity to the dimension is
:math:`\partial \ln R / \partial d = (p / d^2) \ln(n'/n)`.

Two ways to measure, chosen by ``pooled`` in :meth:`GapLaw.fit`:

* ``pooled=True`` (default): references and training points are one i.i.d. sample of the task
  distribution (held-out data from the same source). They are pooled into :math:`N = n + m` points
  and every point acts as a reference to the others (leave-one-out), so the gap is measured up to
  size :math:`N - 1` with :math:`N` terms instead of :math:`m`. Valid only when :math:`\pi = q`;
  :meth:`GapLaw.fit` warns when the references' gap to the training set disagrees with the law.
* ``pooled=False``: the references only query the training set, which estimates
  :math:`\int \pi\, q^{-p/d}` whatever the two densities are (e.g. a shifted test set), at the price
  of more noise and a longer extrapolation.

Where each part lives:

=========================================  =====================================================
measuring the curve (searches)             :func:`gapcallback.functional.gap_curve.measure_gap_curve`
fitting it (slope, LPS constant,           :mod:`gapcallback.law.fit`
bootstrap, covariance)
the fitted law (predict, band, state)      :class:`gapcallback.law.GapLaw` (``law/gap_law.py``)
its figure                                 :func:`gapcallback.plotting.plot_law`
=========================================  =====================================================
"""

from gapcallback.law.gap_law import GapLaw

__all__ = ["GapLaw"]
