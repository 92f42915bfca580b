"""Label transfer: each query cell's label from a distance-weighted vote of its nearest labelled
reference cells in a shared latent space (in the manner of scArches' weighted kNN).

:func:`weighted_knn_labels` works on plain arrays, so any latent will do (pyrosc's, scVI's, a
PCA); :func:`transfer_labels` runs it on two fitted pyrosc models, a reference and a query
mapped onto it, and writes the result to the query's AnnData. The neighbours come from
scikit-learn's exact search, or from pynndescent's approximate one for large references.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pyrosc.api.base import PyroscModel

#: The label of a cell whose uncertainty exceeds the threshold.
UNKNOWN = "Unknown"
#: Above this many labelled reference cells, method="auto" searches approximately.
EXACT_MAX_CELLS = 50_000
METHODS = ("auto", "exact", "approximate")


class LabelVotes(NamedTuple):
    """The outcome of :func:`weighted_knn_labels` for ``n_query`` cells.

    Attributes:
        labels: ``(n_query,)`` Categorical of the predicted labels (the reference labels as
            strings, plus ``"Unknown"`` when a threshold was given).
        uncertainty: ``(n_query,)`` float64, ``1 -`` the winning label's weight share.
        weights: ``(n_query, n_labels)`` DataFrame, each label's weight share; rows sum to 1.
    """

    labels: pd.Categorical
    uncertainty: np.ndarray
    weights: pd.DataFrame


def weighted_knn_labels(
    reference_latent: np.ndarray,
    reference_labels: np.ndarray | pd.Series,
    query_latent: np.ndarray,
    k: int = 15,
    threshold: float | None = None,
    method: str = "auto",
    seed: int = 0,
) -> LabelVotes:
    r"""Predict each query cell's label by a Gaussian-weighted vote of its ``k`` nearest
    labelled reference cells.

    For query cell ``i`` with labelled neighbours ``j = 1..k`` at Euclidean distances
    ``d_ij`` and labels ``y_j``::

        sigma_i^2 = (1/k) sum_j d_ij^2                       the spread of its distances
        w_ij      = exp(-d_ij^2 / (2 sigma_i^2)) / sum_j' exp(-d_ij'^2 / (2 sigma_i^2))
        W_ic      = sum_{j : y_j = c} w_ij                   label c's weight share
        label_i   = argmax_c W_ic,   uncertainty_i = 1 - max_c W_ic

    Scaling by each cell's own spread makes the weights free of the latent's units and of how
    far the cell lies from the reference: a cell far from every reference cell still ranks its
    nearer neighbours above its farther ones instead of every weight vanishing. The weights
    lie between ``exp(-k/2)`` and 1 before normalising; when every neighbour sits at the cell
    itself (``sigma_i = 0``) each gets ``1/k``. A tie goes to the label first in sorted
    order. With ``threshold``, cells whose uncertainty exceeds it are labelled ``"Unknown"``.

    Reference cells with a missing label (NaN/None) do not vote; a warning says how many.

    Args:
        reference_latent: ``(n_ref, d)`` latent of the reference cells.
        reference_labels: ``(n_ref,)`` their labels (any type; compared as strings).
        query_latent: ``(n_query, d)`` latent of the query cells, in the same space.
        k: neighbours per query cell, at most the number of labelled reference cells.
        threshold: in [0, 1]; None: no cell is "Unknown".
        method: ``"exact"`` (scikit-learn), ``"approximate"`` (pynndescent) or ``"auto"``:
            exact up to ``EXACT_MAX_CELLS`` labelled reference cells.
        seed: seeds pynndescent's index.

    Returns:
        :class:`LabelVotes` ``(labels, uncertainty, weights)``.

    Raises:
        ValueError: latents that are not 2-D, differ in dimension or hold NaN/inf; labels
            not one per reference cell; a bad k, threshold or method.
    """
    reference_latent, query_latent = _checked_latents(reference_latent, query_latent)
    if len(reference_labels) != len(reference_latent):
        raise ValueError(
            f"reference_labels has {len(reference_labels)} entries for "
            f"{len(reference_latent)} reference cells; give one label per cell"
        )
    check_vote_settings(reference_labels, k, threshold, method)
    voters, codes, categories = _voters(reference_labels)
    if not voters.all():
        warnings.warn(
            f"{int((~voters).sum())} of the {len(voters)} reference cells have no label (NaN) "
            "and do not vote",
            stacklevel=2,
        )
    distances, neighbours = nearest_neighbours(
        reference_latent[voters], query_latent, k, method, seed
    )
    shares = _label_shares(kernel_weights(distances), codes[neighbours], len(categories))
    winner = shares.argmax(axis=1)
    # Shares summing to 1 up to rounding could give -1e-16; an uncertainty is never below 0.
    uncertainty = np.maximum(1.0 - shares[np.arange(len(shares)), winner], 0.0)
    labels = categories.to_numpy(dtype=object)[winner]
    predicted = categories
    if threshold is not None:
        labels[uncertainty > threshold] = UNKNOWN
        predicted = categories.append(pd.Index([UNKNOWN]))
    return LabelVotes(
        labels=pd.Categorical(labels, categories=predicted),
        uncertainty=uncertainty,
        weights=pd.DataFrame(shares, columns=categories),
    )


def check_vote_settings(
    reference_labels: np.ndarray | pd.Series,
    k: int,
    threshold: float | None = None,
    method: str = "auto",
) -> None:
    """Raise a ValueError for settings the vote cannot run with (cheap: call it before a fit).

    Args:
        reference_labels: ``(n_ref,)`` labels of the reference cells, NaN where missing.
        k, threshold, method: as :func:`weighted_knn_labels`.
    """
    voters, _, categories = _voters(reference_labels)
    n_voters = int(voters.sum())
    if n_voters == 0:
        raise ValueError("no reference cell has a label; label some reference cells first")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_voters:
        raise ValueError(
            f"k must be an integer from 1 to the {n_voters} labelled reference cells, got {k!r}; "
            "choose a smaller k (15 is usual)"
        )
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold must lie in [0, 1] (an uncertainty), got {threshold}; e.g. 0.5 labels "
            f"cells {UNKNOWN!r} when no label holds half of the vote"
        )
    if threshold is not None and UNKNOWN in categories:
        raise ValueError(
            f"the reference labels already hold {UNKNOWN!r}, which a threshold would also "
            "give uncertain cells; rename that label or leave threshold unset"
        )
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def nearest_neighbours(
    reference: np.ndarray, query: np.ndarray, k: int, method: str = "auto", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference cells of each query cell (Euclidean).

    Args:
        reference: ``(n_ref, d)``; query: ``(n_query, d)``.
        method: ``"exact"`` (scikit-learn's NearestNeighbors), ``"approximate"`` (a
            pynndescent index, built with ``seed``) or ``"auto"``: exact up to
            ``EXACT_MAX_CELLS`` reference cells, where it is still quick and pynndescent's
            first call would spend most of its time compiling.

    Returns:
        ``(distances, indices)``, each ``(n_query, k)``, nearest first; indices into
        ``reference``.
    """
    if method == "auto":
        method = "exact" if len(reference) <= EXACT_MAX_CELLS else "approximate"
    if method == "exact":
        from sklearn.neighbors import NearestNeighbors

        distances, indices = NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(query)
        return distances, indices
    from pynndescent import NNDescent

    # The index's graph degree sets its accuracy; pynndescent's default is 30.
    degree = max(1, min(max(k, 30), len(reference) - 1))
    index = NNDescent(reference, n_neighbors=degree, random_state=seed)
    indices, distances = index.query(query, k=k)
    return distances.astype(np.float64), indices


def kernel_weights(distances: np.ndarray) -> np.ndarray:
    """Each neighbour's vote weight ``w_ij`` (see :func:`weighted_knn_labels`).

    Args:
        distances: ``(n_query, k)`` neighbour distances.

    Returns:
        ``(n_query, k)`` float64 weights; each row sums to 1.
    """
    squared = np.asarray(distances, dtype=np.float64) ** 2
    spread = squared.mean(axis=1, keepdims=True)  # sigma_i^2
    # sigma_i = 0: every neighbour is at the cell itself, and every kernel value is exp(0).
    scaled = np.divide(squared, 2.0 * spread, out=np.zeros_like(squared), where=spread > 0)
    kernel = np.exp(-scaled)
    return kernel / kernel.sum(axis=1, keepdims=True)


def _label_shares(weights: np.ndarray, neighbour_codes: np.ndarray, n_labels: int) -> np.ndarray:
    """``W_ic``: the summed weights of each query cell's neighbours of each label.

    Args:
        weights: ``(n_query, k)``; neighbour_codes: ``(n_query, k)`` label codes.

    Returns:
        ``(n_query, n_labels)`` float64.
    """
    n_query = len(weights)
    # One flat bincount: memory stays (n_query, n_labels), never (n_query, k, n_labels).
    slots = np.arange(n_query)[:, None] * n_labels + neighbour_codes
    totals = np.bincount(slots.ravel(), weights=weights.ravel(), minlength=n_query * n_labels)
    return totals.reshape(n_query, n_labels)


def _voters(reference_labels: np.ndarray | pd.Series) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Which reference cells vote (a label that is not missing), their label codes, and the
    labels as sorted strings: ``(voters (n_ref,) bool, codes (n_voters,), categories)``."""
    labels = pd.Series(np.asarray(reference_labels, dtype=object))
    voters = labels.notna().to_numpy()
    voting = pd.Categorical(labels[voters].astype(str))
    return voters, voting.codes.astype(np.int64), voting.categories


def _checked_latents(reference: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both latents as float arrays, checked to be 2-D, finite and of one dimension."""
    reference, query = np.asarray(reference, dtype=np.float64), np.asarray(query, dtype=np.float64)
    for name, latent in (("reference_latent", reference), ("query_latent", query)):
        if latent.ndim != 2:
            raise ValueError(f"{name} must be 2-D (cells, latent dimensions), got {latent.shape}")
        if not np.isfinite(latent).all():
            raise ValueError(f"{name} holds NaN or infinite values; embed the cells again")
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"the reference latent has {reference.shape[1]} dimensions and the query latent "
            f"{query.shape[1]}; embed both with one model (the query mapped onto the reference)"
        )
    return reference, query


def transfer_labels(
    reference: PyroscModel,
    query: PyroscModel,
    labels_key: str,
    k: int = 15,
    threshold: float | None = None,
    method: str = "auto",
    seed: int = 0,
) -> pd.DataFrame:
    """Label the query's cells from the reference's by :func:`weighted_knn_labels` on their
    latents (``reference.latent()``, ``query.latent()``; each is also written to its
    AnnData's ``obsm["X_pyrosc"]``).

    Args:
        reference: a fitted model whose ``adata.obs[labels_key]`` holds the labels (NaN:
            unlabelled, not a voter).
        query: a fitted model of the query cells in the reference's latent space (e.g. from
            ``SCVI.load_query_data(query_adata, reference)``).
        labels_key: the obs column of the reference labels.
        k, threshold, method, seed: as :func:`weighted_knn_labels`.

    Returns:
        DataFrame indexed by the query's obs_names with columns ``f"{labels_key}_pred"``
        (categorical) and ``f"{labels_key}_uncertainty"`` (float); both are also written to
        ``query.adata.obs``.

    Raises:
        ValueError: an unknown labels_key, a bad k, threshold or method, latents of different
            dimensions.
    """
    if labels_key not in reference.adata.obs:
        raise ValueError(
            f"labels_key {labels_key!r} is not a column of the reference's obs; its columns "
            f"are: {list(reference.adata.obs.columns)}"
        )
    votes = weighted_knn_labels(
        reference.latent(),
        reference.adata.obs[labels_key],
        query.latent(),
        k=k,
        threshold=threshold,
        method=method,
        seed=seed,
    )
    result = pd.DataFrame(
        {f"{labels_key}_pred": votes.labels, f"{labels_key}_uncertainty": votes.uncertainty},
        index=query.adata.obs_names,
    )
    for column in result:
        query.adata.obs[column] = result[column]
    return result
