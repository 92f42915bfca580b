"""Counts bigger than memory: cells streamed from h5ad files on disk.

:func:`from_backed` turns an AnnData whose counts are on disk (``anndata.read_h5ad(path,
backed="r")``, or :func:`read_backed`), or a list of them (the same genes in the same order;
cells stacked in the order given), into a :class:`StreamedCountData`: the
:class:`pyrosc.data.CountData` interface (``n_cells``, ``n_genes``, the per-cell metadata,
``subset``, ``minibatch(index)``, ``sampler``) with the counts left on disk. Everything a fit
needs from all cells is computed in one streamed pass over blocks of cells: the checks of the
counts (the same errors as in memory, naming the cell and the gene), the library sizes, the
genes without counts. What stays in memory per cell is its metadata (library size, covariate
codes, name: tens of bytes); the counts in memory are bounded by the block cache
(:class:`pyrosc.disk_blocks.BlockReader`), whatever the number of cells.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pyrosc import input_checks as checks
from pyrosc.block_sampler import BlockShuffleSampler, prefetched
from pyrosc.data import CountData, MinibatchSampler, cell_annotations, checked_keys
from pyrosc.disk_blocks import ON_DISK, BlockReader

Source = anndata.AnnData | str | os.PathLike
SHUFFLES = ("blocks", "cells")


@dataclass(frozen=True)
class StreamOptions:
    """How cells are read from disk.

    Attributes:
        block_size: consecutive cells read at once.
        blocks_per_window: blocks whose cells are shuffled together in training; the reader
            caches twice as many (the window being read and the one before), so at most
            ``2 * blocks_per_window * block_size`` cells' counts are in memory.
        prefetch: minibatches read ahead in a background thread while one trains (0: none).
    """

    block_size: int = 512
    blocks_per_window: int = 16
    prefetch: int = 2


class DiskRows:
    """``(cells, genes)`` counts on disk: rows ``rows`` of a :class:`BlockReader`, read on demand.

    Indexing with positions gives another ``DiskRows`` (nothing is read); :meth:`read` reads.
    """

    def __init__(self, reader: BlockReader, rows: np.ndarray) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.reader.n_genes

    def __getitem__(self, index: np.ndarray | slice) -> DiskRows:
        return DiskRows(self.reader, self.rows[index])

    def read(self, index: np.ndarray) -> sp.csr_matrix:
        """float32 CSR counts of the cells at positions ``index``, (n, genes)."""
        return self.reader.read(self.rows[index])


@dataclass(frozen=True)
class StreamedCountData(CountData):
    """:class:`pyrosc.data.CountData` whose counts stay on disk (``counts`` is a
    :class:`DiskRows`): minibatches are read in blocks, and a fit's minibatches are
    block-shuffled (:class:`pyrosc.block_sampler.BlockShuffleSampler`) and read ahead."""

    options: StreamOptions = field(default_factory=StreamOptions)

    @property
    def reader(self) -> BlockReader:
        """The block reader (shared by every subset of these cells)."""
        return self.counts.reader

    def count_rows(self, index: np.ndarray) -> sp.csr_matrix:
        """float32 CSR counts of the cells at positions ``index``, (n, genes), from disk."""
        return self.counts.read(np.asarray(index, dtype=np.int64))

    def sampler(
        self, batch_size: int = 128, seed: int = 0, shuffle: str | None = None
    ) -> MinibatchSampler:
        """A fit's minibatches, epoch after epoch (iterables of (B,) int64 positions).

        Args:
            shuffle: ``"blocks"`` (the default: blocks of consecutive cells in a random order,
                cells shuffled within ``options.blocks_per_window`` blocks; each block read
                once per epoch) or ``"cells"``: the order of counts in memory,
                :class:`pyrosc.data.MinibatchSampler` (a fit then equals one in memory, but
                each minibatch reads from many blocks: slow on large files).
        """
        if shuffle not in (None, *SHUFFLES):
            raise ValueError(f"shuffle must be one of {SHUFFLES}, got {shuffle!r}")
        if shuffle == "cells":
            return MinibatchSampler(self.n_cells, batch_size, shuffle=True, seed=seed)
        blocks = self.reader.block_of(self.counts.rows)
        return BlockShuffleSampler(blocks, batch_size, self.options.blocks_per_window, seed)

    def minibatches(
        self, batches: Iterable[np.ndarray], device: torch.device | str = "cpu"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`minibatch` of each index array, read ahead by ``options.prefetch``."""
        return prefetched(
            batches, lambda index: self.minibatch(index, device), self.options.prefetch
        )


def is_on_disk(adata: object, layer: str | None = None) -> bool:
    """Whether :func:`pyrosc.data.from_anndata` streams ``adata``: a list of AnnData or paths,
    a path, or an AnnData whose count matrix (``X``, or ``layers[layer]``) is on disk."""
    if isinstance(adata, list | tuple | str | os.PathLike):
        return True
    if not isinstance(adata, anndata.AnnData):
        return False
    matrix = adata.X if layer is None else adata.layers.get(layer)
    return isinstance(matrix, ON_DISK)


def read_backed(path: str | os.PathLike, layer: str | None = None) -> anndata.AnnData:
    """Open an h5ad file with its count matrix on disk: ``obs`` and ``var`` in memory, ``X``
    (or ``layers[layer]`` only) as an on-disk matrix, nothing else read.

    Unlike ``anndata.read_h5ad(path, backed="r")``, which reads every layer into memory, this
    leaves the counts layer on disk. The file is opened read-only and never written.

    Returns:
        AnnData ``(cells, genes)`` with ``X`` (layer None) or ``layers[layer]`` on disk.

    Raises:
        ValueError: the file has no such layer (the message lists its layers).
    """
    file = h5py.File(path, "r")
    obs, var = anndata.io.read_elem(file["obs"]), anndata.io.read_elem(file["var"])
    if layer is None:
        return anndata.AnnData(X=_on_disk(file["X"]), obs=obs, var=var)
    layers = list(file["layers"]) if "layers" in file else []
    if layer not in layers:
        raise ValueError(
            f"layer {layer!r} not found in {os.fspath(path)!r}; its layers are "
            f"{checks.quoted(layers) if layers else 'none'}. Use layer=None for X."
        )
    return anndata.AnnData(obs=obs, var=var, layers={layer: _on_disk(file["layers"][layer])})


def opened(sources: Source | Sequence[Source], layer: str | None = None) -> object:
    """``sources`` with every path opened by :func:`read_backed` (an AnnData as it is)."""
    if isinstance(sources, list | tuple):
        return [opened(source, layer) for source in sources]
    if isinstance(sources, str | os.PathLike):
        return read_backed(sources, layer)
    return sources


def var_names_of(sources: anndata.AnnData | Sequence[anndata.AnnData]) -> pd.Index:
    """The genes of an AnnData, or of the first of a list."""
    first = sources[0] if isinstance(sources, list | tuple) else sources
    return first.var_names


def cells_of(
    sources: anndata.AnnData | Sequence[anndata.AnnData], columns: Sequence[str | None] = ()
) -> anndata.AnnData:
    """The cells of an AnnData (itself), or of a list of them: an AnnData without counts, the
    files' cells in order with the obs ``columns`` that every file has (categorical columns
    with the union of the files' categories, as ``anndata.concat``), and the first's genes.

    Raises:
        ValueError: a cell name in more than one file.
    """
    if not isinstance(sources, list | tuple):
        return sources
    adatas = list(sources)
    columns = [key for key in dict.fromkeys(columns) if key is not None]
    columns = [key for key in columns if all(key in adata.obs for adata in adatas)]
    stacked = anndata.concat([anndata.AnnData(obs=adata.obs[columns]) for adata in adatas])
    repeated = stacked.obs_names[stacked.obs_names.duplicated()].unique()
    if len(repeated):
        names = [_name(adata, i, len(adatas)) for i, adata in enumerate(adatas)]
        holders = [
            name
            for adata, name in zip(adatas, names, strict=True)
            if repeated[0] in adata.obs_names
        ]
        raise ValueError(
            f"{len(repeated):,} cell name(s) occur in more than one file (e.g. "
            f"{repeated[0]!r} in {' and '.join(holders)}); pyrosc tells cells apart by name. "
            "Give each file's cells distinct names (e.g. a prefix per file) when writing it."
        )
    return anndata.AnnData(obs=stacked.obs, var=pd.DataFrame(index=adatas[0].var_names))


def from_backed(
    sources: Source | Sequence[Source],
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: Sequence[str] = (),
    covariate_categories: dict[str, list[str]] | None = None,
    continuous_covariate_keys: Sequence[str] = (),
    options: StreamOptions | None = None,
) -> StreamedCountData:
    """Validate counts on disk in one streamed pass and encode the cells' covariates.

    Args:
        sources: an AnnData whose counts are on disk (``anndata.read_h5ad(path, backed="r")``
            or :func:`read_backed`), a path (opened with :func:`read_backed`), or a list of
            these with the same genes in the same order, whose cells are stacked in order.
            Never modified; the files are only read.
        layer: as :func:`pyrosc.data.from_anndata`, and so are ``batch_key``, ``labels_key``,
            ``categorical_covariate_keys``, ``covariate_categories`` and
            ``continuous_covariate_keys``.
        options: block size, shuffling window and read-ahead (:class:`StreamOptions`).

    Returns:
        a :class:`StreamedCountData` whose ``library``, covariates and names are in memory and
        whose counts stay on disk.

    Raises:
        TypeError: a source that is not an AnnData or a path, or counts stored as CSC.
        ValueError: as :func:`pyrosc.data.from_anndata` (the first offending cell and gene of a
            file named in the message), files whose genes differ (the first differing gene
            named), or a cell name in two files.
    """
    adatas = opened(sources, layer)
    adatas = list(adatas) if isinstance(adatas, list) else [adatas]
    if not adatas:
        raise ValueError("the list of files is empty; pass at least one AnnData or path")
    names = [_name(adata, i, len(adatas)) for i, adata in enumerate(adatas)]
    for adata, name in zip(adatas, names, strict=True):
        _in_file(name, len(adatas), checks.check_anndata, adata)
        _in_file(name, len(adatas), checks.check_unique_names, adata)
        _in_file(name, len(adatas), checks.check_not_empty, adata)
    _check_same_genes(adatas, names)
    for adata, name in zip(adatas, names, strict=True):
        keys = (labels_key, categorical_covariate_keys, continuous_covariate_keys)
        covariate_keys, continuous_keys = _in_file(
            name, len(adatas), checked_keys, adata, batch_key, *keys, covariate_categories
        )
    columns = [batch_key, labels_key, *categorical_covariate_keys, *continuous_covariate_keys]
    cells = cells_of(adatas if len(adatas) > 1 else adatas[0], columns)
    what = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    matrices = [
        _matrix(adata, layer, what, name) for adata, name in zip(adatas, names, strict=True)
    ]
    options = options or StreamOptions()
    reader = BlockReader(matrices, options.block_size, 2 * options.blocks_per_window)

    library = np.empty(reader.n_rows, dtype=np.float64)
    gene_totals = np.zeros(reader.n_genes, dtype=np.float64)
    for file, (adata, name) in enumerate(zip(adatas, names, strict=True)):
        source = what if len(adatas) == 1 else f"{what} of {name}"
        problems = checks.ValueProblems()
        for start, stop, block in reader.blocks(file):
            problems.add(block, cells.obs_names[start:stop], cells.var_names)
            counts = block.astype(np.float32)
            library[start:stop] = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
            gene_totals += np.asarray(counts.sum(axis=0, dtype=np.float64)).ravel()

        def summaries(file: int = file) -> checks.RowSummaries:
            parts = [checks.RowSummaries.of(block) for _, _, block in reader.blocks(file)]
            return checks.RowSummaries.joined(parts)

        problems.raise_first(adata, layer, source, summaries)
    source = what if len(adatas) == 1 else f"{what} of the {len(adatas)} files"
    checks.check_cells_have_counts(library, cells.obs_names, source)
    if covariate_categories is None:  # new data for a fitted model: its genes are fixed
        checks.warn_genes_without_counts(gene_totals, cells.var_names, source)
    return StreamedCountData(
        counts=DiskRows(reader, np.arange(reader.n_rows)),
        library=library.astype(np.float32),
        **cell_annotations(
            cells, covariate_keys, continuous_keys, labels_key, covariate_categories
        ),
        options=options,
    )


# -- the files -------------------------------------------------------------------------------


def _on_disk(element: h5py.Group | h5py.Dataset) -> object:
    """An h5ad matrix element as anndata's backed matrix (sparse) or the dataset (dense)."""
    if isinstance(element, h5py.Dataset):
        return element
    return anndata.io.sparse_dataset(element)


def _name(adata: object, position: int, n_sources: int) -> str:
    """How messages name a source: its file, else its position in the list."""
    if isinstance(adata, anndata.AnnData):
        for matrix in (adata.X, *adata.layers.values()):
            if isinstance(matrix, ON_DISK):
                group = matrix.group if hasattr(matrix, "group") else matrix
                return repr(os.fspath(group.file.filename))
    return "adata" if n_sources == 1 else f"the AnnData at position {position} of the list"


def _in_file(name: str, n_sources: int, check, *args) -> object:
    """``check(*args)``, its ValueError or TypeError prefixed with the file's name when there
    are several files."""
    if n_sources == 1:
        return check(*args)
    try:
        return check(*args)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{name}: {error}") from None


def _check_same_genes(adatas: list[anndata.AnnData], names: list[str]) -> None:
    """Raise unless every AnnData has the first one's genes, in the same order."""
    genes = adatas[0].var_names
    for adata, name in zip(adatas[1:], names[1:], strict=True):
        other = adata.var_names
        if other.equals(genes):
            continue
        shared = min(len(genes), len(other))
        differ = np.flatnonzero(np.asarray(genes[:shared]) != np.asarray(other[:shared]))
        if len(differ):
            i = int(differ[0])
            where = f"gene {i} is {other[i]!r} there but {genes[i]!r} in {names[0]}"
        else:
            where = f"it has {len(other):,} genes and {names[0]} has {len(genes):,}"
        raise ValueError(
            f"{name} does not hold the genes of {names[0]} in the same order: {where}. Every "
            "file must hold the same genes in the same order; write each with "
            "adata[:, genes] for one list of genes."
        )


def _matrix(adata: anndata.AnnData, layer: str | None, what: str, name: str) -> object:
    """The count matrix of ``adata`` (on disk, or in memory in a list of files)."""
    if layer is not None and layer not in adata.layers:
        checks.count_matrix(adata, layer, what)  # raises the unknown-layer error
    matrix = adata.X if layer is None else adata.layers[layer]
    if isinstance(matrix, anndata.abc.CSCDataset):
        raise TypeError(
            f"{what} of {name} is stored as CSC (by gene): reading a cell means reading every "
            "gene's column. pyrosc streams CSR (by cell) counts; write the file with CSR "
            "counts, e.g. adata.X = adata.X.tocsr() before adata.write_h5ad(...)."
        )
    if isinstance(matrix, ON_DISK):
        if matrix.dtype.kind not in "iuf":
            raise ValueError(f"{what} of {name} has dtype {matrix.dtype}; counts must be numbers.")
        return matrix
    return checks.count_matrix(adata, layer, what)
