"""Count matrices on disk, read in blocks of consecutive cells, with a cache of bounded size.

An h5ad file stores a CSR matrix row after row, so a block of consecutive cells is one
contiguous read. :class:`BlockReader` takes anndata's backed matrices
(``anndata.abc.CSRDataset``, what ``anndata.read_h5ad(path, backed="r").X`` or
``anndata.io.sparse_dataset`` gives, read through its arrays by :class:`CsrOnDisk`; a dense
``h5py.Dataset`` too), stacks several files' cells one after the other, and keeps at most
``cache_blocks`` blocks in memory: whatever the number of cells, the counts in memory are
bounded by ``cache_blocks * block_size`` cells.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import anndata
import h5py
import numpy as np
import scipy.sparse as sp

#: The count matrices that live on disk: what a backed AnnData holds.
ON_DISK = (anndata.abc.CSRDataset, anndata.abc.CSCDataset, h5py.Dataset)

# A block of which fewer than this share of cells is needed is not read whole: its cells are
# read one by one (e.g. the 10% of validation cells, spread over every block).
_WHOLE_BLOCK_SHARE = 0.25


class BlockReader:
    """The rows of one or more ``(cells_i, genes)`` count matrices, stacked in order, read from
    disk in blocks.

    Blocks are ``block_size`` consecutive rows of one matrix (a file's last block may be
    shorter; no block spans two files). Blocks that are read whole are kept in a
    least-recently-used cache of at most ``cache_blocks`` blocks; reads are serialised by a
    lock, so a background thread may read ahead (:func:`pyrosc.block_sampler.prefetched`).

    Args:
        matrices: CSR on disk (``anndata.abc.CSRDataset``), dense on disk (``h5py.Dataset``),
            or in memory (scipy sparse, numpy), all with the same number of genes.
        block_size: rows per block.
        cache_blocks: blocks kept in memory at most.

    Attributes:
        block_starts, block_stops: (blocks,) int64 first row and one past the last row of each
            block, in the stacked numbering.
        blocks_read: how many blocks were read whole from disk so far.
        most_cached: the largest number of blocks the cache ever held (never above
            ``cache_blocks``).
    """

    def __init__(self, matrices: Sequence, block_size: int = 512, cache_blocks: int = 32) -> None:
        if block_size < 1 or cache_blocks < 1:
            raise ValueError(
                f"block_size and cache_blocks must be at least 1, got {block_size} and "
                f"{cache_blocks}"
            )
        # CSR on disk is read from its arrays directly (see CsrOnDisk); the rest by slicing.
        self.matrices = [
            CsrOnDisk(matrix) if isinstance(matrix, anndata.abc.CSRDataset) else matrix
            for matrix in matrices
        ]
        self.block_size = block_size
        self.cache_blocks = cache_blocks
        sizes = [int(matrix.shape[0]) for matrix in self.matrices]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        starts = [
            np.arange(0, size, block_size) + offset
            for size, offset in zip(sizes, self.offsets[:-1], strict=True)
        ]
        self.block_starts = np.concatenate(starts).astype(np.int64)
        self.block_file = np.concatenate(
            [np.full(len(s), i, dtype=np.int64) for i, s in enumerate(starts)]
        )
        file_ends = self.offsets[1:][self.block_file]
        self.block_stops = np.minimum(self.block_starts + block_size, file_ends)
        self.blocks_read = 0
        self.most_cached = 0
        self._cache: OrderedDict[int, sp.csr_matrix] = OrderedDict()
        self._lock = threading.Lock()

    # -- in another process --------------------------------------------------------------

    def __getstate__(self) -> dict:
        """What a process started by ``spawn`` receives: the files by name, no open handle
        (HDF5 handles do not cross processes), an empty cache."""
        state = self.__dict__.copy()
        state["matrices"] = [_Reopen.of(matrix) for matrix in self.matrices]
        state["_cache"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.matrices = [_Reopen.opened(matrix) for matrix in self.matrices]
        self._lock = threading.Lock()

    def reopen(self) -> None:
        """Open this reader's files afresh (read-only) and empty its cache: what a process
        forked from the one that opened them does before reading (an HDF5 handle shared across
        a fork is not safe)."""
        with self._lock:
            self.matrices = [_Reopen.opened(_Reopen.of(matrix)) for matrix in self.matrices]
            self._cache.clear()

    @property
    def n_rows(self) -> int:
        """Rows of all matrices together."""
        return int(self.offsets[-1])

    @property
    def n_genes(self) -> int:
        """Columns of every matrix."""
        return int(self.matrices[0].shape[1])

    @property
    def cached_blocks(self) -> int:
        """How many blocks the cache holds now."""
        return len(self._cache)

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """(n,) int64 block of each of ``rows`` (stacked numbering)."""
        return np.searchsorted(self.block_starts, rows, side="right") - 1

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """The float32 counts of ``rows`` (stacked numbering, any order, repeats allowed), in
        that order: ``(len(rows), genes)`` CSR."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"rows outside the {self.n_rows} rows on disk")
        unique, inverse = np.unique(rows, return_inverse=True)
        blocks = self.block_of(unique)
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        parts = []
        with self._lock:
            for segment in np.split(np.arange(len(unique)), cuts):
                if len(segment) == 0:
                    continue
                block = int(blocks[segment[0]])
                parts.append(self._rows_of_block(block, unique[segment]))
        if not parts:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        return sp.vstack(parts, format="csr")[inverse]

    def blocks(self, file: int) -> Iterator[tuple[int, int, sp.csr_matrix | np.ndarray]]:
        """Every block of matrix ``file`` in order, as stored (dtype unchanged, for checks):
        ``(start, stop, rows)`` with ``start``/``stop`` in the stacked numbering. Not cached:
        one pass over a file holds one block at a time."""
        for block in np.flatnonzero(self.block_file == file):
            start, stop = int(self.block_starts[block]), int(self.block_stops[block])
            yield start, stop, self._read_range(block)

    # -- reading ---------------------------------------------------------------------------

    def _rows_of_block(self, block: int, rows: np.ndarray) -> sp.csr_matrix:
        """float32 CSR of ``rows`` (sorted, unique), all in ``block``."""
        start, stop = int(self.block_starts[block]), int(self.block_stops[block])
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block][rows - start]
        if len(rows) < _WHOLE_BLOCK_SHARE * (stop - start):
            matrix = self.matrices[int(self.block_file[block])]
            offset = int(self.offsets[self.block_file[block]])
            return _as_counts(matrix[rows - offset])
        counts = _as_counts(self._read_range(block))
        self.blocks_read += 1
        self._cache[block] = counts
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        self.most_cached = max(self.most_cached, len(self._cache))
        return counts[rows - start]

    def _read_range(self, block: int) -> sp.csr_matrix | np.ndarray:
        """Block ``block`` as stored: CSR (canonical: duplicate entries summed) or dense."""
        file = int(self.block_file[block])
        offset = int(self.offsets[file])
        start, stop = int(self.block_starts[block]) - offset, int(self.block_stops[block]) - offset
        rows = self.matrices[file][start:stop]
        if sp.issparse(rows):
            rows = sp.csr_matrix(rows)
            if not rows.has_canonical_format:
                rows = rows.copy()
                rows.sum_duplicates()
            return rows
        return np.asarray(rows)


def _as_counts(rows: sp.spmatrix | sp.sparray | np.ndarray) -> sp.csr_matrix:
    """Rows of counts as float32 CSR (duplicate entries summed), a copy."""
    counts = sp.csr_matrix(rows, dtype=np.float32, copy=True)
    counts.sum_duplicates()
    return counts


class CsrOnDisk:
    """The rows of a CSR matrix in anndata's on-disk encoding (a group holding ``data``,
    ``indices`` and ``indptr``), read straight from those arrays.

    anndata's ``CSRDataset[...]`` reads the same arrays, but each call first looks up SciPy's
    version in the installed packages' metadata (in anndata 0.12; costlier than reading a
    block), so only the group and its shape are taken from it. ``indptr`` ((cells + 1,) int64,
    8 bytes a cell) is read once and kept, as anndata does.
    """

    def __init__(self, dataset: anndata.abc.CSRDataset) -> None:
        group = dataset.group
        self.shape = tuple(int(size) for size in dataset.shape)
        self.dtype = dataset.dtype
        self.indptr = np.asarray(group["indptr"][...], dtype=np.int64)
        self.data, self.indices = group["data"], group["indices"]

    def __getitem__(self, rows: slice | np.ndarray) -> sp.csr_matrix:
        """Rows ``start:stop`` (one read of each array), or the sorted unique ``rows`` (one
        read of each array per row), as stored."""
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(self.shape[0])
            low, high = self.indptr[start], self.indptr[stop]
            indptr = self.indptr[start : stop + 1] - low
            data, indices = self.data[low:high], self.indices[low:high]
            return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.shape[1]))
        lows, highs = self.indptr[rows], self.indptr[rows + 1]
        data = [self.data[low:high] for low, high in zip(lows, highs, strict=True)]
        indices = [self.indices[low:high] for low, high in zip(lows, highs, strict=True)]
        indptr = np.concatenate([[0], np.cumsum(highs - lows)])
        return sp.csr_matrix(
            (_joined(data, self.dtype), _joined(indices, self.indices.dtype), indptr),
            shape=(len(rows), self.shape[1]),
        )


class _Reopen:
    """A matrix on disk by file name and path in the file, to open again in another process
    (read-only); a matrix in memory is kept as it is."""

    def __init__(self, kind: str, file: str, name: str) -> None:
        self.kind, self.file, self.name = kind, file, name

    @staticmethod
    def of(matrix: object) -> object:
        if isinstance(matrix, CsrOnDisk):
            return _Reopen("csr", matrix.data.file.filename, matrix.data.parent.name)
        if isinstance(matrix, h5py.Dataset):
            return _Reopen("dense", matrix.file.filename, matrix.name)
        return matrix

    @staticmethod
    def opened(matrix: object) -> object:
        if not isinstance(matrix, _Reopen):
            return matrix
        node = h5py.File(matrix.file, "r")[matrix.name]
        return CsrOnDisk(anndata.io.sparse_dataset(node)) if matrix.kind == "csr" else node


def _joined(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
