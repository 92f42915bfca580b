"""Held-out log-likelihood, Leiden ARI and training speed of the VAE on a benchmark view.

Reads ../shared/data/hvg2000/<dataset>.h5ad (fixed 2,000 genes and train/test split; see
../shared/data/README.md): trains on the "train" cells with every cell training
(validation_fraction=0, as scvi-tools' benchmark setting), scores the "test" cells by
importance-sampled log p(x) with K samples, and clusters the latent of all cells with Leiden
(15 neighbours, resolution 1, igraph flavour, 2 iterations, random_state 0), scoring the ARI
against `cell_type` on labelled cells. Prints one JSON line.

    python benchmarks/vae_heldout.py --dataset pbmc3k --likelihood nb --epochs 400
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import adjusted_rand_score
from views import DATA, load_view

import pyrosc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pbmc3k")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--likelihood", default="nb")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--kl-warmup-epochs", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata, train, test = load_view(args.data_dir, args.dataset)
    model = pyrosc.VAE(train, likelihood=args.likelihood)
    started = time.perf_counter()
    model.fit(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        validation_fraction=0,
        kl_warmup_epochs=args.kl_warmup_epochs,
        seed=args.seed,
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - started
    log_lik = model.log_likelihood(test, n_samples=args.n_samples)

    model.latent(adata)
    sc.pp.neighbors(adata, use_rep="X_pyrosc", n_neighbors=15, random_state=0)
    sc.tl.leiden(adata, resolution=1.0, flavor="igraph", n_iterations=2, random_state=0)
    labelled = adata.obs["cell_type"].notna().to_numpy()
    ari = adjusted_rand_score(
        adata.obs["cell_type"][labelled].astype(str), adata.obs["leiden"][labelled]
    )
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "likelihood": args.likelihood,
                "epochs": args.epochs,
                "kl_warmup_epochs": args.kl_warmup_epochs,
                "train_cells": train.n_obs,
                "test_cells": test.n_obs,
                "heldout_log_likelihood": round(float(np.mean(log_lik)), 2),
                "K": args.n_samples,
                "leiden_ari": round(float(ari), 3),
                "train_seconds": round(seconds, 1),
                "cells_per_second": round(train.n_obs * args.epochs / seconds),
                "threads": args.threads,
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "final_train_elbo": round(float(model.history["train_elbo"].iloc[-1]), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
