"""AnnData -> validated counts, covariate codes and minibatches.

Raw integer counts are the only valid input. `from_anndata` checks them (on the sparse ``.data``
when the matrix is sparse, so nothing is densified) and raises an error that says what was found,
where, and what to do. The user's AnnData is never modified: `CountData` holds its own float32
copy of the counts.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

# How many names an error message shows before it says "... and N more".
_NAMES_SHOWN = 5
_COLUMNS_SHOWN = 30


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

    @property
    def n_cells(self) -> int:
        """Number of cells (rows of counts)."""
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        """Number of genes (columns of counts)."""
        return self.counts.shape[1]

    def subset(self, index: np.ndarray) -> CountData:
        """The cells at integer positions ``index`` (shape (n,)), as a new CountData."""
        index = _positions(index)
        return CountData(
            counts=self.counts[index],
            library=self.library[index],
            covariates={key: codes[index] for key, codes in self.covariates.items()},
            covariate_categories={
                key: list(names) for key, names in self.covariate_categories.items()
            },
            labels=None if self.labels is None else self.labels.iloc[index],
            obs_names=self.obs_names[index],
            var_names=self.var_names,
            continuous_covariates=self.continuous_covariates[index],
            continuous_covariate_keys=self.continuous_covariate_keys,
            cell_index=self.cell_index[index],
        )

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
            subsamples.
        """
        index = _positions(index)
        rows = self.counts[index]
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
        return {
            name: torch.from_numpy(array).to(device, non_blocking=True)
            for name, array in arrays.items()
        }


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

    Args:
        adata: (cells, genes) AnnData; never modified.
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
        TypeError: ``adata`` is not an AnnData, or its matrix is not an in-memory array.
        ValueError: duplicated cell or gene names, an unknown layer or obs key, an empty
            AnnData, values that are not raw counts (NaN, inf, negative, non-integer), cells
            without counts, missing covariate values, a category unknown to
            ``covariate_categories``, or a continuous covariate that is not numeric or not
            finite.

    Warns:
        UserWarning: some genes have no counts in any cell (not when ``covariate_categories``
            is given: new data scored by a fitted model has the model's genes).
    """
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(
            f"from_anndata expects an anndata.AnnData, got {type(adata).__module__}."
            f"{type(adata).__qualname__}. Wrap a count matrix with anndata.AnnData(X=counts)."
        )
    check_unique_names(adata)
    covariate_keys = _covariate_keys(batch_key, categorical_covariate_keys)
    continuous_keys = _continuous_keys(continuous_covariate_keys, covariate_keys)
    _check_obs_keys(adata, batch_key, labels_key, categorical_covariate_keys, continuous_keys)
    if covariate_categories is not None and set(covariate_categories) != set(covariate_keys):
        raise ValueError(
            f"covariate_categories has keys {_quoted(covariate_categories)} but the covariates "
            f"are {_quoted(covariate_keys)}; pass the batch_key and categorical_covariate_keys "
            "the model was fitted with."
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"adata has {adata.n_obs} cells and {adata.n_vars} genes; pyrosc needs at least one "
            "of each."
        )
    source = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    matrix = count_matrix(adata, layer, source)
    _check_raw_counts(matrix, adata, layer, source)

    if sp.issparse(matrix):
        counts = matrix.astype(np.float32)  # astype copies: the user's buffers are never shared
    else:
        counts = np.array(matrix, dtype=np.float32)
    library = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
    _check_cells_have_counts(library, adata.obs_names, source)
    if covariate_categories is None:  # new data for a fitted model: its genes are fixed
        _warn_genes_without_counts(counts, adata.var_names, source)

    covariates, categories = {}, {}
    for key in covariate_keys:
        known = None if covariate_categories is None else covariate_categories[key]
        covariates[key], categories[key] = _encode(adata, key, known)
    return CountData(
        counts=counts,
        library=library.astype(np.float32),
        covariates=covariates,
        covariate_categories=categories,
        labels=None if labels_key is None else adata.obs[labels_key].copy(),
        obs_names=adata.obs_names.copy(),
        var_names=adata.var_names.copy(),
        continuous_covariates=_continuous_values(adata, continuous_keys),
        continuous_covariate_keys=continuous_keys,
        cell_index=np.arange(adata.n_obs, dtype=np.int64),
    )


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

    def __iter__(self) -> Iterator[np.ndarray]:
        """One epoch: (B,) int64 cell positions per batch, every cell exactly once."""
        if self.shuffle:
            order = self._generator.permutation(self.n_cells)
        else:
            order = np.arange(self.n_cells)
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


# ---------------------------------------------------------------------------------------------
# Validation helpers


def _covariate_keys(batch_key: str | None, categorical_covariate_keys: Sequence[str]) -> list[str]:
    """The covariate keys in order, batch first; rejects a bare string and repeated keys."""
    if isinstance(categorical_covariate_keys, str):
        raise TypeError(
            "categorical_covariate_keys must be a list of obs column names, got the string "
            f"{categorical_covariate_keys!r}; write [{categorical_covariate_keys!r}]."
        )
    keys = ([] if batch_key is None else [batch_key]) + list(categorical_covariate_keys)
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(
            f"covariate key(s) {_quoted(repeated)} given more than once (batch_key and "
            "categorical_covariate_keys together); give each obs column once."
        )
    return keys


def check_unique_names(adata: anndata.AnnData) -> None:
    """Raise a ``ValueError`` if two cells or two genes of ``adata`` share a name.

    Genes are matched by name (new data, reference mapping) and results are written per cell
    name, so a repeated name would silently pick one of its rows or columns.
    """
    for axis, names, noun, fix in (
        ("obs_names", adata.obs_names, "cell", "adata.obs_names_make_unique()"),
        ("var_names", adata.var_names, "gene", "adata.var_names_make_unique()"),
    ):
        if names.is_unique:
            continue
        repeated = names[names.duplicated()].unique()
        raise ValueError(
            f"adata.{axis} holds {len(repeated):,} {noun} name(s) more than once (e.g. "
            f"{_quoted(repeated)}); pyrosc tells {noun}s apart by name, so each must be unique. "
            f"Run {fix} (it appends '-1', '-2', ... to repeats), or keep one of each."
        )


def _continuous_keys(keys: Sequence[str], categorical: list[str]) -> tuple[str, ...]:
    """The continuous covariate keys as a tuple; rejects a bare string, repeats, and a key
    that is also categorical."""
    if isinstance(keys, str):
        raise TypeError(
            f"continuous_covariate_keys must be a list of obs column names, got the string "
            f"{keys!r}; write [{keys!r}]."
        )
    keys = tuple(keys)
    repeated = sorted({key for key in keys if keys.count(key) > 1} | (set(keys) & set(categorical)))
    if repeated:
        raise ValueError(
            f"covariate key(s) {_quoted(repeated)} given more than once (continuous, or both "
            "continuous and categorical); give each obs column once."
        )
    return keys


def _continuous_values(adata: anndata.AnnData, keys: tuple[str, ...]) -> np.ndarray:
    """(cells, len(keys)) float32 values of numeric, finite obs columns."""
    columns = []
    for key in keys:
        column = adata.obs[key]
        if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
            raise ValueError(
                f"continuous covariate {key!r} has dtype {column.dtype}; it must be numeric. "
                "A column of categories belongs in categorical_covariate_keys."
            )
        values = column.to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ValueError(
                f"continuous covariate {key!r} is NaN or infinite in {len(bad):,} cells (e.g. "
                f"{_quoted(adata.obs_names[bad])}). Fill them in, or drop those cells: "
                f"adata = adata[np.isfinite(adata.obs[{key!r}])].copy()."
            )
        columns.append(values.astype(np.float32))
    if not columns:
        return np.zeros((adata.n_obs, 0), dtype=np.float32)
    return np.stack(columns, axis=1)


def _check_obs_keys(
    adata: anndata.AnnData,
    batch_key: str | None,
    labels_key: str | None,
    categorical_covariate_keys: Sequence[str],
    continuous_covariate_keys: Sequence[str] = (),
) -> None:
    """Every key names a column of adata.obs."""
    named = [("batch_key", batch_key), ("labels_key", labels_key)]
    named += [("categorical_covariate_keys", key) for key in categorical_covariate_keys]
    named += [("continuous_covariate_keys", key) for key in continuous_covariate_keys]
    for argument, key in named:
        if key is not None and key not in adata.obs.columns:
            columns = (
                f"the columns are: {_quoted(adata.obs.columns, _COLUMNS_SHOWN)}"
                if len(adata.obs.columns)
                else "adata.obs has no columns"
            )
            raise ValueError(f"{argument} {key!r} is not a column of adata.obs; {columns}.")


def count_matrix(
    adata: anndata.AnnData, layer: str | None = None, source: str | None = None
) -> sp.csr_matrix | np.ndarray:
    """The ``(cells, genes)`` matrix of ``adata.X`` or ``adata.layers[layer]``, unvalidated.

    CSR (possibly sharing the user's buffers: do not write to it) or a dense array.

    Raises:
        ValueError: an unknown layer (the message lists the layers), an empty matrix, or a
            non-numeric dtype.
    """
    source = source or ("adata.X" if layer is None else f"adata.layers[{layer!r}]")
    if layer is not None and layer not in adata.layers:
        existing = (
            f"the layers are: {_quoted(adata.layers.keys())}"
            if len(adata.layers)
            else "adata has no layers"
        )
        raise ValueError(
            f"layer {layer!r} not found in adata.layers; {existing}. Use layer=None for adata.X."
        )
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise ValueError(f"{source} is empty (None); pass the layer that holds the raw counts.")
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)  # no copy when already CSR
        if not matrix.has_canonical_format:
            # Duplicate entries add up; check the summed values, on a copy.
            matrix = matrix.copy()
            matrix.sum_duplicates()
    elif isinstance(matrix, np.ndarray):
        matrix = np.asarray(matrix)
    else:
        raise TypeError(
            f"{source} is a {type(matrix).__qualname__}; pyrosc needs a numpy array or a scipy "
            "sparse matrix in memory (for a backed AnnData, use adata.to_memory())."
        )
    if matrix.dtype.kind not in "iuf":
        raise ValueError(f"{source} has dtype {matrix.dtype}; raw counts must be numbers.")
    return matrix


def _check_raw_counts(
    matrix: sp.csr_matrix | np.ndarray, adata: anndata.AnnData, layer: str | None, source: str
) -> None:
    """Raise unless every value is a finite, non-negative integer."""
    raw_counts_needed = "pyrosc needs raw (un-normalised) integer counts."
    if matrix.dtype.kind == "f":
        count, where = _offending(matrix, lambda values: ~np.isfinite(values), adata)
        if count:
            raise ValueError(
                f"{source} holds {count:,} NaN or infinite values (first at {where}). "
                f"{raw_counts_needed}"
            )
    if matrix.dtype.kind in "if":
        count, where = _offending(matrix, lambda values: values < 0, adata)
        if count:
            raise ValueError(
                f"{source} holds {count:,} negative values (first at {where}): counts are never "
                "negative, so the data were scaled or centred (e.g. by sc.pp.scale) or are not "
                f"counts. {raw_counts_needed} "
                f"{_where_counts_are(adata, layer)}"
            )
    if matrix.dtype.kind == "f":
        count, where = _offending(matrix, lambda values: values != np.round(values), adata)
        if count:
            raise ValueError(
                f"{source} holds {count:,} non-integer values (first at {where}). "
                f"{raw_counts_needed} {_diagnose_non_integer(matrix, source)}"
                f"{_where_counts_are(adata, layer)}"
            )


def _offending(
    matrix: sp.csr_matrix | np.ndarray,
    is_bad: Callable[[np.ndarray], np.ndarray],
    adata: anndata.AnnData,
) -> tuple[int, str]:
    """How many stored values are bad, and where the first is ("cell 'c', gene 'g': value")."""
    values = matrix.data if sp.issparse(matrix) else matrix
    bad = is_bad(values)
    count = int(np.count_nonzero(bad))
    if count == 0:
        return 0, ""
    if sp.issparse(matrix):
        position = int(np.flatnonzero(bad)[0])
        cell = int(np.searchsorted(matrix.indptr, position, side="right")) - 1
        gene = int(matrix.indices[position])
        value = matrix.data[position]
    else:
        cell, gene = (int(i) for i in np.argwhere(bad)[0])
        value = matrix[cell, gene]
    return count, f"cell {adata.obs_names[cell]!r}, gene {adata.var_names[gene]!r}: {value:g}"


def _diagnose_non_integer(matrix: sp.csr_matrix | np.ndarray, source: str) -> str:
    """A sentence saying what the non-integer values look like, or "" if nothing fits."""
    with np.errstate(over="ignore", invalid="ignore"):
        exp_sums = _row_sums(matrix, np.expm1)
        sums = _row_sums(matrix, None)
    if _roughly_constant(exp_sums):
        return (
            f"{source} looks log-normalised: exp(x) - 1 sums to about {np.median(exp_sums):,.0f} "
            "in every cell, as after sc.pp.normalize_total and sc.pp.log1p. "
        )
    if _roughly_constant(sums):
        return (
            f"{source} looks normalised: every cell sums to about {np.median(sums):,.0f}, as "
            "after sc.pp.normalize_total. "
        )
    largest = matrix.max()
    if largest < 30:
        return f"{source} looks log-transformed or scaled: all values are below 30 ({largest:g}). "
    return ""


def _row_sums(
    matrix: sp.csr_matrix | np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """(cells,) float64 sums of ``transform(values)`` per cell (transform must keep 0 at 0)."""
    if sp.issparse(matrix):
        data = matrix.data.astype(np.float64)
        if transform is not None:
            data = transform(data)
        matrix = sp.csr_matrix((data, matrix.indices, matrix.indptr), shape=matrix.shape)
        return np.asarray(matrix.sum(axis=1)).ravel()
    values = matrix.astype(np.float64)
    return (values if transform is None else transform(values)).sum(axis=1)


def _roughly_constant(sums: np.ndarray) -> bool:
    """True when at least 2 cells have counts and all their sums agree within 1%."""
    sums = sums[sums > 0]
    return len(sums) >= 2 and bool(np.all(np.isfinite(sums))) and sums.max() <= 1.01 * sums.min()


def _where_counts_are(adata: anndata.AnnData, checked_layer: str | None) -> str:
    """A hint naming the layers, X, or adata.raw that hold non-negative integers."""
    hints = []
    if checked_layer is not None and _holds_counts(adata.X):
        hints.append("adata.X holds non-negative integers: pass layer=None to use it.")
    for name in adata.layers:
        if name != checked_layer and _holds_counts(adata.layers[name]):
            hints.append(
                f"adata.layers[{name!r}] holds non-negative integers: pass layer={name!r}."
            )
    if adata.raw is not None and _holds_counts(adata.raw.X):
        hints.append(
            "adata.raw.X holds non-negative integers: use adata.raw.to_adata() (it has "
            f"{adata.raw.n_vars:,} genes; subset it to adata.var_names to keep the same genes)."
        )
    if not hints:
        return (
            "No layer nor adata.raw holds integer counts here: pass the raw count matrix (for "
            "example from the original file) in adata.X or in a layer."
        )
    return "Raw counts seem to be elsewhere: " + " ".join(hints)


def _holds_counts(matrix: object) -> bool:
    """True if ``matrix`` is numeric and all its values are finite non-negative integers."""
    if sp.issparse(matrix):
        values = matrix.data
    elif isinstance(matrix, np.ndarray):
        values = matrix
    else:
        return False
    if values.dtype.kind in "iu":
        return values.size == 0 or values.min() >= 0
    if values.dtype.kind != "f":
        return False
    return bool(np.all(np.isfinite(values) & (values >= 0) & (values == np.round(values))))


def _check_cells_have_counts(library: np.ndarray, obs_names: pd.Index, source: str) -> None:
    """Raise if some cells have zero total counts."""
    empty = np.flatnonzero(library == 0)
    if len(empty):
        raise ValueError(
            f"{len(empty):,} cells have zero total counts in {source} (e.g. "
            f"{_quoted(obs_names[empty])}); a cell with no counts carries no information. Remove "
            "them with sc.pp.filter_cells(adata, min_counts=1)."
        )


def _warn_genes_without_counts(
    counts: sp.csr_matrix | np.ndarray, var_names: pd.Index, source: str
) -> None:
    """Warn (UserWarning) if some genes have no counts in any cell."""
    gene_totals = np.asarray(counts.sum(axis=0, dtype=np.float64)).ravel()
    empty = np.flatnonzero(gene_totals == 0)
    if len(empty):
        warnings.warn(
            f"{len(empty):,} genes have zero counts in every cell of {source} (e.g. "
            f"{_quoted(var_names[empty])}); they add parameters but no information. Consider "
            "sc.pp.filter_genes(adata, min_cells=1).",
            UserWarning,
            stacklevel=3,
        )


def _encode(
    adata: anndata.AnnData, key: str, known: list[str] | None
) -> tuple[np.ndarray, list[str]]:
    """(cells,) int64 codes of obs[key] and the category names they index."""
    column = adata.obs[key]
    missing = np.flatnonzero(column.isna().to_numpy())
    if len(missing):
        raise ValueError(
            f"obs column {key!r} has missing values in {len(missing):,} cells (e.g. "
            f"{_quoted(adata.obs_names[missing])}). Fill them in, or drop those cells: "
            f"adata = adata[adata.obs[{key!r}].notna()].copy()."
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = column.cat.remove_unused_categories().cat.categories
        default_categories = [str(name) for name in present]
    else:
        # dict.fromkeys drops repeats of distinct values with the same text (1 and "1").
        default_categories = list(dict.fromkeys(str(value) for value in _sorted_unique(column)))
    categories = default_categories if known is None else [str(name) for name in known]
    names = column.astype(str).to_numpy()
    codes = pd.Index(categories).get_indexer(names)
    unseen = np.flatnonzero(codes < 0)
    if len(unseen):
        unseen_names = pd.unique(names[unseen])
        raise ValueError(
            f"obs column {key!r} holds {len(unseen_names)} categor(ies) the model was not fitted "
            f"with: {_quoted(unseen_names)} ({len(unseen):,} cells). Known categories: "
            f"{_quoted(categories, _COLUMNS_SHOWN)}."
        )
    return codes.astype(np.int64), categories


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


def _quoted(names: Sequence | pd.Index, limit: int = _NAMES_SHOWN) -> str:
    """'a', 'b', 'c' ... and N more."""
    names = list(names)
    shown = ", ".join(repr(str(name)) for name in names[:limit])
    return shown if len(names) <= limit else f"{shown} ... and {len(names) - limit:,} more"


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
            :func:`check_unique_names`), an unknown layer.
    """
    import scanpy as sc

    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, numbers.Integral):
        raise ValueError(f"n_top_genes must be an integer, got {n_top_genes!r}.")
    if n_top_genes < 0:
        raise ValueError(
            f"n_top_genes must be 0 (keep every gene) or a positive number of genes, got "
            f"{n_top_genes}."
        )
    check_unique_names(adata)
    view = anndata.AnnData(count_matrix(adata, layer), obs=adata.obs[[]], var=adata.var[[]])
    detected = np.asarray((view.X > 0).sum(axis=0)).ravel() >= 3
    view = view[:, detected].copy()
    if n_top_genes == 0 or n_top_genes >= view.n_vars:
        return adata[:, view.var_names].copy()
    sc.pp.normalize_total(view, target_sum=1e4)
    sc.pp.log1p(view)
    sc.pp.highly_variable_genes(view, n_top_genes=n_top_genes, flavor="seurat")
    return adata[:, view.var_names[view.var["highly_variable"].to_numpy()]].copy()
