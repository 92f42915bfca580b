"""Counts streamed from disk against the same counts in memory: the validated data, the checks'
errors, a fit (same seed, the in-memory order) and its results, lists of files against their
concatenation, a bounded block cache, and files that are only ever read."""

from __future__ import annotations

import threading

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import simulate_counts

import pyrosc
from pyrosc import SCVI, streaming
from pyrosc.block_sampler import BlockShuffleSampler, prefetched
from pyrosc.data import MinibatchSampler, from_anndata
from pyrosc.de_groups import count_summaries
from pyrosc.disk_blocks import CsrOnDisk
from pyrosc.streaming import StreamedCountData, StreamOptions, from_backed

TINY = {"n_latent": 2, "n_hidden": 8}
# Poisson: no compiled likelihood to build (what these tests check is the data, not the loss)
POISSON = {**TINY, "likelihood": "poisson"}
FIT = {"max_epochs": 2, "batch_size": 32, "lr": 1e-2, "seed": 0, "progress": False}
SMALL_BLOCKS = StreamOptions(block_size=16, blocks_per_window=2, prefetch=2)

# Tiny networks: a second thread only adds synchronisation (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread_module")


def written(adata: ad.AnnData, tmp_path, name: str = "counts.h5ad") -> str:
    path = tmp_path / name
    adata.write_h5ad(path)
    return str(path)


def backed(adata: ad.AnnData, tmp_path, name: str = "counts.h5ad") -> ad.AnnData:
    """``adata`` written to ``tmp_path`` and opened again with its counts on disk."""
    return ad.read_h5ad(written(adata, tmp_path, name), backed="r")


def assert_same_data(streamed, in_memory) -> None:
    """Every field and every minibatch of two validated datasets are equal, exactly."""
    assert isinstance(streamed, StreamedCountData)
    np.testing.assert_array_equal(streamed.library, in_memory.library)
    assert streamed.covariate_categories == in_memory.covariate_categories
    for key in in_memory.covariates:
        np.testing.assert_array_equal(streamed.covariates[key], in_memory.covariates[key])
    assert list(streamed.obs_names) == list(in_memory.obs_names)
    assert list(streamed.var_names) == list(in_memory.var_names)
    index = np.random.default_rng(0).permutation(in_memory.n_cells)[:50]
    index[1] = index[0]  # a cell twice in one minibatch is read twice
    got, expected = streamed.minibatch(index), in_memory.minibatch(index)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.fixture
def adata() -> ad.AnnData:
    return simulate_counts(n_cells=240, n_genes=20)


def test_streamed_data_equals_the_data_in_memory(adata, tmp_path):
    on_disk = backed(adata, tmp_path)
    keys = {"batch_key": "batch", "labels_key": "cell_type"}
    streamed = from_backed(on_disk, **keys, options=SMALL_BLOCKS)
    assert_same_data(streamed, from_anndata(adata, **keys))
    assert_same_data(from_anndata(on_disk, **keys), from_anndata(adata, **keys))
    part = np.arange(10, 200, 3)
    assert_same_data(streamed.subset(part), from_anndata(adata, **keys).subset(part))


def test_a_counts_layer_on_disk_is_streamed(adata, tmp_path):
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    on_disk = pyrosc.read_backed(written(adata, tmp_path), layer="counts")
    assert isinstance(on_disk.layers["counts"], ad.abc.CSRDataset)
    assert_same_data(from_anndata(on_disk, layer="counts"), from_anndata(adata, layer="counts"))
    with pytest.raises(ValueError, match="layer 'raw' not found in .*its layers are 'counts'"):
        pyrosc.read_backed(written(adata, tmp_path, "other.h5ad"), layer="raw")


def test_a_dense_matrix_on_disk_is_streamed_and_csc_is_refused(adata, tmp_path):
    dense = adata.copy()
    dense.X = adata.X.toarray()
    on_disk = backed(dense, tmp_path)
    assert not sp.issparse(on_disk.X) and not isinstance(on_disk.X, np.ndarray)
    assert_same_data(from_backed(on_disk, options=SMALL_BLOCKS), from_anndata(adata))
    csc = adata.copy()
    csc.X = adata.X.tocsc()
    with pytest.raises(TypeError, match=r"adata.X of '.*csc.h5ad' is stored as CSC .*tocsr"):
        from_anndata(backed(csc, tmp_path, "csc.h5ad"))


@pytest.mark.parametrize(
    ("value", "found"), [(-2.0, "negative values"), (np.nan, "NaN or infinite values")]
)
def test_bad_value_in_the_third_block_is_named_as_in_memory(adata, tmp_path, value, found):
    counts = adata.X.toarray()
    counts[40, 7] = value  # cell 40: the 3rd block of 16 cells
    counts[200, 3] = value
    bad = ad.AnnData(sp.csr_matrix(counts), obs=adata.obs, var=adata.var)
    with pytest.raises(ValueError) as in_memory:
        from_anndata(bad)
    with pytest.raises(ValueError) as streamed:
        from_backed(backed(bad, tmp_path), options=SMALL_BLOCKS)
    assert f"holds 2 {found} (first at cell 'cell40', gene 'gene7'" in str(streamed.value)
    assert str(streamed.value) == str(in_memory.value)


def test_non_integer_values_are_described_as_in_memory(adata, tmp_path):
    lognormal = ad.AnnData(
        sp.csr_matrix(np.log1p(adata.X.toarray() / adata.X.sum(axis=1).A * 1e4)),
        obs=adata.obs,
        var=adata.var,
    )
    with pytest.raises(ValueError) as in_memory:
        from_anndata(lognormal)
    with pytest.raises(ValueError, match="looks log-normalised") as streamed:
        from_backed(backed(lognormal, tmp_path), options=SMALL_BLOCKS)
    assert str(streamed.value) == str(in_memory.value)


def test_empty_cells_and_genes_are_found_by_the_streamed_pass(adata, tmp_path):
    counts = adata.X.toarray()
    counts[:, 5] = 0
    counts[33] = 0
    empty = ad.AnnData(sp.csr_matrix(counts), obs=adata.obs, var=adata.var)
    with pytest.raises(ValueError, match=r"1 cells have zero total counts in adata.X .*'cell33'"):
        from_backed(backed(empty, tmp_path), options=SMALL_BLOCKS)
    counts[33, 0] = 1
    no_gene = ad.AnnData(sp.csr_matrix(counts), obs=adata.obs, var=adata.var)
    with pytest.warns(UserWarning, match="1 genes have zero counts .*'gene5'"):
        from_backed(backed(no_gene, tmp_path, "genes.h5ad"), options=SMALL_BLOCKS)


def test_a_list_of_files_is_their_concatenation(adata, tmp_path):
    first, second = adata[:100].copy(), adata[100:].copy()
    second.obs["batch"] = second.obs["batch"].cat.rename_categories({"a": "c"})
    files = [backed(first, tmp_path, "first.h5ad"), backed(second, tmp_path, "second.h5ad")]
    together = ad.concat([first, second])
    keys = {"batch_key": "batch", "labels_key": "cell_type"}
    assert_same_data(from_anndata(files, **keys), from_anndata(together, **keys))
    paths = [str(tmp_path / "first.h5ad"), str(tmp_path / "second.h5ad")]
    assert_same_data(from_anndata(paths, **keys), from_anndata(together, **keys))

    streamed = SCVI(files, batch_key="batch", **POISSON).fit(shuffle="cells", **FIT)
    in_memory = SCVI(together, batch_key="batch", **POISSON).fit(shuffle="cells", **FIT)
    np.testing.assert_array_equal(streamed.history["train_elbo"], in_memory.history["train_elbo"])
    latent = streamed.latent()
    np.testing.assert_array_equal(latent, in_memory.latent())
    np.testing.assert_array_equal(files[0].obsm["X_pyrosc"], latent[:100])
    np.testing.assert_array_equal(files[1].obsm["X_pyrosc"], latent[100:])


def test_a_file_with_other_genes_is_named_with_the_first_gene_that_differs(adata, tmp_path):
    other = adata.copy()
    other.obs_names = [f"other{i}" for i in range(other.n_obs)]
    other.var_names = [*adata.var_names[:4], "CD3E", *adata.var_names[5:]]
    files = [backed(adata, tmp_path, "a.h5ad"), backed(other, tmp_path, "b.h5ad")]
    differ = r"'.*b.h5ad' does not hold the genes of '.*a.h5ad' .*gene 4 is 'CD3E' there but"
    with pytest.raises(ValueError, match=differ + " 'gene4'"):
        from_anndata(files)
    fewer = adata[:, :10].copy()
    fewer.obs_names = other.obs_names
    with pytest.raises(ValueError, match="it has 10 genes and '.*a.h5ad' has 20"):
        from_anndata([files[0], backed(fewer, tmp_path, "c.h5ad")])
    with pytest.raises(ValueError, match="cell name.* in more than one file .*'cell0' in"):
        from_anndata([files[0], backed(adata, tmp_path, "d.h5ad")])


def test_a_bad_value_in_the_second_file_names_the_file(adata, tmp_path):
    counts = adata.X.toarray()
    counts[7, 2] = -1
    bad = ad.AnnData(sp.csr_matrix(counts), obs=adata.obs.copy(), var=adata.var)
    bad.obs_names = [f"b{i}" for i in range(bad.n_obs)]
    files = [backed(adata, tmp_path, "good.h5ad"), backed(bad, tmp_path, "bad.h5ad")]
    named = r"adata.X of '.*bad.h5ad' holds 1 negative values \(first at cell 'b7', gene"
    with pytest.raises(ValueError, match=named + " 'gene2': -1"):
        from_anndata(files)


def test_fit_from_disk_equals_fit_in_memory_and_the_file_is_never_written(adata, tmp_path):
    path = written(adata, tmp_path)
    before = (open(path, "rb").read(), tmp_path.joinpath("counts.h5ad").stat().st_mtime_ns)
    on_disk = ad.read_h5ad(path, backed="r")
    options = {"batch_key": "batch", "library": "latent", **TINY}
    streamed = SCVI(on_disk, **options).fit(shuffle="cells", **FIT)
    in_memory = SCVI(adata, **options).fit(shuffle="cells", **FIT)
    for column in ("train_elbo", "validation_elbo"):
        np.testing.assert_array_equal(streamed.history[column], in_memory.history[column])
    with streamed._scope() as (_, _, networks), in_memory._scope() as (_, _, expected):
        prior, expected_prior = networks["library_prior"], expected["library_prior"]
        torch.testing.assert_close(prior.loc, expected_prior.loc, rtol=0, atol=0)
        torch.testing.assert_close(prior.scale, expected_prior.scale, rtol=0, atol=0)
    np.testing.assert_array_equal(streamed.latent(), in_memory.latent())
    assert "X_pyrosc" in on_disk.obsm
    scores = streamed.cell_scores(n_samples=3, seed=0)
    np.testing.assert_array_equal(scores, in_memory.cell_scores(n_samples=3, seed=0))
    de = {"n_samples": 5, "seed": 0}
    de_from_disk = streamed.differential_expression("cell_type", **de)
    pd.testing.assert_frame_equal(
        de_from_disk, in_memory.differential_expression("cell_type", **de)
    )
    assert "pyrosc_de" in on_disk.uns
    streamed.fit(**FIT)  # block-shuffled: the default on disk
    assert np.isfinite(streamed.history["validation_elbo"]).all()
    after = (open(path, "rb").read(), tmp_path.joinpath("counts.h5ad").stat().st_mtime_ns)
    assert after == before


def test_latent_to_a_new_file(adata, tmp_path):
    model = SCVI(backed(adata, tmp_path), **POISSON).fit(**FIT)
    out = tmp_path / "latent.npy"
    on_file = model.latent(out=out, batch_size=50)
    np.testing.assert_array_equal(np.load(out), model.latent())
    np.testing.assert_array_equal(on_file, model.latent())
    with pytest.raises(FileExistsError, match="exists; pyrosc writes results to a new file"):
        model.latent(out=out)
    with pytest.raises(ValueError, match=r"out must name a new .npy file"):
        model.latent(out=tmp_path / "counts.h5ad")


def test_cell_scores_to_a_new_file(adata, tmp_path):
    model = SCVI(backed(adata, tmp_path), **POISSON).fit(**FIT)
    in_memory = model.cell_scores(n_samples=5, per_gene=True)
    del model.adata.obs["pyrosc_log_likelihood"]
    one_chunk = model.cell_scores(n_samples=5, per_gene=True, out=tmp_path / "all.csv")
    table = pd.read_csv(one_chunk, index_col=0)
    assert "pyrosc_log_likelihood" not in model.adata.obs  # written to the file only
    assert list(table.index) == list(adata.obs_names)
    assert list(table.columns) == list(in_memory.columns)  # log_likelihood, then the genes
    np.testing.assert_allclose(table.to_numpy(), in_memory.to_numpy(), rtol=1e-6)  # CSV text
    out = tmp_path / "chunks.csv"
    chunks = pd.read_csv(model.cell_scores(n_samples=5, out=out, chunk_cells=100), index_col=0)
    assert chunks.shape == (240, 1) and np.isfinite(chunks.to_numpy()).all()
    with pytest.raises(FileExistsError, match="exists; pyrosc writes results to a new file"):
        model.cell_scores(out=out)


def test_every_class_fits_from_disk(adata, tmp_path):
    on_disk = backed(adata, tmp_path)
    pyrosc.VAE(on_disk, "poisson", **TINY).fit(**FIT)
    gmvae = pyrosc.GMVAE(on_disk, n_clusters=3, likelihood="poisson", **TINY)
    gmvae.fit(init_epochs=1, **FIT)
    assert len(gmvae.clusters()) == adata.n_obs and "pyrosc_cluster" in on_disk.obs
    labelled = adata.copy()
    labelled.obs["annotation"] = (
        labelled.obs["cell_type"].astype(str).where(np.arange(adata.n_obs) % 3 == 0, "Unknown")
    )
    on_disk = backed(labelled, tmp_path, "labelled.h5ad")
    scanvi = pyrosc.SCANVI(on_disk, "annotation", "Unknown", batch_key="batch", **POISSON)
    assert set(scanvi.fit(**FIT).predict()) <= {"type0", "type1", "type2"}


def test_group_count_summaries_streamed_equal_in_memory(adata, tmp_path):
    codes = adata.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    codes[::7] = -1
    streamed = count_summaries(from_backed(backed(adata, tmp_path), options=SMALL_BLOCKS), codes, 3)
    in_memory = count_summaries(from_anndata(adata), codes, 3)
    np.testing.assert_array_equal(streamed.detected, in_memory.detected)
    np.testing.assert_array_equal(streamed.total, in_memory.total)


def test_select_genes_asks_for_counts_in_memory(adata, tmp_path):
    with pytest.raises(ValueError, match="select_genes needs the counts in memory"):
        pyrosc.select_genes(backed(adata, tmp_path), n_top_genes=5)


# -- block shuffling and the bounded cache -----------------------------------------------------


def test_block_shuffled_epochs_read_each_block_once_and_cache_few(adata, tmp_path):
    data = from_backed(backed(adata, tmp_path), options=SMALL_BLOCKS)
    reader = data.reader
    sampler = data.sampler(batch_size=8, seed=0)
    assert isinstance(sampler, BlockShuffleSampler)
    assert len(sampler) == len(MinibatchSampler(data.n_cells, 8))
    for epoch in range(3):
        seen, read_before = [], reader.blocks_read
        for minibatch in data.minibatches(sampler):
            seen.append(minibatch["cell_index"].numpy())
            assert reader.cached_blocks <= 4
        assert sorted(np.concatenate(seen)) == list(range(data.n_cells))
        # 240 cells: 15 blocks, each read at most once per epoch (a later epoch may find up
        # to 4 still cached from the one before)
        read = reader.blocks_read - read_before
        assert (read == 15) if epoch == 0 else (11 <= read <= 15)
    assert reader.most_cached == reader.cache_blocks == 4


def test_csr_rows_read_from_the_arrays_equal_the_matrix(adata, tmp_path):
    rows = CsrOnDisk(backed(adata, tmp_path).X)
    assert rows.shape == adata.shape
    for index in (slice(16, 48), slice(230, 240), np.array([0, 5, 239]), np.zeros(0, np.int64)):
        got = rows[index]
        assert isinstance(got, sp.csr_matrix)
        np.testing.assert_array_equal(got.toarray(), adata.X[index].toarray())


def test_block_sampler_keeps_blocks_together_and_reshuffles(adata):
    blocks = np.arange(256) // 16
    sampler = BlockShuffleSampler(blocks, batch_size=8, blocks_per_window=2, seed=0)
    first, second = (np.concatenate(list(sampler)) for _ in range(2))
    assert not np.array_equal(first, second)
    windows = blocks[first].reshape(-1, 32)  # a window: 2 blocks of 16 cells
    assert all(len(set(window)) == 2 for window in windows)
    again = BlockShuffleSampler(blocks, batch_size=8, blocks_per_window=2, seed=0)
    np.testing.assert_array_equal(np.concatenate(list(again)), first)


def test_shuffle_option_applies_where_it_means_something(adata, tmp_path):
    with pytest.raises(ValueError, match="shuffle='blocks' does not apply to counts in memory"):
        SCVI(adata, **TINY).fit(shuffle="blocks", **FIT)
    with pytest.raises(ValueError, match="shuffle must be one of"):
        SCVI(backed(adata, tmp_path), **TINY).fit(shuffle="genes", **FIT)


def test_prefetch_stays_ahead_passes_errors_and_stops_early():
    started = threading.active_count()

    def read(index: np.ndarray) -> int:
        if index[0] == 3:
            raise OSError("disk gone")
        return int(index[0])

    batches = [np.array([i]) for i in range(10)]
    assert list(prefetched(batches[:3], read, depth=2)) == [0, 1, 2]
    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(batches, read, depth=2))
    stream = prefetched(batches[:3] * 5, read, depth=2)
    next(stream)
    stream.close()  # the consumer stops early: the thread ends
    assert threading.active_count() == started


def test_streaming_options_are_checked():
    with pytest.raises(ValueError, match="block_size and cache_blocks must be at least 1"):
        streaming.BlockReader([sp.csr_matrix((4, 2))], block_size=0)


def test_block_shuffled_fit_reaches_the_held_out_elbo_of_a_fit_in_memory(tmp_path):
    adata = simulate_counts(n_cells=1000, n_genes=30, seed=1)
    options = {"max_epochs": 30, "batch_size": 64, "lr": 1e-2, "seed": 0, "progress": False}
    model_options = {"likelihood": "nb", **TINY}
    in_memory = pyrosc.VAE(adata, **model_options).fit(**options)
    on_disk = from_backed(backed(adata, tmp_path), options=StreamOptions(block_size=50))
    streamed = pyrosc.VAE(backed(adata, tmp_path, "again.h5ad"), **model_options)
    streamed.data = on_disk  # blocks of 50 cells, 16 to a window: 800 of 900 cells shuffled
    streamed.fit(**options)
    # the same split; only the order of the cells differs (and so the draws): within 3%
    held_out = in_memory.history["validation_elbo"].iloc[-5:].mean()
    streamed_held_out = streamed.history["validation_elbo"].iloc[-5:].mean()
    assert abs(streamed_held_out - held_out) < 0.03 * abs(held_out)
