"""Notebook-facing classes: build a model from an AnnData, fit it, and put results where scanpy
users look for them (``adata.obsm["X_pyrosc"]``). One file per class, as in pyrosc/models/::

    base.py         PyroscModel: setup, fit, latent, scores and the predictive questions
    batches.py      BatchModel: the questions that name a batch (simulate in, decode as)
    query.py        ReferenceMapping (a base of BatchModel): load_query_data, a query's fit
    persistence.py  save / load: JSON settings and tensors only
    vae.py, gmvae.py, scvi.py, scanvi.py   the classes, each binding its model and guide to
                    its networks

Each class is a thin wrapper: it validates the data, builds the networks, binds them to the
model and guide functions of :mod:`pyrosc.models` and :mod:`pyrosc.guides`, and hands the pair
to :func:`pyrosc.train.train` and :mod:`pyrosc.evaluate`. A model with batches subclasses
BatchModel in its own file (SCANVI extends SCVI, itself a BatchModel); operations on any fitted
model (differential expression) go in files named for them.
"""

from pyrosc.api.gmvae import GMVAE
from pyrosc.api.scanvi import SCANVI
from pyrosc.api.scvi import SCVI
from pyrosc.api.vae import VAE

__all__ = ["GMVAE", "SCANVI", "SCVI", "VAE"]
