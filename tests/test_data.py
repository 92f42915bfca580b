"""Tests of pyrosc.data: counts and covariate codes of valid input, minibatches and splits
(bad input: test_input_checks.py)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import dense, log_normalise, make_adata, simulate_counts

import pyrosc
from pyrosc.data import CountData, MinibatchSampler, align_genes, from_anndata, split_cells

# ----------------------------------------------------------------------------- good input


@pytest.mark.parametrize("n_top_genes", [-1, 2.5, True])
def test_select_genes_rejects_a_bad_number_of_genes(n_top_genes):
    with pytest.raises(ValueError, match="n_top_genes must be"):
        pyrosc.select_genes(make_adata(), n_top_genes)


@pytest.mark.parametrize("layer", [None, "counts"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_align_genes_matches_by_name_with_zeros_for_missing_genes(sparse, layer):
    adata = make_adata(sparse=sparse)  # gene0 ... gene7
    if layer is not None:
        adata.layers[layer] = adata.X.copy()
    untouched = dense(adata.X).copy()
    wanted = ["gene3", "new", "gene0", "gene7", "gene5"]
    with pytest.warns(UserWarning, match=r"1 of the model's 5 genes are missing .*'new'.*; 4 "):
        aligned = align_genes(adata, wanted, layer)
    matrix = aligned.X if layer is None else aligned.layers[layer]
    assert sp.issparse(matrix) == sparse and list(aligned.var_names) == wanted
    expected = np.zeros((adata.n_obs, 5), np.float32)
    expected[:, [0, 2, 3, 4]] = untouched[:, [3, 0, 7, 5]]
    np.testing.assert_array_equal(dense(matrix), expected)
    assert aligned.obs.equals(adata.obs)
    np.testing.assert_array_equal(dense(adata.X), untouched)


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


def test_embedded_cellbench_is_raw_counts_with_batches_and_split():
    adata = pyrosc.datasets.cellbench()
    assert adata.shape == (1408, 2000)
    assert adata.obs["batch"].nunique() == 5
    assert adata.obs["cell_type"].nunique() == 5
    assert adata.obs["split"].value_counts().to_dict() == {"train": 1275, "test": 133}
    values = adata.X.data
    assert (values >= 0).all() and (values == np.round(values)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minibatches_reach_the_gpu_through_pinned_memory(monkeypatch):
    """On a GPU every array is pinned before its non-blocking copy, and arrives unchanged."""
    data = from_anndata(simulate_counts(n_cells=40, n_genes=12))
    pinned = []
    original = torch.Tensor.pin_memory

    def spy(tensor, *args, **kwargs):
        pinned.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    index = np.arange(8)
    on_gpu = data.minibatch(index, "cuda")
    on_cpu = data.minibatch(index, "cpu")
    torch.cuda.synchronize()
    assert len(pinned) == len(on_gpu)
    for name, tensor in on_gpu.items():
        assert tensor.device.type == "cuda"
        torch.testing.assert_close(tensor.cpu(), on_cpu[name])
