"""The ``pyrosc`` command: fit a model to an .h5ad file (or the embedded PBMC 3k) and write the
fitted model, an annotated .h5ad, and figures; map query cells onto a fitted reference and
transfer its labels (``pyrosc map``, in :mod:`pyrosc.cli_map`); or compare groups of cells
through a fitted model (``pyrosc de``, in :mod:`pyrosc.cli_de`); or build the fused
likelihood's kernels ahead of the first fit (``pyrosc build-kernels``, :mod:`pyrosc.cli_kernels`).

    pyrosc fit [DATA.h5ad] --model vae --likelihood nb --out DIR
    pyrosc fit DATA.h5ad --model scvi --batch-key batch --out DIR
    pyrosc map QUERY.h5ad --reference DIR --labels-key cell_type --out MAPPED
    pyrosc de DIR DIR/pyrosc.h5ad --groupby cell_type --out DE
    pyrosc build-kernels
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np

from pyrosc import cli_de, cli_kernels, cli_map
from pyrosc.data import select_genes
from pyrosc.input_checks import count_matrix
from pyrosc.likelihoods import LIKELIHOODS
from pyrosc.models.scvi import DISPERSIONS
from pyrosc.train import default_epochs

MODELS = ("vae", "gmvae", "scvi")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrosc", description="Deep generative models of single-cell RNA-seq counts."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser(
        "fit",
        help="fit a model and write the model, an annotated .h5ad and figures",
        description="Fit a model to raw counts. With no DATA, the embedded PBMC 3k dataset "
        "(10x Genomics, 2,700 cells, 9 labelled cell types) is used.",
    )
    fit.add_argument("data", nargs="?", help=".h5ad file of raw counts (default: PBMC 3k)")
    fit.add_argument("--model", choices=MODELS, default="vae")
    fit.add_argument(
        "--likelihood", choices=LIKELIHOODS, help="default: nb (zinb for scvi, as scvi-tools)"
    )
    fit.add_argument("--n-clusters", type=int, help="GMVAE: mixture components (default: 10)")
    fit.add_argument(
        "--guide", choices=("scvae", "marginal"), help="GMVAE: the guide (default: scvae)"
    )
    fit.add_argument(
        "--batch-key", default=None, help="scVI: obs column of the batch (default: one batch)"
    )
    fit.add_argument(
        "--dispersion",
        choices=DISPERSIONS,
        help="scVI with nb or zinb: inverse dispersion per gene, gene and batch, or cell "
        "(default: gene)",
    )
    fit.add_argument(
        "--library",
        choices=("observed", "latent"),
        help="scVI: observed total counts or a latent library size (default: observed)",
    )
    fit.add_argument("--out", default="pyrosc_out", help="output directory (default: %(default)s)")
    fit.add_argument("--layer", default=None, help="layer with raw counts (default: X)")
    fit.add_argument(
        "--labels-key",
        default=None,
        help="obs column of labels to score clusters against (default: 'cell_type' if present)",
    )
    fit.add_argument(
        "--n-top-genes",
        type=int,
        default=2000,
        help="model the N most variable genes (0 keeps all; default: %(default)s)",
    )
    fit.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: min(400, round(20000 / cells * 400)), scvi-tools' rule (400 up to 20,000 "
        "cells)",
    )
    fit.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    fit.add_argument("--lr", type=float, default=1e-3, help="default: %(default)s")
    fit.add_argument("--n-latent", type=int, default=10, help="default: %(default)s")
    fit.add_argument("--n-hidden", type=int, default=128, help="default: %(default)s")
    fit.add_argument("--n-layers", type=int, default=1, help="default: %(default)s")
    fit.add_argument(
        "--held-out",
        type=float,
        default=0.1,
        help="share of cells held out of training, scored by log-likelihood (default: %(default)s)",
    )
    fit.add_argument(
        "--n-samples",
        type=int,
        default=200,
        help="importance samples per held-out cell (default: %(default)s)",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    fit.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    cli_map.add_parser(commands)
    cli_de.add_parser(commands)
    cli_kernels.add_parser(commands)
    return parser


def _save_figures(out: Path, adata: ad.AnnData, history, colors: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["train_elbo"], label="training")
    if history["validation_elbo"].notna().any():
        ax.plot(history["epoch"], history["validation_elbo"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per cell (nats)")
    low = np.nanpercentile(history[["train_elbo", "validation_elbo"]].to_numpy(), 5)
    ax.set_ylim(bottom=low)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curve.png", dpi=120)
    plt.close(fig)

    fig = sc.pl.umap(adata, color=colors, show=False, return_fig=True, wspace=0.5)
    fig.savefig(out / "umap.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


# The options that belong to one model only.
_MODEL_OPTIONS = {
    "scvi": ("batch_key", "dispersion", "library"),
    "gmvae": ("n_clusters", "guide"),
}


def _check_options_apply(args: argparse.Namespace) -> None:
    """Raise a ValueError for an option given that the chosen model does not take."""
    for model, options in _MODEL_OPTIONS.items():
        for option in options:
            if model != args.model and getattr(args, option) is not None:
                flag = "--" + option.replace("_", "-")
                raise ValueError(
                    f"{flag} is for --model {model}; --model {args.model} does not take it"
                )


def fit_command(args: argparse.Namespace) -> int:
    """Run ``pyrosc fit``: load, select genes, fit, write the model and latent, then score,
    cluster, embed and draw.

    Returns:
        0 on success; 1 when a step after the fit failed (the model and latent are written
        already, and the error is printed on one line).
    """
    import scanpy as sc
    import torch
    from sklearn.metrics import adjusted_rand_score

    from pyrosc import GMVAE, SCVI, VAE, datasets

    _check_options_apply(args)
    likelihood = args.likelihood or ("zinb" if args.model == "scvi" else "nb")
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        print("Data: embedded PBMC 3k (10x Genomics; see pyrosc/datasets/PROVENANCE.md)")
        adata = datasets.pbmc3k()
    else:
        print(f"Data: {args.data}")
        adata = ad.read_h5ad(args.data)
    labels_key = args.labels_key
    if labels_key is None and "cell_type" in adata.obs:
        labels_key = "cell_type"
    print(f"  {adata.n_obs} cells x {adata.n_vars} genes")

    adata = select_genes(adata, args.n_top_genes, args.layer)
    empty = np.asarray(count_matrix(adata, args.layer).sum(axis=1)).ravel() == 0
    if empty.any():
        print(f"  dropping {int(empty.sum())} cells with no counts in the selected genes")
        adata = adata[~empty].copy()
    print(f"  modelling {adata.n_vars} genes of {adata.n_obs} cells")

    sizes = {"n_latent": args.n_latent, "n_hidden": args.n_hidden, "n_layers": args.n_layers}
    common = {"likelihood": likelihood, "layer": args.layer, "labels_key": labels_key}
    if args.model == "gmvae":
        n_clusters = 10 if args.n_clusters is None else args.n_clusters
        model = GMVAE(adata, n_clusters, guide=args.guide or "scvae", **common, **sizes)
    elif args.model == "scvi":
        model = SCVI(
            adata,
            batch_key=args.batch_key,
            dispersion=args.dispersion,
            library=args.library or "observed",
            **common,
            **sizes,
        )
    else:
        model = VAE(adata, **common, **sizes)
    epochs = args.epochs or default_epochs(model.data.n_cells)
    chosen = "" if args.epochs else f" (scvi-tools' rule for {model.data.n_cells:,} cells)"
    print(f"Fitting a {likelihood.upper()} {args.model.upper()} for {epochs} epochs{chosen}")
    fit_started = time.perf_counter()
    model.fit(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        validation_fraction=args.held_out,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    fit_seconds = time.perf_counter() - fit_started
    n_train = len(model.train_result.train_index)

    summary = {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "training cells": n_train,
        "training seconds": round(fit_seconds, 1),
        "training cells/s": round(n_train * len(model.history) / fit_seconds),
    }
    # The fitted model and the latent are written before anything that may fail later
    # (scoring, neighbours, clustering, UMAP, figures): a failure there loses nothing.
    model.save(out / "model")
    model.history.to_csv(out / "history.csv", index=False)
    model.latent()
    cluster_keys = []
    if args.model == "gmvae":
        model.clusters()
        cluster_keys.append("pyrosc_cluster")
        summary["GMVAE clusters used"] = adata.obs["pyrosc_cluster"].nunique()
    _write_h5ad(adata, out / "pyrosc.h5ad")
    print(f"Wrote {out}/: model/, history.csv, pyrosc.h5ad (latent in obsm['X_pyrosc'])")

    step = "scoring held-out cells"
    try:
        held_out = model.train_result.validation_index
        if len(held_out):
            print(f"Scoring {len(held_out)} held-out cells (K = {args.n_samples})")
            log_lik = model.log_likelihood(adata[held_out], n_samples=args.n_samples)
            summary["held-out log-likelihood per cell"] = round(float(log_lik.mean()), 2)
        step = "embedding (neighbours, Leiden, UMAP)"
        print("Embedding: neighbours, Leiden, UMAP")
        sc.pp.neighbors(adata, use_rep="X_pyrosc", random_state=args.seed)
        sc.tl.leiden(adata, resolution=1.0, flavor="igraph", n_iterations=2, random_state=args.seed)
        sc.tl.umap(adata, random_state=args.seed)
        summary["Leiden clusters"] = adata.obs["leiden"].nunique()
        cluster_keys.insert(0, "leiden")
        if labels_key:
            labelled = adata.obs[labels_key].notna().to_numpy()
            truth = adata.obs[labels_key][labelled].astype(str)
            for key in cluster_keys:
                score = adjusted_rand_score(truth, adata.obs[key][labelled])
                summary[f"ARI ({key} vs {labels_key})"] = round(score, 3)
        step = "writing pyrosc.h5ad with the embedding"
        _write_h5ad(adata, out / "pyrosc.h5ad")
        step = "drawing the figures"
        colors = cluster_keys + [key for key in (labels_key, args.batch_key) if key]
        _save_figures(out, adata, model.history, colors)
    except Exception as error:  # whatever failed, what was written stays
        message = str(error).splitlines()[0] if str(error) else ""
        print(
            f"pyrosc: error: {step} failed ({type(error).__name__}: {message}); the fitted "
            f"model and the latent are kept in {out}/ (model/, history.csv, pyrosc.h5ad).",
            file=sys.stderr,
        )
        return 1
    summary["wall seconds"] = round(time.perf_counter() - started, 1)
    summary["threads"] = torch.get_num_threads()

    _print_summary(summary)
    print(f"\nWrote {out}/: model/, history.csv, pyrosc.h5ad, training_curve.png, umap.png")
    return 0


def _print_summary(summary: dict) -> None:
    """Print ``summary`` (name -> value) as an aligned table."""
    print("\nSummary")
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")


def _write_h5ad(adata: ad.AnnData, path: Path) -> None:
    """Write ``adata`` to ``path`` through a temporary file, so that a failed write never
    leaves a broken file in place of the one written before."""
    partial = path.with_name(path.name + ".partial")
    adata.write_h5ad(partial, compression="gzip")
    partial.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyrosc`` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "fit":
            return fit_command(args)
        if args.command == "map":
            return cli_map.map_command(args)
        if args.command == "de":
            return cli_de.de_command(args)
        if args.command == "build-kernels":
            return cli_kernels.build_kernels_command(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"pyrosc: error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
