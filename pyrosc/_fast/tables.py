"""The negative binomial's lgamma terms, in forms that are fast and accurate in float32.

With mean m, inverse dispersion t and count x, the speed path writes (exactly)

    log NB(x | m, t) = t q + x w + E(t, x),   q = log((t + x) / (t + m)),
                                              w = log(m (t + x) / ((t + m) (x + 1))),
    E(t, x) = lgamma(t + x) - lgamma(t) - lgamma(x + 1) - (t + x) log(t + x) + t log t
              + x log(x + 1),

(see :mod:`pyrosc._fast.eager`). E does not involve the mean, and is small: -log(2 pi x) / 2 +
O(1 / x) for large x, -log(1 + x / t) / 2 + O(1 / t) for large t. Its derivative in t is
F(t, x) = digamma(t + x) - digamma(t) - log(1 + x / t). This module computes E and F two ways,
both without the large cancelling terms of the lgamma form: per-gene tables for small integer
counts (:func:`count_tables`, one look-up per element), and Stirling remainders for any count
(:func:`remainder_terms`). Both are tested against the reference log-probability of
:mod:`pyrosc.likelihoods`, in float64 and in float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Counts below this are looked up in per-gene tables (rows 0..TABLE_SIZE-1). In single-cell
#: data nearly all counts are: in pbmc3k 0.02 % are >= 32 (0.4 % on its 2000 most variable
#: genes). The tables take 2 * TABLE_SIZE * genes float64 numbers to build.
TABLE_SIZE = 32

# Stirling's formula: lgamma(z) = (z - 1/2) log z - z + log(2 pi) / 2 + a remainder that is
# 1 / (12 z) - 1 / (360 z^3) + 1 / (1260 z^5) - 1 / (1680 z^7) + O(z^-9); for z >= 10 the
# omitted terms are below 1 / (1188 * 10^9) < 1e-12.
_SERIES_FROM = 10.0
_REMAINDER_AT_ONE = 1 - 0.5 * math.log(2 * math.pi)


def stirling_remainder(z: Tensor) -> Tensor:
    """lgamma(z) - (z - 1/2) log z + z - 1 for z > 0, elementwise: zero at z = 1.

    Stirling's remainder shifted by its value at 1, so that the remainders cancel exactly in
    :func:`remainder_terms` for a count of 0. It is small (|.| < 1) for z >= 1; below 10 it is
    computed from lgamma itself, which is small there.
    """
    small = z.clamp(max=_SERIES_FROM)
    direct = torch.lgamma(small) - (small - 0.5) * small.log() + small - 1
    r = z.clamp(min=_SERIES_FROM).reciprocal()
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680))) - _REMAINDER_AT_ONE
    # Both branches are finite everywhere (clamped), so the unused one's zero gradient is not NaN.
    return torch.where(z < _SERIES_FROM, direct, series)


def stirling_remainder_derivative(z: Tensor) -> Tensor:
    """d/dz :func:`stirling_remainder` = digamma(z) - log z + 1 / (2 z), elementwise, z > 0.

    From 10 on it is the derivative of the series, -1 / (12 z^2) + 1 / (120 z^4)
    - 1 / (252 z^6) + 1 / (240 z^8), with omitted terms below 1 / (132 * 10^10) < 1e-12.
    Unlike digamma(z) itself (~ log z), it is small for large z, so differences of it are
    accurate in float32. No gradient flows through it (it is only used to form gradients).
    """
    small = z.clamp(max=_SERIES_FROM)
    direct = torch.digamma(small) - small.log() + 0.5 / small
    r2 = z.clamp(min=_SERIES_FROM).reciprocal().square()
    series = -r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 / 240)))
    return torch.where(z < _SERIES_FROM, direct, series)


def remainder_terms(
    theta: Tensor, value: Tensor, with_derivative: bool
) -> tuple[Tensor, Tensor | None]:
    """E(theta, value) and, if asked, F = dE/dtheta, elementwise for any theta and value >= 0.

    With R the Stirling remainder (:func:`stirling_remainder`), lgamma(z) = (z - 1/2) log z -
    z + 1 + R(z), so that

        E = R(theta + value) - R(theta) - R(value + 1) - log1p(value / theta) / 2
            - log1p(value) / 2
        F = R'(theta + value) - R'(theta) + value / (2 theta (theta + value))

    in which every term is small. Costs three lgamma and two digamma per element.
    """
    total = theta + value
    log_gamma_terms = (
        stirling_remainder(total)
        - stirling_remainder(theta)
        - stirling_remainder(value + 1)
        - 0.5 * torch.log1p(value / theta)
        - 0.5 * torch.log1p(value)
    )
    if not with_derivative:
        return log_gamma_terms, None
    derivative = (
        stirling_remainder_derivative(total)
        - stirling_remainder_derivative(theta)
        + value / (2 * theta * total)
    )
    return log_gamma_terms, derivative


def count_tables(theta: Tensor, size: int, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
    """E(theta, k) and, if asked, F(theta, k) for k = 0..size-1: ``(size, genes)`` each.

    ``theta`` is ``(genes,)``. For integer k, lgamma(t + k) - lgamma(t) = sum_{j<k} log(t + j)
    and digamma(t + k) - digamma(t) = sum_{j<k} 1 / (t + j), so with L_k = log1p(k / t)

        E(t, k) = sum_{j<k} L_j - (t + k) L_k + k log(k + 1) - lgamma(k + 1)
        F(t, k) = sum_{j<k} 1 / (t + j) - L_k

    Written with log1p(k / t) rather than log(t + k), nothing of the size of t log t appears,
    whatever t is. The tables are computed in float64 (they are small, and E cancels terms of
    size ~k) and returned in float64: the caller casts.
    """
    t = theta.detach().to(torch.float64)
    k = torch.arange(size, dtype=torch.float64, device=theta.device).unsqueeze(-1)  # (size, 1)
    shifted = t + k  # (size, genes)
    log_ratio = torch.log1p(k / t)  # L_k
    count_only = k * torch.log1p(k) - torch.lgamma(k + 1)  # (size, 1)
    # sum_{j<k} L_j is the cumulative sum minus its last term, so that
    # E = cumsum(L) - (t + k + 1) L + k log(k + 1) - lgamma(k + 1).
    log_gamma_terms = (
        log_ratio.cumsum(0).addcmul_(shifted + 1, log_ratio, value=-1).add_(count_only)
    )
    if not with_derivative:
        return log_gamma_terms, None
    reciprocals = shifted.reciprocal_()
    derivative = reciprocals.cumsum(0).sub_(reciprocals).sub_(log_ratio)
    return log_gamma_terms, derivative


def gene_terms(theta: Tensor) -> tuple[Tensor, ...]:
    """What the compiled loop (:mod:`pyrosc._fast.compiled`) needs of ``theta`` ``(genes,)``:
    the tables of E and F for counts 0..TABLE_SIZE-1 (:func:`count_tables`), flattened to
    ``(TABLE_SIZE * genes,)``, the Stirling remainder R(theta) and its derivative, and
    1 / theta, ``(genes,)``; all in theta's dtype.
    """
    tables = count_tables(theta, TABLE_SIZE, with_derivative=True)
    flat = (table.to(theta.dtype).reshape(-1) for table in tables)
    remainders = stirling_remainder(theta), stirling_remainder_derivative(theta)
    return (*flat, *remainders, theta.reciprocal())
