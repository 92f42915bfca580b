"""Evaluation against closed forms: a linear-Gaussian model whose log p(x) is known exactly, a
per-gene score against the Poisson pmf; and cell scores that flag corrupted cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from conftest import factor_model, simulate_counts
from scipy import stats
from sklearn.metrics import roc_auc_score

from pyrosc import evaluate
from pyrosc.data import from_anndata
from pyrosc.plates import cells_plate

# x = W z + b + noise, z ~ N(0, I_2), noise ~ N(0, s^2 I_3): marginally x ~ N(b, W W^T + s^2 I).
W = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.6, -1.2]], dtype=torch.float64)
B = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)
S = 0.7


def linear_gaussian_model(counts, cell_index, n_cells=None):
    with cells_plate(cell_index, n_cells):
        z = pyro.sample("z", dist.Normal(counts.new_zeros(2), counts.new_ones(2)).to_event(1))
        pyro.sample(
            "counts", dist.Normal(z @ W.T.to(counts) + B.to(counts), S).to_event(1), obs=counts
        )


def exact_posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (cells, 2) and covariance (2, 2) of p(z | x)."""
    precision = torch.eye(2, dtype=x.dtype) + W.T @ W / S**2
    covariance = torch.linalg.inv(precision)
    mean = (x - B) @ W / S**2 @ covariance
    return mean, covariance


def make_guide(shift: float, inflate: float):
    """A diagonal Gaussian guide: the exact posterior's marginals, shifted and widened."""

    def guide(counts, cell_index, n_cells=None):
        mean, covariance = exact_posterior(counts.double())
        scale = covariance.diagonal().sqrt() * inflate
        with cells_plate(cell_index, n_cells):
            pyro.sample("z", dist.Normal((mean + shift).to(counts), scale.to(counts)).to_event(1))

    return guide


@pytest.fixture
def gaussian_data():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=(40, 3)).astype(np.float64)
    data = from_anndata(ad.AnnData(x))
    truth = stats.multivariate_normal(B.numpy(), (W @ W.T).numpy() + S**2 * np.eye(3)).logpdf(x)
    return data, truth


def test_importance_sampled_log_likelihood_converges_to_closed_form(gaussian_data):
    data, truth = gaussian_data
    guide = make_guide(shift=0.4, inflate=1.5)
    pyro.set_rng_seed(0)
    errors, biases = [], []
    for k in (1, 10, 100, 1000, 10000):
        estimate = evaluate.log_likelihood(linear_gaussian_model, guide, data, n_samples=k)
        errors.append(np.abs(estimate - truth).mean())
        biases.append((estimate - truth).mean())
    # The error shrinks like 1/sqrt(K) and the (negative) bias like 1/K.
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.02
    assert biases[0] < -0.5 and abs(biases[-1]) < 0.005


def test_elbo_is_a_bound_and_exact_posterior_gives_equality(gaussian_data):
    data, truth = gaussian_data
    pyro.set_rng_seed(0)
    loose = evaluate.elbo(linear_gaussian_model, make_guide(0.4, 1.5), data, n_samples=2000)
    assert np.all(loose < truth)
    # With the exact posterior the ELBO gap is KL(q || p(z | x)); the diagonal guide misses only
    # the posterior correlation, so the gap is small and known: -0.5 log(1 - rho^2).
    _, covariance = exact_posterior(torch.zeros(1, 3, dtype=torch.float64))
    rho = covariance[0, 1] / covariance.diagonal().sqrt().prod()
    gap = float(-0.5 * torch.log(1 - rho**2))
    tight = evaluate.elbo(linear_gaussian_model, make_guide(0.0, 1.0), data, n_samples=4000)
    np.testing.assert_allclose(truth - tight, gap, atol=0.02)


def test_log_likelihood_covers_all_cells_in_chunks(gaussian_data):
    data, _ = gaussian_data
    guide = make_guide(0.0, 1.0)
    whole = evaluate.log_likelihood(linear_gaussian_model, guide, data, n_samples=3, batch_size=7)
    assert whole.shape == (data.n_cells,)
    assert np.isfinite(whole).all()


def test_global_latent_is_refused(gaussian_data):
    data, _ = gaussian_data

    def model(counts, cell_index, n_cells=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with cells_plate(cell_index, n_cells):
            pyro.sample("counts", dist.Normal(shift, 1.0).expand([3]).to_event(1), obs=counts)

    def guide(counts, cell_index, n_cells=None):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="not inside the plate 'cells'"):
        evaluate.log_likelihood(model, guide, data, n_samples=2)


# -- per-cell and per-gene scores ------------------------------------------------------------


def test_gene_log_likelihood_is_the_counts_log_pmf_under_a_point_posterior():
    adata = simulate_counts(n_cells=12, n_genes=5)
    data = from_anndata(adata, batch_key="batch")
    point = torch.randn(12, 2)

    def point_guide(counts, library, batch, cell_index, n_cells=None):
        with cells_plate(cell_index, n_cells):
            pyro.sample("z", dist.Delta(point[: counts.shape[0]]).to_event(1))

    pyro.param("loadings", torch.randn(2, 5))
    pyro.param("offsets", torch.randn(2, 5))
    per_gene = evaluate.gene_log_likelihood(factor_model, point_guide, data, n_samples=3)

    logits = point @ pyro.param("loadings") + pyro.param("offsets")[data.covariates["batch"]]
    rate = data.library[:, None] * torch.softmax(logits, dim=-1).detach().numpy()
    expected = stats.poisson(rate).logpmf(adata.X.toarray())
    np.testing.assert_allclose(per_gene.to_numpy(), expected, rtol=1e-4)
    assert list(per_gene.index) == list(adata.obs_names)


def test_cell_scores_flag_corrupted_cells(nb_fit):
    clean = nb_fit.adata
    rng = np.random.default_rng(0)
    counts = clean.X[:10].toarray()
    corrupted = ad.AnnData(
        sp.csr_matrix(rng.permuted(counts, axis=1)),  # each cell's counts shuffled over genes
        obs=pd.DataFrame(index=[f"corrupted{i}" for i in range(10)]),
        var=clean.var,
    )
    cells = ad.concat([clean, corrupted])
    scores = nb_fit.cell_scores(cells, n_samples=20, per_gene=True)
    assert list(scores.index) == list(cells.obs_names)
    assert list(scores.columns) == ["log_likelihood", *clean.var_names]
    np.testing.assert_array_equal(cells.obs["pyrosc_log_likelihood"], scores["log_likelihood"])
    per_count = scores["log_likelihood"] / np.asarray(cells.X.sum(axis=1)).ravel()
    is_corrupted = per_count.index.isin(corrupted.obs_names)
    assert roc_auc_score(is_corrupted, -per_count) > 0.97
    assert np.all(scores[list(clean.var_names)].to_numpy() <= 0)
