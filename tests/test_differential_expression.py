"""Differential expression: calibration on counts simulated with known fold changes, the mirror
comparison, a random split of one group, batch correction, every model (one written outside the
package included), the scanpy layout, the volcano plot, the CLI and bad input."""

from __future__ import annotations

from functools import partial

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pyro
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import QUICK, TINY, factor_model, simulate_counts
from test_predictive import batch_effect_data, factor_guide

import pyrosc
from pyrosc import GMVAE, SCVI, VAE
from pyrosc import differential_expression as de
from pyrosc.cli import main
from pyrosc.data import from_anndata
from pyrosc.nets import GaussianEncoder
from pyrosc.train import train

matplotlib.use("Agg")
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def types_fit():
    """A VAE of three simulated cell types (240 cells, 40 genes)."""
    adata = simulate_counts(n_cells=240, n_genes=40)
    return VAE(adata, "nb", **TINY).fit(progress=False, **QUICK)


# -- calibration -------------------------------------------------------------------------------

LOG2_FOLD_CHANGES = np.array([0.5, 1.0, 1.5, 2.0] * 2 + [-0.5, -1.0, -1.5, -2.0] * 2)


def fold_change_counts(n_cells: int, n_genes: int = 100, seed: int = 0):
    """NB counts of groups "A" and "B" (alternate cells) that share one latent structure,
    ``rho = softmax(W z + b)`` with ``z ~ N(0, I_2)``; in B the logits of genes 0-15 are
    shifted by ``LOG2_FOLD_CHANGES * log 2``. The increased genes start at 0.5% of the counts
    and the decreased ones at 1.5%, so the mass moved is nearly balanced and the other genes'
    proportions barely move (their true LFC is computed, not assumed 0).

    Returns:
        the AnnData (obs "group") and each group's population mean of rho, ``(2, genes)``
        (A, B), from 200,000 draws of z shared by both groups.
    """
    rng = np.random.default_rng(seed)
    n_de = len(LOG2_FOLD_CHANGES)
    loadings = rng.normal(0.0, 0.5, size=(2, n_genes))
    shares = np.concatenate(
        [
            np.where(LOG2_FOLD_CHANGES > 0, 0.005, 0.015),
            0.84 * rng.dirichlet(np.full(n_genes - n_de, 2.0)),
        ]
    )
    shifts = np.zeros(n_genes)
    shifts[:n_de] = LOG2_FOLD_CHANGES * np.log(2.0)

    def proportions(z: np.ndarray, in_b: np.ndarray) -> np.ndarray:
        logits = z @ loadings + np.log(shares) + in_b[:, None] * shifts
        rho = np.exp(logits - logits.max(axis=1, keepdims=True))
        return rho / rho.sum(axis=1, keepdims=True)

    in_b = np.arange(n_cells) % 2 == 1
    rho = proportions(rng.normal(size=(n_cells, 2)), in_b)
    library = rng.lognormal(np.log(1500), 0.3, size=n_cells)
    theta = 5.0
    mean = library[:, None] * rho
    counts = rng.negative_binomial(theta, theta / (theta + mean)).astype(np.float32)
    obs = pd.DataFrame(
        {"group": pd.Categorical(np.where(in_b, "B", "A"))},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = ad.AnnData(
        sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(n_genes)])
    )
    z = rng.normal(size=(200_000, 2))
    population = [proportions(z, np.full(len(z), b)).mean(axis=0) for b in (False, True)]
    return adata, np.stack(population)


def calibration(n_cells: int, fdr_targets=(0.05, 0.1)) -> dict:
    """Refit a VAE on :func:`fold_change_counts`, compare B with A, and score the calls and
    intervals against the true LFC (with the same pseudocount, the quantity estimated)."""
    adata, population = fold_change_counts(n_cells)
    model = VAE(adata, "nb").fit(progress=False, **QUICK)
    results = model.differential_expression("group", "B", "A", n_samples=200)
    results = results.set_index("gene").loc[adata.var_names]
    offset = results["pseudocount"].iloc[0]
    truth = np.log2(population[1] * de.CP10K + offset) - np.log2(population[0] * de.CP10K + offset)
    inside = ((results["lfc_ci95_low"] <= truth) & (truth <= results["lfc_ci95_high"])).to_numpy()
    delta = de.DEFAULT_DELTA
    changed = np.abs(truth) > delta
    within = (results["lfc_ci95_low"] >= -delta) & (results["lfc_ci95_high"] <= delta)
    measured = {
        "coverage_changed": inside[changed].mean(),
        "unchanged_within_delta": within.to_numpy()[~changed].mean(),
        "truly_de": int(changed.sum()),
    }
    for target in fdr_targets:
        called = results["expected_fdr"].to_numpy() <= target
        up = results["lfc_median"].to_numpy() > 0
        right = np.where(up, truth > delta, truth < -delta)
        measured[target] = (int(called.sum()), int((called & ~right).sum()))
    return measured


def check_calibration(measured: dict, fdr_targets=(0.05, 0.1)) -> None:
    """The called set's false discovery proportion is at most the target plus two binomial
    standard deviations of a proportion over the calls (a calibrated caller makes each call
    false with probability at most the target, so more is a miss beyond Monte Carlo noise),
    and at least half the truly changed genes are found.

    The 95% intervals cover the true LFC of the changed genes at about the nominal rate
    (measured 15 of 16 at 600 cells, 13 or 15 of 16 at 2,000 by the thread count; the bound,
    12 of 16, has a chance under 1% at a true rate of 0.95). The other genes' true LFCs are
    not 0 but a few hundredths (the proportions are renormalised); shrinkage puts most of
    their posterior on 0 exactly, so the check is that their intervals lie within +-delta
    (measured 0.88-0.89 at 600 cells, 0.98 at 2,000; bound 0.8): the model says they did not
    change by delta."""
    for target in fdr_targets:
        n_called, n_false = measured[target]
        assert n_called >= measured["truly_de"] // 2, measured  # power: at least half found
        slack = 2 * np.sqrt(target * (1 - target) / n_called)
        assert n_false / n_called <= target + slack, measured
    assert measured["coverage_changed"] >= 0.75, measured
    assert measured["unchanged_within_delta"] >= 0.8, measured


def test_calls_are_calibrated_on_simulated_fold_changes():
    check_calibration(calibration(n_cells=600))


@pytest.mark.slow
def test_calls_are_calibrated_on_simulated_fold_changes_at_more_cells():
    check_calibration(calibration(n_cells=2000))


# -- properties of the comparison ----------------------------------------------------------------


def test_group1_against_group2_mirrors_group2_against_group1(types_fit):
    forward = types_fit.differential_expression("cell_type", "type0", "type1", n_samples=50)
    backward = types_fit.differential_expression("cell_type", "type1", "type0", n_samples=50)
    forward = forward.set_index("gene")
    backward = backward.set_index("gene").loc[forward.index]
    np.testing.assert_allclose(forward["lfc_mean"], -backward["lfc_mean"], atol=1e-12)
    np.testing.assert_allclose(forward["lfc_ci95_low"], -backward["lfc_ci95_high"], atol=1e-12)
    np.testing.assert_array_equal(forward["proba_de"], backward["proba_de"])
    np.testing.assert_array_equal(forward["is_de_fdr_0.05"], backward["is_de_fdr_0.05"])
    np.testing.assert_array_equal(forward["detection1"], backward["detection2"])
    assert forward["is_de_fdr_0.05"].sum() > 5  # distinct types: a real comparison


def test_a_group_split_at_random_shows_almost_nothing(types_fit):
    adata = types_fit.adata.copy()
    labels = adata.obs["cell_type"].astype(str).to_numpy(dtype=object)
    in_type0 = np.flatnonzero(labels == "type0")
    halves = np.random.default_rng(1).permutation(in_type0)
    labels[halves[: len(halves) // 2]], labels[halves[len(halves) // 2 :]] = "half1", "half2"
    adata.obs["split"] = labels
    results = types_fit.differential_expression("split", "half1", "half2", adata=adata)
    assert results["is_de_fdr_0.05"].sum() <= 1
    assert results["proba_de"].median() < 0.5


def test_vanilla_mode_is_change_mode_at_delta_zero(types_fit):
    vanilla = types_fit.differential_expression("cell_type", "type0", mode="vanilla", n_samples=30)
    change = types_fit.differential_expression("cell_type", "type0", delta=0.0, n_samples=30)
    pd.testing.assert_frame_equal(vanilla, change)
    assert vanilla.attrs["mode"] == "vanilla"
    # Without shrinkage one of the two sides has at least half the draws; with it the point
    # mass at 0 is on neither side.
    flat = types_fit.differential_expression(
        "cell_type", "type0", mode="vanilla", n_samples=30, shrink=False
    )
    assert (flat["proba_de"] >= 0.5).all()


def test_batch_correction_removes_a_batch_confounded_with_the_groups():
    adata, _ = batch_effect_data()
    adata.obs["condition"] = adata.obs["batch"].map({"a": "control", "b": "treated"})
    model = SCVI(adata, batch_key="batch", likelihood="nb", **TINY).fit(progress=False, **QUICK)
    options = {"groupby": "condition", "group1": "treated", "group2": "control", "n_samples": 50}
    observed = model.differential_expression(**options)
    corrected = model.differential_expression(**options, batch_correction=True)
    # The batch effect is N(0, 0.7) in log space on every gene: most genes differ as observed.
    assert observed["is_de_fdr_0.05"].sum() >= 10
    assert corrected["is_de_fdr_0.05"].sum() <= 1


def test_near_zero_genes_are_never_called(types_fit):
    results = types_fit.differential_expression("cell_type", min_detection=0.9)
    assert not results.loc[~results["expressed"], "is_de_fdr_0.05"].any()
    assert (results.loc[~results["expressed"], "expected_fdr"] == 1).all()
    silent = results[["detection1", "detection2"]].max(axis=1) < 0.9
    np.testing.assert_array_equal(silent, ~results["expressed"])


# -- every model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (VAE, {"likelihood": "zinb"}),
        (GMVAE, {"n_clusters": 3, "guide": "marginal"}),
        (SCVI, {"library": "latent"}),
    ],
)
def test_every_model_compares_every_group_with_the_rest(cls, options):
    adata = simulate_counts(n_cells=60, n_genes=8)
    model = cls(adata, **TINY, **options)
    model.fit(max_epochs=1, progress=False, **({"init": "random"} if cls is GMVAE else {}))
    results = model.differential_expression("cell_type", n_samples=5)
    assert len(results) == 3 * 8 and set(results["group2"]) == {"rest"}
    assert list(results["group1"].unique()) == ["type0", "type1", "type2"]
    assert np.isfinite(results.select_dtypes("number")).all(None)
    if cls is SCVI:  # set up without a batch_key
        with pytest.raises(ValueError, match="batch_correction needs a model with a batch_key"):
            model.differential_expression("cell_type", batch_correction=True)


def test_a_model_written_outside_the_package_gets_differential_expression():
    adata = simulate_counts(n_cells=80, n_genes=10)
    data = from_anndata(adata, batch_key="batch")
    encoder = GaussianEncoder(10, 2, n_hidden=16)
    guide = partial(factor_guide, encoder=encoder)
    with pyro.get_param_store().scope():
        train(factor_model, guide, data, networks=encoder, max_epochs=3, progress=False)
        results = de.differential_expression(
            factor_model,
            guide,
            data,
            adata.obs["cell_type"],
            covariates=[{"batch": "a"}, {"batch": "b"}],
            n_samples=5,
            networks=encoder,
        )
    assert len(results) == 3 * 10 and results["lfc_std"].gt(0).all()


# -- where the results go ------------------------------------------------------------------------


def test_the_scanpy_layout_reads_back_and_draws_a_dotplot(types_fit):
    results = types_fit.differential_expression("cell_type", n_samples=30)
    layout = types_fit.adata.uns["pyrosc_de"]
    assert layout["params"]["groupby"] == "cell_type" and layout["params"]["reference"] == "rest"
    table = sc.get.rank_genes_groups_df(types_fit.adata, group=None, key="pyrosc_de")
    assert len(table) == len(results)
    for column, expected in (
        ("names", results["gene"]),
        ("logfoldchanges", results["lfc_mean"].astype(np.float32)),
        ("pvals", 1 - results["proba_de"]),
        ("pvals_adj", results["expected_fdr"]),
        ("pct_nz_group", results["detection1"]),
    ):
        np.testing.assert_array_equal(table[column].to_numpy(), expected.to_numpy(), column)
    assert list(table["group"].unique()) == ["type0", "type1", "type2"]
    # (No dendrogram: scanpy's own fails on a sparse X of under 50 genes.)
    for values in (None, "logfoldchanges"):
        dotplot = sc.pl.rank_genes_groups_dotplot(
            types_fit.adata,
            key="pyrosc_de",
            n_genes=3,
            values_to_plot=values,
            dendrogram=False,
            show=False,
        )
        assert "mainplot_ax" in dotplot
    matplotlib.pyplot.close("all")


def test_plot_de_draws_a_panel_per_comparison(types_fit):
    results = types_fit.differential_expression("cell_type", n_samples=20)
    figure = pyrosc.plot_de(results, y="bayes_factor", n_labels=3)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 3 and visible[0].get_title().startswith("type0 vs rest:")
    called = results.query("group1 == 'type0'")["is_de_fdr_0.05"].sum()
    assert len(visible[0].texts) == min(3, called)
    with pytest.raises(ValueError, match="y must be"):
        pyrosc.plot_de(results, y="pvals")
    matplotlib.pyplot.close("all")


def test_cli_writes_the_table_and_the_volcano(types_fit, tmp_path, capsys):
    types_fit.save(tmp_path / "fit" / "model")
    data = tmp_path / "cells.h5ad"
    types_fit.adata.write_h5ad(data)
    out = tmp_path / "de"
    args = ["de", str(tmp_path / "fit"), str(data), "--groupby", "cell_type", "--out", str(out)]
    assert main([*args, "--n-samples", "20"]) == 0
    table = pd.read_csv(out / "de.csv")
    assert len(table) == 3 * 40 and (out / "volcano.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    for group in ("type0", "type1", "type2"):
        called = int(table.query("group1 == @group")["is_de_fdr_0.05"].sum())
        assert f"  {group} vs rest: {called} (" in printed
    pair = ["--group1", "type0", "--group2", "type1", "--mode", "vanilla", "--fdr", "0.1"]
    assert main([*args, "--n-samples", "10", *pair]) == 0
    assert set(pd.read_csv(out / "de.csv")["group2"]) == {"type1"}
    assert "lfc_unshrunk" in pd.read_csv(out / "de.csv")
    flat = [*pair, "--no-shrink", "--no-sampling-noise"]
    assert main([*args, "--n-samples", "10", *flat]) == 0
    assert "lfc_unshrunk" not in pd.read_csv(out / "de.csv")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--groupby", "tissue"], "groupby 'tissue' is not an obs column"),
        (["--groupby", "cell_type", "--group2", "type1"], "group2 needs group1"),
        (["--groupby", "cell_type", "--batch-correction"], "--batch-correction needs a model"),
        (["--groupby", "cell_type", "--fdr", "1.5"], "fdr_target must lie strictly between"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(types_fit, tmp_path, capsys, extra, message):
    types_fit.save(tmp_path / "model")
    data = tmp_path / "cells.h5ad"
    types_fit.adata.write_h5ad(data)
    assert main(["de", str(tmp_path / "model"), str(data), "--out", str(tmp_path), *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


# -- bad input ---------------------------------------------------------------------------------


def with_columns(model, **columns) -> ad.AnnData:
    adata = model.adata.copy()
    for name, values in columns.items():
        adata.obs[name] = values
    return adata


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ({"groupby": "tissue"}, r"groupby 'tissue' is not an obs column; the columns are"),
        ({"group1": "type9"}, r"obs\['cell_type'\] has no group 'type9'; its groups are"),
        ({"group2": "type1"}, "group2 needs group1"),
        ({"group1": "type1", "group2": "type1"}, "group1 and group2 are both 'type1'"),
        ({"delta": -0.1}, "delta .* must be 0 or more"),
        ({"mode": "vanilla", "delta": 0.5}, "delta applies to mode='change'"),
        ({"mode": "bayes"}, "mode must be one of"),
        ({"fdr_target": 0.0}, "fdr_target must lie strictly between 0 and 1"),
        ({"fdr_target": 1.0}, "fdr_target must lie strictly between 0 and 1"),
        ({"n_samples": 0}, "n_samples must be an integer of at least 1"),
        ({"min_detection": 2}, r"min_detection must lie in \[0, 1\]"),
    ],
)
def test_bad_options_say_what_to_do(types_fit, call, message):
    with pytest.raises(ValueError, match=message):
        types_fit.differential_expression(**{"groupby": "cell_type", **call})


def test_groups_without_cells_or_without_a_partner(types_fit):
    types = types_fit.adata.obs["cell_type"]
    empty = pd.Categorical(types, categories=[*types.cat.categories, "type9"])
    adata = with_columns(types_fit, with_empty=empty, one="x")
    with pytest.raises(ValueError, match="group 'type9' of obs\\['with_empty'\\] has no cells"):
        types_fit.differential_expression("with_empty", "type9", adata=adata)
    with pytest.raises(ValueError, match=r"obs\['one'\] has 1 group\(s\) with cells \['x'\]"):
        types_fit.differential_expression("one", adata=adata)


def test_a_model_without_batches_takes_no_batch_correction(types_fit):
    with pytest.raises(TypeError, match="batch_correction"):
        types_fit.differential_expression("cell_type", batch_correction=True)


# -- the counts' sampling noise ------------------------------------------------------------------


def test_count_variance_is_the_negative_binomials(types_fit):
    """``Var(x / l)`` read off the counts site is ``rho / l + rho^2 / theta`` (NB, mean l rho)."""

    def first_chunk(*args, **kwargs):  # drawn inside the model's parameter scope
        return next(pyrosc.predictive.expression_draws(*args, count_variance=True, **kwargs))

    index, proportions, variance = types_fit._call(first_chunk, None, None, 1.0, 3)
    with types_fit._scope():
        theta = pyro.param("inverse_dispersion").detach()
    library = torch.as_tensor(types_fit.adata.X[index].sum(axis=1), dtype=torch.float32)
    expected = proportions / library + proportions**2 / theta
    torch.testing.assert_close(variance, expected, rtol=1e-4, atol=1e-10)


def test_the_noise_of_a_group_mean_is_its_cells_variance_over_its_size_squared():
    """GroupDraws.side_means: a group of N cells (represented by n drawn ones standing for
    N/n each) has mean-noise sd sqrt(sum of variances) / N, N counted once per cell."""
    sums = torch.tensor([[[2.0, 4.0], [6.0, 8.0]]], dtype=torch.float64)  # (1, 2 groups, 2)
    totals = torch.tensor([[4.0, 8.0]], dtype=torch.float64)
    noise = torch.tensor([[1.0, 4.0], [9.0, 16.0]], dtype=torch.float64)  # (2 groups, 2)
    draws = de.GroupDraws(sums, totals, noise, torch.tensor([10.0, 20.0], dtype=torch.float64))
    normals = np.array([[1.0, -1.0]])
    np.testing.assert_allclose(draws.side_means((0,)), [[0.5, 1.0]])
    np.testing.assert_allclose(draws.side_means((0,), normals), [[0.5 + 0.1, 1.0 - 0.2]])
    union = draws.side_means((0, 1), normals)
    np.testing.assert_allclose(union, [[8 / 12 + np.sqrt(10) / 30, 12 / 12 - np.sqrt(20) / 30]])
    # Never below 0.
    assert draws.side_means((0,), np.array([[-100.0, -100.0]])).min() == 0.0
