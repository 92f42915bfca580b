"""pyrosc vs scvi-tools 1.4.2: speed, memory, held-out log-likelihood and integration, one command.

For every dataset x likelihood x configuration, one fit in a fresh Python process (so that its
peak memory is its own and no state leaks between fits) on the "train" cells of
../shared/data/hvg2000/<dataset>.h5ad, every cell training. Matched settings: scVI with an
observed library, gene dispersion, 128 hidden units / 10 latent dimensions / 1 layer, dropout
0.1, BatchNorm, minibatch 128, Adam lr 1e-3 (eps 0.01, weight decay 1e-6 in both), 400 epochs,
no early stopping, ``--threads`` torch threads, each number of epochs of ``--epochs`` (40 and
400 by default: a short fit, where start-up counts, beside a long one). Each tool keeps its own
KL warm-up default: none in pyrosc, 400 epochs in scvi-tools. Per fit it records

- training wall time around the fit call alone, and training cells per second
  (cells trained per epoch x epochs / seconds);
- the time from the fit call to the end of its first optimiser step (a post-step hook on
  scvi-tools' ``torch.optim`` optimiser and on pyrosc's ``StoreAdam`` reads the clock), and the
  time of the tool's ``import`` (after torch and anndata), which a session pays once beside it;
- peak memory: the process's maximum resident set size (``ru_maxrss``) when the fit returns
  (imports, data and model included), and its resident size just before the fit;
- the mean held-out importance-sampled log-likelihood of the "test" cells with K samples,
  the same K for both tools (pyrosc ``log_likelihood``, scvi-tools ``get_marginal_ll``);
- on multi-batch datasets, scib-metrics' bio-conservation and batch-correction aggregates
  (Benchmarker defaults, ``min_max_scale=False``) of the latent of all labelled cells, for the
  longest fits only;
- the achieved matrix-multiply GFLOP/s of training (benchmarks/flops.py) and its fraction of
  the machine's measured dense float32 matmul throughput.

Writes a markdown table to ``--out`` (header: date, machine, versions, command, settings) and
the raw results to the same path with the suffix ``.jsonl``: a first "meta" line (command,
settings, machine, matmul probe), then one "fit" line per fit, written as each fit ends.

    python benchmarks/compare.py                    # the full benchmark (about an hour)
    python benchmarks/compare.py --epochs 2 --n-samples 10 --out /tmp/results_smoke.md
    python benchmarks/compare.py --epochs 40 --datasets pbmc3k --likelihoods nb
    python benchmarks/compare.py --pyrosc-batch-size 512   # adds a "pyrosc (batch 512)" row

A configuration is a named :class:`Config`; ``--pyrosc-batch-size`` adds pyrosc
configurations next to the matched ones.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flops import scvi_linears, step_flops
from measure import HERE, machine, peak_rss_mib, rss_mib, run_python
from views import DATA, load_view

DATASETS = ("pbmc3k", "zeisel_cortex", "cellbench_5batch")
LIKELIHOODS = ("zinb", "nb")
TOOLS = ("pyrosc", "scvi-tools")


@dataclass(frozen=True)
class Config:
    """One way of fitting: a ``label`` for the table, the ``tool``, its minibatch size and any
    further keyword arguments of the tool's fit call (pyrosc ``fit``, scvi-tools ``train``)."""

    label: str
    tool: str
    batch_size: int = 128
    fit_options: dict = field(default_factory=dict)


def configs(tools: list[str], pyrosc_batch_sizes: list[int]) -> list[Config]:
    """The matched configuration of each tool, then one pyrosc configuration per extra
    minibatch size (labelled "pyrosc (batch B)")."""
    matched = [Config(tool, tool) for tool in tools]
    extra = [
        Config(f"pyrosc (batch {size})", "pyrosc", batch_size=size) for size in pyrosc_batch_sizes
    ]
    return matched + extra


# -- one fit, in a child process -------------------------------------------------------------


def _fit_pyrosc(spec: dict, train, test, adata) -> dict:
    """Fit pyrosc.SCVI (observed library) on ``train``; held-out LL of ``test``; latent of
    ``adata`` in ``obsm["X_pyrosc"]``."""
    import numpy as np

    import pyrosc

    model = pyrosc.SCVI(train, batch_key="batch", likelihood=spec["likelihood"], library="observed")
    rss_before = rss_mib()
    started = time.perf_counter()
    model.fit(
        max_epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        validation_fraction=0,
        seed=spec["seed"],
        device="cpu",
        progress=False,
        **spec["fit_options"],
    )
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    cells_per_epoch = train.n_obs  # a lone last cell joins the previous minibatch
    evaluated = time.perf_counter()
    log_lik = model.log_likelihood(test, n_samples=spec["n_samples"])
    latent_key = None
    if spec["scib"]:
        model.latent(adata)
        latent_key = "X_pyrosc"
    return {
        "fit_started": started,
        "train_seconds": seconds,
        "cells_per_epoch": cells_per_epoch,
        "rss_before_fit_mib": rss_before,
        "peak_rss_fit_mib": peak,
        "heldout_log_likelihood": float(np.mean(log_lik)),
        "final_train_elbo": float(model.history["train_elbo"].iloc[-1]),
        "ll_seconds": time.perf_counter() - evaluated,
        "latent_key": latent_key,
    }


def _fit_scvi_tools(spec: dict, train, test, adata) -> dict:
    """Fit scvi-tools' SCVI (observed library, its default) on ``train``; held-out LL of
    ``test``; latent of ``adata`` in ``obsm["X_scVI"]``.

    ``train_size=1.0`` trains on every cell (no validation split). With exactly one cell left
    for the last minibatch, scvi-tools 1.4.2 would hand BatchNorm a batch of one and crash
    (PBMC 3k: 2433 = 19 x 128 + 1), so then ``drop_last`` drops that one (reshuffled) cell each
    epoch; pyrosc folds it into the previous minibatch instead.
    """
    import numpy as np
    import scvi

    scvi.settings.seed = spec["seed"]
    batch_key = "batch" if train.obs["batch"].nunique() > 1 else None
    scvi.model.SCVI.setup_anndata(train, batch_key=batch_key)
    model = scvi.model.SCVI(
        train,
        n_hidden=128,
        n_latent=10,
        n_layers=1,
        dropout_rate=0.1,
        dispersion="gene",
        gene_likelihood=spec["likelihood"],
        use_observed_lib_size=True,
    )
    drop_last = train.n_obs % spec["batch_size"] == 1
    rss_before = rss_mib()
    started = time.perf_counter()
    model.train(
        max_epochs=spec["epochs"],
        accelerator="cpu",
        devices=1,
        train_size=1.0,
        batch_size=spec["batch_size"],
        early_stopping=False,
        datasplitter_kwargs={"drop_last": drop_last},
        plan_kwargs={"lr": spec["lr"]},
        enable_progress_bar=False,
        **spec["fit_options"],
    )
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    evaluated = time.perf_counter()
    # get_marginal_ll returns log p(x) itself (higher is better); K samples in passes of up
    # to 50, which is the same estimator as K passes of one, in less time.
    log_lik = model.get_marginal_ll(
        test,
        n_mc_samples=spec["n_samples"],
        return_mean=False,
        n_mc_samples_per_pass=min(spec["n_samples"], 50),
    )
    latent_key = None
    if spec["scib"]:
        adata.obsm["X_scVI"] = model.get_latent_representation(adata)
        latent_key = "X_scVI"
    return {
        "fit_started": started,
        "train_seconds": seconds,
        "cells_per_epoch": train.n_obs - int(drop_last),
        "rss_before_fit_mib": rss_before,
        "peak_rss_fit_mib": peak,
        "heldout_log_likelihood": float(np.mean(np.asarray(log_lik))),
        "final_train_elbo": -float(model.history["elbo_train"].iloc[-1, 0]),
        "ll_seconds": time.perf_counter() - evaluated,
        "latent_key": latent_key,
        "drop_last": drop_last,
        "batch_key": batch_key,
    }


def run_fit(spec: dict) -> dict:
    """One fit described by ``spec`` (a :class:`Config` plus dataset, likelihood and the shared
    settings), evaluated; returns the result row."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    started = time.perf_counter()
    torch.set_num_threads(spec["threads"])
    adata, train, test = load_view(Path(spec["data_dir"]), spec["dataset"])
    spec = {**spec, "scib": adata.obs["batch"].nunique() > 1 and spec["scib"]}
    fit = _fit_pyrosc if spec["tool"] == "pyrosc" else _fit_scvi_tools
    imported = time.perf_counter()  # the tool's import, the first thing to import it
    importlib.import_module("pyrosc" if spec["tool"] == "pyrosc" else "scvi")
    import_seconds = time.perf_counter() - imported
    steps: list[float] = []  # when each optimiser step ended; the first is the one read

    def first_step(optimizer, args, kwargs) -> None:
        if not steps:
            steps.append(time.perf_counter())

    # scvi-tools steps a torch.optim optimiser; pyrosc steps its own (pyrosc.optim.StoreAdam,
    # torch's fused Adam function without the torch.optim class): both are watched.
    hook = register_optimizer_step_post_hook(first_step)
    if spec["tool"] == "pyrosc":
        from pyrosc.optim import StoreAdam

        store_step = StoreAdam.step

        def watched_step(self, loss) -> None:
            store_step(self, loss)
            first_step(self, (), {})

        StoreAdam.step = watched_step
    result = fit(spec, train, test, adata)
    hook.remove()
    result["first_step_seconds"] = steps[0] - result.pop("fit_started")
    result["import_seconds"] = import_seconds
    threads_after_fit = torch.get_num_threads()
    scib = {}
    if spec["scib"]:
        from scvi_heldout import scib_scores

        scored = time.perf_counter()
        scib = scib_scores(adata, key=result.pop("latent_key"))
        scib["scib_seconds"] = time.perf_counter() - scored
    result.pop("latent_key", None)
    return {
        **{key: spec[key] for key in ("label", "tool", "dataset", "likelihood", "batch_size")},
        "epochs": spec["epochs"],
        "train_cells": train.n_obs,
        "test_cells": test.n_obs,
        "n_batches": int(adata.obs["batch"].nunique()),
        **result,
        "cells_per_second": result["cells_per_epoch"] * spec["epochs"] / result["train_seconds"],
        "K": spec["n_samples"],
        **scib,
        "peak_rss_total_mib": peak_rss_mib(),
        "total_seconds": time.perf_counter() - started,
        "threads": spec["threads"],
        "threads_after_fit": threads_after_fit,
    }


def _child(spec_json: str, out: Path) -> None:
    out.write_text(json.dumps(run_fit(json.loads(spec_json))))


# -- the run, in the parent process ----------------------------------------------------------


def run_in_child(spec: dict, work: Path) -> dict:
    """:func:`run_fit` in a fresh process; on failure, a row with the error and the log's tail."""
    name = f"{spec['dataset']}_{spec['likelihood']}_{spec['epochs']}_{spec['label']}"
    name = name.replace(" ", "_")
    out, log = work / f"{name}.json", work / f"{name}.log"
    done = run_python([str(HERE / "compare.py"), "--child", json.dumps(spec), str(out)], log)
    if done.returncode == 0 and out.exists():
        return json.loads(out.read_text())
    tail = log.read_text()[-3000:]
    keys = ("label", "tool", "dataset", "likelihood", "batch_size", "epochs")
    return {**{key: spec[key] for key in keys}, "error": f"exit {done.returncode}: {tail}"}


def matmul_probe(threads: int, batch_sizes: list[int], work: Path) -> dict:
    """benchmarks/flops.py's throughput probe, in a fresh process on ``threads`` threads."""
    out = work / "probe.log"
    args = [str(HERE / "flops.py"), "--threads", str(threads), "--batch-sizes"]
    done = run_python([*args, *map(str, sorted(set(batch_sizes)))], out)
    if done.returncode != 0:
        raise RuntimeError(f"the matmul probe failed:\n{out.read_text()[-3000:]}")
    return json.loads(out.read_text().strip().splitlines()[-1])


def flops_per_cell(row: dict) -> int:
    """Matrix-multiply FLOPs of one training step per cell for ``row``'s model."""
    layers = scvi_linears(n_covariate_categories=row["n_batches"], likelihood=row["likelihood"])
    return step_flops(layers)["total"]


# -- the report ------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0, thousands: bool = True) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def markdown(rows: list[dict], probe: dict, info: dict, settings: dict, command: str) -> str:
    """The results page: header, main table, pyrosc vs scvi-tools table, FLOPs notes."""
    square = probe["square_gflops"]
    lines = [
        "# pyrosc vs scvi-tools 1.4.2",
        "",
        f"Measured {info['date']} on {info['cpu']} ({info['logical_cpus']} logical CPUs), "
        f"{settings['threads']} torch threads. Python {info['python']}, torch {info['torch']}, "
        f"pyro-ppl {info['pyro-ppl']}, scvi-tools {info['scvi-tools']}, scib-metrics "
        f"{info['scib-metrics']}, pyrosc {info['pyrosc_commit']}.",
        "",
        f"Command: `{command}`",
        "",
        f"Settings: scVI, observed library, gene dispersion, 128/10/1, dropout 0.1, BatchNorm, "
        f"Adam lr {settings['lr']} (eps 0.01, weight decay 1e-6), "
        f"{' and '.join(map(str, settings['epochs']))} epochs, "
        f'minibatch 128 unless the row says otherwise, every "train" cell training (pyrosc '
        f"`validation_fraction=0`, scvi-tools `train_size=1.0`), no early stopping, seed "
        f"{settings['seed']}. KL warm-up: each tool's default (pyrosc none, scvi-tools 400 "
        f'epochs). Held-out LL: mean importance-sampled log p(x) of the "test" cells, '
        f"K = {settings['n_samples']} for both tools. Each fit runs in its own process. First "
        "step s: from the fit call to the end of its first optimiser step (start-up); import s: "
        "`import pyrosc` or `import scvi` in a fresh process after torch and anndata.",
        "",
        "| dataset | likelihood | epochs | tool | train cells/s | train wall s | first step s "
        "| import s | peak RSS MiB | RSS before fit MiB | held-out LL | bio cons. | batch corr. "
        "| GFLOP/s (% of matmul) | total s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        head = (
            f"| {row['dataset']} | {row['likelihood'].upper()} | {row['epochs']} | {row['label']} "
        )
        if "error" in row:
            lines.append(head + "| failed: see the .jsonl | | | | | | | | | | |")
            continue
        achieved = flops_per_cell(row) * row["cells_per_second"] / 1e9
        lines.append(
            head + f"| {_fmt(row['cells_per_second'])} | {_fmt(row['train_seconds'], 1)} "
            f"| {_fmt(row['first_step_seconds'], 2)} | {_fmt(row['import_seconds'], 2)} "
            f"| {_fmt(row['peak_rss_fit_mib'])} | {_fmt(row['rss_before_fit_mib'])} "
            f"| {_fmt(row['heldout_log_likelihood'], 1)} "
            f"| {_fmt(row.get('bio_conservation'), 3)} | {_fmt(row.get('batch_correction'), 3)} "
            f"| {achieved:.1f} ({100 * achieved / square:.1f}%) | {_fmt(row['total_seconds'], 1)} |"
        )
    lines += ["", *comparison(rows), "", *flops_notes(rows, probe)]
    return "\n".join(lines) + "\n"


def comparison(rows: list[dict]) -> list[str]:
    """pyrosc configurations against scvi-tools, per dataset and likelihood."""
    reference = {
        (r["dataset"], r["likelihood"], r["epochs"]): r
        for r in rows
        if r["tool"] == "scvi-tools" and "error" not in r
    }
    lines = [
        "pyrosc against scvi-tools (speed and memory ratios; LL difference in nats per cell, "
        "positive when pyrosc is better):",
        "",
        "| dataset | likelihood | epochs | pyrosc configuration | speed ratio | first step ratio "
        "| peak RSS ratio | LL difference |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        scvi = reference.get((row["dataset"], row["likelihood"], row["epochs"]))
        if row["tool"] != "pyrosc" or "error" in row or scvi is None:
            continue
        lines.append(
            f"| {row['dataset']} | {row['likelihood'].upper()} | {row['epochs']} | {row['label']} "
            f"| {row['cells_per_second'] / scvi['cells_per_second']:.2f} "
            f"| {row['first_step_seconds'] / scvi['first_step_seconds']:.2f} "
            f"| {row['peak_rss_fit_mib'] / scvi['peak_rss_fit_mib']:.2f} "
            f"| {row['heldout_log_likelihood'] - scvi['heldout_log_likelihood']:+.1f} |"
        )
    return lines


def flops_notes(rows: list[dict], probe: dict) -> list[str]:
    """How the GFLOP/s column is computed, and the probe's figures."""
    step = ", ".join(
        f"{float(gflops):.1f} GFLOP/s at minibatch {size}"
        for size, gflops in probe["step_gflops"].items()
    )
    per_cell = sorted(
        {(r["likelihood"], r["n_batches"], flops_per_cell(r)) for r in rows if "error" not in r}
    )
    counts = "; ".join(
        f"{likelihood.upper()}, {n} batch{'es' if n > 1 else ''}: {flops / 1e6:.2f} MFLOP"
        for likelihood, n, flops in per_cell
    )
    return [
        f"Matmul throughput (benchmarks/flops.py, {probe['threads']} threads, float32, best of "
        f"5): {probe['square_gflops']:.1f} GFLOP/s for {probe['square']} x {probe['square']} "
        f"products; the {probe['step_likelihood'].upper()} step's own products: {step}. "
        "The GFLOP/s column is the matrix-multiply FLOPs of a training step per cell "
        "(forward + backward, 3x the forward products less the never-computed gradient of the "
        f"data; {counts}) times training cells per second, and its percentage of the "
        f"{probe['square']}-square rate. Biases, BatchNorm, activations and the likelihood are "
        "not counted.",
        "",
        "Peak RSS is the process's maximum resident set size when the fit returns (imports, "
        "data and model included); RSS before fit is its resident size just before. Total s "
        "includes loading, the held-out LL and scib-metrics.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--likelihoods", nargs="+", default=list(LIKELIHOODS), choices=LIKELIHOODS)
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument(
        "--pyrosc-batch-size",
        type=int,
        nargs="*",
        default=[],
        help='extra pyrosc rows at these minibatch sizes, labelled "pyrosc (batch B)"',
    )
    parser.add_argument("--epochs", type=int, nargs="+", default=[40, 400])
    parser.add_argument("--n-samples", type=int, default=200, help="K, for both tools")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results.md")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    command = shlex.join(["python", *sys.argv])
    settings = {key: getattr(args, key) for key in ("epochs", "n_samples", "lr", "seed", "threads")}
    run_configs = configs(args.tools, args.pyrosc_batch_size)
    info = {**machine(), "date": started.strftime("%Y-%m-%d %H:%M UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = args.out.with_suffix(".jsonl")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyrosc_compare_") as tmp:
        work = Path(tmp)
        probe = matmul_probe(args.threads, [c.batch_size for c in run_configs], work)
        print(f"matmul probe: {json.dumps(probe)}", flush=True)
        meta = {"kind": "meta", "command": command, "settings": settings, "machine": info}
        jsonl.write_text(json.dumps({**meta, "probe": probe}) + "\n")
        fits = [
            (dataset, likelihood, epochs, config)
            for dataset in args.datasets
            for likelihood in args.likelihoods
            for epochs in args.epochs
            # The tools alternate per dataset, likelihood and length, so drift in the
            # machine's load touches both alike.
            for config in run_configs
        ]
        for dataset, likelihood, epochs, config in fits:
            spec = {
                **asdict(config),
                **settings,
                "epochs": epochs,
                "scib": epochs == max(args.epochs),
                "dataset": dataset,
                "likelihood": likelihood,
                "data_dir": str(args.data_dir.resolve()),
            }
            row = run_in_child(spec, work)
            rows.append(row)
            with jsonl.open("a") as handle:  # each fit is kept as soon as it ends
                handle.write(json.dumps({"kind": "fit", **row}) + "\n")
            summary = row.get("error", "")[-500:] or (
                f"{row['cells_per_second']:.0f} cells/s, "
                f"first step {row['first_step_seconds']:.2f} s, "
                f"LL {row['heldout_log_likelihood']:.1f}"
            )
            print(f"{dataset} {likelihood} {epochs} {config.label}: {summary}", flush=True)
    args.out.write_text(markdown(rows, probe, info, settings, command))
    print(f"wrote {args.out} and {jsonl}")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
