"""Amortized guides, one file per model of the same name in :mod:`pyrosc.models`."""

from pyrosc.guides.gmvae import gmvae_marginal_guide, gmvae_scvae_guide
from pyrosc.guides.scanvi import scanvi_guide
from pyrosc.guides.scvi import scvi_guide
from pyrosc.guides.vae import vae_guide

__all__ = [
    "gmvae_marginal_guide",
    "gmvae_scvae_guide",
    "scanvi_guide",
    "scvi_guide",
    "vae_guide",
]
