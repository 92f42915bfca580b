"""Asking a model for cells: simulation against closed-form moments, counterfactual batches
against a simulated batch effect and against the factual decoding, and every question (with the
predictive checks and cell scores) to every model and to one written outside the package."""

from __future__ import annotations

from functools import partial

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from conftest import QUICK, TINY, factor_model, simulate_counts
from torch.distributions import constraints

import pyrosc
from pyrosc import GMVAE, SCVI, VAE, evaluate, predictive, predictive_checks
from pyrosc.data import from_anndata
from pyrosc.models import scvi_model, vae_model
from pyrosc.models.scvi import LibraryPrior
from pyrosc.nets import CountDecoder, GaussianEncoder, ScviDecoder
from pyrosc.plates import cells_plate
from pyrosc.train import train

pytestmark = pytest.mark.usefixtures("one_thread_module")


def moments_within_monte_carlo_error(x: np.ndarray, mean: np.ndarray, variance: np.ndarray):
    """Per-column sample mean and variance of ``x`` against the true ones, in standard errors
    (the variance's from the sample fourth central moment)."""
    n = len(x)
    sample_mean, sample_variance = x.mean(axis=0), x.var(axis=0, ddof=1)
    fourth = ((x - sample_mean) ** 4).mean(axis=0)
    mean_z = (sample_mean - mean) / np.sqrt(variance / n)
    variance_z = (sample_variance - variance) / np.sqrt((fourth - sample_variance**2) / n)
    assert np.all(np.abs(mean_z) < 4.5), mean_z
    assert np.all(np.abs(variance_z) < 4.5), variance_z


def constant_decoder(decoder: CountDecoder, proportions: np.ndarray, gate: np.ndarray | None):
    """Make ``decoder`` ignore z: zero output weights, biases log rho (and logit pi)."""
    with torch.no_grad():
        decoder.proportion_logits.weight.zero_()
        decoder.proportion_logits.bias.copy_(torch.from_numpy(np.log(proportions)))
        if gate is not None:
            decoder.gate_logits.weight.zero_()
            decoder.gate_logits.bias.copy_(torch.from_numpy(np.log(gate / (1 - gate))))


# -- simulation --------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_simulated_counts_have_the_closed_form_mean_and_variance(likelihood):
    data = from_anndata(simulate_counts(n_cells=10, n_genes=6))
    rho = np.array([0.02, 0.08, 0.1, 0.2, 0.25, 0.35], dtype=np.float32)
    theta = np.array([0.5, 1.0, 2.0, 5.0, 10.0, 50.0], dtype=np.float32)
    pi = np.linspace(0.1, 0.5, 6).astype(np.float32) if likelihood == "zinb" else None
    decoder = CountDecoder(2, 6, n_hidden=4, gate=pi is not None)
    constant_decoder(decoder, rho, pi)
    pyro.param("inverse_dispersion", torch.from_numpy(theta), constraint=constraints.positive)
    model = partial(vae_model, decoder=decoder, likelihood=likelihood)

    cells = pyrosc.simulate(model, 20000, data=data, library=200.0, seed=0, networks=decoder)

    assert cells.X.dtype == np.int64 and sp.issparse(cells.X)
    assert list(cells.var_names) == list(data.var_names)
    assert cells.obsm["z"].shape == (20000, 2)
    np.testing.assert_array_equal(cells.obs["library"], 200.0)
    mu = 200.0 * rho
    if pi is None:
        mean, variance = mu, mu + mu**2 / theta
    else:
        mean, variance = (1 - pi) * mu, (1 - pi) * mu * (1 + pi * mu + mu / theta)
    moments_within_monte_carlo_error(cells.X.toarray().astype(np.float64), mean, variance)


def test_a_latent_library_is_drawn_from_its_batchs_prior_or_fixed_when_given():
    data = from_anndata(simulate_counts(n_cells=10, n_genes=4), batch_key="batch")
    rho = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    theta = np.array([1.0, 2.0, 5.0, 20.0], dtype=np.float32)
    decoder = ScviDecoder(2, 4, n_hidden=4, covariate_sizes=[2])
    constant_decoder(decoder.expression, rho, None)
    pyro.param("inverse_dispersion", torch.from_numpy(theta), constraint=constraints.positive)
    loc, scale = np.log([100.0, 400.0]), np.array([0.3, 0.5])
    prior = LibraryPrior(torch.tensor(loc, dtype=torch.float32), torch.tensor(scale).float())
    model = partial(scvi_model, decoder=decoder, library_prior=prior, likelihood="nb")
    networks = torch.nn.ModuleDict({"decoder": decoder, "prior": prior})

    cells = pyrosc.simulate(
        model, 20000, data=data, covariates={"batch": "b"}, seed=1, networks=networks
    )

    assert (cells.obs["batch"] == "b").all()
    log_library = np.log(cells.obs["library"].to_numpy())
    assert abs(log_library.mean() - loc[1]) < 4.5 * scale[1] / np.sqrt(20000)
    assert log_library.std() == pytest.approx(scale[1], rel=0.03)
    # x | l ~ NB(l rho, theta), l ~ LogNormal: the moments of a gamma-Poisson-lognormal mixture.
    first, second = np.exp(loc[1] + scale[1] ** 2 / 2), np.exp(2 * loc[1] + 2 * scale[1] ** 2)
    mean = first * rho
    variance = rho * first + rho**2 * second / theta + rho**2 * (second - first**2)
    moments_within_monte_carlo_error(cells.X.toarray().astype(np.float64), mean, variance)

    fixed = pyrosc.simulate(model, 50, data=data, library=300.0, seed=1, networks=networks)
    np.testing.assert_array_equal(fixed.obs["library"], 300.0)


# -- counterfactual batches --------------------------------------------------------------------


def batch_effect_data(n_cells: int = 200, n_genes: int = 20, seed: int = 0):
    """NB counts of 3 cell types in batches "a" and "b"; in "b" every gene's log expression is
    shifted by a known effect (an additive batch effect in the decoder's logits)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(3, size=n_cells)
    in_b = rng.integers(2, size=n_cells)
    profiles = rng.dirichlet(np.ones(n_genes), size=3)
    effect = rng.normal(0.0, 0.7, size=n_genes)
    logits = np.log(profiles[types]) + in_b[:, None] * effect
    proportions = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mean = rng.lognormal(np.log(500), 0.3, size=n_cells)[:, None] * proportions
    counts = rng.negative_binomial(10.0, 10.0 / (10.0 + mean))
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.array(["a", "b"])[in_b]), "cell_type": types.astype(str)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var), effect


@pytest.fixture(scope="module")
def batch_effect_fit():
    adata, effect = batch_effect_data()
    model = SCVI(adata, batch_key="batch", likelihood="nb", **TINY).fit(progress=False, **QUICK)
    return model, effect


def test_counterfactual_moves_expression_by_the_simulated_batch_effect(batch_effect_fit):
    model, effect = batch_effect_fit
    in_a = model.adata[model.adata.obs["batch"] == "a"].copy()
    as_b = model.counterfactual(in_a, batch="b", n_samples=5).layers["normalized"]
    as_a = model.counterfactual(in_a, batch="a", n_samples=5).layers["normalized"]
    # Proportions are normalised per cell, so the shift is known up to a constant per cell.
    shift = (np.log(as_b) - np.log(as_a)).mean(axis=0)
    shift, effect = shift - shift.mean(), effect - effect.mean()
    assert np.corrcoef(shift, effect)[0, 1] > 0.95
    assert 0.75 < (shift @ effect) / (effect @ effect) < 1.25


def test_counterfactual_into_the_cells_own_batch_is_the_factual_decoding(batch_effect_fit):
    model, _ = batch_effect_fit
    in_a = model.adata[model.adata.obs["batch"] == "a"].copy()
    factual = model.posterior_predictive(in_a, n_samples=2, seed=3)
    own = model.counterfactual(in_a, batch="a", n_samples=2, seed=3)
    np.testing.assert_array_equal(own.X.toarray(), factual.X.toarray())
    np.testing.assert_array_equal(own.obsm["z"], factual.obsm["z"])
    pyro.set_rng_seed(3)
    expression = model.normalized_expression(in_a, library_size=1e4)
    single = model.counterfactual(in_a, batch="a", seed=3).layers["normalized"]
    np.testing.assert_allclose(single, expression, rtol=1e-6)
    other = model.counterfactual(in_a, batch="b", n_samples=2, seed=3)
    np.testing.assert_array_equal(other.obsm["z"], factual.obsm["z"])  # same latents
    assert (other.obs["batch"] == "b").all() and (own.obs["batch"] == "a").all()
    assert not np.array_equal(other.X.toarray(), factual.X.toarray())


def test_simulated_cells_of_a_batch_take_its_library_sizes(batch_effect_fit):
    model, _ = batch_effect_fit
    cells = model.simulate(30, batch="b", seed=0)
    assert (cells.obs["batch"] == "b").all()
    in_b = (model.adata.obs["batch"] == "b").to_numpy()
    assert set(cells.obs["library"]) <= set(model.data.library[in_b])
    np.testing.assert_array_equal(
        model.simulate(30, batch="b", seed=0).X.toarray(), cells.X.toarray()
    )


# -- every model of the package, through the notebook API ---------------------------------------


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (VAE, {"likelihood": "zinb"}),
        (GMVAE, {"n_clusters": 3, "guide": "scvae"}),
        (GMVAE, {"n_clusters": 3, "guide": "marginal"}),
        (SCVI, {"library": "latent"}),
    ],
)
def test_every_model_answers_every_question(cls, options):
    adata = simulate_counts(n_cells=60, n_genes=8)
    before = adata.copy()
    model = cls(adata, **TINY, **options)
    fit_options = {"init": "random"} if cls is GMVAE else {}
    model.fit(max_epochs=1, progress=False, **fit_options)

    simulated = model.simulate(20)
    replicated = model.posterior_predictive(n_samples=2)
    decoded = model.counterfactual()
    check = model.predictive_check(n_samples=5)
    scores = model.cell_scores(n_samples=3, per_gene=True)

    for result in (simulated, replicated, decoded):
        assert result.X.dtype == np.int64
        assert list(result.var_names) == list(adata.var_names)
        assert result.obsm["z"].shape == (result.n_obs, 2)
        assert ("y" in result.obs) == (cls is GMVAE)
    assert simulated.n_obs == 20 and replicated.n_obs == 120 and decoded.n_obs == 60
    assert list(replicated.obs["replicate"].unique()) == [0, 1]
    np.testing.assert_allclose(decoded.layers["normalized"].sum(axis=1), 1e4, rtol=1e-4)
    assert len(check.summary) == 5 and scores.shape == (60, 9) and np.isfinite(scores).all(None)
    # Only the documented slot changed.
    assert list(adata.obs.columns) == [*before.obs.columns, "pyrosc_log_likelihood"]
    np.testing.assert_array_equal(adata.X.toarray(), before.X.toarray())
    assert not adata.layers and not adata.obsm


# -- a model written outside the package -------------------------------------------------------


def factor_guide(counts, library, batch, cell_index, n_cells=None, *, encoder):
    pyro.module("encoder", encoder)
    with cells_plate(cell_index, n_cells):
        loc, scale = encoder(torch.log1p(counts))
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_a_model_written_outside_the_package_gets_every_utility():
    adata = simulate_counts(n_cells=80, n_genes=10)
    data = from_anndata(adata, batch_key="batch")
    encoder = GaussianEncoder(10, 2, n_hidden=16)
    guide = partial(factor_guide, encoder=encoder)
    with pyro.get_param_store().scope():
        train(factor_model, guide, data, networks=encoder, max_epochs=3, progress=False)
        common = {"networks": encoder, "seed": 0}

        simulated = pyrosc.simulate(
            factor_model, 30, data=data, covariates={"batch": "a"}, **common
        )
        replicated = predictive.posterior_predictive(factor_model, guide, data, 2, **common)
        as_b = predictive.counterfactual(factor_model, guide, data, {"batch": "b"}, **common)
        check = predictive_checks.predictive_check(factor_model, guide, data, 5, **common)
        scores = evaluate.cell_scores(factor_model, guide, data, 4, per_gene=True, **common)
        in_a = data.subset(np.flatnonzero(adata.obs["batch"] == "a"))
        factual = predictive.posterior_predictive(factor_model, guide, in_a, **common)
        own = predictive.counterfactual(factor_model, guide, in_a, {"batch": "a"}, **common)

    assert simulated.shape == (30, 10) and (simulated.obs["batch"] == "a").all()
    assert simulated.X.dtype == np.int64 and simulated.obsm["z"].shape == (30, 2)
    assert replicated.shape == (160, 10) and list(replicated.obs["cell"][:80]) == list(
        adata.obs_names
    )
    assert (as_b.obs["batch"] == "b").all() and as_b.layers["normalized"].shape == (80, 10)
    np.testing.assert_array_equal(own.X.toarray(), factual.X.toarray())
    assert len(check.genes) == 30 and scores.shape == (80, 11)


# -- bad input ---------------------------------------------------------------------------------


def test_unknown_batch_lists_the_known_ones(batch_effect_fit):
    model, _ = batch_effect_fit
    with pytest.raises(ValueError, match=r"no category 'c'.*\['a', 'b'\]"):
        model.counterfactual(batch="c")
    with pytest.raises(ValueError, match="covariate 'donor' is not one the model was set up"):
        model.simulate(5, covariates={"donor": "d1"})


def test_a_model_without_batches_takes_no_batch(nb_fit):
    with pytest.raises(TypeError, match="batch"):
        nb_fit.counterfactual(batch="a")


@pytest.mark.parametrize("n_samples", [0, 1.5])
def test_bad_n_samples(nb_fit, n_samples):
    with pytest.raises(ValueError, match="n_samples must be an integer of at least 1"):
        nb_fit.posterior_predictive(n_samples=n_samples)
