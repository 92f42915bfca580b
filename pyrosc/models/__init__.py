"""Generative models: one Pyro function per file, reading like the math in its docstring."""

from pyrosc.models.gmvae import gmvae_model
from pyrosc.models.scanvi import scanvi_model
from pyrosc.models.scvi import scvi_model
from pyrosc.models.vae import vae_model

__all__ = ["gmvae_model", "scanvi_model", "scvi_model", "vae_model"]
