"""Count observation models, chosen by name and parameterised by their mean.

Every model in pyrosc decodes a cell into a positive expected count ``mean`` per gene and then
observes the counts through one of four likelihoods:

==========  ============================================  ===========================
name        distribution                                  extra parameters
==========  ============================================  ===========================
poisson     Poisson(mu)                                   none
nb          NegativeBinomial(mu, theta)                   inverse_dispersion (theta)
zip         pi * delta_0 + (1 - pi) * Poisson(mu)         gate_logits (logit pi)
zinb        pi * delta_0 + (1 - pi) * NB(mu, theta)       both
==========  ============================================  ===========================

with NB mean mu and variance mu + mu^2 / theta, and pi the probability of an extra
(structural) zero. The distributions are Pyro's own, except that the negative binomial's
log-probability is computed in a way that stays accurate in float32 for large theta (see
:class:`StableNegativeBinomial`). Log-probabilities are tested against scipy.stats over counts
0..1e5, means 1e-3..1e4 and theta 1e-3..1e6.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions.utils import broadcast_all

LIKELIHOODS: tuple[str, ...] = ("poisson", "nb", "zip", "zinb")


# The parameters each likelihood takes, besides the mean.
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "poisson": (),
    "nb": ("inverse_dispersion",),
    "zip": ("gate_logits",),
    "zinb": ("inverse_dispersion", "gate_logits"),
}


def _parameters(likelihood: str) -> tuple[str, ...]:
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"Unknown likelihood {likelihood!r}; expected one of: {', '.join(LIKELIHOODS)}."
        )
    return _PARAMETERS[likelihood]


def uses_dispersion(likelihood: str) -> bool:
    """Whether ``likelihood`` takes an ``inverse_dispersion`` (true for "nb" and "zinb")."""
    return "inverse_dispersion" in _parameters(likelihood)


def uses_gate(likelihood: str) -> bool:
    """Whether ``likelihood`` takes ``gate_logits`` (true for "zip" and "zinb")."""
    return "gate_logits" in _parameters(likelihood)


def _check_arguments(likelihood: str, given: dict[str, Tensor | None]) -> None:
    """Raise if a parameter ``likelihood`` needs is missing, or one it does not use is given."""
    needed = _parameters(likelihood)
    for name, value in given.items():
        if name in needed and value is None:
            raise ValueError(f"Likelihood {likelihood!r} needs {name}, but none was given.")
        if name not in needed and value is not None:
            users = " and ".join(repr(lik) for lik in LIKELIHOODS if name in _PARAMETERS[lik])
            raise ValueError(
                f"Likelihood {likelihood!r} does not use {name}, but {name} was given; "
                f"only {users} take it."
            )


# Stirling's formula: lgamma(z) = (z - 1/2) log z - z + log(2 pi) / 2 + a remainder that is
# 1 / (12 z) - 1 / (360 z^3) + 1 / (1260 z^5) - 1 / (1680 z^7) + O(z^-9); for z >= 10 the
# omitted terms are below 1 / (1188 * 10^9) < 1e-12.
_SERIES_FROM = 10.0
_REMAINDER_AT_ONE = 1 - 0.5 * math.log(2 * math.pi)


def _stirling_remainder(z: Tensor) -> Tensor:
    """lgamma(z) - (z - 1/2) log z + z - 1 for z > 0, elementwise: zero at z = 1.

    Stirling's remainder shifted by its value at 1, so that the remainders cancel exactly in
    :func:`_log_binomial_coefficient` for a count of 0. It is small (|.| < 1) for z >= 1;
    below 10 it is computed from lgamma itself, which is small there.
    """
    small = z.clamp(max=_SERIES_FROM)
    direct = torch.lgamma(small) - (small - 0.5) * small.log() + small - 1
    r = z.clamp(min=_SERIES_FROM).reciprocal()
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680))) - _REMAINDER_AT_ONE
    # Both branches are finite everywhere (clamped), so the unused one's zero gradient is not NaN.
    return torch.where(z < _SERIES_FROM, direct, series)


def _log_binomial_coefficient(theta: Tensor, value: Tensor) -> Tensor:
    """lgamma(theta + value) - lgamma(theta) - lgamma(value + 1), elementwise; same shapes.

    Subtracting the lgammas as they stand loses everything the result does not need once an
    argument is large: in float32 lgamma(1e6) ~ 1.3e7 is stored in steps of 1, so with
    theta = 1e6 the log-probability of a count of 1 would be off by 0.8 nats. Writing each
    lgamma with Stirling's formula and cancelling the large parts by hand leaves terms of the
    size of the result, plus remainders, which are small. For value = 0 it is exactly 0.
    """
    return (
        (theta - 0.5) * torch.log1p(value / theta)
        + value * torch.log1p((theta - 1) / (value + 1))
        - 0.5 * torch.log1p(value)
        + _stirling_remainder(theta + value)
        - _stirling_remainder(theta)
        - _stirling_remainder(value + 1)
    )


class StableNegativeBinomial(dist.NegativeBinomial):
    """Pyro's NegativeBinomial(total_count, logits) with a log_prob accurate for large total_count.

    Pyro subtracts lgammas of total_count + x, total_count and x + 1 as they stand; in float32
    (what training uses) with total_count = 1e6 the log-probability of a count of 1 is then off
    by 0.8 nats (-1.82 instead of -1.00 at mean 1). Large inverse dispersions are common: a
    gene with Poisson-like noise drives theta up. This class differs only in that term
    (:func:`_log_binomial_coefficient`) and in requiring a positive total_count; mean,
    variance, sampling and expand are Pyro's.
    """

    arg_constraints = {**dist.NegativeBinomial.arg_constraints, "total_count": constraints.positive}

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of counts ``value``, broadcast against the batch shape."""
        if self._validate_args:
            self._validate_sample(value)
        theta, logits, value = broadcast_all(self.total_count, self.logits, value)
        return (
            theta * F.logsigmoid(-logits)
            + value * F.logsigmoid(logits)
            + _log_binomial_coefficient(theta, value)
        )


def count_distribution(
    likelihood: str,
    mean: Tensor,
    inverse_dispersion: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> dist.Distribution:
    """Observation model for counts by name, parameterised by its mean.

    Args:
        likelihood: one of :data:`LIKELIHOODS`.
        mean: ``(..., genes)``, expected counts mu of the (non-inflated) count model; strictly
            positive: an exact zero gives logits of -inf and a NaN NB log-probability.
        inverse_dispersion: theta, positive, broadcastable to ``mean``; for "nb" and "zinb"
            only. The NB variance is mu + mu^2 / theta (theta -> inf gives the Poisson).
        gate_logits: logit of pi, the probability of an extra (structural) zero,
            broadcastable to ``mean``; for "zip" and "zinb" only.

    Returns:
        A distribution over non-negative integers with ``batch_shape`` the broadcast shape of
        the parameters and empty ``event_shape``; the caller decides on ``.to_event``.
        Extra leading dimensions (e.g. from Pyro's enumeration) broadcast through.

    Raises:
        ValueError: for an unknown name, a missing parameter the likelihood needs, or a
            parameter given that it does not use.
    """
    _check_arguments(
        likelihood, {"inverse_dispersion": inverse_dispersion, "gate_logits": gate_logits}
    )

    if likelihood == "poisson":
        return dist.Poisson(rate=mean)
    if likelihood == "zip":
        return dist.ZeroInflatedPoisson(rate=mean, gate_logits=gate_logits)

    # Pyro's NegativeBinomial has mean total_count * exp(logits), so total_count = theta and
    # logits = log(mu / theta), taken as a difference of logs so that it stays exact where
    # mu / theta would lose precision or underflow (mu = 1e-3 with theta = 1e6 is 1e-9).
    logits = mean.log() - inverse_dispersion.log()
    negative_binomial = StableNegativeBinomial(total_count=inverse_dispersion, logits=logits)
    if likelihood == "nb":
        return negative_binomial
    return dist.ZeroInflatedDistribution(negative_binomial, gate_logits=gate_logits)
