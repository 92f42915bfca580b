"""Shared fixtures: Pyro's validation on, a fresh parameter store, small simulated count data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
import torch


@pytest.fixture(autouse=True)
def _pyro_validation():
    """Pyro checks distributions' arguments and that every guide matches its model."""
    pyro.enable_validation(True)
    pyro.clear_param_store()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    pyro.clear_param_store()


def simulate_counts(
    n_cells: int = 240, n_genes: int = 40, n_types: int = 3, seed: int = 0
) -> ad.AnnData:
    """NB counts of ``n_types`` well-separated cell types, sparse, with labels in obs."""
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n_cells)
    profiles = rng.dirichlet(np.full(n_genes, 0.3), size=n_types)
    library = rng.lognormal(np.log(400), 0.3, size=n_cells)
    mean = library[:, None] * profiles[types]
    theta = 5.0
    counts = rng.negative_binomial(theta, theta / (theta + mean))
    counts[counts.sum(axis=1) == 0, 0] = 1
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{t}" for t in types]),
            "batch": pd.Categorical(rng.choice(["a", "b"], size=n_cells)),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


def make_adata(n_cells: int = 12, n_genes: int = 8, sparse: bool = True, seed: int = 0):
    """A small AnnData of Poisson counts (every cell and gene non-empty) with obs columns."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    counts[0] += 1  # no empty genes
    adata = ad.AnnData(
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


@pytest.fixture
def toy_adata() -> ad.AnnData:
    return simulate_counts()


def resampled_pbmc3k(n_cells: int, seed: int = 0) -> ad.AnnData:
    """``n_cells`` cells drawn with replacement from the embedded PBMC 3k, each thinned.

    Every count of a drawn cell is binomially thinned with a keep-probability drawn per cell
    from U(0.02, 1), so depths run from a few tens to ~15,000 counts per cell, as in real data
    (the embedded cells have 548-15,844). Cells left with no counts are dropped; names are
    unique; ``obs["cell_type"]`` is the source cell's label.
    """
    from pyrosc import datasets

    source = datasets.pbmc3k()
    rng = np.random.default_rng(seed)
    drawn = rng.integers(source.n_obs, size=n_cells)
    counts = sp.csr_matrix(source.X[drawn], dtype=np.int64)
    keep = rng.uniform(0.02, 1.0, size=n_cells)
    counts.data = rng.binomial(counts.data, np.repeat(keep, np.diff(counts.indptr)))
    counts.eliminate_zeros()
    obs = pd.DataFrame(
        {"cell_type": source.obs["cell_type"].to_numpy()[drawn]},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(counts.astype(np.float32), obs=obs, var=source.var.copy())
    return adata[np.diff(counts.indptr) > 0].copy()
