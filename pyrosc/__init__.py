"""pyrosc: deep generative models of single-cell RNA-seq counts, as Pyro model/guide pairs.

Analysts use the classes (``pyrosc.VAE``, ``pyrosc.GMVAE``, ``pyrosc.SCVI``, ``pyrosc.SCANVI``);
statisticians use the functions underneath (:mod:`pyrosc.models`, :mod:`pyrosc.guides`,
:func:`pyrosc.train.train`, :mod:`pyrosc.evaluate`, :mod:`pyrosc.predictive`,
:mod:`pyrosc.predictive_checks`). Label transfer from a reference to a mapped query:
:func:`pyrosc.transfer_labels`. Differential expression: every class's
``differential_expression`` (for a pair: :mod:`pyrosc.differential_expression`), drawn by
:func:`pyrosc.plot_de`. Models saved by scvi-tools: ``pyrosc.SCVI.from_scvi_tools`` (and
``SCVI.to_scvi_tools``), :mod:`pyrosc.scvi_tools_io`. Several processes (PyTorch Lightning
DDP, the extra ``pyrosc[distributed]``): ``fit(strategy="ddp", devices=N)``, or
:func:`pyrosc.distributed.train`.
Counts bigger than memory: pass a backed AnnData, a path or a list of
them to any class or to :func:`pyrosc.from_anndata` (:mod:`pyrosc.streaming`;
:func:`pyrosc.read_backed` opens a file with only its counts layer on disk).
"""

from pyrosc import (
    datasets,
    differential_expression,
    distributed,
    evaluate,
    predictive,
    predictive_checks,
)
from pyrosc.api import GMVAE, SCANVI, SCVI, VAE
from pyrosc.data import from_anndata, select_genes
from pyrosc.de_results import plot_de
from pyrosc.label_transfer import transfer_labels, weighted_knn_labels
from pyrosc.predictive import simulate
from pyrosc.streaming import read_backed
from pyrosc.train import train

__all__ = [
    "GMVAE",
    "SCANVI",
    "SCVI",
    "VAE",
    "datasets",
    "differential_expression",
    "distributed",
    "evaluate",
    "from_anndata",
    "plot_de",
    "predictive",
    "predictive_checks",
    "read_backed",
    "select_genes",
    "simulate",
    "train",
    "transfer_labels",
    "weighted_knn_labels",
]
__version__ = "0.1.0"
