"""Count likelihoods against independent truth: scipy.stats, closed-form moments, mpmath."""

from __future__ import annotations

import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from scipy import special, stats

from pyrosc.likelihoods import (
    LIKELIHOODS,
    StableNegativeBinomial,
    count_distribution,
    uses_dispersion,
    uses_gate,
)

COUNTS = (0.0, 1.0, 7.0, 1e5)
MEANS = (1e-3, 1e-2, 1.0, 10.0, 1e2, 1e3, 1e4)
THETAS = (1e-3, 1e-1, 1.0, 10.0, 1e3, 1e6)
GATE_LOGITS = (-3.0, 0.0, 2.0)  # pi = 0.047, 0.5, 0.88


def parameter_grid(likelihood: str) -> dict[str, np.ndarray]:
    """Every combination of count, mean and the parameters ``likelihood`` takes, as 1-d arrays."""
    axes = {"value": COUNTS, "mean": MEANS}
    if uses_dispersion(likelihood):
        axes["inverse_dispersion"] = THETAS
    if uses_gate(likelihood):
        axes["gate_logits"] = GATE_LOGITS
    columns = zip(*itertools.product(*axes.values()), strict=True)
    return {name: np.array(column) for name, column in zip(axes, columns, strict=True)}


def pyrosc_log_prob(grid: dict[str, np.ndarray], likelihood: str, dtype: torch.dtype) -> np.ndarray:
    """count_distribution(...).log_prob on the grid, computed in ``dtype``, as float64 numpy."""
    tensors = {name: torch.tensor(column, dtype=dtype) for name, column in grid.items()}
    value = tensors.pop("value")
    return count_distribution(likelihood, **tensors).log_prob(value).double().numpy()


def scipy_log_prob(
    value: np.ndarray,
    mean: np.ndarray,
    inverse_dispersion: np.ndarray | None = None,
    gate_logits: np.ndarray | None = None,
) -> np.ndarray:
    """The reference, in float64. NB with n = theta, p = theta / (theta + mu).

    At theta = 1e6 and mu = 1e-3, p = 1 - 1e-9 and scipy itself is only good to ~1e-7 relative
    (checked against mpmath in test_nb_near_poisson_limit_matches_mpmath), still inside 1e-6.
    The zero-inflated mixture log(pi 1[x=0] + (1 - pi) pmf) is taken in log space, since the
    pmf of a count of 1e5 (~ exp(-1.7e6)) underflows.
    """
    if inverse_dispersion is None:
        log_pmf = stats.poisson.logpmf(value, mean)
    else:
        p = inverse_dispersion / (inverse_dispersion + mean)
        log_pmf = stats.nbinom.logpmf(value, inverse_dispersion, p)
    if gate_logits is None:
        return log_pmf
    pi = special.expit(gate_logits)
    log_not_gated = np.log1p(-pi) + log_pmf
    return np.where(value == 0, np.logaddexp(np.log(pi), log_not_gated), log_not_gated)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_log_prob_matches_scipy(likelihood: str) -> None:
    grid = parameter_grid(likelihood)
    expected = scipy_log_prob(**grid)
    # No absolute floor is needed: the smallest |log p| on the grid is ~1e-4 (a zero count with
    # mean 1e-3 and pi = 0.88), and it is matched to 1e-6 relative like the rest.
    np.testing.assert_allclose(
        pyrosc_log_prob(grid, likelihood, torch.float64), expected, rtol=1e-6, atol=0
    )


def test_nb_near_poisson_limit_matches_mpmath() -> None:
    """Where scipy's p rounds near 1 (huge theta, tiny mu), check against 50-digit arithmetic."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50

    def nb_log_pmf(x: float, mu: float, theta: float) -> float:
        x, mu, theta = mpmath.mpf(x), mpmath.mpf(mu), mpmath.mpf(theta)
        return float(
            mpmath.loggamma(theta + x)
            - mpmath.loggamma(theta)
            - mpmath.loggamma(x + 1)
            + theta * mpmath.log(theta / (theta + mu))
            + x * mpmath.log(mu / (theta + mu))
        )

    cases = list(itertools.product(COUNTS, (1e-3, 1e-2, 1.0, 10.0), (1e6, 1e8)))
    expected = np.array([nb_log_pmf(*case) for case in cases])
    value, mean, theta = torch.tensor(cases, dtype=torch.float64).T
    log_prob = count_distribution("nb", mean, theta).log_prob(value).numpy()
    np.testing.assert_allclose(log_prob, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_float32_log_prob_is_finite_and_close(likelihood: str) -> None:
    """Training runs in float32: the grid must stay finite, and close to the float64 truth.

    Pyro's own NegativeBinomial is off by 0.8 nats (82 %) at theta = 1e6, x = 1 in float32;
    StableNegativeBinomial is within a few 1e-6 there. The remaining float32 error is rounding
    of terms of size ~|log p| (and, for the Poisson at x = 1e5, of x log mu ~ 1e6). The small
    absolute floor is for zero-inflated zeros with log p ~ -1e-4: Pyro forms them as
    log(pi) + softplus(...), two terms of size ~0.1 whose float32 rounding is ~1e-7.
    """
    grid = parameter_grid(likelihood)
    log_prob = pyrosc_log_prob(grid, likelihood, torch.float32)
    assert np.isfinite(log_prob).all()
    np.testing.assert_allclose(log_prob, scipy_log_prob(**grid), rtol=1e-4, atol=1e-6)


def closed_form_moments(
    mean: torch.Tensor,
    inverse_dispersion: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the (zero-inflated) Poisson / NB with these parameters."""
    base_variance = mean if inverse_dispersion is None else mean + mean**2 / inverse_dispersion
    if gate_logits is None:
        return mean, base_variance
    pi = torch.sigmoid(gate_logits)
    return (1 - pi) * mean, (1 - pi) * base_variance + pi * (1 - pi) * mean**2


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_mean_and_variance_properties_equal_closed_forms(likelihood: str) -> None:
    grid = parameter_grid(likelihood)
    del grid["value"]
    tensors = {name: torch.tensor(column, dtype=torch.float64) for name, column in grid.items()}
    distribution = count_distribution(likelihood, **tensors)
    expected_mean, expected_variance = closed_form_moments(**tensors)
    torch.testing.assert_close(distribution.mean, expected_mean, rtol=1e-10, atol=0)
    torch.testing.assert_close(distribution.variance, expected_variance, rtol=1e-10, atol=0)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_sample_moments_match_closed_forms(likelihood: str) -> None:
    """200k draws per gene; sample mean and variance within 5 standard errors."""
    torch.manual_seed(0)
    parameters = {"mean": torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)}
    if uses_dispersion(likelihood):
        parameters["inverse_dispersion"] = torch.tensor([0.5, 2.0, 20.0], dtype=torch.float64)
    if uses_gate(likelihood):
        parameters["gate_logits"] = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    draws = count_distribution(likelihood, **parameters).sample((200_000,))
    assert draws.shape == (200_000, 3)
    assert (draws >= 0).all() and (draws == draws.round()).all()

    expected_mean, expected_variance = closed_form_moments(**parameters)
    n = draws.shape[0]
    squared_deviations = (draws - draws.mean(0)) ** 2
    mean_error = (expected_variance / n).sqrt()
    variance_error = squared_deviations.std(0) / n**0.5
    assert ((draws.mean(0) - expected_mean).abs() < 5 * mean_error).all()
    assert ((squared_deviations.mean(0) - expected_variance).abs() < 5 * variance_error).all()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_extra_leading_dims_broadcast(likelihood: str) -> None:
    """Parameters with enumeration-style leading dims broadcast with per-gene parameters."""
    mean = torch.rand(4, 1, 1, 3) * 10 + 0.1  # (clusters, 1, 1, genes), as under enumeration
    parameters = {"mean": mean}
    if uses_dispersion(likelihood):
        parameters["inverse_dispersion"] = torch.rand(3) + 0.5
    if uses_gate(likelihood):
        parameters["gate_logits"] = torch.randn(3)
    distribution = count_distribution(likelihood, **parameters)
    assert distribution.batch_shape == (4, 1, 1, 3)
    assert distribution.event_shape == ()
    counts = torch.poisson(torch.full((5, 3), 2.0))  # (cells, genes)
    assert distribution.log_prob(counts).shape == (4, 1, 5, 3)
    expanded = distribution.expand((4, 2, 5, 3))
    assert type(expanded) is type(distribution)
    assert expanded.sample().shape == (4, 2, 5, 3)
    torch.testing.assert_close(
        expanded.log_prob(counts), distribution.log_prob(counts).expand(4, 2, 5, 3)
    )


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_enumerated_mixture_equals_sum_over_clusters(likelihood: str) -> None:
    """Under TraceEnum_ELBO the observation site sees a (clusters, 1, genes) mean."""
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((6, 4), 3.0))
    weights = torch.tensor([0.2, 0.3, 0.5])
    cluster_means = torch.rand(3, 4) * 5 + 0.5
    parameters = {}
    if uses_dispersion(likelihood):
        parameters["inverse_dispersion"] = torch.rand(4) + 0.5
    if uses_gate(likelihood):
        parameters["gate_logits"] = torch.randn(4)

    @config_enumerate
    def model() -> None:
        with pyro.plate("cells", counts.shape[0]):
            y = pyro.sample("y", dist.Categorical(weights))
            observation = count_distribution(likelihood, cluster_means[y], **parameters)
            pyro.sample("counts", observation.to_event(1), obs=counts)

    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda: None)
    by_cluster = count_distribution(likelihood, cluster_means[:, None], **parameters)
    log_joint = weights.log()[:, None] + by_cluster.log_prob(counts).sum(-1)  # (clusters, cells)
    assert loss == pytest.approx(-log_joint.logsumexp(0).sum().item(), rel=1e-5)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_gradients_match_finite_differences(likelihood: str) -> None:
    """Gradients in every parameter, on both sides of the switch to Stirling's series at 10."""
    value = torch.tensor([0.0, 1.0, 7.0, 12.0, 300.0], dtype=torch.float64)
    parameters = {"mean": torch.tensor([0.3, 2.0, 9.0, 15.0, 250.0], dtype=torch.float64)}
    if uses_dispersion(likelihood):
        parameters["inverse_dispersion"] = torch.tensor([0.2, 9.5, 10.5, 1e3, 3.0]).double()
    if uses_gate(likelihood):
        parameters["gate_logits"] = torch.tensor([-1.0, 0.5, 2.0, 0.0, -2.0]).double()
    names = list(parameters)

    def log_prob(*tensors: torch.Tensor) -> torch.Tensor:
        return count_distribution(likelihood, **dict(zip(names, tensors, strict=True))).log_prob(
            value
        )

    inputs = tuple(tensor.requires_grad_() for tensor in parameters.values())
    assert torch.autograd.gradcheck(log_prob, inputs)


def test_stable_negative_binomial_agrees_with_pyro_in_float64() -> None:
    """The subclass only changes how the log binomial coefficient is rounded."""
    value = torch.tensor([0.0, 1.0, 3.0, 40.0, 1e3]).double()
    total_count = torch.tensor([0.05, 2.0, 9.99, 10.0, 5e4]).double()
    logits = torch.tensor([-3.0, 0.1, 1.0, -0.5, 2.0]).double()
    ours = StableNegativeBinomial(total_count, logits=logits).log_prob(value)
    pyros = dist.NegativeBinomial(total_count, logits=logits).log_prob(value)
    torch.testing.assert_close(ours, pyros, rtol=1e-10, atol=0)


def test_which_likelihoods_use_which_parameters() -> None:
    assert [uses_dispersion(name) for name in LIKELIHOODS] == [False, True, False, True]
    assert [uses_gate(name) for name in LIKELIHOODS] == [False, False, True, True]


@pytest.mark.parametrize("function", [uses_dispersion, uses_gate])
def test_flags_reject_unknown_names(function) -> None:
    with pytest.raises(ValueError, match="Unknown likelihood 'negbin'.*poisson, nb, zip, zinb"):
        function("negbin")


def test_unknown_likelihood_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="Unknown likelihood 'gaussian'.*poisson, nb, zip, zinb"):
        count_distribution("gaussian", torch.ones(3))


@pytest.mark.parametrize(
    ("likelihood", "given", "message"),
    [
        ("nb", {}, "'nb' needs inverse_dispersion, but none was given"),
        ("zinb", {"gate_logits": torch.zeros(3)}, "'zinb' needs inverse_dispersion"),
        ("zip", {}, "'zip' needs gate_logits, but none was given"),
        ("zinb", {"inverse_dispersion": torch.ones(3)}, "'zinb' needs gate_logits"),
        (
            "nb",
            {"inverse_dispersion": torch.ones(3), "gate_logits": torch.zeros(3)},
            "'nb' does not use gate_logits.*only 'zip' and 'zinb'",
        ),
        (
            "zip",
            {"inverse_dispersion": torch.ones(3), "gate_logits": torch.zeros(3)},
            "'zip' does not use inverse_dispersion.*only 'nb' and 'zinb'",
        ),
        ("poisson", {"inverse_dispersion": torch.ones(3)}, "'poisson' does not use inverse_disp"),
        ("poisson", {"gate_logits": torch.zeros(3)}, "'poisson' does not use gate_logits"),
    ],
)
def test_missing_or_unused_parameters_are_named(
    likelihood: str, given: dict[str, torch.Tensor], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        count_distribution(likelihood, torch.ones(3), **given)
