"""Label transfer: the weighted vote against hand-computed values on hand-placed points, both
neighbour searches, and transfer_labels on fitted models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import QUICK, TINY, simulate_counts

import pyrosc
from pyrosc.label_transfer import kernel_weights, weighted_knn_labels

# Hand-placed 2-D reference cells. With k = 3:
#   query (0, 0)   sees A at 0, A at 1, B at 2;
#   query (10, 10) sees B at 0, then C at 1 and C at 2: the unlabelled cell at (11, 10), also
#                  at 1, does not vote (were it a voter, it would displace the C at 2);
#   query (20, 20) sees D, D, E all at distance 0 (zero spread: equal weights).
REFERENCE = np.array(
    [[0, 0], [1, 0], [0, 2], [10, 10], [10, 11], [11, 10], [12, 10], [20, 20], [20, 20], [20, 20]],
    dtype=float,
)
LABELS = np.array(["A", "A", "B", "B", "C", np.nan, "C", "D", "D", "E"], dtype=object)
QUERY = np.array([[0, 0], [10, 10], [20, 20]], dtype=float)

# By hand, for distances (0, 1, 2): sigma^2 = (0 + 1 + 4) / 3 = 5/3, so the kernel values are
# exp(0) = 1, exp(-1 / (10/3)) = exp(-0.3) = 0.7408182, exp(-4 / (10/3)) = exp(-1.2) = 0.3011942,
# which sum to 2.0420124; the weights are 0.4897130, 0.3627883 and 0.1474987.
WEIGHTS_0_1_2 = [0.4897130, 0.3627883, 0.1474987]
SHARES = pd.DataFrame(
    {
        "A": [0.4897130 + 0.3627883, 0.0, 0.0],
        "B": [0.1474987, 0.4897130, 0.0],
        "C": [0.0, 0.3627883 + 0.1474987, 0.0],
        "D": [0.0, 0.0, 2 / 3],
        "E": [0.0, 0.0, 1 / 3],
    }
)
UNCERTAINTY = [0.1474987, 0.4897130, 1 / 3]


def vote(**kwargs):
    with pytest.warns(UserWarning, match="1 of the 10 reference cells have no label"):
        return weighted_knn_labels(REFERENCE, LABELS, QUERY, k=3, **kwargs)


def test_kernel_weights_equal_the_hand_computed_values():
    weights = kernel_weights(np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(weights, [WEIGHTS_0_1_2, [1 / 3] * 3], atol=1e-7)


def test_kernel_weights_do_not_depend_on_the_latent_scale():
    distances = np.array([[0.3, 1.1, 2.0, 2.5]])
    np.testing.assert_allclose(kernel_weights(distances), kernel_weights(1e3 * distances))


def test_votes_shares_and_uncertainties_equal_the_hand_computed_values():
    votes = vote()
    assert list(votes.labels) == ["A", "C", "D"]
    pd.testing.assert_frame_equal(votes.weights, SHARES, atol=1e-7)
    np.testing.assert_allclose(votes.uncertainty, UNCERTAINTY, atol=1e-7)
    assert "Unknown" not in votes.labels.categories


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(0.4, ["A", "Unknown", "D"]), (0.3, ["A", "Unknown", "Unknown"]), (0.1, ["Unknown"] * 3)],
)
def test_unknown_exactly_where_the_uncertainty_exceeds_the_threshold(threshold, expected):
    votes = vote(threshold=threshold)
    assert list(votes.labels) == expected
    assert list(votes.labels.categories) == ["A", "B", "C", "D", "E", "Unknown"]


def test_a_fully_labelled_reference_warns_of_nothing():
    labelled = ~pd.isna(LABELS)
    votes = weighted_knn_labels(REFERENCE[labelled], LABELS[labelled], QUERY[:1], k=3)
    assert list(votes.labels) == ["A"]


@pytest.mark.slow  # pynndescent compiles for about a minute on its first query in a process
def test_exact_and_approximate_neighbours_give_the_same_labels():
    rng = np.random.default_rng(0)
    centres = 10.0 * np.eye(3, 5)
    reference = np.repeat(centres, 200, axis=0) + rng.normal(size=(600, 5))
    labels = np.repeat(["x", "y", "z"], 200)
    query = np.repeat(centres, 50, axis=0) + rng.normal(size=(150, 5))
    exact = weighted_knn_labels(reference, labels, query, k=15, method="exact")
    approximate = weighted_knn_labels(reference, labels, query, k=15, method="approximate")
    assert list(exact.labels) == list(approximate.labels) == list(np.repeat(["x", "y", "z"], 50))
    np.testing.assert_allclose(exact.uncertainty, approximate.uncertainty, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an integer from 1 to the 9 labelled reference cells"),
        ({"k": 10}, "k must be an integer from 1 to the 9 labelled reference cells"),
        ({"threshold": 1.5}, r"threshold must lie in \[0, 1\]"),
        ({"threshold": -0.1}, r"threshold must lie in \[0, 1\]"),
        ({"method": "fast"}, "method must be one of"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        weighted_knn_labels(REFERENCE, LABELS, QUERY, **{"k": 3, **kwargs})


def test_latents_of_different_dimensions_are_an_error():
    with pytest.raises(ValueError, match="reference latent has 2 dimensions and the query"):
        weighted_knn_labels(REFERENCE, LABELS, np.zeros((2, 3)), k=3)


def test_unknown_as_a_reference_label_clashes_with_a_threshold():
    labels = np.where(LABELS == "E", "Unknown", LABELS)
    with pytest.raises(ValueError, match="already hold 'Unknown'"):
        weighted_knn_labels(REFERENCE, labels, QUERY, k=3, threshold=0.5)


@pytest.fixture(scope="module")
def reference_and_query(tmp_path_factory):
    """A VAE fitted to 160 cells and the same networks set up on 80 other cells of the same
    types (a query in the reference's latent space without surgery)."""
    adata = simulate_counts(n_cells=240, n_genes=30)
    reference_adata, query_adata = adata[:160].copy(), adata[160:].copy()
    reference_adata.obs.loc[reference_adata.obs_names[:5], "cell_type"] = np.nan
    reference = pyrosc.VAE(reference_adata, "nb", **TINY).fit(progress=False, **QUICK)
    path = reference.save(tmp_path_factory.mktemp("reference"))
    return reference, pyrosc.VAE.load(path, query_adata)


def test_transfer_labels_writes_the_query_obs_and_returns_the_frame(reference_and_query):
    reference, query = reference_and_query
    with pytest.warns(UserWarning, match="5 of the 160 reference cells have no label"):
        result = pyrosc.transfer_labels(reference, query, "cell_type", k=10, threshold=0.9)
    assert list(result.columns) == ["cell_type_pred", "cell_type_uncertainty"]
    assert result.index.equals(query.adata.obs_names)
    obs = query.adata.obs
    assert isinstance(obs["cell_type_pred"].dtype, pd.CategoricalDtype)
    pd.testing.assert_series_equal(obs["cell_type_pred"], result["cell_type_pred"])
    assert obs["cell_type_uncertainty"].between(0, 1).all()
    assert query.adata.obsm["X_pyrosc"].shape == (80, TINY["n_latent"])
    accuracy = (obs["cell_type_pred"].astype(str) == obs["cell_type"].astype(str)).mean()
    assert accuracy > 0.8


def test_transfer_labels_names_an_unknown_labels_key(reference_and_query):
    reference, query = reference_and_query
    with pytest.raises(ValueError, match="labels_key 'celltype' is not a column"):
        pyrosc.transfer_labels(reference, query, "celltype")
