"""pyrosc: deep generative models of single-cell RNA-seq counts, as Pyro model/guide pairs.

Analysts use the classes (``pyrosc.VAE``, ``pyrosc.GMVAE``, ``pyrosc.SCVI``); statisticians use
the functions underneath (:mod:`pyrosc.models`, :mod:`pyrosc.guides`, :func:`pyrosc.train.train`,
:mod:`pyrosc.evaluate`, :mod:`pyrosc.predictive`).
"""

from pyrosc import datasets, predictive
from pyrosc.api import GMVAE, SCVI, VAE
from pyrosc.data import from_anndata, select_genes
from pyrosc.predictive import simulate
from pyrosc.train import train

__all__ = [
    "GMVAE",
    "SCVI",
    "VAE",
    "datasets",
    "from_anndata",
    "predictive",
    "select_genes",
    "simulate",
    "train",
]
__version__ = "0.1.0"
