"""Posterior predictive checks of the VAE on PBMC 3k with Poisson, NB and ZINB likelihoods.

On ../shared/data/hvg2000/pbmc3k.h5ad (2,000 fixed genes and train/test split): fits pyrosc.VAE
with each likelihood (128/10/1, dropout 0.1, minibatch 128, Adam 1e-3, 400 epochs, every
"train" cell training) and checks the training cells against --n-samples replicated datasets
(``VAE.predictive_check``: latents from the posterior, counts from the model). Prints two
markdown tables, statistics by likelihood: the calibration (the share of genes, for the mean,
variance and fraction of zeros over the cells, or of cells, for the library size and the
coefficient of variation over the genes, whose observed value lies inside its replicated 95%
interval), and the median over genes or cells of observed / replicated median (above 1: the
model replicates too little of it). ``--plots DIR`` saves each check's figure.

    python benchmarks/predictive_checks.py --epochs 400
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from views import DATA, load_view, markdown_table

import pyrosc

LIKELIHOODS = ("poisson", "nb", "zinb")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--dataset", default="pbmc3k")
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--n-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plots", type=Path, default=None, help="directory for the figures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    _, train, _ = load_view(args.data_dir, args.dataset)
    shares, ratios = {}, {}
    for likelihood in LIKELIHOODS:
        model = pyrosc.VAE(train, likelihood=likelihood)
        model.fit(
            max_epochs=args.epochs,
            validation_fraction=0,
            seed=args.seed,
            device="cpu",
            progress=False,
        )
        check = model.predictive_check(n_samples=args.n_samples, seed=args.seed)
        shares[likelihood] = check.summary["share_inside"]
        table = pd.concat([check.genes, check.cells])
        ratio = table["observed"] / table["replicated_median"]
        ratios[likelihood] = ratio.groupby(table["statistic"], sort=False).median()
        if args.plots is not None:
            args.plots.mkdir(parents=True, exist_ok=True)
            check.plot().savefig(args.plots / f"predictive_check_{likelihood}.png", dpi=120)

    summary = check.summary
    header = (
        f"VAE on the {train.n_obs} training cells of {args.dataset}, {args.epochs} epochs; "
        f"{args.n_samples} replicated datasets"
    )
    calibration = pd.DataFrame(shares).rename_axis("statistic").reset_index()
    calibration.insert(1, "of", summary.loc[calibration["statistic"], "level"].to_numpy())
    print(f"{header}: share inside the replicated 95% interval\n")
    print(markdown_table(calibration))
    print(f"\n{header}: median of observed / replicated median\n")
    print(markdown_table(pd.DataFrame(ratios).rename_axis("statistic").reset_index()))


if __name__ == "__main__":
    main()
