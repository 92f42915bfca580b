"""The command line and the README's scanpy flow at a real dataset's size.

scanpy switches from exact to approximate neighbours (pynndescent) above 8,192 cells, where a
version mismatch once broke ``sc.pp.neighbors`` on every pyrosc latent; the other tests use a
few hundred cells and would not see it. A few epochs on 9,000 resampled, thinned PBMC 3k cells.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import resampled_pbmc3k

import pyrosc
from pyrosc.cli import main

N_CELLS = 9_000  # above scanpy's 8,192-cell switch to approximate neighbours


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> ad.AnnData:
    adata = resampled_pbmc3k(N_CELLS, seed=1)
    assert adata.n_obs > 8_192
    depth = np.asarray(adata.X.sum(axis=1)).ravel()
    assert depth.min() < 100 and depth.max() > 10_000  # low-depth cells next to deep ones
    return adata


def test_cli_end_to_end_above_the_approximate_neighbours_switch(large, tmp_path, capsys):
    data = tmp_path / "large.h5ad"
    large.write_h5ad(data)
    out = tmp_path / "out"
    args = ["fit", str(data), "--out", str(out), "--epochs", "2", "--n-top-genes", "500"]
    assert main([*args, "--n-samples", "5", "--no-progress"]) == 0, capsys.readouterr().err
    result = ad.read_h5ad(out / "pyrosc.h5ad")
    # Thinned cells with no counts in the 500 selected genes are dropped, and said so.
    assert 8_192 < result.n_obs <= large.n_obs and result.n_vars == 500
    if result.n_obs < large.n_obs:
        assert f"dropping {large.n_obs - result.n_obs} cells" in capsys.readouterr().out
    assert {"X_pyrosc", "X_umap"} <= set(result.obsm)
    assert result.obsp["connectivities"].shape == (result.n_obs, result.n_obs)
    assert result.obs["leiden"].nunique() > 1
    for name in ("model/model.pt", "history.csv", "training_curve.png", "umap.png"):
        assert (out / name).stat().st_size > 0, name


def test_readme_scanpy_flow_above_the_approximate_neighbours_switch(large):
    adata = pyrosc.select_genes(large, n_top_genes=500)
    sc.pp.filter_cells(adata, min_counts=1)  # as the error on empty cells says, for thinned data
    assert adata.n_obs > 8_192
    model = pyrosc.VAE(adata, likelihood="nb", labels_key="cell_type")
    model.fit(max_epochs=2, progress=False)
    model.latent()
    sc.pp.neighbors(adata, use_rep="X_pyrosc")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2)
    sc.tl.umap(adata)
    graph = adata.obsp["connectivities"]
    assert graph.shape == (adata.n_obs, adata.n_obs) and graph.nnz >= adata.n_obs
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_pyrosc"]).all()
