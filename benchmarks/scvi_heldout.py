"""scVI held-out log-likelihood and (optionally) scib-metrics integration scores.

On ../shared/data/hvg2000/<dataset>.h5ad (fixed genes and train/test split): fits pyrosc.SCVI
on the "train" cells (every cell training; ZINB, gene dispersion, 128/10/1, dropout 0.1,
minibatch 128, Adam 1e-3, 400 epochs, observed library by default as scvi-tools), scores
held-out importance-sampled log p(x) of the "test" cells (K samples), and with --scib computes
scib-metrics' Benchmarker (defaults, min_max_scale=False) bio-conservation and
batch-correction aggregates of the latent of all labelled cells. Prints one JSON line.

    python benchmarks/scvi_heldout.py --dataset cellbench_5batch --library observed --scib
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from views import DATA, load_view

import pyrosc


def scib_scores(adata: ad.AnnData, key: str = "X_pyrosc") -> dict[str, float]:
    """scib-metrics' aggregate scores of the latent ``adata.obsm[key]`` (labelled cells)."""
    from scib_metrics.benchmark import Benchmarker

    labelled = adata[adata.obs["cell_type"].notna()].copy()
    labelled.obsm["Unintegrated"] = labelled.obsm[key]  # Benchmarker wants a baseline
    bench = Benchmarker(
        labelled, batch_key="batch", label_key="cell_type", embedding_obsm_keys=[key]
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    row = table.loc[key]
    return {
        "bio_conservation": round(float(row["Bio conservation"]), 3),
        "batch_correction": round(float(row["Batch correction"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cellbench_5batch")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--likelihood", default="zinb")
    parser.add_argument("--library", default="observed")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--kl-warmup-epochs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scib", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata, train, test = load_view(args.data_dir, args.dataset)
    model = pyrosc.SCVI(train, batch_key="batch", likelihood=args.likelihood, library=args.library)
    started = time.perf_counter()
    model.fit(
        max_epochs=args.epochs,
        validation_fraction=0,
        kl_warmup_epochs=args.kl_warmup_epochs,
        seed=args.seed,
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - started
    result = {
        "dataset": args.dataset,
        "likelihood": args.likelihood,
        "library": args.library,
        "epochs": args.epochs,
        "kl_warmup_epochs": args.kl_warmup_epochs,
        "seed": args.seed,
        "train_cells": train.n_obs,
        "test_cells": test.n_obs,
        "heldout_log_likelihood": round(
            float(np.mean(model.log_likelihood(test, args.n_samples))), 2
        ),
        "K": args.n_samples,
        "train_seconds": round(seconds, 1),
        "cells_per_second": round(train.n_obs * args.epochs / seconds),
    }
    if args.scib:
        model.latent(adata)
        result.update(scib_scores(adata))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
