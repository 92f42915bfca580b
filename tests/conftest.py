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
