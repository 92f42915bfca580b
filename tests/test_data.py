"""Tests of pyrosc.data: validation of raw counts, covariate codes, minibatches and splits."""

from __future__ import annotations

import copy
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyrosc
from pyrosc.data import CountData, MinibatchSampler, from_anndata, split_cells


def make_adata(n_cells: int = 12, n_genes: int = 8, sparse: bool = True, seed: int = 0):
    """A small AnnData of Poisson counts (every cell and gene non-empty) with obs columns."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    counts[0] += 1  # no empty genes
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts) if sparse else counts,
        obs=pd.DataFrame(
            {
                "batch": pd.Categorical(["b", "a"] * (n_cells // 2), categories=["b", "a", "z"]),
                "donor": [f"d{i % 3}" for i in range(n_cells)],
                "cell_type": ["T", np.nan] * (n_cells // 2),
            },
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )
    return adata


def log_normalise(counts: np.ndarray) -> np.ndarray:
    """log1p of counts scaled to 10,000 per cell, as sc.pp.normalize_total + sc.pp.log1p."""
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4).astype(np.float32)


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


# ----------------------------------------------------------------------------- bad input


def test_not_anndata_is_type_error():
    with pytest.raises(TypeError, match=r"expects an anndata\.AnnData, got numpy\.ndarray"):
        from_anndata(np.ones((3, 3)))


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicated_names_are_an_error_that_says_how_to_fix_them(axis):
    adata = make_adata()
    names = list(getattr(adata, f"{axis}_names"))
    names[3] = names[5] = names[1]
    with warnings.catch_warnings():  # anndata's own warning about repeated names
        warnings.simplefilter("ignore", UserWarning)
        setattr(adata, f"{axis}_names", names)
    noun, fix = ("cell", "obs_names_make_unique") if axis == "obs" else ("gene", "var_names")
    pattern = rf"adata\.{axis}_names holds 1 {noun} name\(s\) more than once \(e\.g\. '{noun}1'\)"
    for function in (from_anndata, lambda a: pyrosc.select_genes(a, 4)):
        with pytest.raises(ValueError, match=pattern) as error:
            function(adata)
        assert f"{fix}" in str(error.value)
    assert list(getattr(adata, f"{axis}_names")) == names  # the user's names are untouched


@pytest.mark.parametrize("n_top_genes", [-1, 2.5, True])
def test_select_genes_rejects_a_bad_number_of_genes(n_top_genes):
    with pytest.raises(ValueError, match="n_top_genes must be"):
        pyrosc.select_genes(make_adata(), n_top_genes)


def test_unknown_layer_lists_existing_layers():
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    with pytest.raises(ValueError, match=r"layer 'raw'.*the layers are: 'counts'.*layer=None"):
        from_anndata(adata, layer="raw")


def test_unknown_layer_when_there_are_no_layers():
    with pytest.raises(ValueError, match=r"adata has no layers.*layer=None for adata\.X"):
        from_anndata(make_adata(), layer="counts")


@pytest.mark.parametrize(
    "argument", ["batch_key", "labels_key", "categorical_covariate_keys"], ids=str
)
def test_unknown_obs_key_lists_obs_columns(argument):
    value = ["tissue"] if argument == "categorical_covariate_keys" else "tissue"
    with pytest.raises(
        ValueError, match=rf"{argument} 'tissue'.*columns are: 'batch', 'donor', 'cell_type'"
    ):
        from_anndata(make_adata(), **{argument: value})


def test_covariate_keys_as_a_bare_string_is_type_error():
    with pytest.raises(TypeError, match=r"write \['donor'\]"):
        from_anndata(make_adata(), categorical_covariate_keys="donor")


def test_repeated_covariate_key():
    with pytest.raises(ValueError, match="'batch' given more than once"):
        from_anndata(make_adata(), batch_key="batch", categorical_covariate_keys=["batch"])


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)], ids=["no_cells", "no_genes"])
def test_empty_anndata(shape):
    adata = anndata.AnnData(X=np.zeros(shape, dtype=np.float32))
    with pytest.raises(ValueError, match=rf"{shape[0]} cells and {shape[1]} genes"):
        from_anndata(adata)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("bad_value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_inf_reports_count_and_first_entry(sparse, bad_value):
    adata = make_adata(sparse=False)
    adata.X[2, 3] = bad_value
    adata.X[5, 1] = bad_value
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(
        ValueError,
        match=r"adata\.X holds 2 NaN or infinite values \(first at cell 'cell2', "
        r"gene 'gene3'",
    ):
        from_anndata(adata)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_negative_values_ask_for_raw_counts(sparse):
    adata = make_adata(sparse=False)
    adata.X[4, 6] = -1
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(ValueError) as error:
        from_anndata(adata)
    message = str(error.value)
    assert "adata.X holds 1 negative values (first at cell 'cell4', gene 'gene6': -1)" in message
    assert "raw (un-normalised) integer counts" in message


def test_negative_integer_dtype():
    adata = make_adata(sparse=False)
    adata.X = adata.X.astype(np.int32)
    adata.X[1, 1] = -3
    with pytest.raises(
        ValueError, match=r"1 negative values \(first at cell 'cell1', gene 'gene1'"
    ):
        from_anndata(adata)


def test_log_normalised_x_suggests_counts_layer():
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(log_normalise(dense(adata.X)))
    with pytest.raises(ValueError) as error:
        from_anndata(adata)
    message = str(error.value)
    assert message.startswith("adata.X holds")
    assert "non-integer values (first at cell 'cell0'" in message
    assert "looks log-normalised" in message
    assert "layer='counts'" in message


def test_log_normalised_x_suggests_raw():
    adata = make_adata()
    adata.raw = adata
    adata.X = sp.csr_matrix(log_normalise(dense(adata.X)))
    with pytest.raises(ValueError, match=r"looks log-normalised.*adata\.raw\.to_adata\(\)"):
        from_anndata(adata)


def test_normalised_without_log_is_named():
    adata = make_adata(sparse=False)
    adata.X = adata.X / adata.X.sum(axis=1, keepdims=True) * 1e4
    with pytest.raises(ValueError, match=r"looks normalised: every cell sums to about 10,000"):
        from_anndata(adata)


def test_non_integer_without_counts_anywhere_asks_for_the_raw_matrix():
    adata = make_adata(sparse=False)
    adata.X = adata.X + 0.5
    with pytest.raises(ValueError, match=r"pass the raw count matrix"):
        from_anndata(adata)


def test_non_integer_layer_names_the_layer_checked_and_suggests_x():
    adata = make_adata()
    adata.layers["log1p"] = sp.csr_matrix(log_normalise(dense(adata.X)))
    with pytest.raises(ValueError) as error:
        from_anndata(adata, layer="log1p")
    message = str(error.value)
    assert message.startswith("adata.layers['log1p'] holds")
    assert "adata.layers['log1p'] looks log-normalised" in message
    assert "adata.X holds non-negative integers: pass layer=None" in message


def test_cells_without_counts():
    adata = make_adata(sparse=False)
    adata.X[[3, 7]] = 0
    adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(
        ValueError,
        match=r"2 cells have zero total counts.*'cell3', 'cell7'.*"
        r"sc\.pp\.filter_cells\(adata, min_counts=1\)",
    ):
        from_anndata(adata)


def test_genes_without_counts_warn():
    adata = make_adata(sparse=False)
    adata.X[:, [2, 5]] = 0
    with pytest.warns(
        UserWarning,
        match=r"2 genes have zero counts.*'gene2', 'gene5'.*filter_genes\(adata, min_cells=1\)",
    ):
        data = from_anndata(adata)
    assert data.n_genes == 8


def test_missing_covariate_values():
    adata = make_adata()
    adata.obs["donor"] = adata.obs["donor"].where(adata.obs_names != "cell4")
    with pytest.raises(ValueError, match=r"'donor' has missing values in 1 cells \(e\.g\. 'cell4'"):
        from_anndata(adata, categorical_covariate_keys=["donor"])


def test_unseen_category_lists_known_ones():
    adata = make_adata()
    with pytest.raises(ValueError, match=r"not fitted with: 'd2' \(4 cells\).*'d0', 'd1'"):
        from_anndata(
            adata,
            categorical_covariate_keys=["donor"],
            covariate_categories={"donor": ["d0", "d1"]},
        )


def test_covariate_categories_must_match_the_keys():
    with pytest.raises(ValueError, match=r"covariate_categories has keys 'donor'.*'batch'"):
        from_anndata(make_adata(), batch_key="batch", covariate_categories={"donor": ["d0"]})


def test_non_numeric_matrix():
    adata = make_adata(sparse=False)
    adata.X = adata.X.astype(bool)
    with pytest.raises(ValueError, match="dtype bool"):
        from_anndata(adata)


# ----------------------------------------------------------------------------- good input


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.float64])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_integer_and_integral_float_counts_are_accepted(dtype, sparse):
    adata = make_adata(sparse=False)
    expected = adata.X.copy()
    adata.X = adata.X.astype(dtype)
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    data = from_anndata(adata)
    assert isinstance(data.counts, sp.csr_matrix if sparse else np.ndarray)
    assert data.counts.dtype == np.float32
    np.testing.assert_array_equal(dense(data.counts), expected)
    np.testing.assert_array_equal(data.library, expected.sum(axis=1))
    assert data.library.dtype == np.float32
    assert (data.n_cells, data.n_genes) == (12, 8)


def test_csc_input_becomes_csr():
    adata = make_adata()
    expected = dense(adata.X)
    adata.X = sp.csc_matrix(adata.X)
    data = from_anndata(adata)
    assert isinstance(data.counts, sp.csr_matrix)
    np.testing.assert_array_equal(data.counts.toarray(), expected)


def test_counts_layer_is_used():
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(log_normalise(dense(adata.X)))
    data = from_anndata(adata, layer="counts")
    np.testing.assert_array_equal(data.counts.toarray(), adata.layers["counts"].toarray())


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_user_anndata_is_unchanged_and_not_shared(sparse):
    adata = make_adata(sparse=sparse)
    adata.layers["counts"] = adata.X.copy()
    before = copy.deepcopy(adata)
    data = from_anndata(
        adata,
        layer="counts",
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=["donor"],
    )
    np.testing.assert_array_equal(dense(adata.X), dense(before.X))
    np.testing.assert_array_equal(dense(adata.layers["counts"]), dense(before.layers["counts"]))
    assert list(adata.layers) == ["counts"]
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    pd.testing.assert_frame_equal(adata.var, before.var)
    # Writing into the CountData must not reach the user's matrices.
    stored = data.counts.data if sparse else data.counts
    stored[:] = -1
    data.labels.iloc[:] = "changed"
    np.testing.assert_array_equal(dense(adata.layers["counts"]), dense(before.layers["counts"]))
    pd.testing.assert_frame_equal(adata.obs, before.obs)


def test_covariate_codes_and_categories():
    adata = make_adata()
    adata.obs["plate"] = [10, 2] * 6
    data = from_anndata(
        adata,
        batch_key="batch",
        labels_key="cell_type",
        categorical_covariate_keys=["donor", "plate"],
    )
    assert list(data.covariates) == ["batch", "donor", "plate"]
    # Categorical: the order of cat.categories, without the unused category 'z'.
    assert data.covariate_categories["batch"] == ["b", "a"]
    np.testing.assert_array_equal(data.covariates["batch"], [0, 1] * 6)
    # Other columns: unique values sorted by value, as strings.
    assert data.covariate_categories["donor"] == ["d0", "d1", "d2"]
    assert data.covariate_categories["plate"] == ["2", "10"]
    np.testing.assert_array_equal(data.covariates["plate"], [1, 0] * 6)
    for key, codes in data.covariates.items():
        assert codes.dtype == np.int64
        names = np.array(data.covariate_categories[key])[codes]
        np.testing.assert_array_equal(names, adata.obs[key].astype(str).to_numpy())
    pd.testing.assert_series_equal(data.labels, adata.obs["cell_type"])
    assert data.labels.isna().sum() == 6


def test_given_categories_fix_the_codes():
    adata = make_adata()
    data = from_anndata(adata, batch_key="batch", covariate_categories={"batch": ["z", "a", "b"]})
    assert data.covariate_categories["batch"] == ["z", "a", "b"]
    np.testing.assert_array_equal(data.covariates["batch"], [2, 1] * 6)


# ----------------------------------------------------------------------------- CountData


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_minibatch_matches_dense_rows(sparse):
    adata = make_adata(sparse=sparse)
    data = from_anndata(adata, batch_key="batch", categorical_covariate_keys=["donor"])
    index = np.array([5, 0, 11, 3])
    batch = data.minibatch(index)
    expected = {"counts", "library", "batch", "covariates", "continuous_covariates", "cell_index"}
    assert set(batch) == expected
    np.testing.assert_array_equal(batch["cell_index"].numpy(), index)
    assert batch["continuous_covariates"].shape == (4, 0)
    assert batch["counts"].shape == (4, 8) and batch["counts"].dtype == torch.float32
    assert batch["library"].shape == (4,) and batch["library"].dtype == torch.float32
    assert batch["batch"].shape == (4,) and batch["batch"].dtype == torch.int64
    assert batch["covariates"].shape == (4, 2) and batch["covariates"].dtype == torch.int64
    rows = dense(adata.X)[index]
    np.testing.assert_array_equal(batch["counts"].numpy(), rows)
    np.testing.assert_array_equal(batch["library"].numpy(), rows.sum(axis=1))
    np.testing.assert_array_equal(batch["batch"].numpy(), data.covariates["batch"][index])
    np.testing.assert_array_equal(
        batch["covariates"][:, 1].numpy(), data.covariates["donor"][index]
    )


def test_minibatch_without_covariates():
    data = from_anndata(make_adata())
    batch = data.minibatch(np.arange(3), device=torch.device("cpu"))
    assert batch["covariates"].shape == (3, 0) and batch["covariates"].dtype == torch.int64
    np.testing.assert_array_equal(batch["batch"].numpy(), [0, 0, 0])
    assert batch["batch"].dtype == torch.int64
    assert data.covariates == {} and data.labels is None


def test_minibatch_does_not_alias_the_stored_counts():
    data = from_anndata(make_adata(sparse=False))
    before = data.counts.copy()
    data.minibatch(np.arange(4))["counts"].fill_(-1)
    np.testing.assert_array_equal(data.counts, before)


def test_subset_keeps_everything_aligned():
    adata = make_adata()
    data = from_anndata(adata, batch_key="batch", labels_key="cell_type")
    index = np.array([7, 2, 9])
    part = data.subset(index)
    assert isinstance(part, CountData) and isinstance(part.counts, sp.csr_matrix)
    assert (part.n_cells, part.n_genes) == (3, 8)
    np.testing.assert_array_equal(part.counts.toarray(), dense(adata.X)[index])
    np.testing.assert_array_equal(part.library, data.library[index])
    np.testing.assert_array_equal(part.covariates["batch"], data.covariates["batch"][index])
    assert part.covariate_categories == data.covariate_categories
    assert list(part.obs_names) == ["cell7", "cell2", "cell9"]
    assert list(part.labels.index) == ["cell7", "cell2", "cell9"]
    assert part.var_names.equals(data.var_names)


def test_positions_must_be_integers():
    data = from_anndata(make_adata())
    with pytest.raises(TypeError, match="integer cell positions"):
        data.minibatch(np.array([0.0, 1.0]))


# ----------------------------------------------------------------------------- sampling


def epoch_sizes_and_cells(sampler: MinibatchSampler) -> tuple[list[int], np.ndarray]:
    batches = list(sampler)
    return [len(batch) for batch in batches], np.concatenate(batches)


def test_pbmc3k_split_has_no_batch_of_one():
    sampler = MinibatchSampler(2433, batch_size=128)
    sizes, cells = epoch_sizes_and_cells(sampler)
    assert min(sizes) > 1
    assert sizes[-1] == 129 and len(sizes) == len(sampler) == 19
    np.testing.assert_array_equal(np.sort(cells), np.arange(2433))


def test_every_cell_once_and_never_a_batch_of_one():
    for batch_size in (2, 3, 4, 7, 16, 128):
        for n_cells in range(2, 601):
            sampler = MinibatchSampler(n_cells, batch_size=batch_size, seed=n_cells)
            sizes, cells = epoch_sizes_and_cells(sampler)
            assert len(sizes) == len(sampler)
            assert min(sizes) >= 2 and max(sizes) <= batch_size + 1
            assert len(cells) == n_cells and len(np.unique(cells)) == n_cells


def test_sampler_rejects_one_cell_and_batches_of_one():
    with pytest.raises(ValueError, match="cannot train on 1 cell"):
        MinibatchSampler(1)
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        MinibatchSampler(100, batch_size=1)


def test_sampler_is_seeded_and_reshuffles_each_epoch():
    first, second = MinibatchSampler(300, 32, seed=3), MinibatchSampler(300, 32, seed=3)
    epochs_first = [np.concatenate(list(first)) for _ in range(2)]
    epochs_second = [np.concatenate(list(second)) for _ in range(2)]
    np.testing.assert_array_equal(epochs_first[0], epochs_second[0])
    np.testing.assert_array_equal(epochs_first[1], epochs_second[1])
    assert not np.array_equal(epochs_first[0], epochs_first[1])
    other_seed = np.concatenate(list(MinibatchSampler(300, 32, seed=4)))
    assert not np.array_equal(epochs_first[0], other_seed)


def test_sampler_without_shuffle_keeps_order():
    batches = list(MinibatchSampler(10, batch_size=3, shuffle=False))
    assert [batch.tolist() for batch in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def test_split_cells():
    train, val = split_cells(100, 0.1, seed=0)
    assert len(train) == 90 and len(val) == 10
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    again_train, again_val = split_cells(100, 0.1, seed=0)
    np.testing.assert_array_equal(val, again_val)
    assert not np.array_equal(val, split_cells(100, 0.1, seed=1)[1])
    train, val = split_cells(7, 0.0, seed=0)
    np.testing.assert_array_equal(train, np.arange(7))
    assert val.shape == (0,) and val.dtype == np.int64


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_cells_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        split_cells(100, fraction, seed=0)


@pytest.mark.parametrize("n_cells, fraction", [(10, 0.1), (10, 0.9)])
def test_split_cells_needs_two_cells_each_side(n_cells, fraction):
    with pytest.raises(ValueError, match="each needs at least 2"):
        split_cells(n_cells, fraction, seed=0)


def test_genes_warning_absent_for_clean_data():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_anndata(make_adata())


def test_embedded_cellbench_is_raw_counts_with_batches_and_split():
    adata = pyrosc.datasets.cellbench()
    assert adata.shape == (1408, 2000)
    assert adata.obs["batch"].nunique() == 5
    assert adata.obs["cell_type"].nunique() == 5
    assert adata.obs["split"].value_counts().to_dict() == {"train": 1275, "test": 133}
    values = adata.X.data
    assert (values >= 0).all() and (values == np.round(values)).all()
