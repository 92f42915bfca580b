"""Scaling of pyrosc training with the number of cells: time per epoch and peak memory.

Datasets of 10k, 50k, 100k and 200k cells are made from the "train" cells of
../shared/data/hvg2000/pbmc3k.h5ad: cells drawn with replacement, and each drawn cell's counts
binomially thinned (every molecule kept with probability ``--keep``, 0.8 by default), so that
no two cells are exact copies; seeded, and kept sparse. For each size, pyrosc.SCVI (observed
library, ``--likelihood``, every other setting at pyrosc's defaults, minibatch 128, every cell
training) is fitted for ``--epochs`` epochs in a fresh Python process, which records

- the time of each epoch (pyrosc's training history), summarised by the median over the
  epochs after the first (which pays one-off costs);
- its resident memory just before the fit and its peak (``ru_maxrss``) when the fit returns;
- its resident memory sampled every 0.1 s during the fit, and so the peak within each epoch.

One further fit, of ``--memory-size`` cells for ``--memory-epochs`` epochs, shows that the peak
memory within an epoch does not grow with the number of epochs. Writes ``--out`` (a markdown
table with a least-squares line of time per epoch against cells and its R^2), a JSON-lines file
of the raw numbers beside it, and a plot (``.png``, same name).

    python benchmarks/scaling.py                          # 10k ... 200k cells, 3 epochs each
    python benchmarks/scaling.py --sizes 2000 5000 --epochs 2 --memory-size 2000 \\
        --memory-epochs 4 --out /tmp/scaling_smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import HERE, RssSampler, machine, peak_rss_mib, rss_mib, run_python
from views import DATA, load_view

SIZES = (10_000, 50_000, 100_000, 200_000)


def resampled_cells(source, n_cells: int, keep: float, seed: int):
    """``n_cells`` cells drawn with replacement from the AnnData ``source`` (raw counts, CSR),
    each thinned binomially: every count ``x`` becomes ``Binomial(x, keep)``.

    A cell thinned to no counts at all (which pyrosc would refuse) is drawn again.

    Returns:
        an AnnData with CSR float32 counts, the genes of ``source`` and ``obs["batch"]``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(source.X)
    picked = rng.integers(0, source.n_obs, n_cells)
    rows = counts[picked]
    rows.data = rng.binomial(rows.data.astype(np.int64), keep).astype(np.float32)
    empty = np.flatnonzero(np.asarray(rows.sum(axis=1)).ravel() == 0)
    while len(empty):
        again = counts[rng.integers(0, source.n_obs, len(empty))]
        again.data = rng.binomial(again.data.astype(np.int64), keep).astype(np.float32)
        rows = sp.vstack([rows, again], format="csr")
        rows = rows[np.setdiff1d(np.arange(rows.shape[0]), empty)]
        empty = np.flatnonzero(np.asarray(rows.sum(axis=1)).ravel() == 0)
    rows.eliminate_zeros()
    obs = pd.DataFrame(
        {"batch": pd.Categorical(["pbmc3k"] * n_cells)},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(X=rows.tocsr(), obs=obs, var=source.var[[]].copy())


def run_fit(spec: dict) -> dict:
    """Make the dataset of ``spec["cells"]`` cells and fit pyrosc.SCVI to it; returns the
    timings and memory of the fit."""
    import torch

    import pyrosc

    torch.set_num_threads(spec["threads"])
    _, train, _ = load_view(Path(spec["data_dir"]), "pbmc3k")
    adata = resampled_cells(train, spec["cells"], spec["keep"], spec["seed"] + spec["cells"])
    del train
    model = pyrosc.SCVI(adata, batch_key="batch", likelihood=spec["likelihood"])
    rss_before = rss_mib()
    with RssSampler(0.1) as sampler:
        started = time.perf_counter()
        model.fit(
            max_epochs=spec["epochs"],
            validation_fraction=0,
            seed=spec["seed"],
            device="cpu",
            progress=False,
        )
        ended = time.perf_counter()
    peak = peak_rss_mib()
    seconds = model.history["seconds"].to_numpy()
    # Epoch k ends where the later epochs' durations, counted back from the fit's end, begin.
    ends = ended - np.concatenate([np.cumsum(seconds[::-1])[::-1][1:], [0.0]])
    starts = np.concatenate([[started], ends[:-1]])
    epoch_peaks = [sampler.peak_between(a, b) for a, b in zip(starts, ends, strict=True)]
    later = seconds[1:] if len(seconds) > 1 else seconds
    return {
        "cells": spec["cells"],
        "nonzeros": int(adata.X.nnz),
        "likelihood": spec["likelihood"],
        "epochs": spec["epochs"],
        "epoch_seconds": seconds.tolist(),
        "seconds_per_epoch": float(np.median(later)),
        "fit_seconds": ended - started,
        "cells_per_second": spec["cells"] / float(np.median(later)),
        "rss_before_fit_mib": rss_before,
        "peak_rss_mib": peak,
        "epoch_peak_rss_mib": epoch_peaks,
        "threads": spec["threads"],
    }


def run_in_child(spec: dict, work: Path) -> dict:
    """:func:`run_fit` in a fresh process; raises with the log's tail if it fails."""
    out, log = work / f"{spec['cells']}_{spec['epochs']}.json", work / "fit.log"
    done = run_python([str(HERE / "scaling.py"), "--child", json.dumps(spec), str(out)], log)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"the fit of {spec['cells']} cells failed:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = intercept + slope x``: ``(slope, intercept, R^2)``."""
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r_squared = 1.0 - (residual**2).sum() / total if total > 0 else float("nan")
    return float(slope), float(intercept), float(r_squared)


def plot(rows: list[dict], memory: dict, path: Path) -> None:
    """Time per epoch and peak memory against cells, and memory per epoch of the long fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = np.array([r["cells"] for r in rows], dtype=float)
    seconds = np.array([r["seconds_per_epoch"] for r in rows])
    slope, intercept, r_squared = line_fit(cells / 1e3, seconds)
    grid = np.linspace(0, cells.max(), 50)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(cells, seconds, "o", label="median epoch")
    axes[0].plot(grid, intercept + slope * grid / 1e3, "-", label=f"fit, R$^2$ = {r_squared:.3f}")
    axes[0].set(xlabel="cells", ylabel="seconds per epoch", title="Time per epoch")
    axes[0].legend()
    axes[1].plot(cells, [r["peak_rss_mib"] for r in rows], "o-", label="peak (fit)")
    axes[1].plot(cells, [r["rss_before_fit_mib"] for r in rows], "s--", label="before fit")
    axes[1].set(xlabel="cells", ylabel="resident memory (MiB)", title="Memory")
    axes[1].legend()
    epochs = np.arange(1, len(memory["epoch_peak_rss_mib"]) + 1)
    axes[2].plot(epochs, memory["epoch_peak_rss_mib"], "o-")
    axes[2].set(
        xlabel="epoch",
        ylabel="peak resident memory in the epoch (MiB)",
        title=f"Memory per epoch, {memory['cells']:,} cells",
    )
    axes[2].set_ylim(0, max(memory["epoch_peak_rss_mib"]) * 1.15)
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in axes[:2]:
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict], memory: dict, info: dict, settings: dict, command: str) -> str:
    """The results page: header, the table per size, the line fit, memory per epoch."""
    cells = np.array([r["cells"] for r in rows], dtype=float)
    seconds = np.array([r["seconds_per_epoch"] for r in rows])
    peaks = np.array([r["peak_rss_mib"] for r in rows])
    slope, intercept, r_squared = line_fit(cells / 1e3, seconds)
    memory_slope, memory_intercept, memory_r2 = line_fit(cells / 1e3, peaks)
    epoch_peaks = memory["epoch_peak_rss_mib"]
    lines = [
        "# pyrosc training: scaling with the number of cells",
        "",
        f"Measured {info['date']} on {info['cpu']} ({info['logical_cpus']} logical CPUs), "
        f"{settings['threads']} torch threads; torch {info['torch']}, pyro-ppl "
        f"{info['pyro-ppl']}, pyrosc {info['pyrosc_commit']}.",
        "",
        f"Command: `{command}`",
        "",
        f'Data: cells drawn with replacement from the 2,433 "train" cells of hvg2000/pbmc3k '
        f"(2,000 genes), each count binomially thinned with keep probability {settings['keep']} "
        f"(seeded), sparse CSR. Model: pyrosc.SCVI, {settings['likelihood'].upper()}, observed "
        f"library, 128/10/1, minibatch 128, Adam 1e-3, every cell training, "
        f"{settings['epochs']} epochs per size, each size in a fresh process.",
        "",
        "| cells | nonzeros | s / epoch (median after the 1st) | first epoch s | cells/s "
        "| RSS before fit MiB | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cells']:,} | {r['nonzeros']:,} | {r['seconds_per_epoch']:.2f} "
            f"| {r['epoch_seconds'][0]:.2f} | {r['cells_per_second']:,.0f} "
            f"| {r['rss_before_fit_mib']:,.0f} | {r['peak_rss_mib']:,.0f} |"
        )
    growth = epoch_peaks[-1] - epoch_peaks[1] if len(epoch_peaks) > 1 else float("nan")
    lines += [
        "",
        f"Time per epoch = {intercept:.3f} s + {slope:.4f} s per 1,000 cells "
        f"(least squares, R^2 = {r_squared:.4f}). Peak memory = {memory_intercept:,.0f} MiB + "
        f"{memory_slope:.2f} MiB per 1,000 cells (R^2 = {memory_r2:.4f}); "
        "each copy of the counts takes 8 bytes per nonzero (CSR float32 value, int32 column).",
        "",
        f"Memory per epoch ({memory['cells']:,} cells, {memory['epochs']} epochs; the highest "
        "resident memory sampled every 0.1 s within each epoch, MiB): "
        + ", ".join(f"{mib:,.0f}" for mib in epoch_peaks)
        + f". From epoch 2 to epoch {len(epoch_peaks)} it changes by {growth:+.1f} MiB.",
        "",
        f"![time per epoch and memory against cells]({settings['plot']})",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--memory-size", type=int, default=None, help="default: the smallest")
    parser.add_argument("--memory-epochs", type=int, default=10)
    parser.add_argument("--likelihood", default="zinb")
    parser.add_argument("--keep", type=float, default=0.8, help="binomial thinning probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "scaling.md")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(run_fit(json.loads(args.child[0]))))
        return
    if len(args.sizes) < 2:
        parser.error("--sizes needs at least two sizes for the line fit")

    started = datetime.datetime.now(datetime.timezone.utc)
    command = shlex.join(["python", *sys.argv])
    info = {**machine(), "date": started.strftime("%Y-%m-%d %H:%M UTC")}
    png = args.out.with_suffix(".png")
    settings = {
        "epochs": args.epochs,
        "likelihood": args.likelihood,
        "keep": args.keep,
        "threads": args.threads,
        "plot": png.name,
    }
    shared = {
        "likelihood": args.likelihood,
        "keep": args.keep,
        "seed": args.seed,
        "threads": args.threads,
        "data_dir": str(args.data_dir.resolve()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = args.out.with_suffix(".jsonl")
    meta = {"kind": "meta", "command": command, "settings": settings, "machine": info}
    jsonl.write_text(json.dumps(meta) + "\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyrosc_scaling_") as tmp:
        for size in sorted(args.sizes):
            rows.append(run_in_child({**shared, "cells": size, "epochs": args.epochs}, Path(tmp)))
            with jsonl.open("a") as handle:
                handle.write(json.dumps({"kind": "size", **rows[-1]}) + "\n")
            print(
                f"{size} cells: {rows[-1]['seconds_per_epoch']:.2f} s/epoch, "
                f"peak {rows[-1]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        memory_size = args.memory_size or min(args.sizes)
        memory = run_in_child(
            {**shared, "cells": memory_size, "epochs": args.memory_epochs}, Path(tmp)
        )
    with jsonl.open("a") as handle:
        handle.write(json.dumps({"kind": "memory", **memory}) + "\n")
    plot(rows, memory, png)
    args.out.write_text(markdown(rows, memory, info, settings, command))
    print(f"wrote {args.out}, {jsonl} and {png}")


if __name__ == "__main__":
    main()
