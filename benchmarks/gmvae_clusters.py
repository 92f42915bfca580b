"""GMVAE clusters against k-means and Leiden on the VAE latent, and held-out log-likelihoods.

On ../shared/data/hvg2000/<dataset>.h5ad (fixed genes and train/test split): fits a VAE and a
GMVAE (K clusters) on the "train" cells, every cell training; scores held-out log p(x) of the
"test" cells (K_is importance samples); and compares, on all labelled cells, the ARI and NMI of
  - the GMVAE's own clusters (argmax p(y | x)),
  - k-means (K clusters, 10 inits) on the VAE latent,
  - Leiden on the VAE latent (15 neighbours, resolution 1, igraph, 2 iterations, seed 0).
Prints one JSON line.

    python benchmarks/gmvae_clusters.py --dataset zeisel_cortex --n-clusters 7 --guide marginal
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scanpy as sc
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from views import DATA, load_view

import pyrosc


def scores(truth, labels) -> dict[str, float]:
    return {
        "ari": round(float(adjusted_rand_score(truth, labels)), 3),
        "nmi": round(float(normalized_mutual_info_score(truth, labels)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="zeisel_cortex")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--n-clusters", type=int, default=7)
    parser.add_argument("--guide", default="marginal")
    parser.add_argument("--mixture-weights", default="uniform")
    parser.add_argument("--likelihood", default="nb")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--init-epochs", type=int, default=50)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--skip-vae", action="store_true", help="GMVAE only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata, train, test = load_view(args.data_dir, args.dataset)
    labelled = adata.obs["cell_type"].notna().to_numpy()
    truth = adata.obs["cell_type"][labelled].astype(str).to_numpy()
    result = {"dataset": args.dataset, "K": args.n_clusters, "epochs": args.epochs}

    if not args.skip_vae:
        started = time.perf_counter()
        vae = pyrosc.VAE(train, likelihood=args.likelihood)
        vae.fit(max_epochs=args.epochs, validation_fraction=0, progress=False)
        result["vae_seconds"] = round(time.perf_counter() - started, 1)
        result["vae_heldout_ll"] = round(float(vae.log_likelihood(test, args.n_samples).mean()), 2)
        latent = vae.latent(adata)
        kmeans = KMeans(args.n_clusters, n_init=10, random_state=0).fit_predict(latent)
        result["vae_kmeans"] = scores(truth, kmeans[labelled])
        sc.pp.neighbors(adata, use_rep="X_pyrosc", n_neighbors=15, random_state=0)
        sc.tl.leiden(adata, resolution=1.0, flavor="igraph", n_iterations=2, random_state=0)
        result["vae_leiden"] = scores(truth, adata.obs["leiden"][labelled])

    started = time.perf_counter()
    gmvae = pyrosc.GMVAE(
        train,
        n_clusters=args.n_clusters,
        likelihood=args.likelihood,
        guide=args.guide,
        mixture_weights=args.mixture_weights,
    )
    gmvae.fit(
        max_epochs=args.epochs,
        init_epochs=args.init_epochs,
        validation_fraction=0,
        progress=False,
    )
    result["gmvae_guide"] = args.guide
    result["mixture_weights"] = args.mixture_weights
    result["gmvae_seconds"] = round(time.perf_counter() - started, 1)
    result["gmvae_heldout_ll"] = round(float(gmvae.log_likelihood(test, args.n_samples).mean()), 2)
    clusters = gmvae.clusters(adata)
    result["gmvae_clusters"] = scores(truth, clusters[labelled])
    result["gmvae_clusters_used"] = int(len(np.unique(clusters)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
