"""Reference mapping and label transfer, pyrosc against scvi-tools 1.4.2, on CellBench.

On ../shared/data/hvg2000/cellbench_5batch.h5ad (2,000 genes): the reference is the three
CEL-seq2 batches ``sc_celseq2_5cl_p1..p3`` (909 cells, cell lines known), the query the other
CEL-seq2 run ``sc_celseq2`` and the Drop-seq run ``sc_dropseq`` (499 cells, a second technology;
their cell lines are used only to score). For each tool, in a fresh process, with matched
settings (ZINB, observed library, gene dispersion, 128 hidden units, 10 latent dimensions,
1 layer, dropout 0.1, BatchNorm, the batch given to the encoder too, as scArches needs;
minibatch 128, Adam 1e-3, every cell training):

1. an scVI reference, 400 epochs; the query mapped onto it (``load_query_data``: new batch
   columns, reference frozen; scvi-tools' defaults) and trained 200 epochs with weight decay 0,
   as scvi-tools' scArches tutorial; the query's cell lines from the reference's by the
   weighted kNN vote of :func:`pyrosc.weighted_knn_labels` (k = 15) on each tool's own latents;
2. an scANVI started from the scVI reference (every reference cell labelled), 20 epochs, its
   query mapped and trained 100 epochs (the tutorial's counts), labels from ``predict``;
3. a de novo scVI on reference + query, 400 epochs: the time a query fit saves.

Per tool it reports query accuracy and macro-F1 of both transfers, the mean uncertainty of
right and wrong predictions (kNN: 1 - the winning label's weight share; scANVI: 1 - the
largest class probability), scib-metrics' batch correction and bio conservation of the joint
reference + query latent of the mapped scVI (Benchmarker defaults, ``min_max_scale=False``,
batch = the five batches), and the wall times of every fit. Writes a markdown table to
``--out`` and the raw results beside it (``.jsonl``).

    pip install -e ".[bench]"
    python benchmarks/reference_mapping.py            # both tools, about 15 minutes
    python benchmarks/reference_mapping.py --epoch-scale 0.01 --out /tmp/rm_smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from measure import HERE, machine, run_python
from views import DATA, markdown_table, write_results

REFERENCE = ("sc_celseq2_5cl_p1", "sc_celseq2_5cl_p2", "sc_celseq2_5cl_p3")
ARCHITECTURE = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}
EPOCHS = {"reference": 400, "query": 200, "scanvi": 20, "scanvi_query": 100, "de_novo": 400}


def split(data_dir: Path) -> tuple[ad.AnnData, ad.AnnData]:
    """The reference and query cells of the CellBench view (all cells, both splits)."""
    adata = ad.read_h5ad(data_dir / "cellbench_5batch.h5ad")
    in_reference = adata.obs["batch"].isin(REFERENCE).to_numpy()
    return adata[in_reference].copy(), adata[~in_reference].copy()


def transfer_scores(truth: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray) -> dict:
    """Accuracy, macro-F1 over the query's own cell types (a prediction of a type the query
    lacks counts against the true type's recall, but adds no class of F1 0 to the mean), the
    mean uncertainty of right and wrong predictions, and the predictions themselves."""
    from sklearn.metrics import f1_score

    right = predicted == truth
    return {
        "accuracy": float(right.mean()),
        "macro_f1": float(f1_score(truth, predicted, labels=np.unique(truth), average="macro")),
        "uncertainty_right": float(uncertainty[right].mean()) if right.any() else float("nan"),
        "uncertainty_wrong": float(uncertainty[~right].mean()) if (~right).any() else float("nan"),
        "n_wrong": int((~right).sum()),
        "predicted": predicted.tolist(),
        "uncertainty": np.round(uncertainty, 4).tolist(),
    }


def knn_scores(reference_latent, reference: ad.AnnData, query_latent, query: ad.AnnData) -> dict:
    """The weighted kNN vote (k = 15) of the reference's cell lines, scored on the query."""
    from pyrosc import weighted_knn_labels

    votes = weighted_knn_labels(
        reference_latent, reference.obs["cell_type"].astype(str).to_numpy(), query_latent, k=15
    )
    truth = query.obs["cell_type"].astype(str).to_numpy()
    return transfer_scores(
        truth, np.asarray(votes.labels, dtype=str), np.asarray(votes.uncertainty)
    )


def scanvi_scores(probabilities, query: ad.AnnData) -> dict:
    """scANVI's transfer scored on the query: the most probable label of each cell (a
    cells x labels DataFrame of ``predict(soft=True)``), uncertainty 1 - its probability."""
    predicted = probabilities.idxmax(axis=1).astype(str).to_numpy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    uncertainty = 1 - probabilities.max(axis=1).to_numpy()
    return transfer_scores(truth, predicted, uncertainty)


def scib_joint(reference: ad.AnnData, query: ad.AnnData, latents: list[np.ndarray]) -> dict:
    """scib-metrics of the joint latent of reference and query cells."""
    from scvi_heldout import scib_scores

    joint = ad.concat([reference, query])
    joint.obsm["X_joint"] = np.concatenate(latents)
    return scib_scores(joint, key="X_joint")


def timed(fit) -> float:
    """Wall seconds of ``fit()``."""
    started = time.perf_counter()
    fit()
    return time.perf_counter() - started


def run_pyrosc(reference: ad.AnnData, query: ad.AnnData, seed: int) -> dict:
    import pyrosc

    settings = {"likelihood": "zinb", "encode_covariates": True, **ARCHITECTURE}
    fit = {"validation_fraction": 0, "progress": False, "seed": seed}
    result = {}
    ref_model = pyrosc.SCVI(reference, batch_key="batch", **settings)
    result["reference_seconds"] = timed(
        lambda: ref_model.fit(max_epochs=EPOCHS["reference"], **fit)
    )
    mapped = pyrosc.SCVI.load_query_data(query, ref_model)
    result["query_seconds"] = timed(lambda: mapped.fit(max_epochs=EPOCHS["query"], **fit))
    reference_latent, query_latent = ref_model.latent(), mapped.latent()
    result["knn"] = knn_scores(reference_latent, reference, query_latent, query)
    result["scib"] = scib_joint(reference, query, [reference_latent, query_latent])

    with warnings.catch_warnings():  # every reference cell is labelled, as intended
        warnings.filterwarnings("ignore", message=".*does not occur.*every cell is taken")
        scanvi = pyrosc.SCANVI.from_scvi(ref_model, "cell_type", "Unknown")
    result["scanvi_seconds"] = timed(lambda: scanvi.fit(max_epochs=EPOCHS["scanvi"], **fit))
    unlabelled = query.copy()
    unlabelled.obs["cell_type"] = "Unknown"
    scanvi_query = pyrosc.SCANVI.load_query_data(unlabelled, scanvi)
    result["scanvi_query_seconds"] = timed(
        lambda: scanvi_query.fit(max_epochs=EPOCHS["scanvi_query"], **fit)
    )
    result["scanvi"] = scanvi_scores(scanvi_query.predict(soft=True), query)

    both = ad.concat([reference, query])
    de_novo = pyrosc.SCVI(both, batch_key="batch", **settings)
    result["de_novo_seconds"] = timed(lambda: de_novo.fit(max_epochs=EPOCHS["de_novo"], **fit))
    return result


def run_scvi_tools(reference: ad.AnnData, query: ad.AnnData, seed: int) -> dict:
    import scvi

    scvi.settings.seed = seed
    trainer = {"accelerator": "cpu", "devices": 1, "train_size": 1.0, "batch_size": 128}
    trainer |= {"early_stopping": False, "enable_progress_bar": False}
    settings = {"gene_likelihood": "zinb", "dispersion": "gene", "dropout_rate": 0.1}
    settings |= {"encode_covariates": True, **ARCHITECTURE}
    result = {}
    reference = reference.copy()
    scvi.model.SCVI.setup_anndata(reference, batch_key="batch", labels_key="cell_type")
    ref_model = scvi.model.SCVI(reference, **settings)
    result["reference_seconds"] = timed(
        lambda: ref_model.train(max_epochs=EPOCHS["reference"], **trainer)
    )
    query_cells = query.copy()
    mapped = scvi.model.SCVI.load_query_data(query_cells, ref_model)
    result["query_seconds"] = timed(
        lambda: mapped.train(
            max_epochs=EPOCHS["query"], plan_kwargs={"weight_decay": 0.0}, **trainer
        )
    )
    reference_latent = ref_model.get_latent_representation(reference)
    query_latent = mapped.get_latent_representation(query_cells)
    result["knn"] = knn_scores(reference_latent, reference, query_latent, query)
    result["scib"] = scib_joint(reference, query, [reference_latent, query_latent])

    scanvi = scvi.model.SCANVI.from_scvi_model(ref_model, unlabeled_category="Unknown")
    result["scanvi_seconds"] = timed(
        lambda: scanvi.train(max_epochs=EPOCHS["scanvi"], n_samples_per_label=100, **trainer)
    )
    unlabelled = query.copy()
    unlabelled.obs["cell_type"] = "Unknown"
    scanvi_query = scvi.model.SCANVI.load_query_data(unlabelled, scanvi)
    result["scanvi_query_seconds"] = timed(
        lambda: scanvi_query.train(
            max_epochs=EPOCHS["scanvi_query"], plan_kwargs={"weight_decay": 0.0}, **trainer
        )
    )
    result["scanvi"] = scanvi_scores(scanvi_query.predict(soft=True), query)

    both = ad.concat([reference, query])
    scvi.model.SCVI.setup_anndata(both, batch_key="batch")
    de_novo = scvi.model.SCVI(both, **settings)
    result["de_novo_seconds"] = timed(
        lambda: de_novo.train(max_epochs=EPOCHS["de_novo"], **trainer)
    )
    return result


RUNS = {"pyrosc": run_pyrosc, "scvi-tools": run_scvi_tools}


def child(tool: str, out: Path, data_dir: Path, seed: int, threads: int, scale: float) -> None:
    torch.set_num_threads(threads)
    EPOCHS.update({name: max(1, round(n * scale)) for name, n in EPOCHS.items()})
    reference, query = split(data_dir)
    result = {"tool": tool, **RUNS[tool](reference, query, seed)}
    out.write_text(json.dumps(result))


def table(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        rows.append(
            {
                "tool": r["tool"],
                "kNN accuracy": r["knn"]["accuracy"],
                "kNN macro-F1": r["knn"]["macro_f1"],
                "kNN uncertainty right / wrong": (
                    f"{r['knn']['uncertainty_right']:.3f} / {r['knn']['uncertainty_wrong']:.3f}"
                ),
                "scANVI accuracy": r["scanvi"]["accuracy"],
                "scANVI macro-F1": r["scanvi"]["macro_f1"],
                "scANVI uncertainty right / wrong": (
                    f"{r['scanvi']['uncertainty_right']:.3f} / "
                    f"{r['scanvi']['uncertainty_wrong']:.3f}"
                ),
                "batch corr.": r["scib"]["batch_correction"],
                "bio cons.": r["scib"]["bio_conservation"],
                "reference s": r["reference_seconds"],
                "query s": r["query_seconds"],
                "de novo s": r["de_novo_seconds"],
                "de novo / query": r["de_novo_seconds"] / r["query_seconds"],
                "scANVI s (ref + query)": r["scanvi_seconds"] + r["scanvi_query_seconds"],
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="smoke tests: 0.01")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results_reference_mapping.md")
    parser.add_argument("--child", nargs=2, metavar=("TOOL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(
            *args.child[:1],
            Path(args.child[1]),
            args.data_dir,
            args.seed,
            args.threads,
            args.epoch_scale,
        )
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for tool in args.tools:
            out, log = Path(work) / f"{tool}.json", Path(work) / f"{tool}.log"
            command = [__file__, "--child", tool, str(out), "--seed", str(args.seed)]
            command += ["--threads", str(args.threads), "--data-dir", str(args.data_dir)]
            command += ["--epoch-scale", str(args.epoch_scale)]
            if run_python(command, log).returncode != 0:
                sys.exit(f"{tool} failed:\n{log.read_text()[-3000:]}")
            results.append(json.loads(out.read_text()))
            summary = {k: v for k, v in results[-1].items() if k not in ("knn", "scanvi")}
            print(f"{tool}: {json.dumps(summary)}", flush=True)
    info = machine()
    lines = [
        "# Reference mapping and label transfer: pyrosc vs scvi-tools 1.4.2",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {info['cpu']} ({info['logical_cpus']} "
        f"logical CPUs), {args.threads} torch threads. Python {info['python']}, torch "
        f"{info['torch']}, pyro-ppl {info['pyro-ppl']}, scvi-tools {info['scvi-tools']}, "
        f"scib-metrics {info['scib-metrics']}, pyrosc {info['pyrosc_commit']}.",
        "",
        f"Command: `python benchmarks/reference_mapping.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Reference: {', '.join(REFERENCE)}; query: sc_celseq2, sc_dropseq. Epochs: {EPOCHS}"
        f" times {args.epoch_scale}.",
        "",
        markdown_table(table(results)),
    ]
    write_results(args.out, lines, results)


if __name__ == "__main__":
    main()
