"""Checks of what a user hands pyrosc: an AnnData of raw counts and the names of its columns.

Each check raises an error that says what was found, where, and what to do (for example, which
layer probably holds the raw counts when ``adata.X`` looks log-normalised). Nothing here
modifies the AnnData or builds the model's data: :func:`pyrosc.data.from_anndata` calls these
checks, then encodes what passed. Values are checked on the sparse ``.data`` when the matrix is
sparse, so nothing is densified.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

# How many names an error message shows before it says "... and N more".
_NAMES_SHOWN = 5
_COLUMNS_SHOWN = 30
_RAW_COUNTS_NEEDED = "pyrosc needs raw (un-normalised) integer counts."


# -- the AnnData and its names ------------------------------------------------------------------


def check_anndata(adata: object) -> None:
    """Raise a ``TypeError`` unless ``adata`` is an AnnData."""
    if not isinstance(adata, anndata.AnnData):
        raise TypeError(
            f"from_anndata expects an anndata.AnnData, got {type(adata).__module__}."
            f"{type(adata).__qualname__}. Wrap a count matrix with anndata.AnnData(X=counts)."
        )


def check_not_empty(adata: anndata.AnnData) -> None:
    """Raise unless ``adata`` has at least one cell and one gene."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"adata has {adata.n_obs} cells and {adata.n_vars} genes; pyrosc needs at least one "
            "of each."
        )


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
            f"{quoted(repeated)}); pyrosc tells {noun}s apart by name, so each must be unique. "
            f"Run {fix} (it appends '-1', '-2', ... to repeats), or keep one of each."
        )


# -- obs columns: the covariates and labels -------------------------------------------------------


def covariate_keys(batch_key: str | None, categorical_covariate_keys: Sequence[str]) -> list[str]:
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
            f"covariate key(s) {quoted(repeated)} given more than once (batch_key and "
            "categorical_covariate_keys together); give each obs column once."
        )
    return keys


def continuous_keys(keys: Sequence[str], categorical: list[str]) -> tuple[str, ...]:
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
            f"covariate key(s) {quoted(repeated)} given more than once (continuous, or both "
            "continuous and categorical); give each obs column once."
        )
    return keys


def check_obs_keys(
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
                f"the columns are: {quoted(adata.obs.columns, _COLUMNS_SHOWN)}"
                if len(adata.obs.columns)
                else "adata.obs has no columns"
            )
            raise ValueError(f"{argument} {key!r} is not a column of adata.obs; {columns}.")


def check_covariate_categories(
    covariate_categories: dict[str, list[str]] | None, covariate_keys: list[str]
) -> None:
    """A fitted model's categories (when given) name exactly the covariates asked for."""
    if covariate_categories is not None and set(covariate_categories) != set(covariate_keys):
        raise ValueError(
            f"covariate_categories has keys {quoted(covariate_categories)} but the covariates "
            f"are {quoted(covariate_keys)}; pass the batch_key and categorical_covariate_keys "
            "the model was fitted with."
        )


def check_no_missing_values(adata: anndata.AnnData, key: str) -> None:
    """Raise if the categorical column ``obs[key]`` misses values."""
    missing = np.flatnonzero(adata.obs[key].isna().to_numpy())
    if len(missing):
        raise ValueError(
            f"obs column {key!r} has missing values in {len(missing):,} cells (e.g. "
            f"{quoted(adata.obs_names[missing])}). Fill them in, or drop those cells: "
            f"adata = adata[adata.obs[{key!r}].notna()].copy()."
        )


def check_known_categories(
    key: str, names: np.ndarray, codes: np.ndarray, categories: list[str]
) -> None:
    """Raise if some cells' category ``names`` have no code (-1) among ``categories``."""
    unseen = np.flatnonzero(codes < 0)
    if len(unseen):
        unseen_names = pd.unique(names[unseen])
        raise ValueError(
            f"obs column {key!r} holds {len(unseen_names)} categor(ies) the model was not fitted "
            f"with: {quoted(unseen_names)} ({len(unseen):,} cells). Known categories: "
            f"{quoted(categories, _COLUMNS_SHOWN)}."
        )


def check_continuous_covariate(adata: anndata.AnnData, key: str) -> None:
    """Raise unless ``obs[key]`` is numeric (not boolean) and finite in every cell."""
    column = adata.obs[key]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise ValueError(
            f"continuous covariate {key!r} has dtype {column.dtype}; it must be numeric. "
            "A column of categories belongs in categorical_covariate_keys."
        )
    bad = np.flatnonzero(~np.isfinite(column.to_numpy(dtype=np.float64)))
    if len(bad):
        raise ValueError(
            f"continuous covariate {key!r} is NaN or infinite in {len(bad):,} cells (e.g. "
            f"{quoted(adata.obs_names[bad])}). Fill them in, or drop those cells: "
            f"adata = adata[np.isfinite(adata.obs[{key!r}])].copy()."
        )


# -- the count matrix ---------------------------------------------------------------------------


def count_matrix(
    adata: anndata.AnnData, layer: str | None = None, source: str | None = None
) -> sp.csr_matrix | np.ndarray:
    """The ``(cells, genes)`` matrix of ``adata.X`` or ``adata.layers[layer]``; its values are
    not checked yet (see :func:`check_raw_counts`).

    CSR (possibly sharing the user's buffers: do not write to it) or a dense array.

    Raises:
        ValueError: an unknown layer (the message lists the layers), an empty matrix, or a
            non-numeric dtype.
    """
    source = source or ("adata.X" if layer is None else f"adata.layers[{layer!r}]")
    if layer is not None and layer not in adata.layers:
        existing = (
            f"the layers are: {quoted(adata.layers.keys())}"
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


class ValueProblems:
    """Values that are not raw counts, by kind, over the blocks of a count matrix seen so far.

    :func:`check_raw_counts` checks a matrix as one block; :mod:`pyrosc.streaming` adds the
    blocks it reads from disk one at a time, so that its error names the same first offending
    cell and gene, and the same total, as the check of the whole matrix in memory.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # kind -> how many values
        self.first: dict[str, str] = {}  # kind -> "cell 'c', gene 'g': value"

    def add(
        self, matrix: sp.csr_matrix | np.ndarray, obs_names: pd.Index, var_names: pd.Index
    ) -> None:
        """Count the bad values of ``matrix``, (cells, genes), whose rows are ``obs_names``."""
        kind = matrix.dtype.kind
        tests = []
        if kind == "f":
            tests.append(("not finite", lambda values: ~np.isfinite(values)))
        if kind in "if":
            tests.append(("negative", lambda values: values < 0))
        if kind == "f":
            tests.append(("non-integer", lambda values: values != np.round(values)))
        for name, is_bad in tests:
            count, where = _offending(matrix, is_bad, obs_names, var_names)
            if count:
                self.counts[name] = self.counts.get(name, 0) + count
                self.first.setdefault(name, where)

    def raise_first(
        self,
        adata: anndata.AnnData,
        layer: str | None,
        source: str,
        summaries: Callable[[], RowSummaries],
    ) -> None:
        """Raise a ``ValueError`` for the first kind of problem found, in the order NaN or
        infinite, negative, non-integer; nothing if none. ``summaries`` computes the matrix's
        :class:`RowSummaries`, called only to describe non-integer values."""
        counts, first = self.counts, self.first
        if "not finite" in counts:
            raise ValueError(
                f"{source} holds {counts['not finite']:,} NaN or infinite values (first at "
                f"{first['not finite']}). {_RAW_COUNTS_NEEDED}"
            )
        if "negative" in counts:
            raise ValueError(
                f"{source} holds {counts['negative']:,} negative values (first at "
                f"{first['negative']}): counts are never negative, so the data were scaled or "
                f"centred (e.g. by sc.pp.scale) or are not counts. {_RAW_COUNTS_NEEDED} "
                f"{_where_counts_are(adata, layer)}"
            )
        if "non-integer" in counts:
            raise ValueError(
                f"{source} holds {counts['non-integer']:,} non-integer values (first at "
                f"{first['non-integer']}). {_RAW_COUNTS_NEEDED} "
                f"{_describe_non_integer(summaries(), source)}{_where_counts_are(adata, layer)}"
            )


def check_raw_counts(
    matrix: sp.csr_matrix | np.ndarray, adata: anndata.AnnData, layer: str | None, source: str
) -> None:
    """Raise unless every value is a finite, non-negative integer."""
    problems = ValueProblems()
    problems.add(matrix, adata.obs_names, adata.var_names)
    problems.raise_first(adata, layer, source, lambda: RowSummaries.of(matrix))


def check_cells_have_counts(library: np.ndarray, obs_names: pd.Index, source: str) -> None:
    """Raise if some cells have zero total counts (``library``: (cells,) totals)."""
    empty = np.flatnonzero(library == 0)
    if len(empty):
        raise ValueError(
            f"{len(empty):,} cells have zero total counts in {source} (e.g. "
            f"{quoted(obs_names[empty])}); a cell with no counts carries no information. Remove "
            "them with sc.pp.filter_cells(adata, min_counts=1)."
        )


def warn_genes_without_counts(gene_totals: np.ndarray, var_names: pd.Index, source: str) -> None:
    """Warn (UserWarning) if some genes have no counts in any cell (``gene_totals``: (genes,)
    sums over the cells)."""
    empty = np.flatnonzero(gene_totals == 0)
    if len(empty):
        warnings.warn(
            f"{len(empty):,} genes have zero counts in every cell of {source} (e.g. "
            f"{quoted(var_names[empty])}); they add parameters but no information. Consider "
            "sc.pp.filter_genes(adata, min_cells=1).",
            UserWarning,
            stacklevel=3,
        )


def check_shared_genes(var_names: pd.Index, query_names: pd.Index, present: np.ndarray) -> None:
    """Raise if fewer than half of a model's genes ``var_names`` are among ``query_names`` (the
    genes of new data; ``present``: (len(var_names),) bool), else warn of those missing and of
    the query's genes the model lacks, if any."""
    missing = var_names[~present]
    extra = pd.Index(query_names).difference(var_names, sort=False)
    if present.sum() * 2 < len(var_names):
        raise ValueError(
            f"only {int(present.sum()):,} of the model's {len(var_names):,} genes are among the "
            f"{len(query_names):,} genes of the new data (model genes e.g. {quoted(var_names)}; "
            f"new data e.g. {quoted(query_names)}); mapping needs at least half. Check that both "
            "name genes the same way (symbols or Ensembl IDs) and come from the same species."
        )
    if len(missing) or len(extra):
        warnings.warn(
            f"{len(missing):,} of the model's {len(var_names):,} genes are missing from the new "
            f"data and are filled with zeros{_examples(missing)}; {len(extra):,} genes of the "
            f"new data that the model lacks are dropped{_examples(extra)}.",
            UserWarning,
            stacklevel=3,
        )


def _examples(names: pd.Index) -> str:
    """A few of ``names`` for a message, as ` (e.g. 'a', 'b')`; empty for no names."""
    return f" (e.g. {quoted(names)})" if len(names) else ""


def _offending(
    matrix: sp.csr_matrix | np.ndarray,
    is_bad: Callable[[np.ndarray], np.ndarray],
    obs_names: pd.Index,
    var_names: pd.Index,
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
    return count, f"cell {obs_names[cell]!r}, gene {var_names[gene]!r}: {value:g}"


# -- what non-integer values look like, and where the counts may be ----------------------------


class RowSummaries(NamedTuple):
    """What non-integer values look like: ``exp_sums`` and ``sums``, (cells,) float64 sums of
    ``expm1(x)`` and of ``x`` per cell, and ``largest``, the largest value."""

    exp_sums: np.ndarray
    sums: np.ndarray
    largest: float

    @classmethod
    def of(cls, matrix: sp.csr_matrix | np.ndarray) -> RowSummaries:
        """The summaries of a matrix, or of a block of its rows."""
        with np.errstate(over="ignore", invalid="ignore"):
            exp_sums = _row_sums(matrix, np.expm1)
            sums = _row_sums(matrix, None)
        return cls(exp_sums, sums, float(matrix.max()))

    @classmethod
    def joined(cls, parts: Sequence[RowSummaries]) -> RowSummaries:
        """The summaries of blocks of rows, stacked in order."""
        return cls(
            np.concatenate([part.exp_sums for part in parts]),
            np.concatenate([part.sums for part in parts]),
            max(part.largest for part in parts),
        )


def _describe_non_integer(summaries: RowSummaries, source: str) -> str:
    """A sentence saying what the non-integer values look like, or "" if nothing fits."""
    exp_sums, sums, largest = summaries
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


def quoted(names: Sequence | pd.Index, limit: int = _NAMES_SHOWN) -> str:
    """'a', 'b', 'c' ... and N more."""
    names = list(names)
    shown = ", ".join(repr(str(name)) for name in names[:limit])
    return shown if len(names) <= limit else f"{shown} ... and {len(names) - limit:,} more"
