"""scvi-tools 1.4.2 models opened in pyrosc: the same numbers, and the Census architecture.

1. **CellBench** (../shared/data/hvg2000/cellbench_5batch.h5ad): an SCVI fitted with scvi-tools
   on the "train" cells (its defaults: ZINB, gene dispersion, observed library, 128/10/1,
   dropout 0.1, BatchNorm; batch_key "batch"; minibatch 128, ``--epochs`` epochs, every cell
   training), saved, and opened with ``pyrosc.SCVI.from_scvi_tools``. On the same weights:
   latent means of every cell against ``get_latent_representation()`` (max absolute and
   relative difference), and the held-out importance-sampled log-likelihood of the "test"
   cells from both tools (scvi-tools' ``get_marginal_ll``, pyrosc's ``log_likelihood``, K
   draws each): their difference per cell is Monte Carlo error alone, so the mean difference
   is reported with its standard error.
2. **Census architecture** (2 x 512 hidden units, 50 latent dimensions, layer norm and no
   BatchNorm, NB, ``encode_covariates=False``, dropout 0.1; batch key and three more
   categorical covariates): 8,000 genes (the most-counted of PBMC 3k, ../shared/data/pbmc3k.h5ad)
   on cells resampled from PBMC 3k with binomial thinning, random covariates; trained briefly
   with scvi-tools, saved, opened in pyrosc. Reported: the parameter counts, the time to open,
   latent agreement with scvi-tools on the reference cells, a query of new cells (a new batch)
   mapped with ``load_query_data`` and fitted (its time includes compiling pyrosc's likelihood,
   several seconds once per process), its cell types by ``transfer_labels``, and the time to
   embed ``--embed-cells`` (100,000) resampled cells with ``latent()`` (validating the AnnData
   included).

Prints one JSON line per part and writes them to ``--out`` (``.jsonl``). Both tools run in this
one process; times are wall-clock on ``--threads`` threads.

    pip install -e ".[bench]"
    python benchmarks/scvi_tools_open.py                  # full size (tens of minutes)
    python benchmarks/scvi_tools_open.py --smoke          # tiny settings, a minute or two
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from measure import HERE, machine
from views import DATA, load_view

import pyrosc

CENSUS = {
    "n_hidden": 512,
    "n_latent": 50,
    "n_layers": 2,
    "gene_likelihood": "nb",
    "dropout_rate": 0.1,
    "encode_covariates": False,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
}
COVARIATES = {"assay": 3, "suspension_type": 2, "donor_id": 12}


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Max ``|ours - theirs| / max(|theirs|, 1e-3)``: relative where values are not tiny."""
    return float((np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-3)).max())


def cellbench(args: argparse.Namespace, directory: Path) -> dict:
    """Part 1: latent means and held-out log-likelihood of both tools on the same weights."""
    import scvi

    adata, train, test = load_view(args.data_dir, "cellbench_5batch")
    fitted = train.copy()
    scvi.settings.seed = args.seed
    scvi.model.SCVI.setup_anndata(fitted, batch_key="batch")
    model = scvi.model.SCVI(fitted)
    start = time.perf_counter()
    model.train(
        max_epochs=args.epochs,
        batch_size=128,
        train_size=1.0,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    fit_seconds = time.perf_counter() - start
    model.save(str(directory / "cellbench"), overwrite=True)

    start = time.perf_counter()
    opened = pyrosc.SCVI.from_scvi_tools(directory / "cellbench", train.copy())
    open_seconds = time.perf_counter() - start
    everything = adata.copy()
    theirs = model.get_latent_representation(everything)
    ours = opened.latent(adata.copy())

    held_out = test.copy()
    torch.manual_seed(args.seed)
    their_ll = model.get_marginal_ll(
        held_out, n_mc_samples=args.n_samples, return_mean=False, n_mc_samples_per_pass=50
    ).numpy()
    our_ll = opened.log_likelihood(test.copy(), n_samples=args.n_samples)
    difference = our_ll - their_ll
    return {
        "part": "cellbench",
        "epochs": args.epochs,
        "scvi_fit_seconds": round(fit_seconds, 1),
        "open_seconds": round(open_seconds, 3),
        "cells": int(adata.n_obs),
        "latent_max_abs_diff": float(np.abs(ours - theirs).max()),
        "latent_max_rel_diff": relative_difference(ours, theirs),
        "n_samples": args.n_samples,
        "heldout_cells": int(test.n_obs),
        "heldout_ll_scvi_tools": float(their_ll.mean()),
        "heldout_ll_pyrosc": float(our_ll.mean()),
        "heldout_ll_mean_diff": float(difference.mean()),
        "heldout_ll_diff_standard_error": float(difference.std(ddof=1) / np.sqrt(len(difference))),
        "heldout_ll_max_abs_cell_diff": float(np.abs(difference).max()),
    }


def resampled_cells(
    source: ad.AnnData, n_cells: int, rng: np.random.Generator, prefix: str
) -> ad.AnnData:
    """``n_cells`` cells drawn with replacement from ``source`` (raw counts), each thinned
    binomially with a keep-probability from U(0.3, 1), and random categorical covariates
    (:data:`COVARIATES`) and ``dataset_id`` (8 datasets). Built 10,000 cells at a time, so that
    memory stays near that of the float32 result."""
    drawn = rng.integers(source.n_obs, size=n_cells)
    chunks = []
    for start in range(0, n_cells, 10_000):
        counts = sp.csr_matrix(source.X[drawn[start : start + 10_000]], dtype=np.int64)
        keep = rng.uniform(0.3, 1.0, size=counts.shape[0])
        counts.data = rng.binomial(counts.data, np.repeat(keep, np.diff(counts.indptr)))
        counts.eliminate_zeros()
        chunks.append(counts.astype(np.float32))
    counts = sp.vstack(chunks, format="csr")
    obs = pd.DataFrame(
        {"cell_type": source.obs["cell_type"].astype(str).to_numpy()[drawn]},
        index=[f"{prefix}{i}" for i in range(n_cells)],
    )
    obs["dataset_id"] = [f"dataset{i}" for i in rng.integers(8, size=n_cells)]
    for key, n in COVARIATES.items():
        obs[key] = [f"{key}{i}" for i in rng.integers(n, size=n_cells)]
    adata = ad.AnnData(counts, obs=obs, var=source.var[[]].copy())
    return adata[np.diff(counts.indptr) > 0].copy()


def census(args: argparse.Namespace, directory: Path) -> dict:
    """Part 2: a Census-architecture model trained briefly by scvi-tools, opened in pyrosc,
    a query mapped onto it, 100k cells embedded."""
    import scvi

    path = args.data_dir.parent / "pbmc3k.h5ad"
    source = ad.read_h5ad(path) if path.exists() else pyrosc.datasets.pbmc3k()
    source = source[source.obs["cell_type"].notna()]
    totals = np.asarray(source.X.sum(axis=0)).ravel()
    genes = np.sort(np.argsort(-totals, kind="stable")[: args.census_genes])
    source = source[:, genes].copy()
    rng = np.random.default_rng(args.seed)
    reference = resampled_cells(source, args.census_cells, rng, "ref")
    fitted = reference.copy()
    scvi.settings.seed = args.seed
    scvi.model.SCVI.setup_anndata(
        fitted, batch_key="dataset_id", categorical_covariate_keys=list(COVARIATES)
    )
    settings = {**CENSUS, "n_hidden": args.census_hidden, "n_latent": args.census_latent}
    model = scvi.model.SCVI(fitted, **settings)
    n_parameters = sum(p.numel() for p in model.module.parameters())
    start = time.perf_counter()
    model.train(
        max_epochs=args.census_epochs,
        batch_size=1024,
        train_size=1.0,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    fit_seconds = time.perf_counter() - start
    model.save(str(directory / "census"), overwrite=True)

    start = time.perf_counter()
    opened = pyrosc.SCVI.from_scvi_tools(directory / "census", reference.copy())
    open_seconds = time.perf_counter() - start
    with opened._scope() as (_, _, networks):
        n_pyrosc = sum(p.numel() for p in networks.parameters()) + args.census_genes  # + theta
    ours = opened.latent()
    theirs = model.get_latent_representation(fitted)

    query = resampled_cells(source, args.query_cells, rng, "query")
    query.obs["dataset_id"] = "query_dataset"
    start = time.perf_counter()
    mapped = pyrosc.SCVI.load_query_data(query, opened)
    mapped.fit(max_epochs=args.query_epochs, batch_size=256, validation_fraction=0, progress=False)
    query_seconds = time.perf_counter() - start
    labels = pyrosc.transfer_labels(opened, mapped, "cell_type")
    accuracy = float(
        (labels["cell_type_pred"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    )

    big = resampled_cells(source, args.embed_cells, rng, "big")
    start = time.perf_counter()
    embedded = opened.latent(big)
    embed_seconds = time.perf_counter() - start
    return {
        "part": "census_architecture",
        "genes": int(reference.n_vars),
        "reference_cells": int(reference.n_obs),
        "architecture": settings,
        "covariates": {"dataset_id": 8, **COVARIATES},
        # scvi-tools' module also holds heads an NB model with an observed library never uses
        # (the library encoder, the gate, the per-cell dispersion); pyrosc's networks do not.
        "parameters_scvi_tools_module": int(n_parameters),
        "parameters_pyrosc": int(n_pyrosc),
        "scvi_epochs": args.census_epochs,
        "scvi_fit_seconds": round(fit_seconds, 1),
        "open_seconds": round(open_seconds, 3),
        "latent_max_abs_diff": float(np.abs(ours - theirs).max()),
        "latent_max_rel_diff": relative_difference(ours, theirs),
        "query_cells": int(query.n_obs),
        "query_epochs": args.query_epochs,
        "query_map_and_fit_seconds": round(query_seconds, 1),
        "query_label_accuracy": accuracy,
        "embedded_cells": int(embedded.shape[0]),
        "embed_seconds": round(embed_seconds, 2),
        "embed_cells_per_second": round(embedded.shape[0] / embed_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--parts", nargs="+", default=["cellbench", "census"])
    parser.add_argument("--epochs", type=int, default=400, help="CellBench scvi-tools fit")
    parser.add_argument("--n-samples", type=int, default=200, help="K, for both tools")
    parser.add_argument("--census-genes", type=int, default=8000)
    parser.add_argument("--census-cells", type=int, default=20000)
    parser.add_argument("--census-epochs", type=int, default=5)
    parser.add_argument("--census-hidden", type=int, default=512)
    parser.add_argument("--census-latent", type=int, default=50)
    parser.add_argument("--query-cells", type=int, default=2000)
    parser.add_argument("--query-epochs", type=int, default=20)
    parser.add_argument("--embed-cells", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    parser.add_argument("--out", type=Path, default=HERE / "scvi_tools_open.jsonl")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.n_samples = 2, 10
        args.census_genes, args.census_cells, args.census_epochs = 500, 600, 1
        args.census_hidden, args.census_latent = 32, 5
        args.query_cells, args.query_epochs, args.embed_cells = 200, 1, 2000
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            result = {"cellbench": cellbench, "census": census}[part](args, Path(tmp))
            result.update(pyrosc_version=pyrosc.__version__, machine=machine())
            print(json.dumps(result), flush=True)
            results.append(result)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
