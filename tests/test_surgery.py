"""Reference mapping: a query fit keeps every reference weight to the bit and trains the new
categories; genes matched by name; options; save and load; a pair written outside the package;
bad input."""

from __future__ import annotations

import copy
import json
import warnings
from functools import partial

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import simulate_counts
from torch import Tensor, nn

import pyrosc
from pyrosc import SCVI, surgery
from pyrosc.data import from_anndata
from pyrosc.nets import MLP, CountDecoder, GaussianEncoder, LayerStyle
from pyrosc.plates import cells_plate
from pyrosc.train import free_parameter_names, train

TINY = {"n_latent": 2, "n_hidden": 8}
FIT = {"max_epochs": 3, "batch_size": 32, "lr": 1e-2, "validation_fraction": 0, "progress": False}
FIRST_DECODER_LAYER = "decoder.expression.body.linears.0.weight"


def reference_and_query(n_query: int = 60) -> tuple[ad.AnnData, ad.AnnData]:
    """Reference cells of batches a and b; query cells of the shared batch b and a new one, c."""
    reference = simulate_counts(n_cells=120, n_genes=12, seed=0)
    query = simulate_counts(n_cells=n_query, n_genes=12, seed=1)
    query.obs_names = [f"query{i}" for i in range(n_query)]
    query.obs["batch"] = pd.Categorical(np.where(np.arange(n_query) % 3 == 0, "b", "c"))
    return reference, query


def fitted_reference(adata: ad.AnnData, **options) -> SCVI:
    options = {"likelihood": "nb", "encode_covariates": True, **options}
    return SCVI(adata, batch_key="batch", **TINY, **options).fit(**FIT)


def weights(model: SCVI) -> dict[str, Tensor]:
    """Copies of every tensor of a model: network parameters and buffers, free parameters."""
    with model._scope() as (_, _, networks):
        store = pyro.get_param_store()
        free = {name: store[name].detach().clone() for name in free_parameter_names(networks)}
    return {**{k: v.detach().clone() for k, v in networks.state_dict().items()}, **free}


def reference_part(value: Tensor, shape: torch.Size) -> Tensor:
    """The leading ``shape`` block of an extended tensor: with the batch as the only covariate,
    the reference's columns and rows come first, the new batch's last."""
    return value[tuple(slice(0, n) for n in shape)]


def assert_reference_kept(after: dict[str, Tensor], before: dict[str, Tensor], skip=()) -> None:
    for name, value in before.items():
        if not name.startswith(tuple(skip)):
            assert torch.equal(reference_part(after[name], value.shape), value), name


# -- a query fit: the reference to the bit, the new categories trained ---------------------------


@pytest.mark.parametrize(
    ("dispersion", "library"),
    [("gene", "observed"), ("gene-batch", "observed"), ("gene", "latent")],
)
def test_a_query_fit_keeps_every_reference_weight_to_the_bit(dispersion, library):
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata, dispersion=dispersion, library=library)
    before = weights(reference)
    latent = reference.latent()
    query = SCVI.load_query_data(query_adata, reference)
    start = weights(query)
    query.fit(**FIT)
    after = weights(query)

    assert_reference_kept(after, before)
    assert query.data.covariate_categories["batch"] == ["a", "b", "c"]
    for name in (FIRST_DECODER_LAYER, "encoder.body.linears.0.weight"):
        assert after[name].shape[1] == before[name].shape[1] + 1
        assert not torch.equal(after[name][:, -1], start[name][:, -1])  # the new batch's column
    if dispersion == "gene-batch":
        assert after["inverse_dispersion"].shape == (3, 12)
        assert not torch.equal(after["inverse_dispersion"][2], start["inverse_dispersion"][2])
    if library == "latent":
        in_c = (query_adata.obs["batch"] == "c").to_numpy()
        log_library = np.log(np.asarray(query_adata.X.sum(axis=1)).ravel()[in_c])
        loc = after["library_prior.loc"][2].item()
        assert loc == pytest.approx(log_library.mean(), rel=1e-5)
    # The reference itself is untouched.
    assert_reference_kept(weights(reference), before)
    np.testing.assert_array_equal(reference.latent(), latent)
    with reference._scope() as (_, _, networks):
        assert networks["decoder"].expression.body.covariate_sizes == (2,)


def test_reference_cells_mapped_as_a_query_keep_their_latent():
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata)
    expected = reference.latent()[:40]
    again = reference_adata[:40].copy()
    again.obs_names = [f"again{i}" for i in range(40)]
    query = SCVI.load_query_data(ad.concat([again, query_adata]), reference).fit(**FIT)
    np.testing.assert_allclose(query.latent()[:40], expected, rtol=1e-5, atol=1e-5)


def test_a_query_fit_trains_on_the_query_cells_and_writes_to_the_users_anndata():
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata)
    untouched = query_adata.copy()
    query = SCVI.load_query_data(query_adata, reference)
    query.fit(**{**FIT, "validation_fraction": 0.2})
    assert len(query.train_result.train_index) == 48  # 80% of the 60 query cells
    latent = query.latent()
    assert query.adata is query_adata
    np.testing.assert_array_equal(query_adata.obsm["X_pyrosc"], latent)
    assert set(query_adata.obsm) == {"X_pyrosc"} and not query_adata.layers
    np.testing.assert_array_equal(query_adata.X.toarray(), untouched.X.toarray())
    assert query_adata.obs.equals(untouched.obs) and query_adata.var.equals(untouched.var)


# -- genes matched by name -----------------------------------------------------------------------


def test_permuted_query_genes_give_the_same_latent():
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata)
    expected = SCVI.load_query_data(query_adata, reference).fit(**FIT).latent()
    permuted = query_adata[:, ::-1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same genes: nothing to warn about
        query = SCVI.load_query_data(permuted, reference)
    np.testing.assert_allclose(query.fit(**FIT).latent(), expected, rtol=1e-6)


def test_missing_genes_are_zeros_with_a_warning_and_too_few_are_an_error():
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata)
    fewer = query_adata[:, 3:].copy()
    fewer.var_names = [*fewer.var_names[:-1], "other0"]  # one gene the reference lacks
    with pytest.warns(UserWarning) as record:
        query = SCVI.load_query_data(fewer, reference)
    (message,) = [str(w.message) for w in record if "genes" in str(w.message)]
    assert "4 of the model's 12 genes are missing" in message and "'gene0'" in message
    assert "1 genes of the new data that the model lacks are dropped (e.g. 'other0')" in message
    assert list(query.data.var_names) == list(reference.data.var_names)
    assert query.data.counts[:, [0, 1, 2, 11]].sum() == 0
    with pytest.raises(ValueError, match="only 5 of the model's 12 genes are among the 5 genes"):
        SCVI.load_query_data(query_adata[:, 7:].copy(), reference)


# -- options -------------------------------------------------------------------------------------


def test_unfrozen_trains_the_reference_weights_too():
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata)
    before = weights(reference)
    after = weights(SCVI.load_query_data(query_adata, reference, unfrozen=True).fit(**FIT))
    for name in (
        "decoder.expression.proportion_logits.weight",
        "decoder.expression.body.norms.0.running_mean",
        "encoder.loc.weight",
    ):
        assert not torch.equal(after[name], before[name]), name


def test_train_encoder_batchnorm_moves_only_the_encoders_batchnorm():
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata)
    before = weights(reference)
    query = SCVI.load_query_data(query_adata, reference, train_encoder_batchnorm=True)
    after = weights(query.fit(**FIT))
    assert_reference_kept(after, before, skip=["encoder.body.norms."])
    for name in ("weight", "bias", "running_mean", "running_var"):
        name = f"encoder.body.norms.0.{name}"
        assert not torch.equal(after[name], before[name]), name


# -- save and load -------------------------------------------------------------------------------


def test_a_query_round_trips_through_save_and_load(tmp_path):
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata, dispersion="gene-batch")
    query = SCVI.load_query_data(query_adata, reference).fit(**FIT)
    query.save(tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["query"] == {
        "reference_sizes": {"batch": 2},
        "train_encoder_batchnorm": False,
        "unfrozen": False,
    }
    assert set(torch.load(tmp_path / "q" / "model.pt", weights_only=True)) == {"networks", "params"}
    loaded = SCVI.load(tmp_path / "q", query_adata[:, ::-1].copy())
    assert loaded.is_query
    np.testing.assert_array_equal(loaded.latent(), query.latent())
    masks, loaded_masks = query._query.frozen.masks, loaded._query.frozen.masks
    assert masks.keys() == loaded_masks.keys()
    assert all(torch.equal(masks[name], loaded_masks[name]) for name in masks)
    assert loaded._query.frozen.eval_modules == query._query.frozen.eval_modules
    # Refitting the loaded query still keeps the reference to the bit.
    assert_reference_kept(weights(loaded.fit(**FIT)), weights(reference))


def test_a_loaded_reference_maps_a_query_as_the_fitted_one(tmp_path):
    reference_adata, query_adata = reference_and_query()
    reference = fitted_reference(reference_adata, library="latent")
    reference.save(tmp_path / "r")
    loaded = SCVI.load(tmp_path / "r", reference_adata.copy())
    expected = SCVI.load_query_data(query_adata, reference).fit(**FIT).latent()
    query = SCVI.load_query_data(query_adata.copy(), loaded).fit(**FIT)
    np.testing.assert_allclose(query.latent(), expected, rtol=1e-5, atol=1e-6)


# -- the surgery on networks and on a pair written outside the package ---------------------------


def test_widened_networks_compute_the_reference_categories_as_before():
    torch.manual_seed(0)
    mlp = MLP(5, 6, n_layers=2, covariate_sizes=(2, 3)).eval()
    wide = copy.deepcopy(mlp)
    surgery.add_categories(wide, reference_sizes=[2, 3], added=[1, 2])
    assert wide.covariate_sizes == (3, 5)
    x = torch.randn(10, 5)
    codes = torch.stack([torch.randint(2, (10,)), torch.randint(3, (10,))], dim=-1)
    torch.testing.assert_close(wide(x, codes), mlp(x, codes))
    masks = surgery.reference_masks(wide, [2, 3])
    for j, n_features in enumerate((5, 6)):
        new_columns = torch.nonzero(~masks[f"linears.{j}.weight"].all(dim=0)).ravel()
        # after the batch's 2 reference columns; after the donor's 3
        expected = [n_features + 2, n_features + 3 + 3, n_features + 3 + 4]
        assert new_columns.tolist() == expected
        # a new category starts as the mean of its covariate's reference columns
        batch_columns = mlp.linears[j].weight[:, n_features : n_features + 2]
        new_column = wide.linears[j].weight[:, n_features + 2]
        torch.testing.assert_close(new_column, batch_columns.mean(dim=1))


def test_only_layers_that_read_covariates_are_widened():
    torch.manual_seed(0)
    style = LayerStyle(batch_norm=False, layer_norm=True, covariates_every_layer=False)
    mlp = MLP(5, 6, n_layers=2, covariate_sizes=(2,), style=style).eval()
    wide = copy.deepcopy(mlp)
    surgery.add_categories(wide, reference_sizes=[2], added=[1])
    assert [linear.in_features for linear in wide.linears] == [5 + 3, 6]
    x, codes = torch.randn(10, 5), torch.randint(2, (10, 1))
    torch.testing.assert_close(wide(x, codes), mlp(x, codes))
    masks = surgery.reference_masks(wide, [2])
    assert masks["linears.0.weight"][:, -1].logical_not().all()
    assert masks["linears.1.weight"].all()


def offset_model(counts, library, covariates, cell_index, n_cells=None, *, decoder):
    """z ~ N(0, I); rho = softmax(f(z, s) + offset_s); x ~ Poisson(l rho): a decoder that sees
    the batch s, and a free offset per batch and gene."""
    pyro.module("decoder", decoder)
    n_batches = decoder.body.covariate_sizes[0]
    offsets = pyro.param("offsets", counts.new_zeros(n_batches, counts.shape[-1]))
    with cells_plate(cell_index, n_cells):
        z = pyro.sample("z", dist.Normal(counts.new_zeros(2), 1.0).to_event(1))
        logits, _ = decoder(z, covariates)
        rho = (logits + offsets[covariates[..., 0]]).softmax(-1)
        pyro.sample("counts", dist.Poisson(library.unsqueeze(-1) * rho).to_event(1), obs=counts)


def offset_guide(counts, covariates, cell_index, n_cells=None, *, encoder):
    pyro.module("encoder", encoder)
    with cells_plate(cell_index, n_cells):
        loc, scale = encoder(torch.log1p(counts), covariates)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_surgery_on_a_pair_written_outside_the_package():
    reference_adata, query_adata = reference_and_query()
    torch.manual_seed(0)
    networks = nn.ModuleDict(
        {
            "encoder": GaussianEncoder(12, 2, 8, covariate_sizes=[2]),
            "decoder": CountDecoder(2, 12, 8, covariate_sizes=[2]),
        }
    )

    def pair(nets):
        decoder, encoder = nets["decoder"], nets["encoder"]
        return partial(offset_model, decoder=decoder), partial(offset_guide, encoder=encoder)

    options = {"max_epochs": 3, "lr": 1e-2, "validation_fraction": 0, "progress": False}
    data = from_anndata(reference_adata, batch_key="batch")
    with pyro.get_param_store().scope() as reference_params:
        train(*pair(networks), data, networks=networks, **options)
    before = {name: value.clone() for name, value in networks.state_dict().items()}
    offsets = reference_params["params"]["offsets"].detach().clone()

    query_networks, query_params, frozen = surgery.map_query(
        networks, reference_params, [2], [3], indexed_by={"offsets": (0, 0)}
    )
    query_data = from_anndata(
        query_adata, batch_key="batch", covariate_categories={"batch": ["a", "b", "c"]}
    )
    with pyro.get_param_store().scope(query_params):
        train(*pair(query_networks), query_data, networks=query_networks, frozen=frozen, **options)
        query_offsets = pyro.param("offsets").detach()
    assert torch.equal(query_offsets[:2], offsets)
    assert not torch.equal(query_offsets[2], offsets.mean(dim=0))  # started there, trained
    state = query_networks.state_dict()
    for name, value in before.items():
        assert torch.equal(reference_part(state[name], value.shape), value), name
        assert torch.equal(networks.state_dict()[name], value)  # the reference's untouched
    assert query_networks["decoder"].body.covariate_sizes == (3,)
    assert networks["decoder"].body.covariate_sizes == (2,)


# -- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    return fitted_reference(reference_and_query()[0])


def test_a_query_without_the_covariate_columns_is_an_error(reference):
    _, query_adata = reference_and_query()
    del query_adata.obs["batch"]
    with pytest.raises(ValueError, match=r"lacks obs column\(s\) 'batch'.*obs\['batch'\] = "):
        SCVI.load_query_data(query_adata, reference)


def test_a_reference_must_be_a_fitted_model_of_the_class_with_covariates(reference):
    reference_adata, query_adata = reference_and_query()
    with pytest.raises(RuntimeError, match="reference SCVI is not fitted yet"):
        SCVI.load_query_data(query_adata, SCVI(reference_adata, batch_key="batch", **TINY))
    vae = pyrosc.VAE(reference_adata, **TINY)
    with pytest.raises(TypeError, match="the reference is a VAE"):
        SCVI.load_query_data(query_adata, vae)
    one_batch = SCVI(reference_adata, **TINY).fit(**{**FIT, "max_epochs": 1})
    with pytest.raises(ValueError, match="no categorical covariates"):
        SCVI.load_query_data(query_adata, one_batch)
    for cls in (pyrosc.VAE, pyrosc.GMVAE):
        assert not hasattr(cls, "load_query_data")


def test_unknown_or_conflicting_options_are_errors(reference):
    _, query_adata = reference_and_query()
    with pytest.raises(TypeError, match="unexpected keyword argument 'freeze_decoder'"):
        SCVI.load_query_data(query_adata, reference, freeze_decoder=True)
    with pytest.raises(ValueError, match="train_encoder_batchnorm applies to a frozen reference"):
        SCVI.load_query_data(query_adata, reference, unfrozen=True, train_encoder_batchnorm=True)


def test_a_query_with_no_new_category_has_nothing_to_fit(reference):
    reference_adata, _ = reference_and_query()
    query = SCVI.load_query_data(reference_adata[:30].copy(), reference)
    np.testing.assert_allclose(query.latent(), reference.latent()[:30], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="every parameter is frozen"):
        query.fit(**FIT)


def test_a_scanvi_reference_maps_a_query_with_its_labels_kept():
    reference_adata, query_adata = reference_and_query()
    reference_adata.obs["annotation"] = reference_adata.obs["cell_type"].astype(str).to_numpy()
    reference_adata.obs.loc[reference_adata.obs_names[::4], "annotation"] = "Unknown"
    reference = pyrosc.SCANVI(
        reference_adata, "annotation", "Unknown", batch_key="batch", likelihood="nb", **TINY
    ).fit(**FIT)
    before = weights(reference)
    with pytest.raises(ValueError, match="the query has no obs\\['annotation'\\]"):
        pyrosc.SCANVI.load_query_data(query_adata, reference)
    query_adata.obs["annotation"] = "Unknown"
    query = pyrosc.SCANVI.load_query_data(query_adata, reference)
    start = weights(query)
    query.fit(**FIT)
    after = weights(query)

    assert_reference_kept(after, before)
    # The label-conditioned networks are not widened: their covariate is the model's y.
    assert (
        after["z2_encoder.body.linears.0.weight"].shape
        == before["z2_encoder.body.linears.0.weight"].shape
    )
    new_column = after[FIRST_DECODER_LAYER][:, -1]
    assert not torch.equal(new_column, start[FIRST_DECODER_LAYER][:, -1])
    predicted = query.predict()
    assert len(predicted) == query_adata.n_obs
    assert set(predicted) <= set(reference.label_categories)
