"""Count likelihoods against independent truth: scipy.stats, closed-form moments, mpmath."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import TraceEnum_ELBO, config_enumerate
from scipy import special, stats

from pyrosc import _fast
from pyrosc.likelihoods import (
    LIKELIHOODS,
    NegativeBinomialLogMean,
    count_distribution,
    negative_binomial_log_prob,
    poisson_log_prob,
    uses_dispersion,
    uses_gate,
    zero_inflated_log_prob,
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


def reference_log_prob(
    value: torch.Tensor,
    mean: torch.Tensor,
    inverse_dispersion: torch.Tensor | None = None,
    gate_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference forms of pyrosc.likelihoods, called directly (no distribution)."""
    if inverse_dispersion is None:
        log_prob = poisson_log_prob(mean.log(), value)
    else:
        log_prob = negative_binomial_log_prob(mean.log(), inverse_dispersion, value)
    return log_prob if gate_logits is None else zero_inflated_log_prob(log_prob, gate_logits, value)


@pytest.mark.parametrize("path", ["speed", "reference"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_log_prob_matches_scipy(likelihood: str, path: str, monkeypatch) -> None:
    """The distributions' log_prob, by the speed path where it applies on the CPU, and by the
    reference form the distributions fall back to (as on CUDA)."""
    if path == "reference":
        monkeypatch.setattr(_fast, "negative_binomial_log_prob", lambda *args, **kwargs: None)
    grid = parameter_grid(likelihood)
    expected = scipy_log_prob(**grid)
    # No absolute floor is needed: the smallest |log p| on the grid is ~1e-4 (a zero count with
    # mean 1e-3 and pi = 0.88), and it is matched to 1e-6 relative like the rest.
    np.testing.assert_allclose(
        pyrosc_log_prob(grid, likelihood, torch.float64), expected, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_reference_functions_match_scipy(likelihood: str) -> None:
    """The module-level reference forms themselves, in float64, on the same grid."""
    grid = parameter_grid(likelihood)
    tensors = {name: torch.tensor(column, dtype=torch.float64) for name, column in grid.items()}
    log_prob = reference_log_prob(**tensors).numpy()
    np.testing.assert_allclose(log_prob, scipy_log_prob(**grid), rtol=1e-6, atol=0)


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
    log_prob = count_distribution("nb", mean=mean, inverse_dispersion=theta).log_prob(value)
    log_prob = log_prob.numpy()
    np.testing.assert_allclose(log_prob, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_float32_log_prob_is_finite_and_close(likelihood: str) -> None:
    """Training runs in float32: the grid must stay finite, and close to the float64 truth.

    Pyro's own NegativeBinomial is off by 0.8 nats (82 %) at theta = 1e6, x = 1 in float32;
    pyrosc's NegativeBinomialLogMean is within 1e-7 there. The
    remaining float32 error is rounding of terms of size ~|log p| (and, for the Poisson at
    x = 1e5, of x log mu ~ 1e6). The small absolute floor is for zero-inflated zeros with
    log p ~ -1e-4: they are formed (as Pyro does) as log(pi) + softplus(...), two terms of size
    ~0.1 whose float32 rounding is ~1e-7.
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
            observation = count_distribution(likelihood, mean=cluster_means[y], **parameters)
            pyro.sample("counts", observation.to_event(1), obs=counts)

    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda: None)
    by_cluster = count_distribution(likelihood, mean=cluster_means[:, None], **parameters)
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


# The NB log-probability takes a fast path when theta is one value per gene and the batch has
# at least as many rows as the per-gene tables (32): it looks the lgamma terms, which depend
# on theta and the count only, up in per-gene tables instead of computing lgamma and digamma
# per element. The grids above are 1-d, so they test the general path; the tests below
# compare the two.


def per_gene_batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A (64, genes) batch over the grid's means and thetas, one (mean, theta) per gene.

    Rows hold counts 0..47 (so some are beyond the tables), 1e5, and a few non-integers (the
    log-probability is defined for them too, and they must not be looked up in the tables).
    """
    means, thetas = zip(*itertools.product(MEANS, THETAS), strict=True)
    counts = list(range(48)) + [60.0, 100.0, 1e3, 1e5, 0.5, 2.25, 31.5, 40.5]
    counts += [0.0, 1.0, 2.0, 3.0, 1.0, 0.0, 5.0, 2.0]
    value = torch.tensor(counts, dtype=dtype)[:, None].expand(-1, len(means)).clone()
    mean = torch.tensor(means, dtype=dtype).expand(value.shape).clone()
    # Spread the means within each gene, so that every row is a different (count, mean) pair.
    mean *= torch.linspace(0.5, 2.0, value.shape[0], dtype=dtype)[:, None]
    return {"value": value, "mean": mean, "inverse_dispersion": torch.tensor(thetas, dtype=dtype)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nb_per_gene_theta_equals_theta_expanded_to_the_batch(dtype: torch.dtype) -> None:
    """Log-probabilities and gradients with a (genes,) theta equal those with (batch, genes)."""
    batch = per_gene_batch(dtype)
    value = batch.pop("value")

    def log_prob_and_gradients(theta: torch.Tensor) -> list[torch.Tensor]:
        mean = batch["mean"].clone().requires_grad_()
        theta = theta.clone().requires_grad_()
        # (Validation would reject the non-integer counts.)
        log_prob = NegativeBinomialLogMean(mean.log(), theta, validate_args=False).log_prob(value)
        # A weighted sum, so that each element's gradient is tested, not only their sum.
        weights = torch.linspace(-1.0, 2.0, value.numel(), dtype=dtype).reshape(value.shape)
        (log_prob * weights).sum().backward()
        return [
            log_prob.detach(),
            mean.grad,
            theta.grad.sum_to_size(batch["inverse_dispersion"].shape),
        ]

    theta = batch["inverse_dispersion"]
    per_gene = log_prob_and_gradients(theta)
    per_cell = log_prob_and_gradients(theta.expand(value.shape))
    tolerance = (
        {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    )
    for ours, theirs in zip(per_gene, per_cell, strict=True):
        torch.testing.assert_close(ours, theirs, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nb_per_gene_theta_matches_scipy(dtype: torch.dtype) -> None:
    """The table path against scipy, on the integer counts of per_gene_batch.

    float64 to 1e-6 as on the grid (scipy's own error is ~1e-7 at theta = 1e6, mu = 5e-4), and
    float32 to 1e-5: all of its terms are of the size of the result or smaller.
    """
    batch = per_gene_batch(dtype)
    value = batch.pop("value")
    integer = value == value.round()
    value = torch.where(integer, value, 0.0)
    log_prob = count_distribution("nb", **batch).log_prob(value).double().numpy()
    expected = scipy_log_prob(
        value.double().numpy(),
        batch["mean"].double().numpy(),
        batch["inverse_dispersion"].double().expand(value.shape).numpy(),
    )
    rtol = 1e-6 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(log_prob, expected, rtol=rtol, atol=1e-6)


def test_nb_per_gene_gradients_match_finite_differences() -> None:
    """gradcheck on the table path: counts 0..31 from the tables, 32 and 40.5 without."""
    value = torch.cat([torch.arange(33.0), torch.tensor([40.5])]).double()[:, None].expand(-1, 3)
    mean = (torch.rand(value.shape, generator=torch.Generator().manual_seed(0)) * 30 + 0.1).double()
    theta = torch.tensor([0.2, 9.5, 1e3], dtype=torch.float64)

    def log_prob(mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return NegativeBinomialLogMean(mean.log(), theta, validate_args=False).log_prob(value)

    assert torch.autograd.gradcheck(log_prob, (mean.requires_grad_(), theta.requires_grad_()))


def test_nb_gradient_in_the_counts_matches_finite_differences() -> None:
    """Counts are data, but a value that requires grad still gets a correct gradient."""
    value = torch.tensor([0.5, 1.0, 7.0, 12.0, 300.0], dtype=torch.float64, requires_grad=True)
    mean = torch.tensor([0.3, 2.0, 9.0, 15.0, 250.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.2, 9.5, 10.5, 1e3, 3.0], dtype=torch.float64, requires_grad=True)

    def log_prob(value: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return NegativeBinomialLogMean(mean.log(), theta, validate_args=False).log_prob(value)

    assert torch.autograd.gradcheck(log_prob, (value, mean, theta))


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
@pytest.mark.parametrize("bad", [-1.0, 0.5, float("inf"), float("nan")])
def test_validation_rejects_values_outside_the_support(likelihood: str, bad: float) -> None:
    """With validation on (Pyro's default), as Pyro's own support check does."""
    parameters = {"inverse_dispersion": torch.ones(2)}
    if uses_gate(likelihood):
        parameters["gate_logits"] = torch.zeros(2)
    distribution = count_distribution(likelihood, torch.ones(2), **parameters)
    with pytest.raises(ValueError, match="support"):
        distribution.log_prob(torch.tensor([1.0, bad]))


def test_support_check_equals_pyros() -> None:
    values = torch.tensor([0.0, -0.0, 1.0, 2.5, -1.0, 1e30, -1e-30, 1e-30])
    values = torch.cat([values, torch.tensor([float("inf"), -float("inf"), float("nan")])])
    for tensor in (values, values.float(), torch.tensor([0, -1, 3])):
        expected = dist.NegativeBinomial(1.0, logits=0.0).support.check(tensor)
        assert torch.equal(NegativeBinomialLogMean.support.check(tensor), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zinb_equals_pyros_zero_inflation_of_the_nb(dtype: torch.dtype) -> None:
    """count_distribution's ZINB fuses the mixture; Pyro's wrapper around the same NB agrees."""
    batch = per_gene_batch(dtype)
    value = batch.pop("value").round()
    gate_logits = torch.linspace(-4.0, 4.0, value.numel(), dtype=dtype).reshape(value.shape)

    def log_prob_and_gradients(make: Callable[..., dist.Distribution]) -> list[torch.Tensor]:
        mean = batch["mean"].clone().requires_grad_()
        theta = batch["inverse_dispersion"].clone().requires_grad_()
        gate = gate_logits.clone().requires_grad_()
        log_prob = make(mean, theta, gate).log_prob(value)
        weights = torch.linspace(-1.0, 2.0, value.numel(), dtype=dtype).reshape(value.shape)
        (log_prob * weights).sum().backward()
        return [log_prob.detach(), mean.grad, theta.grad, gate.grad]

    ours = log_prob_and_gradients(
        lambda mean, theta, gate: count_distribution("zinb", mean.log(), theta, gate)
    )
    pyros = log_prob_and_gradients(
        lambda mean, theta, gate: dist.ZeroInflatedDistribution(
            NegativeBinomialLogMean(mean.log(), theta), gate_logits=gate
        )
    )
    tolerance = {"rtol": 1e-10, "atol": 1e-12}
    if dtype == torch.float32:
        tolerance = {"rtol": 1e-5, "atol": 1e-5}
    for ours_, pyros_ in zip(ours, pyros, strict=True):
        torch.testing.assert_close(ours_, pyros_, **tolerance)


def _log_mean_truth(likelihood, value, log_mean, theta, gate):
    """Per-cell log-likelihood from the log mean, plainly, in float64."""
    if theta is None:
        log_p = value * log_mean - log_mean.exp() - torch.lgamma(value + 1)
    else:
        log_theta = theta.log()
        log_sum = torch.logaddexp(log_theta, log_mean)  # log(theta + mu)
        log_p = (
            torch.lgamma(value + theta)
            - torch.lgamma(theta)
            - torch.lgamma(value + 1)
            + theta * (log_theta - log_sum)
            + value * (log_mean - log_sum)
        )
    if likelihood in ("zip", "zinb"):
        at_zero = torch.logaddexp(gate, log_p) - F.softplus(gate)
        log_p = torch.where(value == 0, at_zero, log_p - F.softplus(gate))
    return log_p.sum(-1)


@pytest.mark.parametrize("path", ["fused", "eager"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_proportions_that_underflow_keep_a_finite_likelihood_and_gradient(
    likelihood, path, monkeypatch
):
    # Logits 150 and 300 below the others: their softmax is exactly 0.0 in float32, the mean
    # l * rho would be 0, and its log-probability -inf (count > 0) or its gradient NaN.
    if path == "eager":
        monkeypatch.setenv("PYROSC_COMPILE", "0")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=generator)
    logits[:, :10] -= 150.0
    logits[:, 10:20] -= 300.0
    assert (torch.softmax(logits, -1) == 0).any()
    counts = torch.poisson(torch.full((8, 50), 0.8), generator=generator)
    counts[:, 0], counts[:, 15], counts[:, 30] = 1.0, 2.0, 40.0
    library = counts.sum(-1)
    logits.requires_grad_()
    theta = torch.logspace(-1, 2, 50).requires_grad_() if uses_dispersion(likelihood) else None
    gate = torch.randn(8, 50, generator=generator) if uses_gate(likelihood) else None
    if gate is not None:
        gate.requires_grad_()
    log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
    observation = count_distribution(likelihood, log_mean, theta, gate).to_event(1)
    log_prob = observation.log_prob(counts)
    log_prob.sum().backward()
    tensors = [t for t in (logits, theta, gate) if t is not None]
    assert torch.isfinite(log_prob).all()
    assert all(torch.isfinite(t.grad).all() for t in tensors)

    log_mean = library.double().log().unsqueeze(-1) + logits.detach().double().log_softmax(-1)
    theta64 = None if theta is None else theta.detach().double()
    gate64 = None if gate is None else gate.detach().double()
    truth = _log_mean_truth(likelihood, counts.double(), log_mean, theta64, gate64)
    torch.testing.assert_close(log_prob.double(), truth, rtol=1e-5, atol=1e-3)


def speed_path_inputs(theta_per: str, gate: bool) -> dict[str, torch.Tensor]:
    """A float64 (48, 12) batch for the speed path: libraries of 1 to 1e5 counts (so means
    from ~1e-5 to ~1e5, and a column 80 logits down, where m (t + x) underflows 1e-30), counts
    drawn around them with 0, table edges (31, 32, 33), 100, 1e3 and 1e5 written in; theta
    1e-3..1e6, one per gene or one per cell and gene; gate logits -4..4."""
    generator = torch.Generator().manual_seed(0)
    cells, genes = 48, 12
    library = torch.logspace(0, 5, cells, dtype=torch.float64)
    logits = 3 * torch.randn(cells, genes, generator=generator, dtype=torch.float64)
    logits[:, 0] -= 80.0
    log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
    value = torch.poisson(log_mean.exp().clamp(max=1e5), generator=generator)
    value[:8, 1:9] = torch.tensor([0.0, 1.0, 31.0, 32.0, 33.0, 100.0, 1e3, 1e5]).diag()
    value[-1, :3] = torch.tensor([1e5, 32.0, 0.0])
    theta = torch.logspace(-3, 6, genes, dtype=torch.float64)
    if theta_per == "cell":
        theta = theta[torch.randperm(genes, generator=generator)].expand(cells, genes).clone()
        theta *= torch.logspace(-1, 1, cells, dtype=torch.float64).unsqueeze(-1)
    inputs = {"log_mean": log_mean, "theta": theta, "value": value}
    if gate:
        inputs["gate_logits"] = torch.empty(cells, genes, dtype=torch.float64).uniform_(
            -4, 4, generator=generator
        )
    return inputs


@pytest.mark.parametrize("gate", [False, True], ids=["nb", "zinb"])
@pytest.mark.parametrize("theta_per", ["gene", "cell"])
def test_speed_path_equals_the_reference(theta_per: str, gate: bool) -> None:
    """In float64 the speed path (count tables for theta per gene, Stirling remainders for
    theta per cell and beyond the tables) gives the reference's values and gradients."""
    inputs = speed_path_inputs(theta_per, gate)
    value = inputs.pop("value")
    weights = torch.linspace(-1.0, 2.0, value.numel(), dtype=torch.float64).reshape(value.shape)

    def log_prob_and_gradients(function) -> list[torch.Tensor]:
        leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
        log_prob = function(**leaves)
        (log_prob * weights).sum().backward()
        return [log_prob.detach()] + [leaf.grad for leaf in leaves.values()]

    def speed(log_mean, theta, gate_logits=None):
        return _fast.negative_binomial_log_prob(log_mean, theta, value, gate_logits, True)

    def reference(log_mean, theta, gate_logits=None):
        log_prob = negative_binomial_log_prob(log_mean, theta, value)
        return (
            log_prob
            if gate_logits is None
            else zero_inflated_log_prob(log_prob, gate_logits, value)
        )

    fast, slow = log_prob_and_gradients(speed), log_prob_and_gradients(reference)
    # The reference's lgamma terms are ~1e7 at theta = 1e6: ~1e-9 of rounding in float64.
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-9, atol=1e-7)
    for ours, theirs in zip(fast[1:], slow[1:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    with torch.no_grad():  # evaluation: the same values, without the gradients
        torch.testing.assert_close(speed(**inputs), fast[0], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_log_prob_and_backward_do_not_synchronise_on_cuda(likelihood: str) -> None:
    """On CUDA nothing in a log_prob and its backward reads a value to the host (validation,
    which does, is off; it is off in a tuned training run too)."""
    generator = torch.Generator().manual_seed(0)
    parameters = {"log_mean": torch.randn(64, 50, generator=generator) + 1.0}
    if uses_dispersion(likelihood):
        parameters["inverse_dispersion"] = torch.rand(50, generator=generator) + 0.5
    if uses_gate(likelihood):
        parameters["gate_logits"] = torch.randn(64, 50, generator=generator)
    counts = torch.poisson(torch.full((64, 50), 2.0), generator=generator).cuda()
    leaves = {name: tensor.cuda().requires_grad_() for name, tensor in parameters.items()}
    torch.cuda.synchronize()
    with pyro.validation_enabled(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            observation = count_distribution(likelihood, **leaves).to_event(1)
            observation.log_prob(counts).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())
