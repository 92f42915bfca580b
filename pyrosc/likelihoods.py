"""Count observation models, chosen by name and parameterised by the log of their mean.

==========  ============================================  ===========================
name        distribution                                  extra parameters
==========  ============================================  ===========================
poisson     Poisson(mu)                                   none
nb          NegativeBinomial(mu, theta)                   inverse_dispersion (theta)
zip         pi * delta_0 + (1 - pi) * Poisson(mu)         gate_logits (g = logit pi)
zinb        pi * delta_0 + (1 - pi) * NB(mu, theta)       both
==========  ============================================  ===========================

with NB variance mu + mu^2 / theta and pi the probability of an extra (structural) zero. The
models pass log mu = log l + log_softmax(f(z)), finite where a proportion underflows to 0.

Each log-probability is defined by its reference form below (lgamma and softplus), tested
against scipy.stats. The NB's is the largest cost of a training step and loses accuracy in
float32 at large theta, so on the CPU the NB and ZINB take a faster, float32-accurate path
(:mod:`pyrosc._fast`, tested against the reference); elsewhere (CUDA) the reference runs:
plain elementwise work, with no host synchronisation.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.util import is_validation_enabled
from torch import Tensor

from pyrosc import _fast
from pyrosc._fast import NONNEGATIVE_INTEGERS, broadcast_shapes

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


def poisson_log_prob(log_rate: Tensor, value: Tensor) -> Tensor:
    """log Poisson(x | r) = x log r - r - lgamma(x + 1), from the log rate log r.

    Elementwise on the broadcast shape: ``(..., cells, genes)`` from a log rate of that shape
    and ``(cells, genes)`` counts x."""
    return value * log_rate - log_rate.exp() - torch.lgamma(value + 1)


def negative_binomial_log_prob(
    log_mean: Tensor, inverse_dispersion: Tensor, value: Tensor
) -> Tensor:
    """log NB(x | m, t), from the log mean log m and the inverse dispersion t:

        lgamma(x + t) - lgamma(t) - lgamma(x + 1) + t log(t / (t + m)) + x log(m / (t + m))

    with log(t / (t + m)) = -softplus(log m - log t), log(m / (t + m)) = -softplus(log t -
    log m) (in float32 the lgamma difference cancels terms ~1e7 at t = 1e6). Elementwise on the
    broadcast shape: ``(..., cells, genes)`` from a log mean of that shape, ``(genes,)`` or
    ``(..., cells, genes)`` t and ``(cells, genes)`` counts x.
    """
    theta, log_theta = inverse_dispersion, inverse_dispersion.log()
    return (
        torch.lgamma(value + theta)
        - torch.lgamma(theta)
        - torch.lgamma(value + 1)
        - theta * F.softplus(log_mean - log_theta)
        - value * F.softplus(log_theta - log_mean)
    )


def zero_inflated_log_prob(log_prob: Tensor, gate_logits: Tensor, value: Tensor) -> Tensor:
    """log(pi 1[x = 0] + (1 - pi) p(x)) from log p(x) and the gate logits g = logit pi.

    At x = 0 it is log pi + log(1 + (1 - pi) p(0) / pi) = softplus(log p(0) - g) - softplus(-g),
    elsewhere log(1 - pi) + log p(x) = log p(x) - softplus(g). Elementwise on the broadcast
    shape of log p(x), g and x, e.g. ``(..., cells, genes)``.
    """
    at_zero = F.softplus(log_prob - gate_logits) - F.softplus(-gate_logits)
    return torch.where(value == 0, at_zero, log_prob - F.softplus(gate_logits))


class NegativeBinomialLogMean(TorchDistribution):
    """Negative binomial with log mean ``log_mean`` and inverse dispersion theta: Pyro's
    NegativeBinomial(total_count=theta, logits=log mu - log theta), whose log_prob is
    :func:`negative_binomial_log_prob`, by the speed path where it applies. The parameters are
    kept as given (``batch_shape`` is their broadcast shape): a ``(genes,)`` theta stays one
    number per gene, so that the speed path does theta's work once per gene.

    Args:
        log_mean: ``(..., genes)``, log mu.
        inverse_dispersion: theta > 0, broadcastable to the log mean; typically ``(genes,)``.
    """

    arg_constraints = {"log_mean": constraints.real, "inverse_dispersion": constraints.positive}
    support = NONNEGATIVE_INTEGERS

    def __init__(
        self, log_mean: Tensor, inverse_dispersion: Tensor, validate_args: bool | None = None
    ) -> None:
        self._log_mean, self.inverse_dispersion = log_mean, inverse_dispersion  # as given
        batch_shape = broadcast_shapes(log_mean.shape, inverse_dispersion.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    @property
    def log_mean(self) -> Tensor:
        """log mu, broadcast to ``batch_shape``."""
        return self._log_mean.expand(self.batch_shape)

    @property
    def mean(self) -> Tensor:
        """mu, broadcast to ``batch_shape``."""
        return self._log_mean.exp().expand(self.batch_shape)

    @property
    def variance(self) -> Tensor:
        """mu + mu^2 / theta, broadcast to ``batch_shape``."""
        mean = self._log_mean.exp()
        return (mean + mean**2 / self.inverse_dispersion).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> NegativeBinomialLogMean:
        """The same distribution with a larger ``batch_shape``; the parameters are not copied."""
        new = self._get_checked_instance(NegativeBinomialLogMean, _instance)
        batch_shape = torch.Size(batch_shape)
        if broadcast_shapes(batch_shape, self.batch_shape) != batch_shape:
            raise ValueError(f"Cannot expand batch shape {self.batch_shape} to {batch_shape}.")
        new._log_mean, new.inverse_dispersion = self._log_mean, self.inverse_dispersion
        super(NegativeBinomialLogMean, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        """Gamma-Poisson draws: lambda ~ Gamma(theta, rate theta / mu), x ~ Poisson(lambda)."""
        theta = self.inverse_dispersion
        with torch.no_grad():
            rate = theta * torch.exp(-self._log_mean)
            gamma = dist.Gamma(theta, rate.clamp(max=torch.finfo(rate.dtype).max))
            return torch.poisson(gamma.expand(self.batch_shape).sample(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of counts ``value``, on the broadcast shape of value and batch_shape."""
        if self._validate_args:
            self._validate_sample(value)
        parameters = self._log_mean, self.inverse_dispersion
        log_prob = _fast.negative_binomial_log_prob(
            *parameters, value, counts_checked=bool(self._validate_args)
        )
        if log_prob is None:
            log_prob = negative_binomial_log_prob(*parameters, value)
        shape = broadcast_shapes(self.batch_shape, value.shape)
        return log_prob if log_prob.shape == shape else log_prob.expand(shape)


class PoissonLogRate(TorchDistribution):
    """Poisson with log rate ``log_rate``; its log_prob is :func:`poisson_log_prob`.

    Args:
        log_rate: ``(..., genes)``, log r.
    """

    arg_constraints = {"log_rate": constraints.real}
    support = NONNEGATIVE_INTEGERS

    def __init__(self, log_rate: Tensor, validate_args: bool | None = None) -> None:
        self.log_rate = log_rate
        super().__init__(log_rate.shape, validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        """The rate r, which is also the variance."""
        return self.log_rate.exp()

    variance = mean

    def expand(self, batch_shape, _instance=None) -> PoissonLogRate:
        new = self._get_checked_instance(PoissonLogRate, _instance)
        new.log_rate = self.log_rate.expand(batch_shape)
        super(PoissonLogRate, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return torch.poisson(self.log_rate.exp().expand(self._extended_shape(sample_shape)))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return poisson_log_prob(self.log_rate, value)


class ZeroInflated(dist.ZeroInflatedDistribution):
    """pi delta_0 + (1 - pi) base, as ``ZeroInflated(base, gate_logits=logit pi)``: Pyro's
    ZeroInflatedDistribution, whose log_prob is :func:`zero_inflated_log_prob` of the base's;
    around a :class:`NegativeBinomialLogMean`, by the speed path where it applies (which
    validates the counts once and fuses the mixture with the NB)."""

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of counts ``value``, on the broadcast shape of value and batch_shape."""
        if self._validate_args:
            self._validate_sample(value)
        base, gate_logits = self.base_dist, self.gate_logits
        if isinstance(base, NegativeBinomialLogMean):
            parameters = base._log_mean, base.inverse_dispersion, value, gate_logits
            checked = bool(self._validate_args)
            log_prob = _fast.negative_binomial_log_prob(*parameters, counts_checked=checked)
            if log_prob is not None:
                return log_prob
        return zero_inflated_log_prob(base.log_prob(value), gate_logits, value)


def count_distribution(
    likelihood: str,
    log_mean: Tensor | None = None,
    inverse_dispersion: Tensor | None = None,
    gate_logits: Tensor | None = None,
    *,
    mean: Tensor | None = None,
) -> dist.Distribution:
    """Observation model for counts by name, parameterised by the log of its mean.

    Args:
        likelihood: one of :data:`LIKELIHOODS`.
        log_mean: ``(..., genes)``, log mu, the expected count of the (non-inflated) model; or
        mean: ``(..., genes)``, mu > 0 itself (exactly one of the two).
        inverse_dispersion: theta > 0, broadcastable to the mean; for "nb" and "zinb" only.
            Fastest as one value per gene, ``(genes,)``.
        gate_logits: logit pi, broadcastable to the mean; for "zip" and "zinb" only.

    Returns:
        A distribution over non-negative integers with ``batch_shape`` the broadcast shape of
        the parameters (extra leading dimensions, e.g. Pyro's enumeration, broadcast through)
        and empty ``event_shape``; the caller decides on ``.to_event``.

    Raises:
        ValueError: an unknown name, a missing parameter the likelihood needs, one given that
            it does not use, not exactly one of mean and log_mean, or (with validation on) a
            mean that is not positive.
    """
    _check_arguments(
        likelihood, {"inverse_dispersion": inverse_dispersion, "gate_logits": gate_logits}
    )
    if (mean is None) == (log_mean is None):
        raise ValueError("count_distribution takes exactly one of log_mean and mean")
    if mean is not None:
        if is_validation_enabled() and not bool((mean > 0).all()):  # a host sync: validation only
            raise ValueError("count_distribution: the mean must be positive (or pass log_mean).")
        log_mean = mean.log()
    if uses_dispersion(likelihood):
        base = NegativeBinomialLogMean(log_mean, inverse_dispersion)
    else:
        base = PoissonLogRate(log_mean)
    return base if gate_logits is None else ZeroInflated(base, gate_logits=gate_logits)


def gene_inverse_dispersion(counts: Tensor, likelihood: str) -> Tensor | None:
    """The gene-wise inverse dispersion ``theta_g`` of NB and ZINB, a positive Pyro parameter
    named ``inverse_dispersion`` (initialised to 1); None for the likelihoods without one.

    Args:
        counts: ``(batch, genes)`` counts, for the number of genes, dtype and device.
        likelihood: one of :data:`LIKELIHOODS`.
    """
    if not uses_dispersion(likelihood):
        return None
    initial = counts.new_ones(counts.shape[-1])
    return pyro.param("inverse_dispersion", initial, constraint=constraints.positive)
