"""Tests of pyrosc.input_checks, through from_anndata: every kind of bad input gets an error that
says what was found, where, and what to do."""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from conftest import dense, log_normalise, make_adata

import pyrosc
from pyrosc.data import from_anndata


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


def test_genes_warning_absent_for_clean_data():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_anndata(make_adata())
