"""Shared fixtures: Pyro's validation on, a fresh parameter store, small simulated count data,
a short NB VAE fit of data simulated from an NB VAE, and a model written outside the package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from torch.distributions import constraints

import pyrosc
from pyrosc.data import from_anndata
from pyrosc.models import vae_model
from pyrosc.nets import CountDecoder
from pyrosc.plates import cells_plate

TINY = {"n_latent": 2, "n_hidden": 16}
#: A short fit that converges on a few hundred cells: many small steps at a large rate.
QUICK = {"max_epochs": 30, "batch_size": 32, "lr": 1e-2, "validation_fraction": 0}


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


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny networks: a second thread brings no speed, and on a shared machine its
    synchronisation costs many times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_module():
    """:func:`one_thread` for a whole test module (``pytest.mark.usefixtures``)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def self_simulated() -> ad.AnnData:
    """Counts simulated from an NB VAE with fixed random networks (theta = 3)."""
    torch.manual_seed(0)
    template = from_anndata(simulate_counts(n_cells=300, n_genes=20))
    decoder = CountDecoder(2, 20, n_hidden=16).eval()
    baseline = np.random.default_rng(0).dirichlet(np.full(20, 0.5))
    with torch.no_grad():
        decoder.proportion_logits.weight.mul_(3.0)  # genes that vary with z
        decoder.proportion_logits.bias.copy_(torch.from_numpy(np.log(baseline)))
    with pyro.get_param_store().scope():
        pyro.param("inverse_dispersion", torch.full((20,), 3.0), constraint=constraints.positive)
        model = partial(vae_model, decoder=decoder, likelihood="nb")
        return pyrosc.simulate(model, 300, data=template, seed=0, networks=decoder)


@pytest.fixture(scope="session")
def nb_fit(self_simulated):
    """An NB VAE fitted to :func:`self_simulated`, shared by every test that only asks it."""
    with one_thread():
        return pyrosc.VAE(self_simulated, "nb", **TINY).fit(progress=False, **QUICK)


def factor_model(counts, library, batch, cell_index, n_cells=None):
    """z ~ N(0, I_2); rho = softmax(W z + b_batch); x ~ Poisson(l rho): a Poisson factor model
    with a batch offset, written with plain Pyro parameters."""
    n_genes = counts.shape[-1]
    loadings = pyro.param("loadings", counts.new_zeros(2, n_genes))
    offsets = pyro.param("offsets", counts.new_zeros(2, n_genes))
    with cells_plate(cell_index, n_cells):
        z = pyro.sample("z", dist.Normal(counts.new_zeros(2), 1.0).to_event(1))
        rho = torch.softmax(z @ loadings + offsets[batch], dim=-1)
        pyro.deterministic("proportions", rho, event_dim=1)
        pyro.sample("counts", dist.Poisson(library.unsqueeze(-1) * rho).to_event(1), obs=counts)
