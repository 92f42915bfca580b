"""Textbook markers of PBMC 3k cell types in one-vs-rest DE lists: pyrosc, scvi-tools 1.4.2 and
scanpy's Wilcoxon test; and the wall time of a full one-vs-rest DE.

On ../shared/data/hvg2000/pbmc3k.h5ad (2,000 genes), all 2,638 labelled cells (9 Seurat-tutorial
types). Each model tool, in its own process, fits its scVI (NB, observed library, gene
dispersion, 128/10/1, dropout 0.1, minibatch 128, Adam 1e-3, every cell training, 400 epochs;
KL warm-up: each tool's default) and runs one type against the rest for every type, change
mode, delta 0.25, at its own defaults otherwise:

- pyrosc: ``differential_expression("cell_type")``: 100 posterior draws, up to 500 cells a
  group (each draw of every drawn cell), pseudocount 0.1 counts, detection filter 5%;
- scvi-tools: ``differential_expression(groupby="cell_type", mode="change", delta=0.25)``:
  5,000 draws per group (``n_samples_overall``: cells drawn with replacement, one posterior draw
  each), its other defaults;
- scanpy: ``sc.tl.rank_genes_groups(method="wilcoxon")`` on ``normalize_total(1e4)`` + ``log1p``.

A marker's rank is its position (1 = top) in the type's list ordered the tool's way for "higher
in this type": pyrosc, the table's order (the Bayes factor with the LFC's sign, ties by LFC);
scvi-tools, genes with ``lfc_mean > 0`` by ``proba_de`` (its sort key in change mode), ties by
``lfc_mean``, then the others; scanpy, its ``scores`` (the Wilcoxon z, signed). Markers not among
the 2,000 genes are listed, not ranked.

The DE wall time is the one-vs-rest call alone (the model fitted, in memory), best of
``--repeats``, with the 1-minute load average before each; ``--time-only`` reruns just that on
the models a previous run saved under ``--models``, and ``--reuse-models`` reruns the whole DE
(ranks, calls and timing) on them.

    python benchmarks/de_markers.py                    # both tools + scanpy, about 10 minutes
    python benchmarks/de_markers.py --time-only        # the timing again, on the saved models
    python benchmarks/de_markers.py --reuse-models     # ranks and timing, on the saved models
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import torch
from measure import HERE, machine, run_python, train_scvi_tools
from views import DATA, markdown_table, report_header, write_results

ARCHITECTURE = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}
DELTA = 0.25
#: Textbook markers (Seurat's PBMC 3k tutorial), the first ones as that tutorial names them.
MARKERS = {
    "Naive CD4 T": ["CCR7", "IL7R"],
    "Memory CD4 T": ["IL7R", "S100A4"],
    "CD14+ Mono": ["CD14", "LYZ"],
    "B": ["MS4A1", "CD79A"],
    "CD8 T": ["CD8A"],
    "FCGR3A+ Mono": ["FCGR3A", "MS4A7"],
    "NK": ["GNLY", "NKG7"],
    "DC": ["FCER1A", "CST3"],
    "Platelet": ["PPBP"],
}


def labelled_cells(data_dir: Path) -> ad.AnnData:
    adata = ad.read_h5ad(data_dir / "pbmc3k.h5ad")
    return adata[adata.obs["cell_type"].notna().to_numpy()].copy()


def ranks_of(lists: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Each type's markers (those among the genes) -> 1-based rank in its list."""
    return {
        kind: {gene: genes.index(gene) + 1 for gene in MARKERS[kind] if gene in genes}
        for kind, genes in lists.items()
    }


def tool_result(fit_seconds, times, lists: dict[str, list[str]], table: pd.DataFrame) -> dict:
    """A model tool's result: fit and DE times, marker ranks, genes called per type, top 5."""
    called = table.groupby("group1", sort=False)["is_de_fdr_0.05"].sum()
    return {
        "fit_seconds": fit_seconds,
        "de_seconds": [t for t, _ in times],
        "load_before": [load for _, load in times],
        "ranks": ranks_of(lists),
        "called_0.05": {str(k): int(v) for k, v in called.items()},
        "top5": {kind: genes[:5] for kind, genes in lists.items()},
    }


def timed_load(call) -> tuple[float, float]:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    call()
    return time.perf_counter() - started, load


# -- each tool ------------------------------------------------------------------------------


def pyrosc_model(adata: ad.AnnData, models: Path, epochs: int, fit: bool):
    import pyrosc

    path = models / "pyrosc"
    if not fit:
        return pyrosc.SCVI.load(path, adata), None
    model = pyrosc.SCVI(adata, likelihood="nb", **ARCHITECTURE)
    started = time.perf_counter()
    model.fit(max_epochs=epochs, validation_fraction=0, progress=False, seed=0)
    fit_seconds = time.perf_counter() - started
    model.save(path)
    return model, fit_seconds


def run_pyrosc(adata, models, epochs, fit, repeats) -> dict:
    model, fit_seconds = pyrosc_model(adata, models, epochs, fit)
    results, times = {}, []

    def call():
        results["table"] = model.differential_expression("cell_type", mode="change", delta=DELTA)

    for _ in range(repeats):
        times.append(timed_load(call))
    table = results["table"]
    lists = {kind: rows["gene"].tolist() for kind, rows in table.groupby("group1", sort=False)}
    return tool_result(fit_seconds, times, lists, table)


def scvi_model(adata: ad.AnnData, models: Path, epochs: int, fit: bool):
    import scvi

    path = models / "scvi-tools"
    if not fit:
        adata = adata.copy()
        return scvi.model.SCVI.load(str(path), adata=adata), None, adata
    model, adata, fit_seconds = train_scvi_tools(adata, ARCHITECTURE, epochs, seed=0)
    model.save(str(path), overwrite=True)
    return model, fit_seconds, adata


def run_scvi_tools(adata, models, epochs, fit, repeats) -> dict:
    model, fit_seconds, adata = scvi_model(adata, models, epochs, fit)
    results, times = {}, []

    def call():
        results["table"] = model.differential_expression(
            groupby="cell_type", mode="change", delta=DELTA, silent=True
        )

    for _ in range(repeats):
        times.append(timed_load(call))
    table = results["table"].rename_axis("gene").reset_index()
    lists = {}
    for kind, rows in table.groupby("group1", sort=False):
        up = rows["lfc_mean"] > 0
        ordered = rows.assign(up=up).sort_values(
            ["up", "proba_de", "lfc_mean"], ascending=False, kind="stable"
        )
        lists[str(kind)] = ordered["gene"].tolist()
    return tool_result(fit_seconds, times, lists, table)


def run_scanpy(adata, models, epochs, fit, repeats) -> dict:
    import scanpy as sc

    logged = adata.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    times = [
        timed_load(lambda: sc.tl.rank_genes_groups(logged, "cell_type", method="wilcoxon"))
        for _ in range(repeats)
    ]
    names = pd.DataFrame(logged.uns["rank_genes_groups"]["names"])
    lists = {kind: names[kind].tolist() for kind in names.columns}
    return {
        "fit_seconds": None,
        "de_seconds": [t for t, _ in times],
        "load_before": [load for _, load in times],
        "ranks": ranks_of(lists),
        "top5": {kind: genes[:5] for kind, genes in lists.items()},
    }


RUNS = {"pyrosc": run_pyrosc, "scvi-tools": run_scvi_tools, "scanpy wilcoxon": run_scanpy}


def child(tool, out, data_dir, models, epochs, fit, repeats, threads) -> None:
    torch.set_num_threads(threads)
    adata = labelled_cells(data_dir)
    result = {"tool": tool, **RUNS[tool](adata, models, epochs, fit, repeats)}
    out.write_text(json.dumps(result))


def rank_table(results: list[dict], genes: set[str]) -> pd.DataFrame:
    rows = []
    for kind, markers in MARKERS.items():
        for gene in markers:
            row = {"cell type": kind, "marker": gene}
            for r in results:
                rank = r["ranks"].get(kind, {}).get(gene)
                row[r["tool"]] = rank if rank is not None else "not in the 2,000 genes"
                if gene not in genes:
                    row[r["tool"]] = "-"
            if gene not in genes:
                row["marker"] = f"{gene} (not among the 2,000 genes)"
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="smoke tests: 0.01")
    parser.add_argument("--repeats", type=int, default=2, help="DE calls timed, best kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "de_markers")
    parser.add_argument("--time-only", action="store_true", help="time DE on saved models")
    parser.add_argument("--reuse-models", action="store_true", help="all of DE on saved models")
    parser.add_argument("--out", type=Path, default=HERE / "results_de_markers.md")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = max(1, round(args.epochs * args.epoch_scale))
    if args.child:
        tool, out = args.child
        fit = not (args.time_only or args.reuse_models)
        child(tool, Path(out), args.data_dir, args.models, epochs, fit, args.repeats, args.threads)
        return

    args.models.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for tool in args.tools:
            out, log = Path(work) / "out.json", Path(work) / "child.log"
            command = [__file__, "--child", tool, str(out), "--epochs", str(args.epochs)]
            command += ["--epoch-scale", str(args.epoch_scale), "--repeats", str(args.repeats)]
            command += ["--threads", str(args.threads), "--data-dir", str(args.data_dir)]
            command += ["--models", str(args.models)] + (["--time-only"] if args.time_only else [])
            command += ["--reuse-models"] if args.reuse_models else []
            if run_python(command, log).returncode != 0:
                sys.exit(f"{tool} failed:\n{log.read_text()[-3000:]}")
            results.append(json.loads(out.read_text()))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "top5"}), flush=True)
    info = machine()
    genes = set(labelled_cells(args.data_dir).var_names)
    timing = pd.DataFrame(
        [
            {
                "tool": r["tool"],
                "one-vs-rest DE s (best)": min(r["de_seconds"]),
                "all runs s": ", ".join(f"{t:.1f}" for t in r["de_seconds"]),
                "1-min load before": ", ".join(f"{x:.2f}" for x in r["load_before"]),
                "fit s": r["fit_seconds"] if r["fit_seconds"] is not None else "",
            }
            for r in results
        ]
    )
    called = pd.DataFrame(
        {r["tool"]: r["called_0.05"] for r in results if "called_0.05" in r}
    ).rename_axis("cell type")
    lines = [
        *report_header(
            "Textbook markers in one-vs-rest DE on PBMC 3k: pyrosc, scvi-tools 1.4.2, scanpy",
            started,
            info,
            args.threads,
            "de_markers.py",
            sys.argv[1:],
        ),
        "",
        f"2,638 labelled cells, 2,000 genes; scVI (NB) {epochs} epochs per model tool; change "
        f"mode, delta {DELTA}; ranks among genes higher in the type (see the script).",
    ]
    if not args.time_only:
        lines += [
            "",
            "Rank of each marker in its type's list (1 = top):",
            "",
            markdown_table(rank_table(results, genes)),
            "",
            "Genes called at 0.05 per type:",
            "",
            markdown_table(called.reset_index()),
        ]
    lines += ["", "Wall time of the one-vs-rest DE call alone:", "", markdown_table(timing, 1)]
    write_results(args.out, lines, results)


if __name__ == "__main__":
    main()
