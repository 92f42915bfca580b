"""Adaptive shrinkage against brute force: quadrature of the posterior over a fine grid of
the true LFC, and EM's weights on genes drawn from a known prior."""

import numpy as np
import pytest
from scipy.stats import norm

from pyrosc.de_shrinkage import ScaleMixture, fit_prior, prior_grid

PRIOR = ScaleMixture(np.array([0.0, 0.3, 1.0]), np.array([0.6, 0.25, 0.15]))


def brute_force(estimate: float, se: float, prior: ScaleMixture):
    """The posterior by quadrature: the continuous part on a fine grid, the point mass apart."""
    beta = np.linspace(-8, 8, 400_001)
    step = beta[1] - beta[0]
    likelihood = norm.pdf(estimate, beta, se)
    density = sum(
        w * norm.pdf(beta, 0, s) for s, w in zip(prior.sds, prior.weights, strict=True) if s > 0
    )
    spread = density * likelihood * step
    mass = prior.weights[prior.sds == 0].sum() * norm.pdf(estimate, 0, se)
    total = spread.sum() + mass
    return beta, spread / total, mass / total


@pytest.mark.parametrize("estimate, se", [(0.05, 0.1), (-0.4, 0.15), (1.3, 0.2), (2.5, 1.0)])
def test_posterior_matches_quadrature(estimate: float, se: float) -> None:
    post = PRIOR.posterior(np.array([estimate]), np.array([se]))
    beta, spread, mass = brute_force(estimate, se, PRIOR)
    delta = 0.25
    up, down = post.beyond(delta)
    np.testing.assert_allclose(up, spread[beta > delta].sum(), atol=1e-4)
    np.testing.assert_allclose(down, spread[beta < -delta].sum(), atol=1e-4)
    mean = (beta * spread).sum()
    np.testing.assert_allclose(post.mean(), mean, atol=1e-4)
    np.testing.assert_allclose(post.std(), np.sqrt((beta**2 * spread).sum() - mean**2), atol=1e-4)
    # The point mass is at 0, on neither side of delta = 0.
    up0, down0 = post.beyond(0.0)
    np.testing.assert_allclose(up0 + down0 + mass, 1.0, atol=1e-4)
    for q in (0.025, 0.5, 0.975):
        cdf = np.cumsum(spread) + np.where(beta >= 0, mass, 0.0)
        expected = beta[np.searchsorted(cdf, q)]
        got = post.quantile(q)[0]
        # Inside the jump of the point mass the quantile is 0 itself.
        assert abs(got - expected) < 1e-3 or (abs(got) < 1e-6 and abs(expected) < 1e-3)


def test_em_recovers_the_weights_of_a_known_prior() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    changed = rng.random(n) < 0.2
    beta = np.where(changed, rng.normal(0, 1.0, n), 0.0)
    se = rng.uniform(0.05, 0.3, n)
    estimate = beta + rng.normal(0, se)
    prior = fit_prior(estimate, se)
    assert prior.sds[0] == 0
    np.testing.assert_allclose(prior.weights.sum(), 1.0)
    # Small prior sds are indistinguishable from 0 at these standard errors: count them in.
    assert abs(prior.weights[prior.sds < 0.05].sum() - 0.8) < 0.02
    # The fitted prior's variance is that of the truth (0.2 * 1).
    assert abs((prior.weights * prior.sds**2).sum() - 0.2) < 0.03


def test_calls_at_the_expected_fdr_are_calibrated() -> None:
    """Genes from a prior in the family: the observed false discovery proportion of the genes
    called at expected FDR 0.1 is about 0.1, and the flat posterior's is far above it."""
    rng = np.random.default_rng(1)
    n = 20_000
    changed = rng.random(n) < 0.1
    beta = np.where(changed, rng.normal(0, 1.0, n), 0.0)
    se = np.full(n, 0.25)
    estimate = beta + rng.normal(0, se)
    delta = 0.25
    truly = np.where(beta > delta, 1, np.where(beta < -delta, -1, 0))

    def fdp(proba_up: np.ndarray, proba_down: np.ndarray) -> tuple[float, int]:
        proba = np.maximum(proba_up, proba_down)
        sign = np.where(proba_up >= proba_down, 1, -1)
        order = np.argsort(-proba)
        fdr = np.cumsum(1 - proba[order]) / np.arange(1, n + 1)
        called = order[: np.flatnonzero(fdr <= 0.1)[-1] + 1]
        return float(np.mean(truly[called] != sign[called])), len(called)

    post = fit_prior(estimate, se).posterior(estimate, se)
    shrunk, calls = fdp(*post.beyond(delta))
    slack = 3 * np.sqrt(0.1 * 0.9 / calls)
    assert abs(shrunk - 0.1) < slack, (shrunk, calls)
    flat, _ = fdp(norm.sf((delta - estimate) / se), norm.cdf((-delta - estimate) / se))
    assert flat > 0.1 + slack


def test_grid_spans_the_estimates() -> None:
    grid = prior_grid(np.array([0.0, 3.0]), np.array([0.1, 0.2]))
    assert grid[0] == 0 and np.isclose(grid[1], 0.01)
    assert grid[-1] >= 2 * np.sqrt(9 - 0.04) / np.sqrt(2)
    np.testing.assert_allclose(grid[2:] / grid[1:-1], np.sqrt(2))


@pytest.mark.parametrize(
    "estimate, se, match",
    [
        (np.zeros(3), np.zeros(3), "positive"),
        (np.zeros(3), np.ones(2), "same non-zero length"),
        (np.array([np.nan]), np.ones(1), "finite"),
        (np.zeros(0), np.zeros(0), "non-zero length"),
    ],
)
def test_bad_input(estimate, se, match) -> None:
    with pytest.raises(ValueError, match=match):
        fit_prior(estimate, se)
