"""Counterfactual batches on CellBench: does scVI decode a cell of batch A as batch B would see it?

On ../shared/data/hvg2000/cellbench_5batch.h5ad (5 batches of up to 5 cell lines, 2,000 fixed
genes): fits pyrosc.SCVI (ZINB, gene dispersion, observed library, 128/10/1, dropout 0.1,
minibatch 128, Adam 1e-3, 400 epochs: scvi-tools' defaults) on the "train" cells, every cell
training. Then, for each ordered pair of batches (A, B) and each cell line present in both,
over all cells of the view (the test cells are decoded too; the model has not seen them):

* counterfactual: the mean over A's cells of that line of their normalised expression decoded
  as if from B, ``SCVI.normalized_expression(transform_batch=B, library_size=1e4)``
  (rho * 1e4, the posterior mean over --n-samples draws of z inferred with the real batch A);
* factual: the same decoded in A, the cells' own batch (no counterfactual);
* reference: the mean over B's cells of that line of their observed counts normalised to 1e4
  per cell (x / total count * 1e4).

Each is compared with the reference by the Pearson correlation over the 2,000 genes of
``log1p`` of the mean expression. The counterfactual should be closer. For scale, the same
correlation of the observed, normalised mean expression of the line in A (the data alone).
Prints a markdown table and a summary.

    python benchmarks/counterfactual_cellbench.py --epochs 400
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from views import DATA, load_view, markdown_table

import pyrosc

#: Counts per cell of the normalised expression (rho * 1e4, and observed x / total * 1e4).
SCALE = 1e4


def observed_expression(adata) -> np.ndarray:
    """``(cells, genes)`` observed counts normalised to SCALE per cell."""
    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    return counts / counts.sum(axis=1, keepdims=True) * SCALE


def correlation(expression: np.ndarray, reference: np.ndarray) -> float:
    """Pearson correlation of log1p of two ``(genes,)`` mean expression profiles."""
    return float(np.corrcoef(np.log1p(expression), np.log1p(reference))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    adata, train, _ = load_view(args.data_dir, "cellbench_5batch")
    model = pyrosc.SCVI(train, batch_key="batch", likelihood="zinb")
    model.fit(
        max_epochs=args.epochs, validation_fraction=0, seed=args.seed, device="cpu", progress=False
    )

    batches = list(model.data.covariate_categories["batch"])
    lines = adata.obs["cell_type"].astype(str)
    observed = observed_expression(adata)
    rows = []
    for source in batches:
        in_source = (adata.obs["batch"] == source).to_numpy()
        cells = adata[in_source].copy()
        # The decoding of A's cells in each batch, all from the same seed: (cells, genes).
        decoded = {}
        for target in batches:
            torch.manual_seed(args.seed)
            decoded[target] = model.normalized_expression(
                cells, transform_batch=target, library_size=SCALE, n_samples=args.n_samples
            )
        for target in batches:
            if target == source:
                continue
            in_target = (adata.obs["batch"] == target).to_numpy()
            for line in sorted(set(lines[in_source]) & set(lines[in_target])):
                of_line = (lines[in_source] == line).to_numpy()
                reference = observed[in_target & (lines == line).to_numpy()].mean(axis=0)
                rows.append(
                    {
                        "A": source,
                        "B": target,
                        "cell line": line,
                        "cells in A": int(of_line.sum()),
                        "cells in B": int((in_target & (lines == line).to_numpy()).sum()),
                        "observed A": correlation(
                            observed[in_source][of_line].mean(axis=0), reference
                        ),
                        "decoded in A": correlation(
                            decoded[source][of_line].mean(axis=0), reference
                        ),
                        "decoded as B": correlation(
                            decoded[target][of_line].mean(axis=0), reference
                        ),
                    }
                )
    table = pd.DataFrame(rows)
    table["closer"] = table["decoded as B"] > table["decoded in A"]
    print(
        f"SCVI (ZINB, observed library), {args.epochs} epochs on {train.n_obs} training cells; "
        f"Pearson r of log1p mean expression (per {SCALE:g}) with the line's observed mean in B; "
        f"{args.n_samples} posterior draws per cell\n"
    )
    print(markdown_table(table, digits=4))
    pairs = table.groupby(["A", "B"])["closer"].all()
    print(
        f"\nThe counterfactual (decoded as B) is closer than the factual decoding (in A) for "
        f"{int(table['closer'].sum())} of {len(table)} (A, B, cell line) rows, and for every "
        f"cell line of {int(pairs.sum())} of {len(pairs)} ordered batch pairs."
    )
    means = table[["observed A", "decoded in A", "decoded as B"]].mean()
    print("Mean r: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
    gain = table["decoded as B"] - table["decoded in A"]
    print(f"Gain in r (as B - in A): median {gain.median():.4f}, min {gain.min():.4f}")


if __name__ == "__main__":
    main()
