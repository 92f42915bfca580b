"""pyrosc: deep generative models of single-cell RNA-seq counts, as Pyro model/guide pairs.

Analysts use the classes (``pyrosc.VAE``); statisticians use the functions underneath
(:mod:`pyrosc.models`, :mod:`pyrosc.guides`, :func:`pyrosc.train.train`, :mod:`pyrosc.evaluate`).
"""

from pyrosc import datasets
from pyrosc.api import GMVAE, VAE
from pyrosc.data import from_anndata
from pyrosc.train import train

__all__ = ["GMVAE", "VAE", "datasets", "from_anndata", "train"]
__version__ = "0.1.0"
