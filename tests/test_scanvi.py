"""scANVI: the enumerated ELBO of unlabelled cells against the q(y | z1)-weighted sum of their
labelled ELBOs, the per-cell ELBO and log-likelihood against Pyro on a minibatch that mixes
labelled and unlabelled cells, hidden labels predicted on simulated types, persistence, and
bad input."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pyro
import pytest
import torch
from conftest import QUICK, simulate_counts
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.util import site_is_subsample
from scipy.special import logsumexp
from torch import nn

import pyrosc
from pyrosc import evaluate
from pyrosc.data import from_anndata
from pyrosc.guides import scanvi_guide
from pyrosc.models import scanvi_model
from pyrosc.models.scvi import LibraryPrior
from pyrosc.nets import Classifier, GaussianEncoder, ScviDecoder
from pyrosc.objective import annealed_sites
from pyrosc.traces import bind_data, vectorize

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny networks: one thread is faster

K, LATENT, CELLS, GENES = 3, 2, 6, 5
MIXED = torch.tensor([0, -1, 2, -1, 1, -1])  # labelled and unlabelled cells in one minibatch


def tiny_pair(classification_weight: float = 0.0):
    """A tiny scANVI (ZINB, gene-batch dispersion, latent library) with fixed random networks
    in evaluation mode."""
    torch.manual_seed(0)
    networks = nn.ModuleDict(
        {
            "decoder": ScviDecoder(LATENT, GENES, n_hidden=8, covariate_sizes=(2,), gate=True),
            "z1_prior": GaussianEncoder(LATENT, LATENT, n_hidden=8, covariate_sizes=(K,)),
            "encoder": GaussianEncoder(GENES, LATENT, n_hidden=8),
            "library_encoder": GaussianEncoder(GENES, 1, n_hidden=8),
            "classifier": Classifier(LATENT, K, n_hidden=8),
            "z2_encoder": GaussianEncoder(LATENT, LATENT, n_hidden=8, covariate_sizes=(K,)),
        }
    ).eval()
    model = partial(
        scanvi_model,
        decoder=networks["decoder"],
        z1_prior=networks["z1_prior"],
        n_labels=K,
        library_prior=LibraryPrior(torch.tensor([5.0, 6.0]), torch.tensor([0.5, 0.3])),
        likelihood="zinb",
        dispersion="gene-batch",
        n_batches=2,
    )
    guide = partial(
        scanvi_guide,
        encoder=networks["encoder"],
        classifier=networks["classifier"],
        z2_encoder=networks["z2_encoder"],
        library_encoder=networks["library_encoder"],
        classification_weight=classification_weight,
    )
    return bind_data(model), bind_data(guide), networks


@pytest.fixture
def data():
    adata = simulate_counts(n_cells=CELLS, n_genes=GENES, seed=3)
    return from_anndata(adata, batch_key="batch")


def _terms_at_each_type(model, guide, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p - log q`` summed over the sites, per enumerated type and cell, ``(K, cells)``;
    and the draws of ``z1``."""
    guide_trace = poutine.trace(poutine.enum(guide, first_available_dim=-2)).get_trace(**kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**kwargs)
    total = torch.zeros(K, CELLS)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                total = total + sign * site["fn"].log_prob(site["value"])
    return total, guide_trace.nodes["z1"]["value"]


def test_an_unlabelled_cell_sums_its_labelled_elbos_over_q_y_given_z1(data):
    model, guide, networks = tiny_pair()
    seeded = poutine.seed(guide, rng_seed=5)  # the same draws on every run
    kwargs = {**data.minibatch(np.arange(CELLS)), "n_cells": None}
    with torch.no_grad():
        unlabelled = torch.full((CELLS,), -1)
        elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(
            model, seeded, **kwargs | {"label": unlabelled}
        )
        labelled = []  # the ELBO of each cell labelled k, at the draws of y = k
        for k in range(K):
            terms, z1 = _terms_at_each_type(
                model, seeded, kwargs | {"label": torch.full((CELLS,), k)}
            )
            labelled.append(terms[k])
        log_q = networks["classifier"](z1).log_softmax(-1).T  # (K, cells)
    expected = (log_q.exp() * (torch.stack(labelled) - log_q)).sum()
    assert elbo == pytest.approx(float(expected), rel=1e-5)


def test_per_cell_elbo_is_the_trained_objective_less_the_classification_term(data):
    alpha, particles = 3.0, 4
    model, guide, networks = tiny_pair(classification_weight=alpha)
    seeded = poutine.seed(guide, rng_seed=5)
    minibatch = data.minibatch(np.arange(CELLS)) | {"label": MIXED}
    loss = TraceEnum_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        per_cell = evaluate.elbo_terms(model, seeded, minibatch, particles)
        objective = -loss.loss(model, seeded, **minibatch, n_cells=None)
        guide_trace = poutine.trace(vectorize(seeded, particles, 1)).get_trace(**minibatch)
        log_q = networks["classifier"](guide_trace.nodes["z1"]["value"]).log_softmax(-1)
        labelled = MIXED >= 0
        log_q_label = log_q[:, labelled, :].gather(
            -1, MIXED[labelled].view(1, -1, 1).expand(particles, -1, 1)
        )
    classification = alpha * log_q_label.sum() / particles
    assert torch.isfinite(per_cell).all() and per_cell.shape == (particles, CELLS)
    assert float(per_cell.mean(0).sum()) + float(classification) == pytest.approx(
        objective, rel=1e-5
    )


def test_the_likelihood_of_the_labels_sums_to_that_of_the_counts(data):
    """log p(x) = logsumexp_k log p(x, y = k), exactly on the same draws: the importance
    weights keep a labelled cell's type alone, and sum an unlabelled cell's out."""
    model, guide, networks = tiny_pair(classification_weight=5.0)  # left out of the scores
    scores = []
    for code in [*range(K), -1]:
        labelled = dataclasses.replace(data, label=np.full(CELLS, code))
        torch.manual_seed(1)
        scores.append(evaluate.log_likelihood(model, guide, labelled, 50, networks=networks))
    np.testing.assert_allclose(logsumexp(np.stack(scores[:K]), axis=0), scores[K], rtol=1e-5)
    elbo = evaluate.elbo(model, guide, dataclasses.replace(data, label=MIXED.numpy()), 50)
    assert np.isfinite(elbo).all()


def test_the_whole_latent_hierarchy_is_warmed_up_not_the_library(data):
    model, _, _ = tiny_pair()
    kwargs = data.minibatch(np.arange(CELLS)) | {"label": MIXED, "n_cells": None}
    assert annealed_sites(model, kwargs) == {"y", "z2", "z1"}


# ------------------------------------------------------------------ the notebook class


@pytest.fixture(scope="module")
def annotated():
    """Three well-separated types in two batches, 20 % of the labels hidden ("Unknown")."""
    adata = simulate_counts(n_cells=400, n_genes=40, n_types=3, seed=1)
    hidden = np.random.default_rng(0).random(adata.n_obs) < 0.2
    truth = adata.obs["cell_type"].astype(str)
    adata.obs["annotation"] = truth.where(~hidden, "Unknown")
    return adata, hidden, truth.to_numpy()


def _hidden_accuracy(model, hidden, truth) -> float:
    return float((model.predict()[hidden] == truth[hidden]).mean())


def test_predicts_the_hidden_labels(annotated):
    adata, hidden, truth = annotated
    model = pyrosc.SCANVI(
        adata, "annotation", "Unknown", batch_key="batch", n_latent=4, n_hidden=32
    )
    model.fit(progress=False, **QUICK | {"max_epochs": 15})
    assert model.train_result.elbo_name == "TraceEnum_ELBO"
    assert _hidden_accuracy(model, hidden, truth) >= 0.9
    probs = model.predict(soft=True)
    assert list(probs.columns) == ["type0", "type1", "type2"] and probs.shape == (400, 3)
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, rtol=1e-6)
    assert model.latent().shape == (400, 4) and adata.obsm["X_pyrosc"].shape == (400, 4)


def test_from_scvi_starts_from_its_networks_and_dispersion(annotated):
    adata, hidden, truth = annotated
    scvi = pyrosc.SCVI(adata, batch_key="batch", likelihood="nb", n_latent=4, n_hidden=32)
    scvi.fit(progress=False, **QUICK | {"max_epochs": 10})
    model = pyrosc.SCANVI.from_scvi(scvi, "annotation", "Unknown")
    assert model.config["likelihood"] == "nb" and model.config["batch_key"] == "batch"
    start, _, networks = model._build()
    with scvi._scope() as (_, _, scvi_networks):
        for name in ("encoder", "decoder"):
            for key, value in scvi_networks[name].state_dict().items():
                torch.testing.assert_close(networks[name].state_dict()[key], value)
        theta = pyro.param("inverse_dispersion").detach()
    torch.testing.assert_close(start.keywords["inverse_dispersion_init"], theta)
    model.fit(progress=False, **QUICK | {"max_epochs": 3})
    assert _hidden_accuracy(model, hidden, truth) >= 0.9


def test_save_load_keeps_predictions_and_answers_the_predictive_questions(annotated, tmp_path):
    adata, _, _ = annotated
    model = pyrosc.SCANVI(adata, "annotation", "Unknown", library="latent", n_latent=2, n_hidden=8)
    model.fit(max_epochs=2, progress=False)
    probs = model.predict(soft=True)
    model.save(tmp_path / "s")
    loaded = pyrosc.SCANVI.load(tmp_path / "s", adata.copy())
    np.testing.assert_allclose(loaded.predict(soft=True), probs, rtol=1e-6)
    np.testing.assert_allclose(loaded.latent(), model.latent(), rtol=1e-6)
    new_cells = adata[:5].copy()
    del new_cells.obs["annotation"]  # new cells need no labels
    assert loaded.predict(new_cells).shape == (5,)
    simulated = loaded.simulate(7, seed=0)
    assert set(simulated.obs["y"]) <= {0, 1, 2} and simulated.obsm["z1"].shape == (7, 2)
    replicated = loaded.posterior_predictive(n_samples=1)
    labelled = (adata.obs["annotation"] != "Unknown").to_numpy()
    codes = adata.obs["annotation"][labelled].map({"type0": 0, "type1": 1, "type2": 2})
    np.testing.assert_array_equal(replicated.obs["y"].to_numpy()[labelled], codes.to_numpy())
    assert loaded.normalized_expression().shape == (400, 40)
    assert (
        np.isfinite(loaded.elbo()).all() and np.isfinite(loaded.log_likelihood(n_samples=5)).all()
    )


def test_bad_input_is_named(annotated, toy_adata):
    adata, _, _ = annotated
    with pytest.raises(ValueError, match="labels_key 'kind' is not a column"):
        pyrosc.SCANVI(adata, "kind", "Unknown")
    with pytest.warns(UserWarning, match="'unknown' does not occur .* every cell is taken as"):
        misspelt = pyrosc.SCANVI(adata, "annotation", "unknown")
    assert "Unknown" in misspelt.label_categories  # the warning says why
    with pytest.raises(ValueError, match="no cell of obs\\['cell_type'\\] is labelled"):
        pyrosc.SCANVI(toy_adata[toy_adata.obs["cell_type"] == "type0"].copy(), "cell_type", "type0")
    one_type = toy_adata[toy_adata.obs["cell_type"] != "type2"].copy()
    with pytest.raises(ValueError, match="has one cell type"):
        pyrosc.SCANVI(one_type, "cell_type", "type1")
    with pytest.raises(ValueError, match="classification_ratio must be a number >= 0"):
        pyrosc.SCANVI(adata, "annotation", "Unknown", classification_ratio=-1)
    with pytest.raises(ValueError, match="every label"):
        pyrosc.SCANVI(adata, "annotation", "Unknown", label_categories=["type0", "type1"])
    with pytest.raises(ValueError, match="dispersion='gene' does not apply"):
        pyrosc.SCANVI(adata, "annotation", "Unknown", likelihood="poisson", dispersion="gene")
    with pytest.raises(ValueError, match="from_scvi starts from a fitted SCVI, got a VAE"):
        pyrosc.SCANVI.from_scvi(pyrosc.VAE(adata), "annotation", "Unknown")
    with pytest.raises(RuntimeError, match="not fitted"):
        pyrosc.SCANVI.from_scvi(pyrosc.SCVI(adata), "annotation", "Unknown")


def test_only_a_labelled_model_adds_label_codes_to_the_minibatch(annotated):
    adata, hidden, _ = annotated
    assert "label" not in from_anndata(adata).minibatch(np.arange(3))
    codes = pyrosc.SCANVI(adata, "annotation", "Unknown").data.minibatch(np.arange(400))["label"]
    assert (codes.numpy() == -1).tolist() == hidden.tolist()
