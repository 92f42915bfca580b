"""Datasets shipped inside the package (no download, ever).

``pbmc3k()``: 10x Genomics' 3k PBMCs from a healthy donor, raw counts of all 32,738 genes, with
the 9 cell types of the Seurat clustering tutorial in ``obs["cell_type"]`` (62 cells that the
tutorial's QC removed are NaN). Provenance and licence: ``PROVENANCE.md`` beside this file.
"""

from __future__ import annotations

from importlib import resources

import anndata as ad

__all__ = ["pbmc3k"]


def pbmc3k() -> ad.AnnData:
    """The embedded PBMC 3k dataset: 2,700 cells x 32,738 genes, raw integer counts (CSR).

    Returns:
        a new AnnData (a fresh copy on every call) with ``obs["cell_type"]`` (9 types, NaN for
        62 cells), ``obs["batch"]`` (one value) and ``var["gene_symbols"]``.
    """
    with resources.as_file(resources.files(__name__) / "pbmc3k.h5ad") as path:
        return ad.read_h5ad(path)
