"""The GMVAE's validation ELBO, exact against the old stratified figure, and its held-out LL.

Fits ``pyrosc.GMVAE`` (scVAE guide, which enumerates the cluster ``y`` in the guide) on the
"train" cells of ../shared/data/hvg2000/<dataset>.h5ad with 10 % of them held out for
validation (so the warm start, k-means and training see only the other 90 %), then reports on
the validation cells, with the same K draws per cell:

- ``elbo``: the bound ``TraceEnum_ELBO`` optimises, per cell (:func:`pyrosc.evaluate.elbo`):
  sum_y q(y | x) [log p(x, y, z_y) - log q(y | x) - log q(z_y | x, y)];
- ``stratified``: what the validation ELBO was before it was corrected (issue 14),
  E_z[log sum_y p(x, y, z_y) / q(z_y | x, y)], which never involves q(y | x);
- ``log_likelihood``: importance-sampled log p(x) (K = ``--n-samples``), an upper reference;

and the held-out log-likelihood of the "test" cells and ARI / NMI of the clusters against
``cell_type`` on all labelled cells. Prints one JSON line.

    python benchmarks/gmvae_validation_elbo.py --dataset zeisel_cortex --n-clusters 7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from views import DATA, load_view

import pyrosc
from pyrosc import evaluate, traces


def stratified_elbo(model, guide, data, n_samples: int, networks, device) -> np.ndarray:
    """The old per-cell validation ELBO: the mean over K draws of the stratified log weight
    ``log sum_y p(x, y, z_y) / q(z_y | x, y)``, ``(cells,)``."""
    rows = []
    with torch.no_grad(), traces.eval_mode(networks):
        for index in traces.cell_chunks(data, n_samples):
            minibatch = data.minibatch(index, device)
            weights = evaluate.log_importance_weights(model, guide, minibatch, n_samples)
            rows.append(weights.mean(0).cpu())
    return torch.cat(rows).double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="zeisel_cortex")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--n-clusters", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--init-epochs", type=int, default=50)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata, train, test = load_view(args.data_dir, args.dataset)
    started = time.perf_counter()
    gmvae = pyrosc.GMVAE(train, n_clusters=args.n_clusters, likelihood="nb", guide="scvae")
    gmvae.fit(
        max_epochs=args.epochs,
        init_epochs=args.init_epochs,
        validation_fraction=0.1,
        progress=False,
    )
    seconds = time.perf_counter() - started
    validation = gmvae.data.subset(gmvae.train_result.validation_index)
    with gmvae._scope() as (model, guide, networks):
        torch.manual_seed(0)
        exact = evaluate.elbo(model, guide, validation, args.n_samples, networks=networks)
        torch.manual_seed(0)
        old = stratified_elbo(model, guide, validation, args.n_samples, networks, gmvae.device)
        log_px = evaluate.log_likelihood(
            model, guide, validation, args.n_samples, networks=networks
        )
    labelled = adata.obs["cell_type"].notna().to_numpy()
    truth = adata.obs["cell_type"][labelled].astype(str).to_numpy()
    clusters = gmvae.clusters(adata)[labelled]
    result = {
        "dataset": args.dataset,
        "K": args.n_clusters,
        "epochs": args.epochs,
        "init_epochs": args.init_epochs,
        "n_train": int(len(gmvae.train_result.train_index)),
        "n_validation": int(validation.n_cells),
        "fit_seconds": round(seconds, 1),
        "history_last_validation_elbo": round(float(gmvae.history["validation_elbo"].iloc[-1]), 2),
        "validation_elbo": round(float(exact.mean()), 2),
        "validation_stratified_old": round(float(old.mean()), 2),
        "validation_log_likelihood": round(float(log_px.mean()), 2),
        "heldout_log_likelihood": round(
            float(gmvae.log_likelihood(test, args.n_samples).mean()), 2
        ),
        "ari": round(float(adjusted_rand_score(truth, clusters)), 3),
        "nmi": round(float(normalized_mutual_info_score(truth, clusters)), 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
