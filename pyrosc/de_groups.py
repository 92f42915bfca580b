"""Differential expression's view of the cells: which groups are compared, and what their
observed counts say (detection rate, mean raw count, library sizes) for the table beside the
model's answer (:mod:`pyrosc.differential_expression`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrosc.data import CountData

# Cells whose counts are summed at a time: bounded memory, for counts on disk too.
_CHUNK_CELLS = 8192

#: The name of the other side when a group is compared with all other cells.
REST = "rest"


# -- the groups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Two sets of groups to compare: ``side1`` against ``side2`` (codes of the groups)."""

    group1: str
    group2: str
    side1: tuple[int, ...]
    side2: tuple[int, ...]


def group_codes(groups: pd.Series | Sequence) -> tuple[np.ndarray, list[str], str]:
    """Each cell's group code (-1 where the label is missing), the group names (a categorical's
    declared categories, unused ones included; else the sorted labels), and how to name the
    labels in messages."""
    labels = pd.Series(groups)
    categorical = pd.Categorical(labels)
    names = [str(name) for name in categorical.categories]
    what = f"obs[{labels.name!r}]" if labels.name is not None else "the groups"
    return np.asarray(categorical.codes, dtype=np.int64), names, what


def comparisons(
    codes: np.ndarray, names: list[str], what: str, group1: str | None, group2: str | None
) -> list[Comparison]:
    """The comparisons asked for: ``group1`` against ``group2``, against the rest (no
    ``group2``), or each group against the rest (neither).

    Raises:
        ValueError: ``group2`` without ``group1``, a group that is not in the labels or has no
            cells, the same group twice, or fewer than two groups with cells.
    """
    sizes = np.bincount(codes[codes >= 0], minlength=len(names))
    present = [name for name, size in zip(names, sizes, strict=True) if size]
    if len(present) < 2:
        raise ValueError(
            f"{what} has {len(present)} group(s) with cells {present}; differential expression "
            "compares two groups: choose a column with at least two"
        )
    if group2 is not None and group1 is None:
        raise ValueError(
            "group2 needs group1: give group1 (compared with group2 or, without group2, with "
            "the rest), or neither (each group against the rest)"
        )

    def code(name: str) -> int:
        if str(name) not in names:
            raise ValueError(f"{what} has no group {name!r}; its groups are: {present}")
        found = names.index(str(name))
        if not sizes[found]:
            raise ValueError(
                f"group {name!r} of {what} has no cells; the groups with cells are: {present}"
            )
        return found

    everyone = tuple(np.flatnonzero(sizes))
    if group1 is None:
        return [_against_rest(k, names, everyone) for k in everyone]
    first = code(group1)
    if group2 is None:
        return [_against_rest(first, names, everyone)]
    second = code(group2)
    if first == second:
        raise ValueError(f"group1 and group2 are both {group1!r}; compare two different groups")
    return [Comparison(names[first], names[second], (first,), (second,))]


def _against_rest(code: int, names: list[str], everyone: tuple[int, ...]) -> Comparison:
    rest = tuple(k for k in everyone if k != code)
    return Comparison(names[code], REST, (code,), rest)


# -- what is read off the counts ---------------------------------------------------------------


@dataclass(frozen=True)
class CountSummaries:
    """Per group, from every cell of it: ``detected`` (cells with a count) and ``total``
    (summed counts), ``(n_groups, genes)``; ``sizes`` and median ``library``, ``(n_groups,)``
    (the median over a union of groups is taken from ``libraries``, each group's cells')."""

    detected: np.ndarray
    total: np.ndarray
    sizes: np.ndarray
    libraries: list[np.ndarray]

    def side(self, groups: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Detection rate and mean raw count of each gene over the cells of ``groups``."""
        size = self.sizes[list(groups)].sum()
        detected = self.detected[list(groups)].sum(axis=0) / size
        return detected, self.total[list(groups)].sum(axis=0) / size

    def median_library(self, groups: tuple[int, ...]) -> float:
        return float(np.median(np.concatenate([self.libraries[k] for k in groups])))


def count_summaries(data: CountData, codes: np.ndarray, n_groups: int) -> CountSummaries:
    """:class:`CountSummaries` of every group, from the observed counts of ``data``, read
    ``_CHUNK_CELLS`` cells at a time (so counts on disk are streamed)."""
    labelled = np.flatnonzero(codes >= 0)
    detected = np.zeros((n_groups, data.n_genes))
    total = np.zeros((n_groups, data.n_genes))
    for start in range(0, len(labelled), _CHUNK_CELLS):
        cells = labelled[start : start + _CHUNK_CELLS]
        membership = sp.csr_matrix(
            (np.ones(len(cells)), (codes[cells], np.arange(len(cells)))),
            shape=(n_groups, len(cells)),
        )
        counts = data.count_rows(cells)
        detected += _dense(membership @ (counts > 0).astype(np.float64))
        total += _dense(membership @ counts.astype(np.float64))
    return CountSummaries(
        detected=detected,
        total=total,
        sizes=np.bincount(codes[labelled], minlength=n_groups).astype(np.float64),
        libraries=[data.library[codes == k] for k in range(n_groups)],
    )


def _dense(matrix: sp.spmatrix | np.ndarray) -> np.ndarray:
    return np.asarray(matrix.todense() if sp.issparse(matrix) else matrix)
