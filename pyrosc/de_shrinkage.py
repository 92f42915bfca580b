"""Adaptive shrinkage of log fold changes: an empirical-Bayes prior over genes.

Each gene's LFC posterior from the model alone (:mod:`pyrosc.differential_expression`) treats
every gene on its own, as if any fold change were as likely as any other. In a real comparison
most genes do not change: among two thousand unchanged genes a few dozen land two or three
standard errors from zero by chance, and on their own each looks changed with probability 0.8
to 0.95, enough to push the observed FDR of the calls far above its posterior expectation.
Stephens' adaptive shrinkage (ash; Biostatistics 18:275, 2017) learns from all the genes of a
comparison how often, and by how much, genes change, and uses that as the prior of each:

* each gene's LFC estimate ``b`` (its posterior mean) with standard error ``s`` (its posterior
  sd) is read as ``b ~ N(beta, s^2)``;
* the prior of the true ``beta`` is a mixture of a point mass at 0 and normals centred at 0,
  ``g = pi_0 delta_0 + sum_k pi_k N(0, sigma_k^2)``, on a fixed grid of ``sigma_k`` (from a tenth
  of the smallest ``s`` to twice the largest plausible effect, a factor sqrt(2) apart);
* the weights ``pi`` maximise ``sum_g log sum_k pi_k N(b_g; 0, sigma_k^2 + s_g^2)`` (EM), with
  ash's "null-biased" Dirichlet(10, 1, ..., 1) prior on ``pi`` so that, without evidence,
  genes are unchanged;
* each gene's posterior is then the mixture of the point mass (weight ``w_0``) and normals
  ``N(m_k, v_k)``, ``v_k = 1 / (1/sigma_k^2 + 1/s^2)``, ``m_k = v_k b / s^2``, in closed form.

A gene with a large effect measured precisely keeps it; a gene whose estimate is within a few
standard errors of zero is pulled towards zero as far as the other genes say such estimates
usually are noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# scipy.special, not scipy.stats: importing scipy.stats takes a second, at every `import pyrosc`.
from scipy.special import logsumexp, ndtr

#: Pseudo-counts of the Dirichlet prior on the null weight (ash's ``nullweight``).
NULL_WEIGHT = 10.0
#: The grid of prior sds: neighbours a factor sqrt(2) apart (ash's ``mixsqp`` default).
GRID_RATIO = np.sqrt(2.0)


@dataclass(frozen=True)
class ScaleMixture:
    """The prior ``pi_0 delta_0 + sum_k pi_k N(0, sigma_k^2)`` over genes' LFCs.

    Attributes:
        sds: ``(K,)`` the components' sds, ``sds[0] == 0`` (the point mass at 0).
        weights: ``(K,)`` their weights, summing to 1.
    """

    sds: np.ndarray
    weights: np.ndarray

    def posterior(self, estimate: np.ndarray, se: np.ndarray) -> MixturePosterior:
        """Each gene's posterior under this prior, given ``estimate`` and ``se``, ``(genes,)``."""
        estimate, se = _checked(estimate, se)
        log_w = np.log(np.maximum(self.weights, 1e-300)) + _log_marginals(estimate, se, self.sds)
        resp = np.exp(log_w - logsumexp(log_w, axis=1, keepdims=True))
        prior_var = self.sds[None, :] ** 2
        precision = se[:, None] ** -2
        with np.errstate(divide="ignore"):
            var = np.where(prior_var > 0, 1.0 / (1.0 / prior_var + precision), 0.0)
        return MixturePosterior(resp, var * estimate[:, None] * precision, np.sqrt(var))


@dataclass(frozen=True)
class MixturePosterior:
    """Each gene's posterior: weights, means and sds of its components, ``(genes, K)``; a
    component with sd 0 is the point mass at its mean (0)."""

    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray

    def mean(self) -> np.ndarray:
        """``(genes,)``."""
        return (self.weights * self.means).sum(axis=1)

    def std(self) -> np.ndarray:
        """``(genes,)``."""
        second = (self.weights * (self.means**2 + self.sds**2)).sum(axis=1)
        return np.sqrt(np.maximum(second - self.mean() ** 2, 0.0))

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """``P(beta <= x)`` of each gene, ``x`` ``(genes,)`` or broadcastable to it."""
        x = np.broadcast_to(np.asarray(x, dtype=np.float64), self.weights.shape[:1])[:, None]
        point = (self.means <= x).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = ndtr((x - self.means) / self.sds)
        return (self.weights * np.where(self.sds > 0, spread, point)).sum(axis=1)

    def beyond(self, delta: float) -> tuple[np.ndarray, np.ndarray]:
        """``P(beta > delta)`` and ``P(beta < -delta)`` of each gene, ``(genes,)`` each (the
        point mass at 0 is on neither side, also for ``delta = 0``)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            up = ndtr((self.means - delta) / self.sds)
            down = ndtr((-delta - self.means) / self.sds)
        spread = self.sds > 0
        up = np.where(spread, up, self.means > delta)
        down = np.where(spread, down, self.means < -delta)
        return (self.weights * up).sum(axis=1), (self.weights * down).sum(axis=1)

    def quantile(self, q: float, iterations: int = 40) -> np.ndarray:
        """The ``q`` quantile of each gene's posterior (bisection on :meth:`cdf`), ``(genes,)``."""
        low = (self.means - 10.0 * self.sds).min(axis=1) - 1.0
        high = (self.means + 10.0 * self.sds).max(axis=1) + 1.0
        for _ in range(iterations):
            middle = (low + high) / 2
            below = self.cdf(middle) < q
            low, high = np.where(below, middle, low), np.where(below, high, middle)
        return (low + high) / 2


def prior_grid(estimate: np.ndarray, se: np.ndarray) -> np.ndarray:
    """The prior sds: 0, then from a tenth of the smallest ``se`` to twice the largest effect
    the estimates suggest (``sqrt(max(b^2 - s^2))``), a factor :data:`GRID_RATIO` apart."""
    smallest = se.min() / 10.0
    largest = 2.0 * np.sqrt(max(float(np.max(estimate**2 - se**2)), smallest**2))
    steps = int(np.ceil(np.log(largest / smallest) / np.log(GRID_RATIO))) + 1
    return np.concatenate([[0.0], smallest * GRID_RATIO ** np.arange(steps)])


def fit_prior(
    estimate: np.ndarray,
    se: np.ndarray,
    *,
    null_weight: float = NULL_WEIGHT,
    tolerance: float = 1e-7,
    max_iterations: int = 2000,
) -> ScaleMixture:
    """The prior's weights by EM (the likelihood is concave in them: EM finds the maximum).

    Args:
        estimate, se: each gene's LFC estimate and its standard error, ``(genes,)``, ``se > 0``.
        null_weight: the Dirichlet pseudo-count on the point mass (1 on every other component).
        tolerance: stop when an iteration raises the objective by less than this per gene
            (components that the data cannot tell apart trade weight slowly, with no effect
            on any gene's posterior).

    Returns:
        the fitted :class:`ScaleMixture` on :func:`prior_grid`.
    """
    estimate, se = _checked(estimate, se)
    sds = prior_grid(estimate, se)
    log_lik = _log_marginals(estimate, se, sds)
    # Each gene's row scaled by its largest entry: the same EM, in likelihoods, not logs.
    likelihood = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
    pseudo = np.zeros(len(sds))
    pseudo[0] = null_weight - 1.0

    def objective(weights: np.ndarray) -> float:
        log_weights = np.log(np.maximum(weights, 1e-300))
        return float(np.log(likelihood @ weights).sum() + pseudo @ log_weights)

    def em(weights: np.ndarray) -> np.ndarray:
        counts = weights * (likelihood.T @ (1.0 / (likelihood @ weights))) + pseudo
        return counts / counts.sum()

    # EM, accelerated by SQUAREM (Varadhan & Roland 2008, as ash does): from two EM steps,
    # a longer step along their direction, kept only where it raises the objective.
    weights = np.full(len(sds), 1.0 / len(sds))
    current = objective(weights)
    for _ in range(max_iterations):
        first = em(weights)
        second = em(first)
        step, curve = first - weights, second - 2 * first + weights
        alpha = -min(np.linalg.norm(step) / max(np.linalg.norm(curve), 1e-300), 1e6)
        alpha = min(alpha, -1.0)
        jumped = np.maximum(weights - 2 * alpha * step + alpha**2 * curve, 0.0)
        jumped = em(jumped / jumped.sum())
        candidate = jumped if objective(jumped) >= objective(second) else second
        gained = objective(candidate) - current
        weights, current = candidate, current + gained
        if gained < tolerance * len(estimate):
            break
    return ScaleMixture(sds, weights)


def _log_marginals(estimate: np.ndarray, se: np.ndarray, sds: np.ndarray) -> np.ndarray:
    """``log N(b_g; 0, sigma_k^2 + s_g^2)``, ``(genes, K)``."""
    variance = sds[None, :] ** 2 + se[:, None] ** 2
    return -0.5 * (np.log(2 * np.pi * variance) + estimate[:, None] ** 2 / variance)


def _checked(estimate: np.ndarray, se: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    estimate = np.asarray(estimate, dtype=np.float64)
    se = np.asarray(se, dtype=np.float64)
    if estimate.shape != se.shape or estimate.ndim != 1 or not len(estimate):
        raise ValueError(
            f"estimate and se must be 1-d of the same non-zero length, got shapes "
            f"{estimate.shape} and {se.shape}"
        )
    if not (np.all(np.isfinite(estimate)) and np.all(np.isfinite(se)) and np.all(se > 0)):
        raise ValueError("estimate must be finite and se finite and positive for every gene")
    return estimate, se
