"""The model/guide contract as stated: data by name, real cell indices in the plate, one split,
KL warm-up on the marked sites only, parameters that appear late, and exact per-cell ELBOs."""

from __future__ import annotations

from functools import partial

import anndata as ad
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import simulate_counts
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

import pyrosc
from pyrosc import evaluate, predictive, traces
from pyrosc.data import CountData, from_anndata
from pyrosc.guides import gmvae_marginal_guide, gmvae_scvae_guide, vae_guide
from pyrosc.models import gmvae_model, vae_model
from pyrosc.nets import Classifier, CountDecoder, GaussianEncoder
from pyrosc.objective import ScaleLatents, annealed_sites
from pyrosc.plates import cells_plate
from pyrosc.train import train

# ------------------------------------------------------------------ real cell indices


def test_a_per_cell_parameter_reads_the_right_cells_across_shuffled_minibatches():
    # Cell i's genes are Poisson with rate r_i; the only parameter is log r, one per cell.
    rng = np.random.default_rng(0)
    n_cells, n_genes = 60, 40
    rates = rng.uniform(0.5, 20, size=n_cells)
    counts = rng.poisson(rates[:, None], size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1
    data = from_anndata(ad.AnnData(counts))

    def model(counts, cell_index, n_cells=None):
        log_rate = pyro.param("log_rate", torch.zeros(60))
        with cells_plate(cell_index, n_cells) as cells:
            rate = log_rate[cells].exp().unsqueeze(-1).expand(counts.shape)
            pyro.sample("counts", dist.Poisson(rate).to_event(1), obs=counts)

    def guide(counts, cell_index, n_cells=None):
        pass

    with pyro.get_param_store().scope():
        train(model, guide, data, max_epochs=150, batch_size=8, lr=0.05,
              validation_fraction=0, progress=False)  # fmt: skip
        fitted = pyro.param("log_rate").detach().numpy()
    maximum_likelihood = np.log(counts.mean(axis=1))
    np.testing.assert_allclose(fitted, maximum_likelihood, atol=0.05)


def test_minibatches_carry_dataset_positions_through_subsets():
    data = from_anndata(simulate_counts(n_cells=30, n_genes=8))
    part = data.subset(np.array([4, 9, 17, 25])).subset(np.array([3, 1]))
    np.testing.assert_array_equal(part.minibatch(np.array([0, 1]))["cell_index"], [25, 9])


# ------------------------------------------------------------------ data by name


def lean_guide(counts, cell_index, n_cells=None, *, encoder):
    """q(z | x), naming only the data it reads (no library, no batch)."""
    pyro.module("encoder", encoder)
    with cells_plate(cell_index, n_cells):
        loc, scale = encoder(torch.log1p(counts))
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_a_guide_that_names_only_its_own_data_trains_evaluates_and_simulates():
    data = from_anndata(simulate_counts(n_cells=60, n_genes=12))
    encoder, decoder = GaussianEncoder(12, 2, n_hidden=8), CountDecoder(2, 12, n_hidden=8)
    networks = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    model = partial(vae_model, decoder=decoder, likelihood="nb")
    guide = partial(lean_guide, encoder=encoder)
    with pyro.get_param_store().scope():
        result = train(model, guide, data, networks=networks, max_epochs=2, progress=False)
        elbo = evaluate.elbo(model, guide, data, networks=networks)
        log_lik = evaluate.log_likelihood(model, guide, data, 5, networks=networks)
        simulated = pyrosc.simulate(model, 7, data=data, networks=networks, seed=0)
        replicated = predictive.posterior_predictive(model, guide, data, 1, networks=networks)
    assert np.isfinite(result.history["train_elbo"]).all()
    assert elbo.shape == log_lik.shape == (60,) and log_lik.mean() > elbo.mean()
    assert simulated.shape == (7, 12) and replicated.shape == (60, 12)


# ------------------------------------------------------------------ KL warm-up


def _scales(model, guide, kwargs, weight):
    annealed = annealed_sites(model, kwargs)
    scale = ScaleLatents(weight, annealed)
    model, guide = scale(traces.bind_data(model)), scale(traces.bind_data(guide))
    guide_trace, model_trace = traces.trace_pair(model, guide, kwargs)
    sites = ("z", "library")
    return annealed, [{s: t.nodes[s]["scale"] for s in sites} for t in (guide_trace, model_trace)]


def test_kl_warmup_scales_z_and_not_the_latent_library():
    adata = simulate_counts(n_cells=40, n_genes=10)
    model = pyrosc.SCVI(adata, batch_key="batch", library="latent", n_latent=2, n_hidden=8)
    model.fit(max_epochs=1, progress=False, validation_fraction=0)
    with model._scope() as (pair_model, pair_guide, networks):
        kwargs = {**model.data.minibatch(np.arange(10)), "n_cells": None}
        annealed, scales = _scales(pair_model, pair_guide, kwargs, 0.25)
    assert annealed == {"z"}
    assert scales == [{"z": 0.25, "library": 1.0}] * 2


def test_the_gmvae_anneals_z_and_not_its_cluster():
    data = from_anndata(simulate_counts(n_cells=20, n_genes=6))
    decoder = CountDecoder(2, 6, n_hidden=4)
    model = partial(gmvae_model, decoder=decoder, component_locs_init=torch.randn(3, 2))
    kwargs = {**data.minibatch(np.arange(5)), "n_cells": None}
    assert annealed_sites(model, kwargs) == {"z"}


def test_warmup_without_a_marked_site_is_an_error():
    data = from_anndata(simulate_counts(n_cells=30, n_genes=6))
    encoder = GaussianEncoder(6, 2, n_hidden=4)

    def unmarked_model(counts, library, cell_index, n_cells=None):
        with cells_plate(cell_index, n_cells):
            z = pyro.sample("z", dist.Normal(counts.new_zeros(2), 1.0).to_event(1))
            rate = library.unsqueeze(-1) * torch.softmax(z @ counts.new_ones(2, 6), -1)
            pyro.sample("counts", dist.Poisson(rate).to_event(1), obs=counts)

    guide = partial(lean_guide, encoder=encoder)
    with pytest.raises(ValueError, match="marks no site for KL warm-up"):
        train(unmarked_model, guide, data, networks=encoder, kl_warmup_epochs=5, progress=False)


# ------------------------------------------------------------------ one split


def test_no_training_step_reads_a_validation_cell(monkeypatch):
    from sklearn.cluster import KMeans

    adata = simulate_counts(n_cells=120, n_genes=12)
    seen, kmeans_rows = [], []
    original_minibatch, original_kmeans = CountData.minibatch, KMeans.fit

    def recording_minibatch(self, index, device="cpu"):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            seen.append(self.cell_index[np.asarray(index)])
        return original_minibatch(self, index, device)

    def recording_kmeans(self, x, *args, **kwargs):
        kmeans_rows.append(len(x))
        return original_kmeans(self, x, *args, **kwargs)

    monkeypatch.setattr(CountData, "minibatch", recording_minibatch)
    monkeypatch.setattr(KMeans, "fit", recording_kmeans)
    model = pyrosc.GMVAE(adata, n_clusters=3, n_latent=2, n_hidden=8)
    model.fit(max_epochs=2, init_epochs=2, validation_fraction=0.25, progress=False)
    train_index, validation_index = model._split
    assert len(validation_index) == 30
    trained = np.unique(np.concatenate(seen))
    assert not np.intersect1d(trained, validation_index).size
    np.testing.assert_array_equal(model.train_result.validation_index, validation_index)
    assert kmeans_rows == [len(train_index)]


def test_the_scvi_library_prior_comes_from_the_training_cells_only():
    adata = simulate_counts(n_cells=100, n_genes=10)
    model = pyrosc.SCVI(adata, library="latent", n_latent=2, n_hidden=8)
    model.fit(max_epochs=1, validation_fraction=0.3, seed=3, progress=False)
    train_index, _ = model._split
    _, _, networks = model._pair
    log_library = np.log(model.data.library[train_index].astype(np.float64))
    assert float(networks["library_prior"].loc[0]) == pytest.approx(log_library.mean(), rel=1e-6)


# ------------------------------------------------------------------ training hygiene


def test_a_parameter_created_after_the_first_step_is_trained():
    data = from_anndata(simulate_counts(n_cells=40, n_genes=6))
    calls = []

    def model(counts, cell_index, n_cells=None):
        calls.append(1)
        loc = pyro.param("loc", torch.zeros(6))
        if len(calls) > 2:  # the trainer's probe traces once; step 1 is call 2
            loc = loc + pyro.param("late", torch.zeros(6))
        with cells_plate(cell_index, n_cells):
            pyro.sample("counts", dist.Normal(loc, 5.0).to_event(1), obs=counts)

    with pyro.get_param_store().scope():
        train(model, lambda **_: None, data, max_epochs=3, lr=0.1, validation_fraction=0,
              batch_size=10, progress=False)  # fmt: skip
        late = pyro.param("late").detach()
    assert late.abs().min() > 0.05


def test_early_stopping_restores_the_best_parameters_in_place(toy_adata):
    model = pyrosc.VAE(toy_adata, n_latent=2, n_hidden=8)
    model.fit(max_epochs=6, early_stopping=True, patience=2, progress=False)
    result = model.train_result
    best = result.history.loc[result.history["epoch"] == result.best_epoch, "validation_elbo"]
    with model._scope() as (pair_model, pair_guide, networks):
        _, validation_index = model._split
        pyro.set_rng_seed(0)
        again = evaluate.elbo(pair_model, pair_guide, model.data.subset(validation_index),
                              networks=networks)  # fmt: skip
    assert abs(again.mean() - float(best.iloc[0])) < 2.0  # one-draw ELBOs of the same fit


# ------------------------------------------------------------------ exact objectives


def _pair(kind: str, n_genes: int):
    decoder = CountDecoder(2, n_genes, n_hidden=8)
    encoder = GaussianEncoder(
        n_genes, 2, n_hidden=8, covariate_sizes=(3,) if kind == "scvae" else ()
    )
    networks = {"decoder": decoder, "encoder": encoder}
    if kind == "vae":
        return partial(vae_model, decoder=decoder), partial(vae_guide, encoder=encoder), networks
    model = partial(gmvae_model, decoder=decoder, component_locs_init=torch.randn(3, 2))
    if kind == "marginal":
        return model, partial(gmvae_marginal_guide, encoder=encoder), networks
    networks["classifier"] = classifier = Classifier(n_genes, 3, n_hidden=8)
    return model, partial(gmvae_scvae_guide, classifier=classifier, encoder=encoder), networks


@pytest.mark.parametrize("kind", ["vae", "marginal", "scvae"])
def test_per_cell_elbo_sums_to_the_trained_objective_on_the_same_draws(kind):
    data = from_anndata(simulate_counts(n_cells=12, n_genes=8))
    model, guide, networks = _pair(kind, 8)
    for network in networks.values():
        network.eval()
    minibatch = data.minibatch(np.arange(12))
    k = 7
    objective = TraceEnum_ELBO if kind != "vae" else Trace_ELBO
    loss = objective(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    kwargs = {**minibatch, "n_cells": None}
    # The same draws: the guide reseeds the generator each time it runs (same shapes both ways).
    seeded = poutine.seed(traces.bind_data(guide), rng_seed=5)
    with torch.no_grad():
        per_cell = evaluate.elbo_terms(traces.bind_data(model), seeded, minibatch, k)
        trained = -loss.loss(traces.bind_data(model), seeded, **kwargs)
    assert per_cell.shape == (k, 12)
    assert float(per_cell.mean(0).sum()) == pytest.approx(trained, rel=1e-5)
    if kind == "scvae":  # the stratified weight, which never involves q(y | x), is another bound
        with torch.no_grad():
            stratified = evaluate.log_importance_weights(
                traces.bind_data(model), seeded, minibatch, k
            )
        assert float(stratified.mean(0).sum()) != pytest.approx(trained, rel=1e-3)
