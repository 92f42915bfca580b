"""Opening scvi-tools models as pyrosc models, and writing pyrosc models for scvi-tools.

The truth is scvi-tools itself: three small SCVIs trained by scvi-tools 1.4.2 once
(``tests/fixtures/make_scvi_tools_fixtures.py``) are stored with scvi-tools' figures on their
cells (latent means, normalised expression, log p(x | z, l) and the ELBO at fixed draws of the
posterior, importance-sampled log p(x)). Opened in pyrosc, the same weights give the same
numbers, to 1e-5 relative. No test here needs scvi-tools, except the round trip through
scvi-tools' own ``SCVI.load``, skipped without it.
"""

from __future__ import annotations

import builtins

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures.scvi_tools_cells import FIXTURES, VARIANTS, fixture_cells
from pyro import poutine

import pyrosc
from pyrosc import SCVI, traces
from pyrosc.scvi_tools_file import read_model_file
from pyrosc.scvi_tools_settings import read_settings
from pyrosc.scvi_tools_weights import from_scvi

RTOL = 1e-5


@pytest.fixture(scope="module")
def cells():
    return fixture_cells()


@pytest.fixture(scope="module", params=list(VARIANTS))
def opened(request, cells):
    """(variant name, the opened model, scvi-tools' figures)."""
    expected = dict(np.load(FIXTURES / request.param / "expected.npz"))
    return request.param, SCVI.from_scvi_tools(FIXTURES / request.param, cells.copy()), expected


@pytest.fixture(scope="module")
def census_like(cells):
    return SCVI.from_scvi_tools(FIXTURES / "census_like", cells.copy())


def conditioned_terms(
    model: SCVI, z: np.ndarray, log_library: np.ndarray, index: np.ndarray | None = None
):
    """pyrosc's per-cell ``log p(x | z, l)`` and ``log p(x, z, l) - log q(z, l | x)`` of the
    model's cells at ``index`` (default: all) at the given draws ``(cells, n_latent)`` and
    ``(cells,)``: the guide traced and its draws replaced by them, the model replayed."""
    index = np.arange(model.data.n_cells) if index is None else index
    values = {"z": torch.from_numpy(z)}
    if model.config["library"] == "latent":
        values["library"] = torch.from_numpy(log_library).exp()
    with model._scope() as (pyro_model, guide, networks), traces.eval_mode(networks):
        data = {**model.data.minibatch(index), "n_cells": None}
        with torch.no_grad(), poutine.block():
            guide_trace = poutine.trace(guide).get_trace(**traces.data_kwargs(guide, data))
            for name, value in values.items():
                guide_trace.nodes[name]["value"] = value
            model_trace = poutine.trace(poutine.replay(pyro_model, trace=guide_trace)).get_trace(
                **traces.data_kwargs(pyro_model, data)
            )
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
    log_px = model_trace.nodes["counts"]["log_prob"]
    elbo = log_px.clone()
    for name in values:
        elbo += model_trace.nodes[name]["log_prob"] - guide_trace.nodes[name]["log_prob"]
    return log_px.double().numpy(), elbo.double().numpy()


# -- the same numbers --------------------------------------------------------------------------


def test_latent_means_are_scvi_tools_latent_representation(opened):
    _, model, expected = opened
    latent = model.latent()
    np.testing.assert_allclose(latent, expected["latent"], rtol=RTOL, atol=1e-6)
    assert np.abs(expected["latent"]).max() > 0.5  # a fitted latent, not zeros


def test_normalized_expression_at_the_posterior_mean_is_scvi_tools(opened):
    _, model, expected = opened
    index = expected["expression_cells"]
    with model._scope() as (pyro_model, guide, networks), traces.eval_mode(networks):
        minibatch = model.data.minibatch(index)
        with torch.no_grad():
            _, model_trace, _ = traces.enumerated_traces(
                pyro_model, guide, minibatch, 1, at_mean=True
            )
    proportions = model_trace.nodes["proportions"]["value"][0].numpy()
    np.testing.assert_allclose(proportions, expected["normalized"], rtol=RTOL, atol=1e-9)


def test_log_likelihood_and_elbo_at_fixed_draws_are_scvi_tools(opened):
    _, model, expected = opened
    index = np.arange(0, model.data.n_cells, 3)  # 100 cells of every batch
    for k in range(expected["z_draws"].shape[0]):
        z, log_library = expected["z_draws"][k][index], expected["log_library_draws"][k][index]
        log_px, elbo = conditioned_terms(model, z, log_library, index)
        np.testing.assert_allclose(log_px, expected["log_px"][k][index], rtol=RTOL)
        np.testing.assert_allclose(elbo, expected["elbo"][k][index], rtol=RTOL)


def test_importance_sampled_log_likelihood_agrees_within_monte_carlo_error(census_like, cells):
    # A latent library, the harder case: two latents to sample.
    expected = dict(np.load(FIXTURES / "census_like" / "expected.npz"))
    subset = cells[expected["expression_cells"]].copy()
    ours = census_like.log_likelihood(subset, n_samples=1000)
    # The same weights, so each cell's difference is the Monte Carlo error of the two
    # estimates (K = 1,000 each, independent draws): their mean is within a few standard errors
    # of zero.
    difference = ours - expected["marginal_ll"]
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    assert abs(difference.mean()) < 4 * standard_error
    assert standard_error < 1.0  # and the estimates are not so noisy that this says nothing


def test_codes_follow_scvi_tools_categories(opened):
    name, model, _ = opened
    batches = model.data.covariate_categories["batch"]
    assert batches == sorted(batches, reverse=True)  # as set up in scvi-tools, not sorted
    setup, settings = VARIANTS[name]
    assert list(model.data.covariate_categories) == [
        "batch",
        *setup.get("categorical_covariate_keys", []),
    ]
    assert model.config["n_layers"] == settings["n_layers"]


# -- everything works on an opened model -----------------------------------------------------


def test_opened_model_answers_every_question(census_like):
    model = census_like
    cf = model.counterfactual(batch=model.data.covariate_categories["batch"][0], seed=0)
    assert cf.shape == (model.data.n_cells, model.data.n_genes)
    check = model.predictive_check(n_samples=3)
    assert set(check.summary.index) >= {"mean", "library_size"}
    expression = model.normalized_expression(transform_batch="sc_celseq2", library_size=1e4)
    assert np.allclose(expression.sum(axis=1), 1e4, rtol=1e-3)
    de = model.differential_expression("cell_type", "H1975", "A549", n_samples=20)
    assert len(de) == model.data.n_genes and de["lfc_mean"].abs().max() > 0.1


def test_opened_model_saves_and_loads_in_pyrosc_format(census_like, cells, tmp_path):
    census_like.save(tmp_path / "model")
    loaded = SCVI.load(tmp_path / "model", cells.copy())
    np.testing.assert_array_equal(loaded.latent(), census_like.latent())
    assert loaded.config == census_like.config


def test_query_maps_onto_an_opened_reference_and_takes_its_labels(census_like, cells, monkeypatch):
    monkeypatch.setenv("PYROSC_COMPILE", "0")  # two tiny epochs: compiling would cost more
    query = cells[cells.obs["batch"] == "sc_celseq2_5cl_p2"].copy()
    query.obs_names = [f"query{i}" for i in range(query.n_obs)]
    query.obs["batch"] = "new run"
    mapped = SCVI.load_query_data(query, census_like)
    mapped.fit(max_epochs=2, batch_size=32, validation_fraction=0, progress=False)
    labels = pyrosc.transfer_labels(census_like, mapped, "cell_type")
    agreement = (labels["cell_type_pred"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert agreement > 0.8  # the reference's latent separates the cell lines


def test_scanvi_starts_from_an_opened_scvi(census_like):
    with pytest.warns(UserWarning, match="every cell is taken as labelled"):
        scanvi = pyrosc.SCANVI.from_scvi(census_like, "cell_type", "Unknown")
    assert scanvi.config["layer_norm"] == "both" and scanvi.config["batch_norm"] == "none"
    _, _, networks = scanvi._build()
    with census_like._scope() as (_, _, reference):
        for name in ("encoder", "decoder", "library_encoder"):
            for key, value in reference[name].state_dict().items():
                torch.testing.assert_close(networks[name].state_dict()[key], value)


# -- pyrosc -> scvi-tools ----------------------------------------------------------------------


def test_written_model_opens_again_with_the_same_numbers(opened, tmp_path, cells):
    _, model, expected = opened
    model.to_scvi_tools(tmp_path / "scvi")
    again = SCVI.from_scvi_tools(tmp_path / "scvi", cells.copy())
    np.testing.assert_allclose(again.latent(), expected["latent"], rtol=RTOL, atol=1e-6)
    log_px, _ = conditioned_terms(again, expected["z_draws"][0], expected["log_library_draws"][0])
    np.testing.assert_allclose(log_px, expected["log_px"][0], rtol=RTOL)


@pytest.mark.parametrize(
    "options",
    [
        {"likelihood": "poisson"},  # no batch_key: scvi-tools' single batch, no input column
        {"likelihood": "nb", "dispersion": "gene-cell", "library": "latent", "batch_key": "site"},
    ],
)
def test_pyrosc_fits_round_trip_through_the_scvi_tools_format(
    options, cells, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    fitted = SCVI(cells.copy(), n_latent=3, n_hidden=8, **options).fit(
        max_epochs=1, batch_size=64, validation_fraction=0, progress=False
    )
    fitted.to_scvi_tools(tmp_path / "scvi")
    again = SCVI.from_scvi_tools(tmp_path / "scvi", cells.copy())
    np.testing.assert_allclose(again.latent(), fitted.latent(), rtol=RTOL, atol=1e-6)
    z = fitted.latent()[None]
    log_library = np.log(fitted.data.library)[None]
    expected = conditioned_terms(fitted, z[0], log_library[0])
    found = conditioned_terms(again, z[0], log_library[0])
    np.testing.assert_allclose(found, expected, rtol=RTOL)


def test_a_likelihood_scvi_tools_lacks_is_not_written(cells, tmp_path):
    fitted = SCVI(cells.copy(), likelihood="zip", n_latent=2, n_hidden=8).fit(
        max_epochs=1, validation_fraction=0, progress=False
    )
    with pytest.raises(ValueError, match="no likelihood 'zip'"):
        fitted.to_scvi_tools(tmp_path / "scvi")


@pytest.mark.slow  # importing scvi-tools alone takes seconds
@pytest.mark.parametrize(
    "options",
    [
        {"likelihood": "poisson"},
        {"likelihood": "nb", "dispersion": "gene-cell", "library": "latent", "batch_key": "site"},
        {
            "likelihood": "zinb",
            "dispersion": "gene-batch",
            "batch_key": "batch",
            "categorical_covariate_keys": ["technology", "site"],
            "continuous_covariate_keys": ["log_depth"],
            "layer": "counts",
            "encode_covariates": True,
            "n_layers": 2,
            "batch_norm": "decoder",
            "layer_norm": "both",
            "deeply_inject_covariates": False,
        },
    ],
)
def test_scvi_tools_loads_a_written_model(options, cells, tmp_path, monkeypatch):
    scvi = pytest.importorskip("scvi")
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    adata = cells.copy()
    adata.layers["counts"] = adata.X.copy()
    model = SCVI(adata, n_latent=3, n_hidden=8, **options).fit(
        max_epochs=3, batch_size=64, validation_fraction=0, progress=False
    )
    model.to_scvi_tools(tmp_path / "scvi")
    theirs = adata.copy()
    loaded = scvi.model.SCVI.load(str(tmp_path / "scvi"), theirs)
    np.testing.assert_allclose(
        loaded.get_latent_representation(theirs), model.latent(), rtol=RTOL, atol=1e-6
    )
    # Per cell: scvi-tools' return_mean=True averages its minibatches' means.
    their_ll = loaded.get_marginal_ll(theirs, n_mc_samples=200, return_mean=False).numpy()
    difference = model.log_likelihood(n_samples=200) - their_ll
    assert abs(difference.mean()) < 4 * difference.std(ddof=1) / np.sqrt(len(difference))


# -- refusals ----------------------------------------------------------------------------------


class WritesAFile:
    """Unpickled, it would run ``exec`` and write ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_a_model_file_with_an_arbitrary_object_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran.txt"
    saved = {"model_state_dict": {}, "var_names": np.array(["a"]), "attr_dict": WritesAFile(marker)}
    torch.save(saved, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="exec.*will not unpickle"):
        SCVI.from_scvi_tools(tmp_path, fixture_cells())
    assert not marker.exists()


def test_a_directory_without_a_model_file_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.save"):
        SCVI.from_scvi_tools(tmp_path, fixture_cells())


def test_the_training_history_is_read_as_inert_stand_ins():
    saved = read_model_file(FIXTURES / "one_layer")
    history = saved["attr_dict"]["history_"]
    assert history and all(type(v).__name__ == "Omitted" for v in history.values())


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("latent_distribution", "ln", "latent_distribution='ln'"),
        ("dispersion", "gene-label", "dispersion='gene-label'"),
        ("batch_representation", "embedding", "batch_representation='embedding'"),
        ("log_variational", False, "log_variational=False"),
        ("gene_likelihood", "normal", "gene_likelihood='normal'"),
        ("extra_decoder_kwargs", {"bias": False}, "extra_decoder_kwargs"),
        ("made_up_setting", 1, "made_up_setting"),
    ],
)
def test_settings_pyrosc_cannot_represent_are_named(setting, value, message):
    attr_dict = read_model_file(FIXTURES / "one_layer")["attr_dict"]
    attr_dict["init_params_"]["kwargs"]["kwargs"][setting] = value
    with pytest.raises(ValueError, match=message):
        read_settings(attr_dict)


def test_another_scvi_tools_model_class_is_refused():
    attr_dict = read_model_file(FIXTURES / "one_layer")["attr_dict"]
    attr_dict["registry_"]["model_name"] = "SCANVI"
    with pytest.raises(ValueError, match="scvi-tools SCANVI"):
        read_settings(attr_dict)


def test_opening_leaves_the_users_anndata_as_it_was(cells):
    adata, before = cells.copy(), cells.copy()
    SCVI.from_scvi_tools(FIXTURES / "encoded_covariates", adata)
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert (adata.X != before.X).nnz == 0
    assert list(adata.layers) == list(before.layers) and list(adata.obsm) == list(before.obsm)


def test_tensors_that_disagree_with_the_settings_are_named(cells):
    saved = read_model_file(FIXTURES / "one_layer")
    settings = read_settings(saved["attr_dict"])
    model = SCVI(cells, **settings.config)
    model.data = model._validated(cells, None, settings.categories)
    networks = model._networks()
    state = dict(saved["model_state_dict"])
    from_scvi(state, networks, settings.config)  # as saved: fine
    missing = {k: v for k, v in state.items() if k != "z_encoder.mean_encoder.bias"}
    with pytest.raises(ValueError, match="no tensor 'z_encoder.mean_encoder.bias'"):
        from_scvi(missing, networks, settings.config)
    with pytest.raises(ValueError, match="no place for: \\['decoder.extra'\\]"):
        from_scvi({**state, "decoder.extra": torch.zeros(1)}, networks, settings.config)
    narrow = {**state, "px_r": torch.zeros(199)}
    with pytest.raises(ValueError, match="inverse dispersion of shape \\(199,\\)"):
        from_scvi(narrow, networks, settings.config)


def test_genes_of_adata_must_be_the_saved_ones(cells):
    with pytest.raises(ValueError, match="another order"):
        SCVI.from_scvi_tools(FIXTURES / "one_layer", cells[:, ::-1].copy())
    with pytest.raises(ValueError, match="1 of them missing"):
        SCVI.from_scvi_tools(FIXTURES / "one_layer", cells[:, 1:].copy())


def test_a_batch_the_model_never_saw_is_an_error(cells):
    adata = cells.copy()
    adata.obs["batch"] = pd.Categorical(["unseen"] * adata.n_obs)
    with pytest.raises(ValueError, match="unseen"):
        SCVI.from_scvi_tools(FIXTURES / "one_layer", adata)


def test_only_scvi_opens(cells):
    with pytest.raises(TypeError, match="SCANVI.from_scvi"):
        pyrosc.SCANVI.from_scvi_tools(FIXTURES / "one_layer", cells)
