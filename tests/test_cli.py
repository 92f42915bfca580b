"""The command line: a short fit on a small file writes every promised output."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import simulate_counts

from pyrosc import VAE
from pyrosc.cli import main
from pyrosc.data import select_genes


def test_fit_writes_model_h5ad_figures_and_summary(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=200, n_genes=60).write_h5ad(data)
    out = tmp_path / "out"
    code = main(
        [
            "fit", str(data), "--out", str(out), "--epochs", "3", "--n-top-genes", "30",
            "--n-samples", "5", "--no-progress", "--likelihood", "zinb",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("model/config.json", "model/model.pt", "pyrosc.h5ad", "training_curve.png"):
        assert (out / name).exists(), name
    assert (out / "umap.png").stat().st_size > 1000
    result = ad.read_h5ad(out / "pyrosc.h5ad")
    assert result.n_vars == 30
    assert {"X_pyrosc", "X_umap"} <= set(result.obsm) and "leiden" in result.obs
    printed = capsys.readouterr().out
    for line in ("held-out log-likelihood per cell", "ARI (leiden vs cell_type)", "wall seconds"):
        assert line in printed


def test_fit_gmvae_reports_its_own_clusters(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=150, n_genes=30).write_h5ad(data)
    args = ["fit", str(data), "--model", "gmvae", "--n-clusters", "3", "--out", str(tmp_path / "o")]
    assert main([*args, "--epochs", "2", "--n-samples", "3", "--no-progress"]) == 0
    result = ad.read_h5ad(tmp_path / "o" / "pyrosc.h5ad")
    assert "pyrosc_cluster" in result.obs and "pyrosc_cluster_probs" in result.obsm
    assert "ARI (pyrosc_cluster vs cell_type)" in capsys.readouterr().out


def test_fit_scvi_with_a_batch_key(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=150, n_genes=30).write_h5ad(data)
    args = ["fit", str(data), "--model", "scvi", "--batch-key", "batch", "--library", "latent"]
    args += ["--dispersion", "gene-batch", "--out", str(tmp_path / "o"), "--epochs", "2"]
    assert main([*args, "--n-samples", "3", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "o" / "model" / "config.json").read_text())
    assert meta["class"] == "SCVI"
    config = {key: meta["config"][key] for key in ("batch_key", "library", "dispersion")}
    assert config == {"batch_key": "batch", "library": "latent", "dispersion": "gene-batch"}
    assert meta["config"]["likelihood"] == "zinb"  # scVI's default, not the VAE's
    assert "Fitting a ZINB SCVI" in capsys.readouterr().out


def test_batch_key_is_for_scvi_only(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=50, n_genes=20).write_h5ad(data)
    assert main(["fit", str(data), "--batch-key", "batch", "--out", str(tmp_path / "o")]) == 2
    assert "--batch-key is for --model scvi" in capsys.readouterr().err


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=50, n_genes=20).write_h5ad(data)
    code = main(["fit", str(data), "--layer", "counts", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "layer" in capsys.readouterr().err


def test_select_genes_keeps_raw_counts_of_the_most_variable(toy_adata):
    selected = select_genes(toy_adata, 10, None)
    assert selected.n_vars == 10
    sub = toy_adata[:, selected.var_names]
    assert (selected.X != sub.X).nnz == 0


@pytest.mark.slow
def test_default_dataset_end_to_end(tmp_path):
    assert main(["fit", "--out", str(tmp_path), "--epochs", "2", "--no-progress"]) == 0


def test_a_failure_after_the_fit_keeps_the_model_and_the_latent(tmp_path, capsys, monkeypatch):
    import scanpy as sc

    def broken_umap(*args, **kwargs):
        raise AttributeError("'csr_array' object has no attribute 'getnnz'\nmore detail")

    monkeypatch.setattr(sc.tl, "umap", broken_umap)
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=120, n_genes=30).write_h5ad(data)
    out = tmp_path / "out"
    args = ["fit", str(data), "--out", str(out), "--epochs", "2", "--n-samples", "3"]
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "pyrosc: error: embedding (neighbours, Leiden, UMAP) failed (AttributeError: "
        "'csr_array' object has no attribute 'getnnz'); the fitted model and the latent are "
        f"kept in {out}/ (model/, history.csv, pyrosc.h5ad)."
    ]
    written = ad.read_h5ad(out / "pyrosc.h5ad")
    assert written.obsm["X_pyrosc"].shape == (120, 10)
    assert not list(out.glob("*.partial")) and not (out / "umap.png").exists()
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    loaded = VAE.load(out / "model", written)
    np.testing.assert_allclose(loaded.latent(), written.obsm["X_pyrosc"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--n-latent", "0"], "n_latent must be an integer of at least 1"),
        (["--n-hidden", "0"], "n_hidden must be an integer of at least 1"),
        (["--n-top-genes", "-5"], "n_top_genes must be 0"),
    ],
)
def test_sizes_of_zero_are_reported_before_training(tmp_path, capsys, option, message):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=50, n_genes=20).write_h5ad(data)
    assert main(["fit", str(data), *option, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--dispersion", "gene-batch"], "--dispersion is for --model scvi"),
        (["--library", "latent"], "--library is for --model scvi"),
        (["--guide", "marginal"], "--guide is for --model gmvae"),
        (["--n-clusters", "4"], "--n-clusters is for --model gmvae"),
        (["--model", "scvi", "--n-clusters", "4"], "--model scvi does not take it"),
        (["--model", "scvi", "--likelihood", "poisson", "--dispersion", "gene"], "does not apply"),
    ],
)
def test_options_of_another_model_are_errors(tmp_path, capsys, option, message):
    data = tmp_path / "toy.h5ad"
    simulate_counts(n_cells=50, n_genes=20).write_h5ad(data)
    assert main(["fit", str(data), *option, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


# -- pyrosc map -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mapped_dirs(tmp_path_factory):
    """A reference scVI written by `pyrosc fit` on 160 cells (batches a and b; 3 unlabelled),
    and a query .h5ad of 80 other cells of the same types, whose batch ("c") is in obs
    "sample"."""
    root = tmp_path_factory.mktemp("map")
    adata = simulate_counts(n_cells=240, n_genes=40)
    reference, query = adata[:160].copy(), adata[160:].copy()
    reference.obs.loc[reference.obs_names[:3], "cell_type"] = np.nan
    query.obs = query.obs.drop(columns="batch").assign(sample="c")
    reference.write_h5ad(root / "reference.h5ad")
    query.write_h5ad(root / "query.h5ad")
    args = ["fit", str(root / "reference.h5ad"), "--model", "scvi", "--batch-key", "batch"]
    args += ["--out", str(root / "ref"), "--epochs", "20", "--n-top-genes", "0"]
    assert main([*args, "--n-latent", "4", "--n-samples", "3", "--no-progress"]) == 0
    return root


def map_args(root, *extra):
    return ["map", str(root / "query.h5ad"), "--reference", str(root / "ref"), *extra]


def test_map_writes_the_query_labels_and_the_joint_umap(mapped_dirs, tmp_path, capsys):
    out = tmp_path / "mapped"
    args = ["--labels-key", "cell_type", "--out", str(out), "--batch-key", "sample"]
    assert main(map_args(mapped_dirs, *args, "--epochs", "3", "--k", "10", "--no-progress")) == 0
    query = ad.read_h5ad(out / "query.h5ad")
    assert query.obsm["X_pyrosc"].shape == (80, 4)
    assert set(query.obs["batch"]) == {"c"}  # the query's batches, where the model reads them
    assert query.obs["cell_type_uncertainty"].between(0, 1).all()
    labels = pd.read_csv(out / "labels.csv", index_col="cell")
    assert list(labels.columns) == ["cell_type_pred", "cell_type_uncertainty"]
    assert list(labels.index) == list(query.obs_names)
    assert (labels["cell_type_pred"] == query.obs["cell_type_pred"].astype(str)).all()
    assert (out / "umap_mapped.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "3 of the 160 reference cells have no label (NaN) and do not vote" in printed
    assert re.search(r"labelled reference cells \(voters\)\s+157\n", printed)
    assert "agreement with the query's own cell_type" in printed


def test_map_threshold_labels_uncertain_cells_unknown(mapped_dirs, tmp_path):
    out = tmp_path / "mapped"
    args = ["--labels-key", "cell_type", "--out", str(out), "--batch-key", "sample"]
    assert main(map_args(mapped_dirs, *args, "--epochs", "2", "--threshold", "0")) == 0
    query = ad.read_h5ad(out / "query.h5ad")
    uncertain = query.obs["cell_type_uncertainty"].to_numpy() > 0
    assert (query.obs["cell_type_pred"].astype(str)[uncertain] == "Unknown").all()
    assert (query.obs["cell_type_pred"].astype(str)[~uncertain] != "Unknown").all()


def test_a_failed_umap_keeps_the_labels(mapped_dirs, tmp_path, capsys, monkeypatch):
    import scanpy as sc

    def broken_umap(*args, **kwargs):
        raise RuntimeError("no layout\nmore detail")

    monkeypatch.setattr(sc.tl, "umap", broken_umap)
    out = tmp_path / "mapped"
    args = ["--labels-key", "cell_type", "--out", str(out), "--batch-key", "sample"]
    assert main(map_args(mapped_dirs, *args, "--epochs", "2", "--no-progress")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "pyrosc: error: drawing the UMAP failed (RuntimeError: no layout); the query's latent "
        f"and labels are kept in {out}/ (query.h5ad, labels.csv)."
    ]
    assert len(pd.read_csv(out / "labels.csv")) == 80


SAMPLE = ["--batch-key", "sample"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([*SAMPLE, "--labels-key", "celltype"], "--labels-key 'celltype' is not a column of"),
        ([*SAMPLE, "--threshold", "1.5"], "threshold must lie in [0, 1]"),
        ([*SAMPLE, "--k", "500"], "k must be an integer from 1 to the 157 labelled reference"),
        (["--batch-key", "donor"], "--batch-key 'donor' is not a column of the query's obs"),
        ([], "the query has no obs column 'batch', the reference model's batch_key"),
        ([*SAMPLE, "--reference-data", "missing.h5ad"], "missing.h5ad not found"),
    ],
)
def test_map_reports_bad_input_on_one_line(mapped_dirs, tmp_path, capsys, extra, message):
    args = ["--labels-key", "cell_type", "--out", str(tmp_path / "o"), *extra]
    assert main(map_args(mapped_dirs, *args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrosc: error: ") and message in err[0]
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs are checked


def test_map_matches_query_genes_by_name_and_needs_a_model(mapped_dirs, tmp_path, capsys):
    query = ad.read_h5ad(mapped_dirs / "query.h5ad")
    args = ["--labels-key", "cell_type", "--epochs", "2", "--batch-key", "sample"]
    reference = ["--reference", str(mapped_dirs / "ref")]
    query[:, :30].copy().write_h5ad(tmp_path / "most_genes.h5ad")
    most = ["map", str(tmp_path / "most_genes.h5ad"), *reference, "--out", str(tmp_path / "m")]
    assert main([*most, *args, "--no-progress"]) == 0
    assert "10 of the model's 40 genes are missing from the new data" in capsys.readouterr().out
    query[:, :15].copy().write_h5ad(tmp_path / "few_genes.h5ad")
    few = ["map", str(tmp_path / "few_genes.h5ad"), *reference, "--out", str(tmp_path / "f")]
    assert main([*few, *args]) == 2
    assert "only 15 of the model's 40 genes are among" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
    out = ["--out", str(tmp_path / "o")]
    no_model = ["map", str(mapped_dirs / "query.h5ad"), "--reference", str(tmp_path), *out]
    assert main([*no_model, *args]) == 2
    assert f"no pyrosc model in {tmp_path}" in capsys.readouterr().err
