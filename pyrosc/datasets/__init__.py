"""Datasets shipped inside the package (no download, ever).

``pbmc3k()``: 10x Genomics' 3k PBMCs from a healthy donor, raw counts of all 32,738 genes, with
the 9 cell types of the Seurat clustering tutorial in ``obs["cell_type"]`` (62 cells that the
tutorial's QC removed are NaN). Provenance and licence: ``PROVENANCE.md`` beside this file.

``cellbench()``: CellBench / sc_mixology (Tian et al. 2019), 1,408 cells of 5 lung
adenocarcinoma cell lines from 5 batches (4 CEL-seq2 runs and 1 Drop-seq), raw UMI counts of
2,000 highly variable genes, with a fixed train/test split. The multi-batch dataset of the
scVI tutorial and tests. Provenance and licence (MIT): ``PROVENANCE.md``.
"""

from __future__ import annotations

from importlib import resources

import anndata as ad

__all__ = ["cellbench", "pbmc3k"]


def pbmc3k() -> ad.AnnData:
    """The embedded PBMC 3k dataset: 2,700 cells x 32,738 genes, raw integer counts (CSR).

    Returns:
        a new AnnData (a fresh copy on every call) with ``obs["cell_type"]`` (9 types, NaN for
        62 cells), ``obs["batch"]`` (one value) and ``var["gene_symbols"]``.
    """
    with resources.as_file(resources.files(__name__) / "pbmc3k.h5ad") as path:
        return ad.read_h5ad(path)


def cellbench() -> ad.AnnData:
    """The embedded CellBench 5-batch dataset: 1,408 cells x 2,000 genes, raw counts (CSR).

    A byte copy of the project's benchmark view ``hvg2000/cellbench_5batch.h5ad``.

    Returns:
        a new AnnData with ``obs["cell_type"]`` (5 cell lines: H1975, H2228, HCC827, A549,
        H838), ``obs["batch"]`` (5 batches), ``obs["technology"]`` (CEL-seq2 or Drop-seq),
        ``obs["demuxlet_cls"]``, ``obs["split"]`` ("train" 1,275 / "test" 133 cells), and the
        highly-variable-gene statistics in ``var``; ``var_names`` are Ensembl gene IDs.
    """
    with resources.as_file(resources.files(__name__) / "cellbench_5batch.h5ad") as path:
        return ad.read_h5ad(path)
