"""``pyrosc de``: differential expression from a model written by ``pyrosc fit``: the table
(``de.csv``) and a volcano plot per comparison (``volcano.png``), with the number of genes
called per comparison printed.

    pyrosc de MODEL_DIR DATA.h5ad --groupby cell_type --out DE
    pyrosc de MODEL_DIR DATA.h5ad --groupby condition --group1 treated --group2 control \\
        --batch-correction --out DE
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad

from pyrosc.api.persistence import read_meta
from pyrosc.cli_map import _model_dir, _reference_cells, _saved_class
from pyrosc.differential_expression import DEFAULT_DELTA, MODES


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``de`` subcommand to the ``pyrosc`` parser's ``commands``."""
    de = commands.add_parser(
        "de",
        help="differential expression between groups of cells, from a fitted model",
        description="Compare groups of cells of DATA.h5ad (an obs column) through the model "
        "that `pyrosc fit` wrote: the posterior of each gene's log fold change and the genes "
        "called at a posterior expected FDR. Without --group1, each group against the rest.",
    )
    de.add_argument(
        "model",
        metavar="MODEL_DIR",
        help="output directory of `pyrosc fit` (the model is read from MODEL_DIR/model)",
    )
    de.add_argument(
        "data",
        metavar="DATA.h5ad",
        help="raw counts with all the model's genes and the --groupby column (e.g. "
        "MODEL_DIR/pyrosc.h5ad)",
    )
    de.add_argument("--groupby", required=True, metavar="KEY", help="obs column of the groups")
    de.add_argument("--group1", metavar="A", help="compare A (default: each group) ...")
    de.add_argument("--group2", metavar="B", help="... against B (default: the rest)")
    de.add_argument("--mode", choices=MODES, default="change", help="default: %(default)s")
    de.add_argument(
        "--delta",
        type=float,
        metavar="D",
        help=f"change mode: the |LFC| (log2) that counts as a change (default: {DEFAULT_DELTA})",
    )
    de.add_argument(
        "--fdr",
        type=float,
        default=0.05,
        metavar="Q",
        help="posterior expected FDR of the calls (default: %(default)s)",
    )
    de.add_argument(
        "--batch-correction",
        action="store_true",
        help="compare cells decoded into every batch (a model fitted with --batch-key)",
    )
    de.add_argument(
        "--n-samples", type=int, default=100, metavar="N", help="posterior draws (default: 100)"
    )
    de.add_argument(
        "--max-cells",
        type=int,
        default=500,
        metavar="N",
        help="cells drawn from a larger group (default: %(default)s)",
    )
    de.add_argument(
        "--no-shrink",
        action="store_true",
        help="judge each gene on its own (no prior over genes; see the README)",
    )
    de.add_argument(
        "--no-sampling-noise",
        action="store_true",
        help="leave the counts' sampling noise out of the group means' draws",
    )
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--out", required=True, metavar="DIR", help="output directory")


def de_command(args: argparse.Namespace) -> int:
    """Run ``pyrosc de``: check the inputs, load the model, compare, write the table, draw.

    Returns:
        0 on success; 1 when the drawing failed (the table is written already).
    """
    started = time.perf_counter()
    model_dir = _model_dir(Path(args.model))
    meta = read_meta(model_dir)
    model_class = _saved_class(meta["class"])
    if args.batch_correction and not meta["config"].get("batch_key"):
        raise ValueError(
            f"--batch-correction needs a model fitted with batches (pyrosc fit --model scvi "
            f"--batch-key KEY); this {meta['class']} has none: leave --batch-correction out"
        )
    if not Path(args.data).is_file():
        raise FileNotFoundError(f"{args.data} not found")
    adata = _reference_cells(
        ad.read_h5ad(args.data), meta["var_names"], meta["config"].get("layer"), "data"
    )
    model = model_class.load(model_dir, adata)
    batch_option = {"batch_correction": True} if args.batch_correction else {}
    results = model.differential_expression(
        args.groupby,
        args.group1,
        args.group2,
        mode=args.mode,
        delta=args.delta,
        fdr_target=args.fdr,
        n_samples=args.n_samples,
        max_cells_per_group=args.max_cells,
        shrink=not args.no_shrink,
        sampling_noise=not args.no_sampling_noise,
        seed=args.seed,
        **batch_option,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results.to_csv(out / "de.csv", index=False)
    call = f"is_de_fdr_{args.fdr:g}"
    print(f"Genes called at a posterior expected FDR of {args.fdr:g} ({args.mode} mode):")
    for (group1, group2), rows in results.groupby(["group1", "group2"], sort=False):
        up = int((rows[call] & (rows["lfc_mean"] > 0)).sum())
        print(f"  {group1} vs {group2}: {int(rows[call].sum())} ({up} higher in {group1})")
    print(f"Wrote {out}/de.csv ({time.perf_counter() - started:.1f} s)")
    try:
        _draw(out / "volcano.png", results)
    except Exception as error:  # whatever failed, the table stays written
        message = str(error).splitlines()[0] if str(error) else ""
        print(
            f"pyrosc: error: drawing the volcano plot failed ({type(error).__name__}: "
            f"{message}); the table is kept in {out}/de.csv.",
            file=sys.stderr,
        )
        return 1
    print(f"Wrote {out}/volcano.png")
    return 0


def _draw(path: Path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyrosc.de_results import plot_de

    figure = plot_de(results)
    figure.savefig(path, dpi=120)
    plt.close(figure)
