"""The GMVAE: the enumerated ELBO against a hand-written sum over clusters, the cluster
posterior against Bayes' rule by hand, and recovery of simulated clusters."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyro
import pytest
import torch
from conftest import simulate_counts
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from scipy import stats
from scipy.special import logsumexp
from sklearn.metrics import adjusted_rand_score

from pyrosc import GMVAE, evaluate
from pyrosc.data import from_anndata
from pyrosc.guides import gmvae_marginal_guide, gmvae_scvae_guide
from pyrosc.models import gmvae_model
from pyrosc.nets import Classifier, CountDecoder, GaussianEncoder
from pyrosc.traces import bind_data

K, LATENT = 3, 2


def tiny_pair(n_genes: int, guide: str):
    """A tiny GMVAE with fixed (random) networks in evaluation mode."""
    torch.manual_seed(0)
    decoder = CountDecoder(LATENT, n_genes, n_hidden=8)
    encoder = GaussianEncoder(
        n_genes, LATENT, n_hidden=8, covariate_sizes=(K,) if guide == "scvae" else ()
    )
    modules = {"decoder": decoder, "encoder": encoder}
    model = partial(
        gmvae_model,
        decoder=decoder,
        component_locs_init=torch.randn(K, LATENT),
        likelihood="nb",
        mixture_weights="learned",
    )
    if guide == "scvae":
        modules["classifier"] = Classifier(n_genes, K, n_hidden=8)
        pair_guide = partial(gmvae_scvae_guide, classifier=modules["classifier"], encoder=encoder)
    else:
        pair_guide = partial(gmvae_marginal_guide, encoder=encoder)
    networks = torch.nn.ModuleDict(modules).eval()
    return model, pair_guide, networks


def recording(guide):
    """The guide, keeping the z it draws (the inner trace passes every site on)."""
    draws = []

    def wrapped(counts, cell_index, n_cells=None):
        trace = poutine.trace(guide).get_trace(
            counts=counts, cell_index=cell_index, n_cells=n_cells
        )
        draws.append(trace.nodes["z"]["value"])

    return wrapped, draws


def nb_logpmf(x: np.ndarray, mean: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return stats.nbinom(theta, theta / (theta + mean)).logpmf(x)


@pytest.fixture
def tiny_batch():
    data = from_anndata(simulate_counts(n_cells=6, n_genes=5, seed=3))
    batch = data.minibatch(np.arange(6))
    return data, batch["counts"], batch["library"], batch


@pytest.mark.parametrize("guide_name", ["marginal", "scvae"])
def test_enumerated_elbo_equals_the_sum_over_clusters_by_hand(tiny_batch, guide_name):
    data, x, library, batch = tiny_batch
    model, guide, networks = tiny_pair(data.n_genes, guide_name)
    guide, draws = recording(guide)
    with torch.no_grad():
        elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(
            bind_data(model), bind_data(guide), **batch
        )
        z = draws[-1].double()  # marginal: (cells, L); scvae: (K, cells, L), one draw per y
        store = pyro.get_param_store()
        w = store["mixture_weights"].double().numpy()
        mu, sigma = store["component_locs"].double(), store["component_scales"].double()
        theta = store["inverse_dispersion"].double().numpy()
        xs, lib = x.double().numpy(), library.double().numpy()[:, None]

        def log_px_given(z_values):
            proportions = networks["decoder"](z_values.float())[0].softmax(-1)
            return nb_logpmf(xs, lib * proportions.double().numpy(), theta).sum(-1)

        def log_prior_z_given_y(z_values):  # (K, cells); z_values (cells, L) or (K, cells, L)
            per_y = z_values if z_values.dim() == 3 else z_values.expand(K, *z_values.shape)
            return np.stack(
                [stats.norm(mu[k], sigma[k]).logpdf(per_y[k]).sum(-1) for k in range(K)]
            )

        log_x = torch.log1p(x)
        if guide_name == "marginal":
            loc, scale = networks["encoder"](log_x)
            log_q = stats.norm(loc.double(), scale.double()).logpdf(z).sum(-1)
            log_prior = logsumexp(np.log(w)[:, None] + log_prior_z_given_y(z), axis=0)
            expected = (log_prior + log_px_given(z) - log_q).sum()
        else:
            q_y = torch.softmax(networks["classifier"](log_x), -1).double().numpy().T  # (K, n)
            terms = []
            for k in range(K):
                codes = torch.full((x.shape[0], 1), k)
                loc, scale = networks["encoder"](log_x, codes)
                log_q_z = stats.norm(loc.double(), scale.double()).logpdf(z[k]).sum(-1)
                terms.append(
                    np.log(w[k])
                    + log_prior_z_given_y(z)[k]
                    + log_px_given(z[k])
                    - np.log(q_y[k])
                    - log_q_z
                )
            expected = (q_y * np.stack(terms)).sum()
    assert elbo == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("guide_name", ["marginal", "scvae"])
def test_importance_weights_sum_clusters_out_exactly(tiny_batch, guide_name):
    """log p(x) with K -> many samples from both guides agrees (same model, two estimators)."""
    data, x, library, batch = tiny_batch
    model, guide, networks = tiny_pair(data.n_genes, guide_name)
    with torch.no_grad():
        # create the parameters
        TraceEnum_ELBO(max_plate_nesting=1).loss(bind_data(model), bind_data(guide), **batch)
        pyro.set_rng_seed(0)
        log_lik = evaluate.log_likelihood(model, guide, data, 4000, networks=networks)
        elbo = evaluate.elbo(model, guide, data, 4000, networks=networks)
    assert log_lik.shape == (6,) and np.all(log_lik >= elbo - 1e-3)


def test_cluster_posterior_is_bayes_rule_at_the_posterior_mean(tiny_batch):
    data, x, library, batch = tiny_batch
    model, guide, networks = tiny_pair(data.n_genes, "marginal")
    with torch.no_grad():
        TraceEnum_ELBO(max_plate_nesting=1).loss(bind_data(model), bind_data(guide), **batch)
        probs = evaluate.discrete_posterior(model, guide, data, "y", networks=networks)
        store = pyro.get_param_store()
        w = store["mixture_weights"].double().numpy()
        mu, sigma = store["component_locs"].double(), store["component_scales"].double()
        z, _ = networks["encoder"](torch.log1p(x))
    log_joint = np.stack(
        [np.log(w[k]) + stats.norm(mu[k], sigma[k]).logpdf(z.double()).sum(-1) for k in range(K)]
    )
    expected = np.exp(log_joint - logsumexp(log_joint, axis=0)).T
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("guide_name", ["marginal", "scvae"])
def test_recovers_simulated_clusters(guide_name):
    adata = simulate_counts(n_cells=450, n_genes=60, n_types=3, seed=1)
    model = GMVAE(adata, n_clusters=3, guide=guide_name, n_latent=4, n_hidden=32)
    model.fit(max_epochs=25, init_epochs=15, lr=3e-3, progress=False)
    assert model.train_result.elbo_name == "TraceEnum_ELBO"
    labels = model.clusters()
    assert adjusted_rand_score(adata.obs["cell_type"], labels) >= 0.9
    probs = adata.obsm["pyrosc_cluster_probs"]
    assert probs.shape == (450, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    assert list(adata.obs["pyrosc_cluster"].cat.categories) == ["0", "1", "2"]
    assert "X_pyrosc" not in adata.obsm  # the warm-start VAE writes nothing to the user's data


def test_save_load_keeps_clusters(tmp_path):
    adata = simulate_counts(n_cells=200, n_genes=30, seed=2)
    model = GMVAE(adata, n_clusters=3, guide="scvae", mixture_weights="learned", n_hidden=16)
    model.fit(max_epochs=3, init="random", progress=False)
    probs = model.cluster_probabilities()
    model.save(tmp_path / "g")
    loaded = GMVAE.load(tmp_path / "g", adata.copy())
    np.testing.assert_allclose(loaded.cluster_probabilities(), probs, rtol=1e-6)
    np.testing.assert_allclose(loaded.latent(), model.latent(), rtol=1e-6)


def test_bad_options_are_named(toy_adata):
    with pytest.raises(ValueError, match="guide must be one of"):
        GMVAE(toy_adata, guide="sampled")
    with pytest.raises(ValueError, match="mixture_weights must be one of"):
        GMVAE(toy_adata, mixture_weights="dirichlet")
    with pytest.raises(ValueError, match="n_clusters must be an integer of at least 2"):
        GMVAE(toy_adata, n_clusters=1)
    with pytest.raises(ValueError, match="init must be 'kmeans' or 'random'"):
        GMVAE(toy_adata, n_clusters=3).fit(init="best")
