"""Where the classes put per-cell results: the AnnData a model was set up with, or each AnnData
of a list of files (its own cells' rows), and, on request, a new file on disk.

A backed AnnData's ``obs``, ``obsm`` and ``uns`` live in memory: results written there never
reach its file, which pyrosc only reads. :class:`LatentFile` writes a ``(cells, k)`` result to a
new ``.npy`` file chunk by chunk, so that nothing of size ``cells`` need be in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

Target = ad.AnnData | Sequence[ad.AnnData]


def _members(target: Target) -> list[ad.AnnData]:
    return list(target) if isinstance(target, list | tuple) else [target]


def _row_ranges(target: Target) -> list[tuple[ad.AnnData, slice]]:
    """Each AnnData of ``target`` and the rows of a stacked result that are its cells."""
    ranges, start = [], 0
    for adata in _members(target):
        ranges.append((adata, slice(start, start + adata.n_obs)))
        start += adata.n_obs
    return ranges


def store_obsm(target: Target, key: str, values: np.ndarray) -> None:
    """``values`` (cells, k) to ``obsm[key]`` of ``target`` (each AnnData its rows)."""
    for adata, rows in _row_ranges(target):
        adata.obsm[key] = values[rows]


def store_obs(target: Target, key: str, values: np.ndarray | pd.Categorical) -> None:
    """``values`` (cells,) to ``obs[key]`` of ``target`` (each AnnData its rows)."""
    for adata, rows in _row_ranges(target):
        adata.obs[key] = values[rows]


def store_uns(target: Target, key: str, value: object) -> None:
    """``value`` to ``uns[key]`` of ``target`` (of each AnnData of a list)."""
    for adata in _members(target):
        adata.uns[key] = value


def obs_column(target: Target, key: str, argument: str = "groupby") -> pd.Series:
    """``obs[key]`` of ``target``, the files' columns stacked in order for a list.

    Raises:
        ValueError: ``key`` is not an obs column (of some AnnData of a list).
    """
    for adata in _members(target):
        if key not in adata.obs:
            raise ValueError(
                f"{argument} {key!r} is not an obs column; the columns are: "
                f"{list(adata.obs.columns)}"
            )
    columns = [adata.obs[key] for adata in _members(target)]
    if len(columns) == 1:
        return columns[0]
    if all(isinstance(column.dtype, pd.CategoricalDtype) for column in columns):
        return pd.Series(pd.api.types.union_categoricals(columns), index=_stacked_names(columns))
    return pd.concat(columns)


def _stacked_names(columns: list[pd.Series]) -> pd.Index:
    return pd.Index(np.concatenate([column.index.to_numpy() for column in columns]))


def new_file(path: str | os.PathLike, suffix: str) -> Path:
    """``path`` as a Path, checked to end in ``suffix`` and not to exist yet.

    Raises:
        ValueError: another suffix.
        FileExistsError: ``path`` exists; results go to a new file only, so that no input
            file (such as the h5ad being read) is ever overwritten.
    """
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"out must name a new {suffix} file, got {os.fspath(path)!r}")
    if path.exists():
        raise FileExistsError(
            f"{path} exists; pyrosc writes results to a new file only (so that no input file "
            "is ever overwritten): remove it or choose another name"
        )
    return path


class LatentFile:
    """A new ``.npy`` file of ``(cells, width)`` float32, written chunk by chunk through NumPy's
    ``open_memmap``: a per-cell result that need not fit in memory (see :func:`new_file` for
    the path's checks)."""

    def __init__(self, path: str | os.PathLike, n_cells: int) -> None:
        self.path = new_file(path, ".npy")
        self.n_cells = n_cells
        self._array: np.memmap | None = None
        self._filled = 0

    def append(self, rows: np.ndarray) -> None:
        """The next ``(n, width)`` rows (the first call fixes the width)."""
        if self._array is None:
            self._array = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=np.float32, shape=(self.n_cells, rows.shape[1])
            )
        self._array[self._filled : self._filled + len(rows)] = rows
        self._filled += len(rows)

    def close(self) -> np.memmap:
        """Flush, and return the file memory-mapped read-only, ``(cells, width)``."""
        self._array.flush()
        self._array = None
        return np.load(self.path, mmap_mode="r")
