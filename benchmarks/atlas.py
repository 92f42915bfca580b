"""Atlas-scale training (issue 18): pyrosc's scVI streamed from disk, in memory, on two DDP
processes, and scvi-tools 1.4.2 in memory, at 100k, 300k and 1M cells.

Data. ../shared/data/hvg2000/pbmc3k.h5ad (2,700 cells, its 2,000 genes; the other two views
there hold other genes, so they cannot be stacked with it) is resampled into one h5ad file per
size in ``--work``: cells drawn with replacement, each drawn cell's counts binomially thinned
with its own keep probability, uniform in ``--keep`` (0.3 to 1 by default), so that library
sizes spread as in real data and no two cells are copies (a cell thinned to no counts is drawn
again). Seeded numpy (``--seed`` and the size). ``obs["batch"]`` splits the cells into
``--batches`` consecutive batches of equal size (as files of samples stacked one after the
other). X is CSR float32, written ``--chunk`` cells at a time (the first chunk by anndata's
``write_elem``, the others appended with ``sparse_dataset(...).append``), so building the 1M
file holds one chunk and the cells' names in memory, never the whole matrix. A file already in
``--work`` with the same cells, genes and build settings (``uns["atlas_build"]``) is reused.

Runs, each in a fresh Python process (``--tools``), ``--epochs`` epochs, ``--threads`` torch
threads, every cell training (no validation), minibatch 128, Adam 1e-3, NB, gene dispersion,
observed library, 128 hidden units, 10 latent dimensions, 1 layer, dropout 0.1, the batch as a
covariate:

- ``streamed``: ``pyrosc.SCVI(pyrosc.read_backed(path), batch_key="batch", likelihood="nb")``,
  counts read from the file in shuffled blocks during the fit;
- ``in-memory``: the same on ``anndata.read_h5ad(path)`` (the whole file read);
- ``scvi-tools``: scvi-tools' SCVI on ``anndata.read_h5ad(path)`` with the settings above;
- ``ddp``: pyrosc in memory, ``fit(strategy="ddp", devices=--ddp-devices, accelerator="cpu")``
  at the smallest size only (``--ddp-size``; DDP refuses counts on disk), ``--ddp-epochs``
  epochs (2 by default: see below), each process with ``--threads`` / processes torch threads
  (at least 1; ``OMP_NUM_THREADS``), so that it uses the CPUs one process does.

Measured in each child: the set-up (reading the file, the model's constructor: for streamed
counts a pass over the file), the fit call, and the time of each epoch: pyrosc's history
(``seconds``: the epoch's loop only; for DDP, rank 0's), scvi-tools' from a Lightning callback
at each epoch's start and end. Time per epoch is the mean over the epochs; cells/s is cells
over it. Before the timed fit, each pyrosc child fits the same model to the file's first 1,000
cells for one epoch, so that the one-off compilation of pyrosc's fused likelihood is set-up,
not the first epoch (since issue 19 the kernels are built once per machine and each process
loads them in milliseconds; when results_atlas.md was measured, each process compiled them
with ``torch.compile``, ~6 s even with PyTorch's cache). For DDP the time per epoch is the mean
over the epochs after the first. Peak memory is the child's ``ru_maxrss`` at
its end (for DDP also that of the largest process it started). A child that runs out of memory
(``MemoryError``, or killed by signal 9) is reported as such, and the benchmark goes on. For
DDP: the number of trained parameters (the networks' weights and the free Pyro parameters),
whose float32 gradients DDP all-reduces at every step, and the BatchNorm buffers it broadcasts
from rank 0 at every step.

The streamed runs read a file just written, so from the page cache where it fits in memory:
these are not cold-disk figures. Writes ``--out`` (markdown) and its raw rows beside it
(``.jsonl``).

    python benchmarks/atlas.py --work /scratch/atlas        # 100k, 300k, 1M cells, 1 epoch
    python benchmarks/atlas.py --sizes 2000 4000 --epochs 1 --out /tmp/atlas.md   # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from measure import (
    HERE,
    SCVI_TOOLS_TRAINER,
    machine,
    peak_rss_mib,
    rss_mib,
    run_python,
    scvi_tools_model,
)
from scaling import line_fit
from views import DATA, markdown_table, report_header, write_results

SIZES = (100_000, 300_000, 1_000_000)
TOOLS = {
    "streamed": "pyrosc, streamed from disk",
    "in-memory": "pyrosc, in memory",
    "scvi-tools": "scvi-tools 1.4.2, in memory",
    "ddp": "pyrosc, DDP, in memory",
}
ARCHITECTURE = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}
BATCH_SIZE = 128
WARMUP_CELLS = 1000  # 7 minibatches of 128 and a shorter one: both shapes get compiled
_KILLED = (-9, 137)  # killed by SIGKILL (the kernel's out-of-memory killer), as returncode


# -- the files -------------------------------------------------------------------------------


def thinned_cells(counts: sp.csr_matrix, n_cells: int, keep: list[float], rng) -> sp.csr_matrix:
    """``n_cells`` rows of ``counts`` drawn with replacement, each count ``x`` of a drawn row
    replaced by ``Binomial(x, p)`` with ``p ~ Uniform(keep)`` drawn per row; rows left without
    counts are drawn again. Returns (n_cells, genes) CSR float32."""
    parts, missing = [], n_cells
    while missing:
        rows = counts[rng.integers(0, counts.shape[0], missing)]
        per_row = rng.uniform(keep[0], keep[1], missing)
        per_value = np.repeat(per_row, np.diff(rows.indptr))
        rows.data = rng.binomial(rows.data.astype(np.int64), per_value).astype(np.float32)
        rows.eliminate_zeros()
        has_counts = np.diff(rows.indptr) > 0
        parts.append(rows[has_counts])
        missing -= int(has_counts.sum())
    return sp.vstack(parts, format="csr")


def build_settings(args: argparse.Namespace) -> dict:
    """What a file depends on besides its size (kept in the file, to know when to reuse it)."""
    return {
        "source": "hvg2000/pbmc3k.h5ad",
        "keep": list(args.keep),
        "batches": args.batches,
        "seed": args.seed,
        "chunk": args.chunk,
        "compression": args.compression,
    }


def atlas_path(work: Path, n_cells: int) -> Path:
    return work / f"atlas_{n_cells}.h5ad"


def reusable(path: Path, n_cells: int, settings: dict) -> bool:
    """Whether ``path`` holds a complete file of ``n_cells`` cells built with ``settings``."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as file:
            shape = tuple(int(size) for size in file["X"].attrs["shape"])
            recorded = ad.io.read_elem(file["uns"]).get("atlas_build")
    except (OSError, KeyError):
        return False
    return shape[0] == n_cells and recorded == json.dumps(settings, sort_keys=True)


def build(spec: dict) -> dict:
    """Write the file of ``spec["cells"]`` cells (to a ``.partial`` name, renamed when done)."""
    settings, n_cells, path = spec["settings"], spec["cells"], Path(spec["path"])
    source = ad.read_h5ad(Path(spec["data_dir"]) / "pbmc3k.h5ad")
    counts = sp.csr_matrix(source.X)
    rng = np.random.default_rng([settings["seed"], n_cells])
    codes = np.arange(n_cells) * settings["batches"] // n_cells
    names = np.array([f"batch{k}" for k in range(settings["batches"])])
    obs = pd.DataFrame(
        {"batch": pd.Categorical(names[codes], categories=names)},
        index=pd.Index([f"cell{i}" for i in range(n_cells)]),
    )
    uns = {"atlas_build": json.dumps(settings, sort_keys=True)}
    partial = path.with_name(path.name + ".partial")
    started = time.perf_counter()
    ad.AnnData(obs=obs, var=pd.DataFrame(index=source.var_names), uns=uns).write_h5ad(partial)
    del obs
    compression = {} if settings["compression"] == "none" else {"compression": "gzip"}
    with h5py.File(partial, "a") as file:
        for start in range(0, n_cells, settings["chunk"]):
            rows = thinned_cells(
                counts, min(settings["chunk"], n_cells - start), settings["keep"], rng
            )
            if start == 0:
                ad.io.write_elem(file, "X", rows, dataset_kwargs=compression)
            else:
                ad.io.sparse_dataset(file["X"]).append(rows)
    partial.rename(path)
    return {"build_seconds": time.perf_counter() - started, "build_peak_rss_mib": peak_rss_mib()}


def file_facts(path: Path) -> dict:
    with h5py.File(path, "r") as file:
        nonzeros = int(file["X"]["indptr"][-1])
    return {"nonzeros": nonzeros, "file_mib": path.stat().st_size / 2**20}


# -- the runs (each in its own process) ------------------------------------------------------


def warm_up(adata: ad.AnnData, seed: int) -> float:
    """Fit pyrosc's scVI to the first :data:`WARMUP_CELLS` cells for one epoch (compiles the
    fused likelihood); its seconds."""
    import pyrosc

    n = min(WARMUP_CELLS, adata.n_obs)
    first = ad.AnnData(
        X=sp.csr_matrix(adata.X[:n]), obs=adata.obs.iloc[:n].copy(), var=adata.var[[]].copy()
    )
    started = time.perf_counter()
    model = pyrosc.SCVI(first, batch_key="batch", likelihood="nb", **ARCHITECTURE)
    model.fit(max_epochs=1, validation_fraction=0, progress=False, seed=seed)
    return time.perf_counter() - started


def parameter_sizes(model) -> dict:
    """Trained parameters of a fitted pyrosc model (networks' weights and free Pyro parameters)
    and the bytes of their gradients, and the bytes of the networks' buffers (BatchNorm)."""
    import pyro
    from pyro.params.param_store import user_param_name

    with model._scope() as (_, _, networks):
        store = pyro.get_param_store()
        free = [value for name, value in store.items() if user_param_name(name) == name]
    trained = [*(p for p in networks.parameters() if p.requires_grad), *free]
    return {
        "n_parameters": sum(t.numel() for t in trained),
        "gradient_bytes": sum(t.numel() * t.element_size() for t in trained),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in networks.buffers()),
    }


def fit_pyrosc(adata: ad.AnnData, spec: dict, set_up: float, **placement) -> dict:
    """Warm up, set up pyrosc's scVI on ``adata`` and fit it; the timings (``set_up``: seconds
    already spent reading the data)."""
    import pyrosc

    warm_seconds = warm_up(adata, spec["seed"])
    started = time.perf_counter()
    model = pyrosc.SCVI(adata, batch_key="batch", likelihood="nb", **ARCHITECTURE)
    set_up += time.perf_counter() - started
    rss_before = rss_mib()
    started = time.perf_counter()
    model.fit(
        max_epochs=spec["epochs"],
        batch_size=BATCH_SIZE,
        validation_fraction=0,
        progress=False,
        seed=spec["seed"],
        **placement,
    )
    fit_seconds = time.perf_counter() - started
    return {
        "warmup_seconds": warm_seconds,
        "setup_seconds": set_up,
        "rss_before_fit_mib": rss_before,
        "fit_seconds": fit_seconds,
        "epoch_seconds": model.history["seconds"].tolist(),
        **parameter_sizes(model),
    }


def run_streamed(spec: dict) -> dict:
    import pyrosc

    started = time.perf_counter()
    adata = pyrosc.read_backed(spec["path"])
    return fit_pyrosc(adata, spec, time.perf_counter() - started)


def run_in_memory(spec: dict) -> dict:
    started = time.perf_counter()
    adata = ad.read_h5ad(spec["path"])
    return fit_pyrosc(adata, spec, time.perf_counter() - started)


def run_ddp(spec: dict) -> dict:
    from pyrosc.data import MinibatchSampler

    devices = spec["devices"]
    # Read by torch in each process DDP starts (and respected by Lightning).
    os.environ["OMP_NUM_THREADS"] = str(max(1, spec["threads"] // devices))
    started = time.perf_counter()
    adata = ad.read_h5ad(spec["path"])
    result = fit_pyrosc(
        adata,
        spec,
        time.perf_counter() - started,
        strategy="ddp",
        devices=devices,
        accelerator="cpu",
    )
    return result | {
        "devices": devices,
        "threads_per_process": int(os.environ["OMP_NUM_THREADS"]),
        "steps_per_epoch": len(MinibatchSampler(adata.n_obs, BATCH_SIZE)) // devices,
        # ru_maxrss of the largest process this one started and waited for: a rank
        "ranks_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
    }


def run_scvi_tools(spec: dict) -> dict:
    import scvi  # noqa: F401  (imported here, before the set-up is timed)
    from lightning.pytorch.callbacks import Callback

    class EpochTimes(Callback):
        """Seconds from each training epoch's start to its end."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    started = time.perf_counter()
    adata = ad.read_h5ad(spec["path"])  # set up in place: a copy would double the memory
    model = scvi_tools_model(adata, ARCHITECTURE, spec["seed"], batch_key="batch")
    set_up = time.perf_counter() - started
    rss_before, timer = rss_mib(), EpochTimes()
    started = time.perf_counter()
    model.train(max_epochs=spec["epochs"], callbacks=[timer], **SCVI_TOOLS_TRAINER)
    trained = [p for p in model.module.parameters() if p.requires_grad]
    return {
        "setup_seconds": set_up,
        "rss_before_fit_mib": rss_before,
        "fit_seconds": time.perf_counter() - started,
        "epoch_seconds": timer.seconds,
        "n_parameters": sum(p.numel() for p in trained),
    }


RUNS = {
    "streamed": run_streamed,
    "in-memory": run_in_memory,
    "scvi-tools": run_scvi_tools,
    "ddp": run_ddp,
}


def child(spec: dict, out: Path) -> None:
    """Run ``spec["kind"]`` ("build" or a tool) here and write its result to ``out``."""
    if spec["kind"] == "build":  # numpy only: torch would add its memory to the build's peak
        out.write_text(json.dumps(build(spec)))
        return
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        result = {"status": "ok", **RUNS[spec["kind"]](spec)}
    except MemoryError as error:
        result = {"status": f"out of memory (MemoryError: {error})"}
    result["peak_rss_mib"] = peak_rss_mib()
    out.write_text(json.dumps(result))


def in_child(spec: dict, work: Path) -> dict:
    """:func:`child` in a fresh process; a failure becomes a ``status`` (with the log's tail)."""
    name = f"{spec['kind']}_{spec['cells']}"
    out, log = work / f"{name}.json", work / f"{name}.log"
    out.unlink(missing_ok=True)
    done = run_python([__file__, "--child", json.dumps(spec), str(out)], log)
    if done.returncode == 0 and out.exists():
        return json.loads(out.read_text())
    tail = log.read_text()[-3000:] if log.exists() else ""
    if done.returncode in _KILLED:
        return {"status": "killed by signal 9 (out of memory?)", "log_tail": tail}
    last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
    return {"status": f"failed (exit {done.returncode}): {last}", "log_tail": tail}


# -- the report --------------------------------------------------------------------------------


def with_rates(row: dict) -> dict:
    """``row`` with its mean seconds per epoch and cells per second (NaN if it failed): over
    every epoch, or for DDP over the epochs after the first (compilation in each process)."""
    seconds = row.get("epoch_seconds") or []
    if row["tool"] == "ddp" and len(seconds) > 1:
        seconds = seconds[1:]
    per_epoch = float(np.mean(seconds)) if seconds else float("nan")
    return row | {
        "timed_epochs": len(seconds),
        "seconds_per_epoch": per_epoch,
        "cells_per_second": row["cells"] / per_epoch,
    }


def runs_table(rows: list[dict]) -> pd.DataFrame:
    def number(value: float, digits: int) -> str:
        return "-" if value is None or np.isnan(value) else f"{value:,.{digits}f}"

    return pd.DataFrame(
        [
            {
                "cells": f"{r['cells']:,}",
                "run": TOOLS[r["tool"]],
                "status": r["status"],
                "set-up s": number(r.get("setup_seconds", np.nan), 2),
                "s / epoch": number(r["seconds_per_epoch"], 2),
                "cells / s": number(r["cells_per_second"], 0),
                "fit call s": number(r.get("fit_seconds", np.nan), 1),
                "peak RSS MiB": number(r.get("peak_rss_mib", np.nan), 0),
            }
            for r in rows
        ]
    )


def files_table(files: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "cells": f"{f['cells']:,}",
                "nonzeros": f"{f['nonzeros']:,}",
                "nonzeros / cell": f"{f['nonzeros'] / f['cells']:.0f}",
                "file MiB": f"{f['file_mib']:,.0f}",
                "build s": "reused" if f["reused"] else f"{f['build_seconds']:.2f}",
                "build peak RSS MiB": "-" if f["reused"] else f"{f['build_peak_rss_mib']:,.0f}",
            }
            for f in files
        ]
    )


def findings(rows: list[dict]) -> list[str]:
    """The ratios, the line fit and the DDP figures, from the runs that succeeded."""
    ok = {(r["tool"], r["cells"]): r for r in rows if r["status"] == "ok"}
    streamed = sorted((c, r) for (tool, c), r in ok.items() if tool == "streamed")
    lines = []
    if streamed:
        small, r_small = streamed[0]
        memory = ok.get(("in-memory", small))
        if memory:
            ratio = r_small["cells_per_second"] / memory["cells_per_second"]
            lines.append(
                f"- Streamed over in-memory throughput (pyrosc, {small:,} cells): {ratio:.2f} "
                f"({r_small['cells_per_second']:,.0f} against {memory['cells_per_second']:,.0f} "
                "cells/s)."
            )
        large, r_large = streamed[-1]
        if large != small:
            lines.append(
                f"- Peak RSS streamed, {large:,} over {small:,} cells: "
                f"{r_large['peak_rss_mib'] / r_small['peak_rss_mib']:.2f} "
                f"({r_large['peak_rss_mib']:,.0f} MiB against {r_small['peak_rss_mib']:,.0f} MiB)."
            )
    if len(streamed) >= 2:
        cells = np.array([c for c, _ in streamed], dtype=float)
        seconds = np.array([r["seconds_per_epoch"] for _, r in streamed])
        slope, intercept, r_squared = line_fit(cells / 1e3, seconds)
        two = " (two sizes: a line through both, R^2 = 1 by construction)"
        lines.append(
            f"- Time per epoch streamed = {intercept:.2f} s + {slope:.4f} s per 1,000 cells, "
            f"least squares over {len(streamed)} sizes: R^2 = {r_squared:.4f}"
            + (two if len(streamed) == 2 else "")
            + "."
        )
    for (tool, cells), r in sorted(ok.items()):
        if tool != "ddp":
            continue
        gradient_mb = r["gradient_bytes"] / 1e6
        one = ok.get(("in-memory", cells))
        versus = f" (one process in memory: {one['cells_per_second']:,.0f})" if one else ""
        lines.append(
            f"- DDP, {r['devices']} processes x {r['threads_per_process']} torch thread(s), "
            f"{cells:,} cells in memory: {r['cells_per_second']:,.0f} cells/s{versus}. Each step "
            f"all-reduces the float32 gradients of {r['n_parameters']:,} trained parameters: "
            f"{gradient_mb:.2f} MB per step, {r['steps_per_epoch']:,} steps per epoch, "
            f"{gradient_mb * r['steps_per_epoch']:,.0f} MB per epoch (a ring all-reduce sends "
            f"2(W-1)/W of it per process); rank 0 also broadcasts "
            f"{r['buffer_bytes'] / 1e3:.1f} kB of BatchNorm buffers per step. Peak RSS of the "
            f"largest process it started: {r['ranks_peak_rss_mib']:,.0f} MiB."
        )
    sizes = {tool: r["n_parameters"] for (tool, _), r in ok.items() if "n_parameters" in r}
    if "scvi-tools" in sizes and len(sizes) > 1:
        mine = next(n for tool, n in sizes.items() if tool != "scvi-tools")
        theirs = sizes["scvi-tools"]
        lines.append(
            f"- Parameters: pyrosc trains {mine:,}; scvi-tools' module holds {theirs:,} "
            f"({theirs - mine:+,}: a library-size encoder and per-cell dispersion and dropout "
            "heads, which a fit with observed library, gene dispersion and NB does not train)."
        )
    return lines


def report(args, started, files: list[dict], rows: list[dict]) -> list[str]:
    low, high = args.keep
    return [
        *report_header(
            "Atlas-scale training: streamed from disk, in memory, DDP, scvi-tools",
            started,
            machine(),
            args.threads,
            "atlas.py",
            sys.argv[1:],
        ),
        "",
        f"Files: cells of hvg2000/pbmc3k (2,000 genes) drawn with replacement, each thinned "
        f"binomially with a keep probability uniform in [{low}, {high}], {args.batches} "
        f"consecutive batches, CSR float32, compression {args.compression} (see the script's "
        "docstring).",
        "",
        markdown_table(files_table(files)),
        "",
        f"Runs: scVI (NB, gene dispersion, 128/10/1, dropout 0.1, minibatch 128, every cell "
        f"training), {args.epochs} epoch(s), each in a fresh process. s / epoch: the epochs' "
        "loops only (pyrosc's history, scvi-tools' epoch start to end), after a one-epoch "
        "warm-up on 1,000 cells for pyrosc (compilation); set-up: reading the file and the "
        "model's constructor; peak RSS: the process's ru_maxrss.",
        "",
        markdown_table(runs_table(rows)),
        "",
        *findings(rows),
        "",
        f"Load average at the end: {os.getloadavg()[0]:.2f}. The streamed runs read files "
        "just written (the page cache, where they fit in memory), not a cold disk.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=float, nargs=2, default=[0.3, 1.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=50_000, help="cells written at a time")
    parser.add_argument("--compression", choices=("none", "gzip"), default="none")
    parser.add_argument("--ddp-size", type=int, default=None, help="default: the smallest size")
    parser.add_argument("--ddp-devices", type=int, default=2)
    parser.add_argument("--ddp-epochs", type=int, default=2, help="the first is not timed")
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results_atlas.md")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child[0]), Path(args.child[1]))
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    sizes = sorted(set(args.sizes))
    ddp_size = args.ddp_size or sizes[0]
    settings = build_settings(args)
    shared = {"threads": args.threads, "seed": args.seed, "epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="pyrosc_atlas_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = []
        for n_cells in sorted({*sizes, *([ddp_size] if "ddp" in args.tools else [])}):
            path = atlas_path(work, n_cells)
            built = {"reused": reusable(path, n_cells, settings)}
            if not built["reused"]:
                spec = {**shared, "kind": "build", "cells": n_cells, "path": str(path)}
                spec |= {"settings": settings, "data_dir": str(args.data_dir.resolve())}
                built |= in_child(spec, Path(tmp))
                if "build_seconds" not in built:
                    sys.exit(f"building {path} failed:\n{built['log_tail']}")
            files.append({"kind": "file", "cells": n_cells, **built, **file_facts(path)})
            print(f"{n_cells:,} cells: {path} ({files[-1]['file_mib']:,.0f} MiB)", flush=True)
        plan = [(tool, n) for n in sizes for tool in args.tools if tool != "ddp"]
        plan += [("ddp", ddp_size)] if "ddp" in args.tools else []
        rows = []
        for tool, n_cells in plan:
            spec = {**shared, "kind": tool, "cells": n_cells}
            spec["epochs"] = args.ddp_epochs if tool == "ddp" else args.epochs
            spec |= {"path": str(atlas_path(work, n_cells)), "devices": args.ddp_devices}
            result = in_child(spec, Path(tmp))
            rows.append(with_rates({"kind": "run", "tool": tool, "cells": n_cells, **result}))
            r = rows[-1]
            print(
                f"{tool} {n_cells:,}: {r['status']}, {r['seconds_per_epoch']:.2f} s/epoch, "
                f"peak {r.get('peak_rss_mib', float('nan')):,.0f} MiB",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, report(args, started, files, rows), files + rows)


if __name__ == "__main__":
    main()
