"""The notebook API: results where scanpy looks, save/load round trips, and clear misuse errors."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pyro
import pytest
import torch
from conftest import simulate_counts

import pyrosc
from pyrosc import VAE
from pyrosc.api.batches import BatchModel


@pytest.fixture
def fitted(toy_adata):
    return VAE(toy_adata, likelihood="zinb", n_latent=4, n_hidden=16).fit(
        max_epochs=3, progress=False
    )


def test_latent_is_written_where_scanpy_looks(fitted, toy_adata):
    latent = fitted.latent()
    assert latent.shape == (toy_adata.n_obs, 4)
    np.testing.assert_array_equal(toy_adata.obsm["X_pyrosc"], latent)
    other = toy_adata[:50].copy()
    np.testing.assert_allclose(fitted.latent(other), latent[:50], rtol=1e-5, atol=1e-6)
    assert "X_pyrosc" in other.obsm


def test_only_documented_slots_change(toy_adata):
    before = toy_adata.copy()
    model = VAE(toy_adata, n_latent=2, n_hidden=8).fit(max_epochs=1, progress=False)
    model.latent()
    model.log_likelihood(n_samples=2)
    assert set(toy_adata.obsm) == {"X_pyrosc"}
    np.testing.assert_array_equal(toy_adata.X.toarray(), before.X.toarray())
    assert toy_adata.obs.equals(before.obs) and toy_adata.var.equals(before.var)
    assert not toy_adata.layers and not toy_adata.uns


def test_log_likelihood_and_elbo_per_cell(fitted, toy_adata):
    log_lik = fitted.log_likelihood(toy_adata[:20], n_samples=50)
    elbo = fitted.elbo(toy_adata[:20], n_samples=50)
    assert log_lik.shape == elbo.shape == (20,)
    assert np.all(np.isfinite(log_lik))
    assert log_lik.mean() > elbo.mean()  # the importance-sampled bound is tighter


def test_save_load_round_trip_gives_identical_latents(fitted, toy_adata, tmp_path):
    latent = fitted.latent()
    fitted.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["class"] == "VAE" and meta["config"]["likelihood"] == "zinb"
    loaded = VAE.load(tmp_path / "m", toy_adata.copy())
    np.testing.assert_array_equal(loaded.latent(), latent)
    torch.manual_seed(0)
    a = fitted.log_likelihood(toy_adata[:10], n_samples=5)
    torch.manual_seed(0)
    b = loaded.log_likelihood(toy_adata[:10], n_samples=5)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert loaded.history.equals(fitted.history) or np.allclose(
        loaded.history.to_numpy(), fitted.history.to_numpy()
    )


@pytest.mark.parametrize(
    ("cls", "options", "fit_options"),
    [
        (pyrosc.VAE, {"likelihood": "nb"}, {}),
        (pyrosc.GMVAE, {"n_clusters": 3, "guide": "scvae"}, {"init": "random"}),
        (pyrosc.SCVI, {"batch_key": "batch", "library": "latent"}, {}),
    ],
)
def test_every_class_round_trips_through_save_and_load(cls, options, fit_options, tmp_path):
    adata = simulate_counts(n_cells=60, n_genes=8)
    model = cls(adata, n_latent=2, n_hidden=8, **options)
    model.fit(max_epochs=1, progress=False, **fit_options)
    model.save(tmp_path / "m")
    loaded = cls.load(tmp_path / "m", adata.copy())
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.latent(), model.latent())
    pyro.set_rng_seed(0)
    expected = model.log_likelihood(n_samples=3)
    pyro.set_rng_seed(0)
    np.testing.assert_allclose(loaded.log_likelihood(n_samples=3), expected, rtol=1e-6)


def test_saved_file_loads_with_weights_only(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    tensors = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert set(tensors) == {"networks", "params"}


def test_load_refuses_other_genes_or_class(fitted, toy_adata, tmp_path):
    fitted.save(tmp_path / "m")
    with pytest.raises(ValueError, match="genes differ"):
        VAE.load(tmp_path / "m", toy_adata[:, :10].copy())

    class Other(VAE):
        pass

    with pytest.raises(ValueError, match="holds a VAE, not a Other"):
        Other.load(tmp_path / "m", toy_adata)


def test_scoring_other_genes_is_refused(fitted, toy_adata):
    with pytest.raises(ValueError, match="not the 40 genes the model was set up with"):
        fitted.latent(toy_adata[:, ::-1].copy())


def test_unfitted_model_says_so(toy_adata):
    with pytest.raises(RuntimeError, match=r"not fitted yet: call \.fit\(\) first"):
        VAE(toy_adata).latent()


# What can name a batch: only a model with batches (BatchModel) takes the arguments.
BATCH_ARGUMENTS = [
    ("simulate", "batch"),
    ("simulate", "covariates"),
    ("counterfactual", "batch"),
    ("counterfactual", "covariates"),
    ("normalized_expression", "transform_batch"),
]


@pytest.mark.parametrize("cls", [pyrosc.VAE, pyrosc.GMVAE])
def test_models_without_batches_take_no_batch_arguments(toy_adata, cls):
    assert not issubclass(cls, BatchModel)
    for method, argument in BATCH_ARGUMENTS:
        assert argument not in inspect.signature(getattr(cls, method)).parameters
    model = cls(toy_adata, n_latent=2, n_hidden=8)
    with pytest.raises(TypeError, match="transform_batch"):
        model.normalized_expression(transform_batch="a")
    with pytest.raises(TypeError, match="'batch'"):
        model.simulate(5, batch="a")
    with pytest.raises(TypeError, match="'batch'"):
        model.counterfactual(batch="a")


def test_a_model_with_batches_takes_the_batch_arguments():
    assert issubclass(pyrosc.SCVI, BatchModel)
    for method, argument in BATCH_ARGUMENTS:
        assert argument in inspect.signature(getattr(pyrosc.SCVI, method)).parameters


def test_unknown_likelihood(toy_adata):
    with pytest.raises(ValueError, match="likelihood must be one of"):
        VAE(toy_adata, likelihood="gaussian")


def test_embedded_dataset_ships_with_labels():
    adata = pyrosc.datasets.pbmc3k()
    assert adata.shape == (2700, 32738)
    assert adata.obs["cell_type"].nunique() == 9
    assert adata.obs["cell_type"].isna().sum() == 62
    assert adata.X.dtype.kind == "i"


@pytest.mark.parametrize("cls", [pyrosc.VAE, pyrosc.GMVAE, pyrosc.SCVI])
@pytest.mark.parametrize(
    ("size", "value", "message"),
    [
        ("n_latent", 0, r"n_latent must be an integer of at least 1 \(the number of latent"),
        ("n_hidden", 0, r"n_hidden must be an integer of at least 1 \(the number of units"),
        ("n_layers", 0, r"n_layers must be an integer of at least 1 \(the number of hidden"),
        ("n_latent", 2.5, r"n_latent must be an integer of at least 1 .* got 2\.5"),
        ("n_hidden", True, r"n_hidden must be an integer of at least 1 .* got True"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\)"),
        ("dropout", -0.1, r"dropout must be in \[0, 1\)"),
    ],
)
def test_network_sizes_that_cannot_build_a_network_are_errors(toy_adata, cls, size, value, message):
    with pytest.raises(ValueError, match=message):
        cls(toy_adata, **{size: value})


def test_network_sizes_accept_numpy_integers(toy_adata):
    model = VAE(toy_adata, n_latent=np.int64(3), n_hidden=np.int32(8)).fit(
        max_epochs=1, progress=False
    )
    assert model.latent().shape == (toy_adata.n_obs, 3)


@pytest.mark.parametrize(
    ("network", "sizes"),
    [
        (pyrosc.nets.GaussianEncoder, {"n_input": 5, "n_output": 0}),
        (pyrosc.nets.CountDecoder, {"n_input": 0, "n_genes": 5}),
        (pyrosc.nets.CountDecoder, {"n_input": 3, "n_genes": 0}),
        (pyrosc.nets.Classifier, {"n_input": 5, "n_classes": 0}),
        (pyrosc.nets.MLP, {"n_input": 5, "n_hidden": 0}),
    ],
)
def test_networks_refuse_empty_layers(network, sizes):
    with pytest.raises(ValueError, match="must be an integer of at least 1"):
        network(**sizes)
