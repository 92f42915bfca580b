"""AnnData -> the data a model reads: validated counts, covariate codes, minibatches, splits.

:class:`CountData` holds one AnnData's counts and covariates, ready for minibatching;
`from_anndata` builds it after the checks of :mod:`pyrosc.input_checks` (raw integer counts,
known keys, complete covariates). The user's AnnData is never modified: `CountData` holds its
own float32 copy of the counts. `MinibatchSampler` and `split_cells` draw the cells of training
steps and of the train/validation split; `select_genes` picks the genes to model.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pyrosc import input_checks as checks


@dataclass(frozen=True)
class CountData:
    """Validated counts of one AnnData, ready for minibatching.

    Attributes:
        counts: (cells, genes) float32; a CSR matrix if the input was sparse, else a dense array.
        library: (cells,) float32 total counts per cell, over the genes used.
        covariates: key -> (cells,) int64 codes, in order: batch_key first, then the
            categorical covariate keys.
        covariate_categories: key -> category names; code i means ``categories[i]``.
        labels: ``obs[labels_key]`` as given (may hold NaN), indexed by obs_names; for scoring
            only, never used in training.
        obs_names: (cells,) cell names.
        var_names: (genes,) gene names.
        continuous_covariates: (cells, k) float32 values of the continuous covariate keys, in
            order (shape (cells, 0) when there are none).
        continuous_covariate_keys: the obs columns of ``continuous_covariates``.
        cell_index: (cells,) int64 position of each cell in the dataset it was validated from
            (``arange(cells)``; a :meth:`subset` keeps the original positions).
        label: (cells,) int64 codes of the cell types a semi-supervised model learns from, -1
            where a cell is unlabelled; None (the default) for the models that take no labels.
            Set by the model that encodes them (:class:`pyrosc.SCANVI`), not by
            :func:`from_anndata`.
    """

    counts: sp.csr_matrix | np.ndarray
    library: np.ndarray
    covariates: dict[str, np.ndarray]
    covariate_categories: dict[str, list[str]]
    labels: pd.Series | None
    obs_names: pd.Index
    var_names: pd.Index
    continuous_covariates: np.ndarray
    continuous_covariate_keys: tuple[str, ...]
    cell_index: np.ndarray
    label: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        """Number of cells (rows of counts)."""
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        """Number of genes (columns of counts)."""
        return self.counts.shape[1]

    def subset(self, index: np.ndarray) -> CountData:
        """The cells at integer positions ``index`` (shape (n,)), as a new CountData (of the
        same class: a subset of counts on disk stays on disk)."""
        index = _positions(index)
        return dataclasses.replace(
            self,
            counts=self.counts[index],
            library=self.library[index],
            covariates={key: codes[index] for key, codes in self.covariates.items()},
            covariate_categories={
                key: list(names) for key, names in self.covariate_categories.items()
            },
            labels=None if self.labels is None else self.labels.iloc[index],
            obs_names=self.obs_names[index],
            continuous_covariates=self.continuous_covariates[index],
            cell_index=self.cell_index[index],
            label=None if self.label is None else self.label[index],
        )

    def count_rows(self, index: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """The float32 counts of the cells at positions ``index``, (n, genes): CSR if the
        counts are sparse, else dense."""
        return self.counts[_positions(index)]

    def sampler(
        self, batch_size: int = 128, seed: int = 0, shuffle: str | None = None
    ) -> MinibatchSampler:
        """The minibatches of one pass over these cells, epoch after epoch: an iterable of
        (B,) int64 positions (see :class:`MinibatchSampler`).

        Args:
            batch_size: cells per minibatch.
            seed: seeds the order.
            shuffle: ``"cells"`` (the default here: every epoch a fresh permutation of all
                cells). ``"blocks"`` applies to counts on disk only
                (:class:`pyrosc.streaming.StreamedCountData`).
        """
        if shuffle not in (None, "cells"):
            raise ValueError(
                f"shuffle={shuffle!r} does not apply to counts in memory, whose cells are "
                "shuffled one by one; 'blocks' is for counts read from disk (a backed AnnData)"
            )
        return MinibatchSampler(self.n_cells, batch_size, shuffle=True, seed=seed)

    def minibatches(
        self, batches: Iterable[np.ndarray], device: torch.device | str = "cpu"
    ) -> Iterator[dict[str, torch.Tensor]]:
        """:meth:`minibatch` of each (B,) index array of ``batches`` (e.g. one epoch of a
        :meth:`sampler`), in order. Counts on disk are read ahead in a background thread
        (:class:`pyrosc.streaming.StreamedCountData`)."""
        for index in batches:
            yield self.minibatch(index, device)

    def minibatch(
        self, index: np.ndarray, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Tensors for the cells at integer positions ``index`` (shape (B,)) on ``device``.

        Returns:
            the data arguments of the model/guide contract: ``counts``: (B, genes) float32,
            dense; ``library``: (B,) float32; ``batch``: (B,) int64 codes of the first
            covariate (zeros when there is none); ``covariates``: (B, n_covariates) int64
            (shape (B, 0) when there are none); ``continuous_covariates``: (B, k) float32
            (shape (B, 0) when there are none); ``cell_index``: (B,) int64 positions of the
            cells in the dataset (see :attr:`cell_index`), the indices the ``cells`` plate
            subsamples; and, when the data has them, ``label``: (B,) int64 codes (-1:
            unlabelled, see :attr:`label`). On a GPU the arrays go through pinned (page-locked)
            memory and are copied without blocking, so that a copy overlaps the GPU's work.
        """
        index = _positions(index)
        rows = self.count_rows(index)
        # Only the selected rows are densified: the full matrix may not fit in memory dense.
        dense_rows = rows.toarray() if sp.issparse(rows) else rows
        codes = [self.covariates[key][index] for key in self.covariates]
        covariates = np.stack(codes, axis=1) if codes else np.zeros((len(index), 0), np.int64)
        batch = covariates[:, 0] if codes else np.zeros(len(index), np.int64)
        arrays = {
            "counts": np.ascontiguousarray(dense_rows, dtype=np.float32),
            "library": self.library[index],
            "batch": np.ascontiguousarray(batch),
            "covariates": covariates,
            "continuous_covariates": self.continuous_covariates[index],
            "cell_index": self.cell_index[index],
        }
        if self.label is not None:
            arrays["label"] = self.label[index]
        pinned = torch.device(device).type == "cuda"
        return {
            name: _pinned(torch.from_numpy(array), pinned).to(device, non_blocking=True)
            for name, array in arrays.items()
        }


def _pinned(tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
    """``tensor`` in page-locked memory when ``pinned`` (a host-to-GPU copy from it need not
    wait), else as it is."""
    return tensor.pin_memory() if pinned else tensor


def from_anndata(
    adata: anndata.AnnData,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    categorical_covariate_keys: Sequence[str] = (),
    covariate_categories: dict[str, list[str]] | None = None,
    continuous_covariate_keys: Sequence[str] = (),
) -> CountData:
    """Validate the raw counts of ``adata`` and encode its covariates.

    Counts on disk are streamed (:func:`pyrosc.streaming.from_backed`): an AnnData whose ``X``
    (or ``layers[layer]``) is on disk (``anndata.read_h5ad(path, backed="r")``, or
    :func:`pyrosc.read_backed` for a layer), an h5ad path, or a list of these with the same
    genes in the same order (cells stacked in the order given). The checks below then run in
    one pass over blocks of cells, with the same errors, and a
    :class:`pyrosc.streaming.StreamedCountData` is returned, its counts left on disk.

    Args:
        adata: (cells, genes) AnnData, a path, or a list of them; never modified.
        layer: the layer holding raw counts; None means ``adata.X``.
        batch_key: obs column of the batch; it becomes the first covariate.
        labels_key: obs column of cell labels, kept for scoring only.
        categorical_covariate_keys: further categorical obs columns, after the batch.
        covariate_categories: the categories of a fitted model, key -> names. When given, codes
            are made with these categories, so that new data is encoded as the training data was;
            a category outside them is an error.
        continuous_covariate_keys: numeric obs columns (e.g. percent mitochondrial counts,
            cell-cycle scores), kept as ``continuous_covariates``, (cells, k) float32.

    Category codes: for a pandas Categorical column, its ``cat.categories`` in their order, but
    only those present in the data; for any other column, the sorted unique values, as strings.

    Raises:
        TypeError: ``adata`` is not an AnnData (or a path, or a list), or its matrix is
            neither an array nor CSR (on disk: CSC is refused, see :mod:`pyrosc.streaming`).
        ValueError: duplicated cell or gene names, an unknown layer or obs key, an empty
            AnnData, values that are not raw counts (NaN, inf, negative, non-integer), cells
            without counts, missing covariate values, a category unknown to
            ``covariate_categories``, or a continuous covariate that is not numeric or not
            finite.

    Warns:
        UserWarning: some genes have no counts in any cell (not when ``covariate_categories``
            is given: new data scored by a fitted model has the model's genes).
    """
    from pyrosc import streaming  # builds on this module, so imported here

    if streaming.is_on_disk(adata, layer):
        return streaming.from_backed(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            covariate_categories=covariate_categories,
            continuous_covariate_keys=continuous_covariate_keys,
        )
    checks.check_anndata(adata)
    checks.check_unique_names(adata)
    keys = checked_keys(
        adata,
        batch_key,
        labels_key,
        categorical_covariate_keys,
        continuous_covariate_keys,
        covariate_categories,
    )
    checks.check_not_empty(adata)
    source = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    matrix = checks.count_matrix(adata, layer, source)
    checks.check_raw_counts(matrix, adata, layer, source)

    if sp.issparse(matrix):
        counts = matrix.astype(np.float32)  # astype copies: the user's buffers are never shared
    else:
        counts = np.array(matrix, dtype=np.float32)
    library = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
    checks.check_cells_have_counts(library, adata.obs_names, source)
    if covariate_categories is None:  # new data for a fitted model: its genes are fixed
        gene_totals = np.asarray(counts.sum(axis=0, dtype=np.float64)).ravel()
        checks.warn_genes_without_counts(gene_totals, adata.var_names, source)
    return CountData(
        counts=counts,
        library=library.astype(np.float32),
        **cell_annotations(adata, *keys, labels_key, covariate_categories),
    )


def checked_keys(
    adata: anndata.AnnData,
    batch_key: str | None,
    labels_key: str | None,
    categorical_covariate_keys: Sequence[str],
    continuous_covariate_keys: Sequence[str],
    covariate_categories: dict[str, list[str]] | None,
) -> tuple[list[str], tuple[str, ...]]:
    """The categorical covariate keys (batch first) and the continuous ones, each checked to
    name a column of ``adata.obs`` (see :func:`from_anndata`)."""
    covariate_keys = checks.covariate_keys(batch_key, categorical_covariate_keys)
    continuous_keys = checks.continuous_keys(continuous_covariate_keys, covariate_keys)
    checks.check_obs_keys(adata, batch_key, labels_key, categorical_covariate_keys, continuous_keys)
    checks.check_covariate_categories(covariate_categories, covariate_keys)
    return covariate_keys, continuous_keys


def cell_annotations(
    adata: anndata.AnnData,
    covariate_keys: list[str],
    continuous_keys: tuple[str, ...],
    labels_key: str | None,
    covariate_categories: dict[str, list[str]] | None,
) -> dict:
    """The :class:`CountData` fields read from ``adata.obs`` and its names: covariate codes and
    categories, labels, continuous covariates, ``obs_names``, ``var_names``, ``cell_index``."""
    covariates, categories = {}, {}
    for key in covariate_keys:
        known = None if covariate_categories is None else covariate_categories[key]
        covariates[key], categories[key] = _encode(adata, key, known)
    return {
        "covariates": covariates,
        "covariate_categories": categories,
        "labels": None if labels_key is None else adata.obs[labels_key].copy(),
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
        "continuous_covariates": _continuous_values(adata, continuous_keys),
        "continuous_covariate_keys": continuous_keys,
        "cell_index": np.arange(adata.n_obs, dtype=np.int64),
    }


class MinibatchSampler:
    """Shuffled minibatches of cell positions, seeded; never yields a batch of one cell.

    BatchNorm refuses a training batch of one cell (scvi-tools 1.4.2 crashes on PBMC 3k with a
    90% split because 2433 % 128 == 1). When the last batch would hold a single cell, that cell
    joins the batch before it, which then holds ``batch_size + 1`` cells.
    """

    def __init__(self, n_cells: int, batch_size: int = 128, shuffle: bool = True, seed: int = 0):
        if n_cells < 2:
            raise ValueError(
                f"cannot train on {n_cells} cell(s): minibatches need at least 2 cells "
                "(BatchNorm cannot normalise a batch of one)."
            )
        if batch_size < 2:
            raise ValueError(
                f"batch_size must be at least 2 (BatchNorm cannot normalise a batch of one), "
                f"got {batch_size}."
            )
        self.n_cells = n_cells
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._generator = np.random.default_rng(seed)

    def _order(self) -> np.ndarray:
        """(n_cells,) the order of the cells in one epoch; a subclass may draw it otherwise."""
        if self.shuffle:
            return self._generator.permutation(self.n_cells)
        return np.arange(self.n_cells)

    def __iter__(self) -> Iterator[np.ndarray]:
        """One epoch: (B,) int64 cell positions per batch, every cell exactly once."""
        order = self._order()
        starts = list(range(0, self.n_cells, self.batch_size))
        if self.n_cells - starts[-1] == 1:
            starts.pop()  # the lone last cell joins the previous batch
        ends = starts[1:] + [self.n_cells]
        for start, end in zip(starts, ends, strict=True):
            yield order[start:end]

    def __len__(self) -> int:
        """Number of minibatches per epoch."""
        n_batches = -(-self.n_cells // self.batch_size)
        return n_batches - 1 if self.n_cells % self.batch_size == 1 else n_batches


def split_cells(
    n_cells: int, validation_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation split of cell positions.

    Returns:
        (train_idx, val_idx): sorted int64 positions, shapes (n_train,) and (n_val,), with
        ``n_val = round(validation_fraction * n_cells)``. A fraction of 0 puts every cell in
        train and leaves val empty.
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
    if validation_fraction == 0:
        return np.arange(n_cells, dtype=np.int64), np.zeros(0, dtype=np.int64)
    n_val = round(validation_fraction * n_cells)
    n_train = n_cells - n_val
    if n_val < 2 or n_train < 2:
        raise ValueError(
            f"validation_fraction={validation_fraction} of {n_cells} cells gives {n_train} "
            f"training and {n_val} validation cells; each needs at least 2. Use "
            "validation_fraction=0 for no validation set, or a fraction that leaves at least 2 "
            "cells on each side."
        )
    order = np.random.default_rng(seed).permutation(n_cells)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def align_genes(
    adata: anndata.AnnData, var_names: Sequence[str], layer: str | None = None
) -> anndata.AnnData:
    """The counts of ``adata`` on the genes ``var_names`` (a fitted model's), matched by name and
    put in that order, as a new AnnData; ``adata`` is not modified.

    Genes of ``var_names`` that ``adata`` lacks are filled with zeros; genes of ``adata`` not in
    ``var_names`` are dropped; one warning says how many of each (and names a few).

    Args:
        adata: (cells, genes) raw counts in ``adata.X`` or ``adata.layers[layer]``.
        var_names: (genes,) the genes to keep, in order.
        layer: the layer holding the counts (None: ``adata.X``); the result holds them in the
            same place.

    Returns:
        AnnData (cells, len(var_names)) with a copy of ``adata.obs``; CSR if the input was
        sparse.

    Raises:
        ValueError: duplicated gene names, an unknown layer, or fewer than half of
            ``var_names`` present in ``adata`` (the genes are probably named differently).
    """
    checks.check_anndata(adata)
    checks.check_unique_names(adata)
    var_names = pd.Index([str(name) for name in var_names])
    matrix = checks.count_matrix(adata, layer)
    positions = pd.Index([str(name) for name in adata.var_names]).get_indexer(var_names)
    present = positions >= 0
    checks.check_shared_genes(var_names, adata.var_names, present)
    if sp.issparse(matrix):
        # A 0/1 selection matrix: column j of the product is gene positions[j], or zeros.
        selection = sp.csr_matrix(
            (np.ones(present.sum(), matrix.dtype), (positions[present], np.flatnonzero(present))),
            shape=(adata.n_vars, len(var_names)),
        )
        aligned = (matrix @ selection).tocsr()
    else:
        aligned = np.zeros((adata.n_obs, len(var_names)), matrix.dtype)
        aligned[:, present] = matrix[:, positions[present]]
    var = pd.DataFrame(index=var_names)
    if layer is None:
        return anndata.AnnData(aligned, obs=adata.obs.copy(), var=var)
    return anndata.AnnData(obs=adata.obs.copy(), var=var, layers={layer: aligned})


def _encode(
    adata: anndata.AnnData, key: str, known: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """(cells,) int64 codes of obs[key] and the category names they index."""
    checks.check_no_missing_values(adata, key)
    column = adata.obs[key]
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = column.cat.remove_unused_categories().cat.categories
        default_categories = [str(name) for name in present]
    else:
        # dict.fromkeys drops repeats of distinct values with the same text (1 and "1").
        default_categories = list(dict.fromkeys(str(value) for value in _sorted_unique(column)))
    categories = default_categories if known is None else [str(name) for name in known]
    names = column.astype(str).to_numpy()
    codes = pd.Index(categories).get_indexer(names)
    checks.check_known_categories(key, names, codes, categories)
    return codes.astype(np.int64), categories


def _continuous_values(adata: anndata.AnnData, keys: tuple[str, ...]) -> np.ndarray:
    """(cells, len(keys)) float32 values of numeric, finite obs columns."""
    for key in keys:
        checks.check_continuous_covariate(adata, key)
    if not keys:
        return np.zeros((adata.n_obs, 0), dtype=np.float32)
    columns = [adata.obs[key].to_numpy(dtype=np.float64).astype(np.float32) for key in keys]
    return np.stack(columns, axis=1)


def _sorted_unique(column: pd.Series) -> list:
    """Unique values of ``column`` sorted by value, or by their text when types do not compare."""
    unique = list(pd.unique(column))
    try:
        return sorted(unique)
    except TypeError:
        return sorted(unique, key=str)


def _positions(index: np.ndarray) -> np.ndarray:
    """``index`` as a (n,) int64 array of cell positions."""
    index = np.asarray(index)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise TypeError(
            f"expected a 1-d array of integer cell positions, got shape {index.shape} "
            f"and dtype {index.dtype}."
        )
    return index.astype(np.int64, copy=False)


def select_genes(
    adata: anndata.AnnData, n_top_genes: int = 2000, layer: str | None = None
) -> anndata.AnnData:
    """The ``n_top_genes`` most variable genes of ``adata`` as a new AnnData of raw counts.

    Genes detected in fewer than 3 cells are dropped first; variability is scanpy's
    ``highly_variable_genes(flavor="seurat")`` on a log-normalised copy. The input is untouched.

    Args:
        adata: (cells, genes) raw counts in ``adata.X`` or ``adata.layers[layer]``.
        n_top_genes: how many genes to keep; 0 (or more than there are) keeps every gene
            detected in at least 3 cells.
        layer: the layer holding the counts (None: ``adata.X``).

    Returns:
        a new AnnData, (cells, selected genes), with all of ``adata``'s layers and annotations.

    Raises:
        ValueError: a negative ``n_top_genes``, duplicated cell or gene names (see
            :func:`pyrosc.input_checks.check_unique_names`), an unknown layer, or counts on disk
            (a backed AnnData: select genes on cells in memory first).
    """
    import scanpy as sc

    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, numbers.Integral):
        raise ValueError(f"n_top_genes must be an integer, got {n_top_genes!r}.")
    if n_top_genes < 0:
        raise ValueError(
            f"n_top_genes must be 0 (keep every gene) or a positive number of genes, got "
            f"{n_top_genes}."
        )
    from pyrosc import streaming  # builds on this module, so imported here

    if streaming.is_on_disk(adata, layer):
        raise ValueError(
            "select_genes needs the counts in memory; these are on disk (a backed AnnData, a "
            "path or a list of files). Select genes first, on cells that fit in memory (e.g. "
            "genes = pyrosc.select_genes(adata[random_cells].to_memory()).var_names), and "
            "write the files with those genes only; then stream them."
        )
    checks.check_unique_names(adata)
    view = anndata.AnnData(checks.count_matrix(adata, layer), obs=adata.obs[[]], var=adata.var[[]])
    detected = np.asarray((view.X > 0).sum(axis=0)).ravel() >= 3
    view = view[:, detected].copy()
    if n_top_genes == 0 or n_top_genes >= view.n_vars:
        return adata[:, view.var_names].copy()
    sc.pp.normalize_total(view, target_sum=1e4)
    sc.pp.log1p(view)
    sc.pp.highly_variable_genes(view, n_top_genes=n_top_genes, flavor="seurat")
    return adata[:, view.var_names[view.var["highly_variable"].to_numpy()]].copy()
