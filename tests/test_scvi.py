"""scVI: the library prior against numpy, the count likelihood against scipy, dispersion per
gene / batch / cell, counterfactual batches in the normalised expression, and bad input."""

from __future__ import annotations

import json
from functools import partial

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from conftest import simulate_counts
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import stats

import pyrosc
from pyrosc import SCVI, evaluate
from pyrosc.data import from_anndata
from pyrosc.guides import scvi_guide
from pyrosc.likelihoods import LIKELIHOODS, uses_dispersion, uses_gate
from pyrosc.models import scvi_model
from pyrosc.models.scvi import DISPERSIONS, LibraryPrior
from pyrosc.nets import GaussianEncoder, ScviDecoder
from pyrosc.traces import bind_data, eval_mode, model_kwargs, trace_pair

TINY = {"n_latent": 2, "n_hidden": 8}


def two_batches(n_cells: int = 120, n_genes: int = 12, seed: int = 0):
    """Simulated counts whose batch "b" has three times the library size of batch "a"."""
    adata = simulate_counts(n_cells=n_cells, n_genes=n_genes, seed=seed)
    in_b = (adata.obs["batch"] == "b").to_numpy()
    adata.X = adata.X.multiply(np.where(in_b, 3.0, 1.0)[:, None]).tocsr()
    rng = np.random.default_rng(seed)
    adata.obs["donor"] = rng.choice(["d1", "d2", "d3"], size=n_cells)
    return adata


def make_pair(data, likelihood: str, dispersion: str, library: str, seed: int = 0):
    """A tiny scVI model and guide with fixed random networks, in evaluation mode."""
    torch.manual_seed(seed)
    sizes = [len(names) for names in data.covariate_categories.values()]
    batch_names = data.covariate_categories["batch"]
    decoder = ScviDecoder(
        2,
        data.n_genes,
        n_hidden=8,
        covariate_sizes=sizes,
        gate=uses_gate(likelihood),
        cell_dispersion=dispersion == "gene-cell",
    )
    encoder = GaussianEncoder(data.n_genes, 2, n_hidden=8)
    networks = {"decoder": decoder, "encoder": encoder}
    prior = library_encoder = None
    if library == "latent":
        prior = LibraryPrior.from_library(data.library, data.covariates["batch"], batch_names)
        library_encoder = networks["library_encoder"] = GaussianEncoder(data.n_genes, 1, 8)
    model = partial(
        scvi_model,
        decoder=decoder,
        library_prior=prior,
        likelihood=likelihood,
        dispersion=dispersion,
        n_batches=len(batch_names),
    )
    guide = partial(scvi_guide, encoder=encoder, library_encoder=library_encoder)
    return model, guide, torch.nn.ModuleDict(networks).eval()


def traces(model, guide, minibatch):
    """Guide trace and model trace replayed against it, for a minibatch as a whole."""
    kwargs = model_kwargs(model, minibatch, None)
    return trace_pair(model, guide, kwargs)


def latent_sites(trace) -> set[str]:
    return {
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name != "cells"
    }


@pytest.fixture
def adata():
    return two_batches()


@pytest.fixture
def data(adata):
    return from_anndata(adata, batch_key="batch")


# -- the library -------------------------------------------------------------------------------


def test_library_prior_is_the_log_library_mean_and_variance_of_each_batch(adata, data):
    prior = LibraryPrior.from_library(data.library, data.covariates["batch"], ["a", "b"])
    log_library = np.log(np.asarray(adata.X.sum(axis=1)).ravel())
    batch = adata.obs["batch"].to_numpy()
    for code, name in enumerate(["a", "b"]):
        values = log_library[batch == name]
        assert prior.loc[code].item() == pytest.approx(values.mean(), rel=1e-6)
        assert prior.scale[code].item() ** 2 == pytest.approx(values.var(), rel=1e-5)
    # Through the model: each cell's library prior is its batch's.
    model, guide, _ = make_pair(data, "nb", "gene", "latent")
    _, model_trace = traces(model, guide, data.minibatch(np.arange(data.n_cells)))
    library_prior = model_trace.nodes["library"]["fn"]
    codes = torch.from_numpy(data.covariates["batch"])
    torch.testing.assert_close(library_prior.loc, prior.loc[codes])
    torch.testing.assert_close(library_prior.scale, prior.scale[codes])


def test_scvi_fits_its_library_prior_to_the_training_cells_only(adata):
    model = SCVI(adata, batch_key="batch", library="latent", **TINY).fit(
        max_epochs=1, validation_fraction=0.25, progress=False
    )
    train = model.train_result.train_index
    log_library = np.log(np.asarray(adata.X.sum(axis=1)).ravel())
    batch = adata.obs["batch"].to_numpy()
    with model._scope() as (_, _, networks):
        prior = networks["library_prior"]
    for code, name in enumerate(["a", "b"]):
        in_batch = batch[train] == name
        assert prior.loc[code].item() == pytest.approx(log_library[train][in_batch].mean(), 1e-6)
        variance = log_library[train][in_batch].var()
        assert prior.scale[code].item() ** 2 == pytest.approx(variance, rel=1e-5)
        assert prior.loc[code].item() != pytest.approx(log_library[batch == name].mean(), 1e-6)


def test_latent_library_posterior_starts_at_the_prior_scale(adata):
    # lr=0: the networks stay as initialised. q(log l | x) must start near the data's log
    # library sizes (~log 300 here), not near 0, or training spends its steps getting there.
    model = SCVI(adata, batch_key="batch", library="latent", **TINY).fit(
        max_epochs=1, validation_fraction=0, lr=0.0, progress=False
    )
    minibatch = model.data.minibatch(np.arange(model.data.n_cells))
    with model._scope() as (m, g, networks), eval_mode(networks):
        guide_trace, _ = traces(m, g, minibatch)
        prior = networks["library_prior"]
    log_library_loc = guide_trace.nodes["library"]["fn"].loc
    expected = float(prior.loc.mean())
    assert expected > 4
    assert log_library_loc.mean().item() == pytest.approx(expected, abs=1.0)


def test_library_prior_needs_a_spread_in_every_batch():
    with pytest.raises(ValueError, match="batch 'b' has 1 training cell"):
        LibraryPrior.from_library(np.array([10.0, 20.0, 30.0]), np.array([0, 0, 1]), ["a", "b"])


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_observed_library_is_each_cells_total_and_no_site(data, likelihood):
    """The counts' log-likelihood at a fixed z, written out with scipy, mean = total * rho."""
    model, guide, networks = make_pair(data, likelihood, "gene", "observed")
    minibatch = data.minibatch(np.arange(8))
    with torch.no_grad():
        guide_trace, model_trace = traces(model, guide, minibatch)
        z = guide_trace.nodes["z"]["value"]
        logits, gate_logits, _ = networks["decoder"](z, minibatch["covariates"])
        proportions = logits.softmax(-1)
        log_px = model_trace.nodes["counts"]["fn"].log_prob(minibatch["counts"])
    assert "library" not in latent_sites(guide_trace) | latent_sites(model_trace)
    x = minibatch["counts"].double().numpy()
    mean = x.sum(axis=1, keepdims=True) * proportions.double().numpy()
    theta = pyro.param("inverse_dispersion").detach().double().numpy()
    expected = stats.nbinom(theta, theta / (theta + mean)).logpmf(x)
    if likelihood == "zinb":
        gate = torch.sigmoid(gate_logits).double().numpy()
        expected = np.log(gate * (x == 0) + (1 - gate) * np.exp(expected))
    np.testing.assert_allclose(log_px.double().numpy(), expected.sum(axis=1), rtol=1e-5)


# -- the dispersion ----------------------------------------------------------------------------


def counts_inverse_dispersion(model_trace) -> torch.Tensor:
    """theta of the NB inside the ``counts`` site (Independent around the NB or the ZINB)."""
    distribution = model_trace.nodes["counts"]["fn"].base_dist
    return getattr(distribution, "base_dist", distribution).inverse_dispersion


def test_gene_batch_dispersion_is_one_theta_per_gene_and_batch(data):
    model, guide, _ = make_pair(data, "nb", "gene-batch", "observed")
    theta = torch.rand(2, data.n_genes) + 0.5  # distinct per batch (the default is all ones)
    pyro.param("inverse_dispersion", theta, constraint=torch.distributions.constraints.positive)
    minibatch = data.minibatch(np.arange(10))
    with torch.no_grad():
        _, model_trace = traces(model, guide, minibatch)
        switched = {**minibatch, "batch": 1 - minibatch["batch"]}
        switched["covariates"] = switched["batch"].unsqueeze(-1)
        _, switched_trace = traces(model, guide, switched)
    assert pyro.param("inverse_dispersion").shape == (2, data.n_genes)
    torch.testing.assert_close(counts_inverse_dispersion(model_trace), theta[minibatch["batch"]])
    torch.testing.assert_close(counts_inverse_dispersion(switched_trace), theta[switched["batch"]])
    assert not torch.allclose(
        counts_inverse_dispersion(model_trace), counts_inverse_dispersion(switched_trace)
    )


def test_gene_cell_dispersion_comes_from_the_decoder(data):
    model, guide, networks = make_pair(data, "zinb", "gene-cell", "observed")
    minibatch = data.minibatch(np.arange(10))
    with torch.no_grad():
        guide_trace, model_trace = traces(model, guide, minibatch)
        z = guide_trace.nodes["z"]["value"]
        _, _, decoded = networks["decoder"](z, minibatch["covariates"])
    theta = counts_inverse_dispersion(model_trace)
    assert theta.shape == (10, data.n_genes)
    torch.testing.assert_close(theta, decoded)
    assert not torch.allclose(theta[0], theta[1])
    assert "inverse_dispersion" not in pyro.get_param_store()


# -- the contract with train and evaluate --------------------------------------------------------


@pytest.mark.parametrize("library", ["observed", "latent"])
def test_guide_samples_exactly_the_models_latent_sites(data, library):
    model, guide, _ = make_pair(data, "zinb", "gene-batch", library)
    minibatch = data.minibatch(np.arange(16))
    # Pyro's validation (on in conftest) checks that the guide samples the model's latents.
    loss = Trace_ELBO().loss(bind_data(model), bind_data(guide), **minibatch, n_cells=120)
    assert np.isfinite(loss)
    guide_trace, model_trace = traces(model, guide, minibatch)
    expected = {"z", "library"} if library == "latent" else {"z"}
    assert latent_sites(guide_trace) == latent_sites(model_trace) == expected
    assert model_trace.nodes["proportions"]["value"].shape == (16, data.n_genes)


def test_log_likelihood_with_a_latent_library(data):
    model, guide, networks = make_pair(data, "nb", "gene", "latent")
    log_px = evaluate.log_likelihood(model, guide, data, n_samples=4, networks=networks)
    assert log_px.shape == (data.n_cells,)
    assert np.all(np.isfinite(log_px))


# Every likelihood with every dispersion it takes (Poisson and ZIP take none).
LIKELIHOOD_DISPERSIONS = [
    (likelihood, dispersion)
    for likelihood in LIKELIHOODS
    for dispersion in (DISPERSIONS if uses_dispersion(likelihood) else (None,))
]


@pytest.mark.parametrize("library", ["observed", "latent"])
@pytest.mark.parametrize(("likelihood", "dispersion"), LIKELIHOOD_DISPERSIONS)
def test_short_fit_runs_for_every_option(likelihood, dispersion, library):
    adata = two_batches(n_cells=40, n_genes=6)
    model = SCVI(
        adata,
        batch_key="batch",
        likelihood=likelihood,
        dispersion=dispersion,
        library=library,
        n_latent=2,
        n_hidden=4,
    ).fit(max_epochs=2, batch_size=20, validation_fraction=0, progress=False)
    assert np.all(np.isfinite(model.history["train_elbo"]))
    assert model.latent().shape == (40, 2)
    with model._scope():
        store = pyro.get_param_store()
        has_theta = "inverse_dispersion" in store
        assert has_theta == (uses_dispersion(likelihood) and dispersion != "gene-cell")


def test_decoder_sees_every_covariate_and_encoders_only_when_asked(adata):
    model = SCVI(
        adata,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        encode_covariates=True,
        **TINY,
    )
    model.fit(max_epochs=1, progress=False)
    with model._scope() as (_, _, networks):
        assert networks["decoder"].expression.body.covariate_sizes == (2, 3)
        assert networks["encoder"].body.covariate_sizes == (2, 3)
    expression = model.normalized_expression(transform_batch="a")
    assert expression.shape == (adata.n_obs, adata.n_vars)
    plain = SCVI(adata, batch_key="batch", categorical_covariate_keys=["donor"], **TINY).fit(
        1, progress=False
    )
    with plain._scope() as (_, _, networks):
        assert networks["encoder"].body.covariate_sizes == ()


def test_layer_options_build_the_census_layout(adata, tmp_path):
    model = SCVI(
        adata,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        n_layers=2,
        batch_norm="encoder",
        layer_norm="decoder",
        deeply_inject_covariates=False,
        **TINY,
    ).fit(max_epochs=1, validation_fraction=0, progress=False)
    with model._scope() as (_, _, networks):
        encoder, decoder = networks["encoder"].body, networks["decoder"].expression.body
        assert isinstance(encoder.norms[0], torch.nn.BatchNorm1d) and encoder.layer_norm is None
        assert isinstance(decoder.norms[0], torch.nn.Identity)
        assert not decoder.layer_norm.elementwise_affine
        # covariates (2 batches + 3 donors) into the decoder's first layer only
        assert decoder.linears[0].in_features == 2 + 5 and decoder.linears[1].in_features == 8
    model.save(tmp_path / "model")
    loaded = SCVI.load(tmp_path / "model", adata)
    np.testing.assert_array_equal(loaded.latent(), model.latent())


# -- normalised expression ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted():
    model = SCVI(
        two_batches(), batch_key="batch", library="latent", dispersion="gene-batch", **TINY
    )
    return model.fit(max_epochs=2, validation_fraction=0, progress=False)


def seeded(model, **kwargs) -> np.ndarray:
    pyro.set_rng_seed(0)
    return model.normalized_expression(**kwargs)


def test_transform_batch_of_a_cells_own_batch_is_its_normalised_expression(fitted):
    own = seeded(fitted, n_samples=3)
    in_a = (fitted.adata.obs["batch"] == "a").to_numpy()
    as_a = seeded(fitted, n_samples=3, transform_batch="a")
    np.testing.assert_allclose(as_a[in_a], own[in_a], rtol=1e-6)
    assert not np.allclose(as_a[~in_a], own[~in_a])
    np.testing.assert_allclose(own.sum(axis=1), 1.0, rtol=1e-5)  # library_size=1: proportions


def test_a_list_of_batches_averages_the_single_batch_results(fitted):
    both = seeded(fitted, n_samples=2, transform_batch=["a", "b"])
    as_a = seeded(fitted, n_samples=2, transform_batch="a")
    as_b = seeded(fitted, n_samples=2, transform_batch="b")
    np.testing.assert_allclose(both, (as_a + as_b) / 2, rtol=1e-5)


def test_library_size_scales_or_uses_each_cells_library(fitted):
    np.testing.assert_allclose(seeded(fitted, library_size=1e4), 1e4 * seeded(fitted), rtol=1e-5)
    latent = seeded(fitted, library_size="latent", n_samples=4)
    assert np.all(np.isfinite(latent)) and np.all(latent > 0)
    observed = SCVI(two_batches(), batch_key="batch", **TINY).fit(max_epochs=1, progress=False)
    totals = np.asarray(observed.adata.X.sum(axis=1)).ravel()
    with_totals = observed.normalized_expression(library_size="latent")
    np.testing.assert_allclose(with_totals.sum(axis=1), totals, rtol=1e-5)


def test_save_load_round_trips_the_library_prior_onto_other_cells(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["class"] == "SCVI" and meta["config"]["library"] == "latent"
    only_b = fitted.adata[fitted.adata.obs["batch"] == "b"].copy()
    loaded = SCVI.load(tmp_path / "m", only_b)
    with fitted._scope() as (_, _, saved), loaded._scope() as (_, _, restored):
        torch.testing.assert_close(restored["library_prior"].loc, saved["library_prior"].loc)
    expected = seeded(fitted, adata=only_b, transform_batch="a", library_size="latent")
    np.testing.assert_array_equal(
        seeded(loaded, transform_batch="a", library_size="latent"), expected
    )


# -- bad input ---------------------------------------------------------------------------------


def test_unknown_batch_key_lists_the_obs_columns(adata):
    with pytest.raises(ValueError, match="batch_key 'sample' is not a column.*'cell_type'"):
        SCVI(adata, batch_key="sample")


def test_missing_batch_values_are_an_error(adata):
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("batch")] = None
    with pytest.raises(ValueError, match="'batch' has missing values in 1 cells"):
        SCVI(adata, batch_key="batch")


def test_unknown_transform_batch_lists_the_known_batches(fitted):
    with pytest.raises(ValueError, match=r"\['c'\].*known batches are: \['a', 'b'\]"):
        fitted.normalized_expression(transform_batch=["a", "c"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dispersion": "gene-label"}, "dispersion must be one of"),
        ({"library": "fixed"}, "library must be one of"),
        ({"batch_key": None, "categorical_covariate_keys": ["donor"]}, "need a batch_key"),
        ({"batch_norm": "yes"}, "batch_norm must be one of"),
        ({"layer_norm": True}, "layer_norm must be one of"),
        ({"deeply_inject_covariates": "no"}, "deeply_inject_covariates must be True or False"),
    ],
)
def test_bad_options(adata, options, message):
    with pytest.raises(ValueError, match=message):
        SCVI(adata, **options)


def test_transform_batch_needs_a_batch_key(adata):
    with pytest.raises(ValueError, match="transform_batch needs a model with a batch_key"):
        SCVI(adata, batch_key=None).normalized_expression(transform_batch="a")


def test_bad_library_size(fitted):
    with pytest.raises(ValueError, match="library_size must be 'latent' or positive"):
        fitted.normalized_expression(library_size="observed")


def test_minibatch_scaling_covers_the_library(data):
    model, guide, _ = make_pair(data, "nb", "gene", "latent")
    minibatch = data.minibatch(np.arange(20))
    trace = poutine.trace(model).get_trace(**model_kwargs(model, minibatch, 120))
    assert trace.nodes["library"]["scale"] == pytest.approx(6.0)
    assert trace.nodes["counts"]["scale"] == pytest.approx(6.0)


# -- continuous covariates and options that do not apply ----------------------------------------


def mito_data(n_cells: int = 300, n_genes: int = 12, seed: int = 0):
    """Counts whose first 4 genes rise and next 4 fall with a per-cell covariate pct_mito."""
    rng = np.random.default_rng(seed)
    pct = rng.uniform(-1.5, 1.5, size=n_cells)
    effect = np.zeros(n_genes)
    effect[:4], effect[4:8] = 1.2, -1.2
    logits = rng.normal(0, 0.3, size=n_genes) + pct[:, None] * effect
    rho = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    counts = rng.poisson(rho * rng.lognormal(np.log(600), 0.2, size=(n_cells, 1)))
    counts[:, 0] += 1
    obs = pd.DataFrame({"pct_mito": pct}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(counts.astype(np.float32), obs=obs)


def test_continuous_covariate_effect_is_recovered_with_its_sign():
    adata = mito_data()
    model = SCVI(adata, likelihood="nb", continuous_covariate_keys=["pct_mito"], **TINY)
    model.fit(max_epochs=60, batch_size=64, lr=1e-2, validation_fraction=0, progress=False)
    _, _, networks = model._pair
    z = torch.from_numpy(model.latent()).mean(0, keepdim=True)
    codes = torch.zeros(1, 0, dtype=torch.int64)
    with torch.no_grad():
        high = networks["decoder"](z, codes, torch.tensor([[1.0]]))[0]
        low = networks["decoder"](z, codes, torch.tensor([[-1.0]]))[0]
    change = (high.log_softmax(-1) - low.log_softmax(-1))[0].numpy()
    assert (change[:4] > 0.3).all() and (change[4:8] < -0.3).all()


def test_continuous_covariates_are_validated():
    adata = mito_data(n_cells=20)
    with pytest.raises(ValueError, match="continuous_covariate_keys 'pct' is not a column"):
        SCVI(adata, continuous_covariate_keys=["pct"])
    adata.obs.loc["c3", "pct_mito"] = np.nan
    with pytest.raises(
        ValueError, match=r"'pct_mito' is NaN or infinite in 1 cells \(e\.g\. 'c3'\)"
    ):
        SCVI(adata, continuous_covariate_keys=["pct_mito"])
    adata.obs["pct_mito"] = "high"
    with pytest.raises(ValueError, match="must be numeric"):
        SCVI(adata, continuous_covariate_keys=["pct_mito"])


def test_one_batch_without_a_batch_key():
    adata = mito_data(n_cells=40)
    model = SCVI(adata, **TINY).fit(max_epochs=1, progress=False)
    assert model.data.covariates == {} and model.latent().shape == (40, 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"likelihood": "poisson", "dispersion": "gene-batch"}, "does not apply to likelihood"),
        ({"likelihood": "zip", "dispersion": "gene"}, "does not apply to likelihood"),
        ({"encode_covariates": True}, "no covariates to encode"),
    ],
)
def test_options_that_do_not_apply_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SCVI(mito_data(n_cells=20), **options)


def test_training_options_that_do_not_apply_are_errors(toy_adata):
    with pytest.raises(ValueError, match="patience applies to early stopping only"):
        SCVI(toy_adata, **TINY).fit(max_epochs=1, patience=3, progress=False)
    with pytest.raises(ValueError, match="init_epochs is the warm start's"):
        pyrosc.GMVAE(toy_adata, n_clusters=2, n_latent=2).fit(init="random", init_epochs=5)
