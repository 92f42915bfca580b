"""Every class trains a full-length fit on low-depth data without a NaN (slow: `make test-slow`).

PBMC 3k (the embedded copy, 2,000 variable genes) binomially thinned to a median of ~40 counts
per cell and ~1.6 % non-zero entries, as sci-RNA-seq or shallow droplet data are: the regime in
which decoded proportions of rarely seen genes fall far below the others.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import pyrosc


@pytest.fixture(scope="module")
def thinned():
    adata = pyrosc.select_genes(pyrosc.datasets.pbmc3k(), n_top_genes=2000)
    counts = sp.csr_matrix(adata.X).astype(np.int64)
    rng = np.random.default_rng(0)
    keep = 40 / np.median(np.asarray(counts.sum(axis=1)).ravel())
    counts.data = rng.binomial(counts.data, keep)
    counts.eliminate_zeros()
    adata.X = counts.astype(np.float32)
    depth = np.asarray(adata.X.sum(axis=1)).ravel()
    adata = adata[depth > 0].copy()
    adata = adata[:, np.asarray((adata.X > 0).sum(axis=0)).ravel() > 0].copy()
    assert 30 <= np.median(np.asarray(adata.X.sum(axis=1)).ravel()) <= 50
    return adata


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda a: pyrosc.VAE(a, likelihood="nb"),
        lambda a: pyrosc.GMVAE(a, n_clusters=10, likelihood="nb", guide="scvae"),
        lambda a: pyrosc.GMVAE(a, n_clusters=10, likelihood="nb", guide="marginal"),
        lambda a: pyrosc.SCVI(a, likelihood="zinb"),
        lambda a: pyrosc.SCVI(a, likelihood="nb", library="latent"),
    ],
    ids=["vae", "gmvae-scvae", "gmvae-marginal", "scvi-zinb", "scvi-nb-latent-library"],
)
def test_full_length_fit_on_low_depth_data_has_no_nan(thinned, make):
    model = make(thinned).fit(max_epochs=400, progress=False)
    history = model.history
    assert len(history) == 400
    assert np.isfinite(history[["train_elbo", "validation_elbo"]].to_numpy()).all()
    assert np.isfinite(model.latent()).all()
    print(f"final ELBO per cell: train {history.train_elbo.iloc[-1]:.2f}, "
          f"validation {history.validation_elbo.iloc[-1]:.2f}")  # fmt: skip
