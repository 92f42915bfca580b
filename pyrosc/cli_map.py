"""``pyrosc map``: map query cells onto a reference model written by ``pyrosc fit`` (scArches
surgery, through the model class's ``load_query_data``), transfer the reference's labels to
them, and draw reference and query together.

    pyrosc map QUERY.h5ad --reference DIR --labels-key cell_type --out MAPPED
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from pyrosc.input_checks import count_matrix
from pyrosc.label_transfer import UNKNOWN, check_vote_settings, transfer_labels


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``map`` subcommand to the ``pyrosc`` parser's ``commands``."""
    mapping = commands.add_parser(
        "map",
        help="map query cells onto a fitted reference and transfer its labels",
        description="Map the cells of QUERY.h5ad onto a reference model written by `pyrosc "
        "fit`, train the query's new parameters, and label each query cell by a weighted "
        "vote of its nearest labelled reference cells in the shared latent space.",
    )
    mapping.add_argument("query", metavar="QUERY.h5ad", help=".h5ad file of the query's raw counts")
    mapping.add_argument(
        "--reference",
        required=True,
        metavar="DIR",
        help="output directory of `pyrosc fit` (the model is read from DIR/model)",
    )
    mapping.add_argument(
        "--labels-key",
        required=True,
        metavar="KEY",
        help="obs column of the reference labels to transfer",
    )
    mapping.add_argument("--out", required=True, metavar="OUT", help="output directory")
    mapping.add_argument(
        "--reference-data",
        metavar="REF.h5ad",
        help="the reference cells' .h5ad of raw counts (default: DIR/pyrosc.h5ad, which "
        "`pyrosc fit` writes with the raw counts of the model's genes)",
    )
    mapping.add_argument(
        "--epochs", type=int, default=200, metavar="N", help="default: %(default)s"
    )
    mapping.add_argument(
        "--k",
        type=int,
        default=15,
        metavar="K",
        help="reference neighbours per vote (default: %(default)s)",
    )
    mapping.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="label cells whose uncertainty exceeds this 'Unknown' (default: never)",
    )
    mapping.add_argument(
        "--batch-key",
        metavar="KEY",
        help="obs column of the query's batches, copied to the reference's batch column "
        "(default: the reference's own batch_key)",
    )
    mapping.add_argument("--seed", type=int, default=0)
    mapping.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def map_command(args: argparse.Namespace) -> int:
    """Run ``pyrosc map``: check every input, load the reference, fit the query, transfer the
    labels, write them, then draw.

    Returns:
        0 on success; 1 when the drawing failed (the labels are written already).
    """
    # pyrosc.cli imports this module, so its output helpers are imported when first needed.
    from pyrosc.cli import _print_summary, _write_h5ad

    started = time.perf_counter()
    model_dir, model_class, reference_adata, query_adata = _checked_inputs(args)
    reference = model_class.load(model_dir, reference_adata)
    # Missing and extra query genes are a warning of load_query_data: a line of the report.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        query = model_class.load_query_data(query_adata, reference)
    for warning in caught:
        print(f"  {warning.message}")
    print(f"Fitting the query's {query_adata.n_obs} cells onto the {model_class.__name__} model")
    fit_started = time.perf_counter()
    query.fit(max_epochs=args.epochs, seed=args.seed, progress=not args.no_progress)
    fit_seconds = time.perf_counter() - fit_started

    # transfer_labels warns of unlabelled reference cells; on the command line that is a line
    # of the report, not a Python warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = transfer_labels(
            reference, query, args.labels_key, k=args.k, threshold=args.threshold, seed=args.seed
        )
    for warning in caught:
        print(f"  {warning.message}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_h5ad(query.adata, out / "query.h5ad")
    result.to_csv(out / "labels.csv", index_label="cell")
    print(f"Wrote {out}/: query.h5ad (latent in obsm['X_pyrosc'], labels in obs), labels.csv")

    try:
        _draw_umap(
            out / "umap_mapped.png", reference.adata, query.adata, args.labels_key, args.seed
        )
    except Exception as error:  # whatever failed, the labels stay written
        message = str(error).splitlines()[0] if str(error) else ""
        print(
            f"pyrosc: error: drawing the UMAP failed ({type(error).__name__}: {message}); the "
            f"query's latent and labels are kept in {out}/ (query.h5ad, labels.csv).",
            file=sys.stderr,
        )
        return 1
    _print_summary(_summary(reference.adata, query.adata, args.labels_key, fit_seconds, started))
    print(f"\nWrote {out}/: query.h5ad, labels.csv, umap_mapped.png")
    return 0


def _checked_inputs(args: argparse.Namespace) -> tuple[Path, type, ad.AnnData, ad.AnnData]:
    """Everything ``pyrosc map`` reads, checked before any training: the saved model's
    directory and class, and the reference and query cells with the model's genes."""
    model_dir = _model_dir(Path(args.reference))
    meta = json.loads((model_dir / "config.json").read_text())
    model_class = _model_class(meta["class"])
    layer, batch_key = meta["config"].get("layer"), meta["config"].get("batch_key")
    reference_path = Path(args.reference_data or Path(args.reference) / "pyrosc.h5ad")
    reference = _reference_cells(_read(reference_path), meta["var_names"], layer)
    if args.labels_key not in reference.obs:
        raise ValueError(
            f"--labels-key {args.labels_key!r} is not a column of the reference's obs "
            f"({reference_path}); its columns are: {list(reference.obs.columns)}"
        )
    check_vote_settings(reference.obs[args.labels_key], args.k, args.threshold)
    query = _query_cells(_read(Path(args.query)), meta["var_names"], layer)
    _name_query_batches(query, batch_key, args.batch_key)
    return model_dir, model_class, reference, query


def _model_dir(reference: Path) -> Path:
    """The saved model of ``pyrosc fit --out reference`` (``reference/model``), or
    ``reference`` itself when it is a directory written by ``model.save``."""
    for path in (reference / "model", reference):
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"no pyrosc model in {reference}: expected {reference}/model/config.json, which "
        f"`pyrosc fit --out {reference}` writes"
    )


def _saved_class(name: str) -> type:
    """The notebook class ``name`` (from a saved config.json)."""
    from pyrosc import api
    from pyrosc.api.base import PyroscModel

    model_class = getattr(api, name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, PyroscModel)):
        raise ValueError(f"the saved model is a {name!r}, which this pyrosc does not know")
    return model_class


def _model_class(name: str) -> type:
    """The notebook class ``name`` (from a saved config.json), checked to map query cells."""
    model_class = _saved_class(name)
    if not hasattr(model_class, "load_query_data"):
        raise ValueError(
            f"a {name} reference cannot map query cells: {name} has no load_query_data"
        )
    return model_class


def _read(path: Path) -> ad.AnnData:
    """The AnnData at ``path``; a missing file is a FileNotFoundError that names it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; give the reference cells' raw counts with --reference-data"
            if path.name == "pyrosc.h5ad"
            else f"{path} not found"
        )
    return ad.read_h5ad(path)


def _reference_cells(
    adata: ad.AnnData, var_names: list[str], layer: str | None, what: str = "reference"
) -> ad.AnnData:
    """The ``what`` cells' counts of the model's genes, in the model's order, without cells
    that have no counts in them (a printed line says how many were dropped)."""
    missing = pd.Index(var_names).difference(adata.var_names.astype(str))
    if len(missing):
        raise ValueError(
            f"the {what} lacks {len(missing)} of the {len(var_names)} genes of the model "
            f"(e.g. {list(missing[:3])}); it must hold the raw counts of all of them"
        )
    return _with_counts(adata[:, var_names], var_names, layer, what)


def _query_cells(adata: ad.AnnData, var_names: list[str], layer: str | None) -> ad.AnnData:
    """The query's cells with counts in the model's genes it has, all its genes kept, for
    ``load_query_data`` to match by name (missing ones zeros, extra ones dropped, a warning;
    under half present, an error)."""
    return _with_counts(adata, var_names, layer, "query")


def _with_counts(adata: ad.AnnData, var_names: list[str], layer: str | None, what: str):
    """A copy of ``adata`` without the cells that have no counts in ``var_names`` (a printed
    line says how many were dropped)."""
    shared = adata.var_names.astype(str).isin(var_names)
    empty = np.asarray(count_matrix(adata[:, shared], layer).sum(axis=1)).ravel() == 0
    if empty.any():
        print(f"  dropping {int(empty.sum())} {what} cells with no counts in the model's genes")
        adata = adata[~empty]
    return adata.copy()


def _name_query_batches(query: ad.AnnData, batch_key: str | None, query_key: str | None) -> None:
    """Put the query's batches in the reference's ``batch_key`` column, where the model reads
    them: copied from ``query_key`` when given."""
    if query_key is not None:
        if batch_key is None:
            raise ValueError(
                "--batch-key names the query's batches, but the reference model has no "
                "batch_key (it was fitted without --batch-key); leave --batch-key out"
            )
        if query_key not in query.obs:
            raise ValueError(
                f"--batch-key {query_key!r} is not a column of the query's obs; its columns "
                f"are: {list(query.obs.columns)}"
            )
        query.obs[batch_key] = query.obs[query_key]
    elif batch_key is not None and batch_key not in query.obs:
        raise ValueError(
            f"the query has no obs column {batch_key!r}, the reference model's batch_key; "
            "name the query's batch column with --batch-key"
        )


def _draw_umap(
    path: Path, reference: ad.AnnData, query: ad.AnnData, labels_key: str, seed: int
) -> None:
    """A UMAP of the reference and query latents together (scanpy's neighbours on the joint
    latent), coloured by dataset and by label: the reference's own, the query's predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    labels = pd.concat(
        [reference.obs[labels_key].astype(object), query.obs[f"{labels_key}_pred"].astype(object)]
    )
    both = ad.AnnData(
        X=np.vstack([reference.obsm["X_pyrosc"], query.obsm["X_pyrosc"]]),
        obs=pd.DataFrame(
            {
                "dataset": pd.Categorical(
                    ["reference"] * reference.n_obs + ["query"] * query.n_obs,
                    categories=["reference", "query"],
                ),
                labels_key: pd.Categorical(labels.to_numpy()),
            },
            index=[str(i) for i in range(reference.n_obs + query.n_obs)],
        ),
    )
    sc.pp.neighbors(both, use_rep="X", random_state=seed)
    sc.tl.umap(both, random_state=seed)
    fig = sc.pl.umap(both, color=["dataset", labels_key], show=False, return_fig=True, wspace=0.5)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _summary(
    reference: ad.AnnData, query: ad.AnnData, labels_key: str, fit_seconds: float, started: float
) -> dict:
    """What ``pyrosc map`` prints at the end: sizes, the vote's outcome, the timings."""
    predicted = query.obs[f"{labels_key}_pred"].astype(str)
    summary = {
        "reference cells": reference.n_obs,
        "labelled reference cells (voters)": int(reference.obs[labels_key].notna().sum()),
        "query cells": query.n_obs,
        "genes": query.n_vars,
        "query training seconds": round(fit_seconds, 1),
        "median uncertainty": round(float(query.obs[f"{labels_key}_uncertainty"].median()), 3),
        f"cells labelled {UNKNOWN}": int((predicted == UNKNOWN).sum()),
    }
    if labels_key in query.obs and query.obs[labels_key].notna().any():
        # The query's own labels, when it has them, measure the transfer.
        labelled = query.obs[labels_key].notna().to_numpy()
        truth = query.obs[labels_key][labelled].astype(str)
        agreement = float((predicted[labelled] == truth).mean())
        summary[f"agreement with the query's own {labels_key}"] = round(agreement, 3)
    summary["wall seconds"] = round(time.perf_counter() - started, 1)
    return summary
