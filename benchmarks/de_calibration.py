"""Differential expression on counts with known fold changes: pyrosc against scvi-tools 1.4.2.

The simulation (issue 17's "Tests", at a realistic size), per seed:

1. A generator, fitted once: a pyrosc VAE (NB, 128 hidden units, 10 latent dimensions) on all
   2,638 labelled cells of ../shared/data/hvg2000/pbmc3k.h5ad (2,000 genes), ``--generator-epochs``
   epochs. Each cell's proportions ``rho_i`` are decoded at one posterior draw of its latent
   (``normalized_expression(library_size=1)``), the gene-wise inverse dispersion ``theta_g`` is
   the fitted one.
2. ``--cells`` of those cells drawn at random, split at random into groups "A" and "B" (half
   each): the two groups have the same cell types in the same expected shares.
3. ``--n-de`` genes, drawn at random among those detected in at least 10% of the cells, get a
   known log2 fold change in group B: a quarter each of 0.5, 1, 1.5 and 2, half of each up and
   half down. In B, ``rho_ig`` of those genes is multiplied by ``2^LFC_g`` and every cell's
   proportions renormalised to sum to 1 (so every other gene moves a little, by the same
   factor; its true LFC is computed and reported, it stays far below delta).
4. Counts ``x_ig ~ NB(mean = l_i rho_ig, theta_g)``, ``l_i`` the cell's observed total count.

The truth: a gene is truly DE (in the direction of its sign) when it is one of the ``--n-de``;
a call is false when the gene is not, or when the call's LFC has the wrong sign. Each tool, in
its own process, fits its scVI (NB, observed library, gene dispersion, 128/10/1, dropout 0.1,
minibatch 128, Adam 1e-3, every cell training, ``--epochs``; KL warm-up: each tool's default,
pyrosc none, scvi-tools 400 epochs) on the simulated counts, then compares B with A in change
mode, delta 0.25, each tool's other defaults:

- pyrosc: ``differential_expression("group", "B", "A")`` (100 draws, up to 500 cells a group,
  pseudocount 0.1 counts, detection filter 5%); the calls at 0.1 from the same table's
  ``expected_fdr <= 0.1`` (the call at any target is a cut of the same ranking);
- scvi-tools: ``differential_expression(groupby="group", group1="B", group2="A", mode="change",
  delta=0.25, fdr_target=q)`` once per target q, its ``is_de_fdr_<q>`` column.

Reported per tool and seed: the calls, the observed false discovery proportion and the power
(share of the truly DE genes called) at targets 0.05 and 0.1, and the power at equal *observed*
FDR: genes ranked by each tool's proba_de (pyrosc: its calling order, filtered genes last;
scvi-tools: proba_de, ties by |LFC|), the largest top set whose observed FDP is at most
0.05 / 0.1, its share of the true DE genes. Writes a markdown table to ``--out`` and every raw
result beside it (``.jsonl``).

    python benchmarks/de_calibration.py                      # 3 seeds, both tools
    python benchmarks/de_calibration.py --seeds 0 --epoch-scale 0.01 --out /tmp/dec.md
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
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from measure import HERE, machine, run_python, train_scvi_tools
from views import DATA, markdown_table, report_header, write_results

ARCHITECTURE = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}
TARGETS = (0.05, 0.1)
DELTA = 0.25
LOG2_FOLD_CHANGES = (0.5, 1.0, 1.5, 2.0)


# -- the simulation ------------------------------------------------------------------------------


def labelled_cells(data_dir: Path) -> ad.AnnData:
    adata = ad.read_h5ad(data_dir / "pbmc3k.h5ad")
    return adata[adata.obs["cell_type"].notna().to_numpy()].copy()


def fit_generator(data_dir: Path, epochs: int, out: Path) -> None:
    """Fit the generator VAE and write each labelled cell's decoded proportions, its library
    and the inverse dispersion to ``out`` (.npz)."""
    import pyro

    import pyrosc

    adata = labelled_cells(data_dir)
    model = pyrosc.VAE(adata, "nb", **ARCHITECTURE)
    model.fit(max_epochs=epochs, validation_fraction=0, progress=False, seed=12345)
    rho = model.normalized_expression(library_size=1, n_samples=1)
    with model._scope():
        theta = pyro.param("inverse_dispersion").detach().cpu().numpy()
    counts = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.savez(
        out,
        rho=rho.astype(np.float64),
        theta=theta.astype(np.float64),
        library=counts.sum(axis=1),
        detection=(counts > 0).mean(axis=0),
        cell_type=np.asarray(adata.obs["cell_type"].astype(str), dtype=str),
        genes=np.asarray(adata.var_names, dtype=str),
    )


def simulate(generator: Path, n_cells: int, n_de: int, seed: int) -> tuple[ad.AnnData, dict]:
    """The simulated AnnData (obs "group": "A"/"B", "cell_type") and the truth."""
    g = np.load(generator, allow_pickle=False)
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(len(g["rho"]), size=n_cells, replace=False))
    rho, library = g["rho"][cells], g["library"][cells]
    in_b = np.zeros(n_cells, dtype=bool)
    in_b[rng.permutation(n_cells)[: n_cells // 2]] = True
    candidates = np.flatnonzero(g["detection"] >= 0.10)
    de_genes = rng.choice(candidates, size=n_de, replace=False)
    sizes = np.repeat(LOG2_FOLD_CHANGES, n_de // len(LOG2_FOLD_CHANGES))
    signs = np.tile([1.0, -1.0], n_de // 2)
    lfc = np.zeros(rho.shape[1])
    lfc[de_genes] = rng.permutation(sizes) * signs
    changed = rho * 2.0**lfc
    changed /= changed.sum(axis=1, keepdims=True)
    simulated = np.where(in_b[:, None], changed, rho)
    mean = library[:, None] * simulated
    theta = g["theta"]
    counts = rng.negative_binomial(theta, theta / (theta + mean))
    obs = pd.DataFrame(
        {
            "group": pd.Categorical(np.where(in_b, "B", "A")),
            "cell_type": g["cell_type"][cells],
        },
        index=[f"cell{i}" for i in cells],
    )
    adata = ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=g["genes"]),
    )
    # The true LFC of each gene's mean proportion, B over A, over the same cells (no sampling
    # noise in the truth: both groups are random halves of them).
    truth = np.log2(changed.mean(axis=0) / rho.mean(axis=0))
    return adata, {"designed_lfc": lfc.tolist(), "true_lfc": truth.tolist()}


# -- each tool -------------------------------------------------------------------------------------


def run_pyrosc(adata: ad.AnnData, epochs: int, seed: int) -> dict:
    import pyrosc

    model = pyrosc.SCVI(adata, likelihood="nb", **ARCHITECTURE)
    started = time.perf_counter()
    model.fit(max_epochs=epochs, validation_fraction=0, progress=False, seed=seed)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    res = model.differential_expression("group", "B", "A", mode="change", delta=DELTA)
    de_seconds = time.perf_counter() - started
    res = res.set_index("gene").loc[adata.var_names]
    # The calling order: the ranking behind expected_fdr (eligible genes by proba_de, ties by
    # |LFC|; filtered genes last).
    order_key = np.where(res["expressed"], res["proba_de"], -1.0)
    return {
        "fit_seconds": fit_seconds,
        "de_seconds": de_seconds,
        "proba_de": res["proba_de"].tolist(),
        "rank_key": order_key.tolist(),
        "lfc_mean": res["lfc_mean"].tolist(),
        "ci95": [res["lfc_ci95_low"].tolist(), res["lfc_ci95_high"].tolist()],
        "pseudocount_cp10k": float(res["pseudocount"].iloc[0]),
        "calls": {str(q): (res["expected_fdr"] <= q).tolist() for q in TARGETS},
    }


def run_scvi_tools(adata: ad.AnnData, epochs: int, seed: int) -> dict:
    model, adata, fit_seconds = train_scvi_tools(adata, ARCHITECTURE, epochs, seed)
    result = {"fit_seconds": fit_seconds, "calls": {}}
    for q in TARGETS:
        started = time.perf_counter()
        res = model.differential_expression(
            groupby="group", group1="B", group2="A", mode="change", delta=DELTA, fdr_target=q
        )
        result.setdefault("de_seconds", time.perf_counter() - started)
        res = res.loc[adata.var_names]
        result["calls"][str(q)] = res[f"is_de_fdr_{q}"].astype(bool).tolist()
        if q == TARGETS[0]:
            result["proba_de"] = res["proba_de"].tolist()
            result["rank_key"] = res["proba_de"].tolist()
            result["lfc_mean"] = res["lfc_mean"].tolist()
    return result


RUNS = {"pyrosc": run_pyrosc, "scvi-tools": run_scvi_tools}


# -- scoring ------------------------------------------------------------------------------------


def score(result: dict, truth: dict) -> dict:
    """Calls, observed FDP and power at each target; power at equal observed FDR."""
    designed = np.asarray(truth["designed_lfc"])
    lfc = np.asarray(result["lfc_mean"])
    truly = designed != 0
    right = truly & (np.sign(lfc) == np.sign(designed))
    n_true = int(truly.sum())
    scores = {}
    for q in TARGETS:
        called = np.asarray(result["calls"][str(q)])
        n_called, n_false = int(called.sum()), int((called & ~right).sum())
        scores[f"calls_{q}"] = n_called
        scores[f"false_{q}"] = n_false
        scores[f"fdp_{q}"] = n_false / n_called if n_called else 0.0
        scores[f"power_{q}"] = int((called & right).sum()) / n_true
    order = np.lexsort((-np.abs(lfc), -np.asarray(result["rank_key"])))
    hits = right[order]
    top = np.arange(1, len(order) + 1)
    fdp = np.cumsum(~hits) / top
    for q in TARGETS:
        within = np.flatnonzero(fdp <= q)
        scores[f"power_at_fdp_{q}"] = (
            float(np.cumsum(hits)[within[-1]] / n_true) if len(within) else 0.0
        )
    if "ci95" in result:  # pyrosc: coverage of the truth with its pseudocount
        low, high = (np.asarray(side) for side in result["ci95"])
        unchanged = np.flatnonzero(designed == 0)
        scores["ci95_within_delta_unchanged"] = float(
            np.mean((low[unchanged] >= -DELTA) & (high[unchanged] <= DELTA))
        )
        scores["n_de"] = n_true
        scores["ci95_coverage_de_genes"] = float(
            np.mean(
                [
                    low[g] <= truth["true_lfc_pc"][g] <= high[g]
                    for g in np.flatnonzero(designed != 0)
                ]
            )
        )
    return scores


def child(tool: str, sim: Path, out: Path, epochs: int, seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    adata = ad.read_h5ad(sim)
    out.write_text(json.dumps({"tool": tool, **RUNS[tool](adata, epochs, seed)}))


def table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    shown = {"seed": "seed", "tool": "tool"}
    for q in TARGETS:
        shown |= {
            f"calls_{q}": f"calls @{q}",
            f"fdp_{q}": f"observed FDR @{q}",
            f"power_{q}": f"power @{q}",
        }
    for q in TARGETS:
        shown[f"power_at_fdp_{q}"] = f"power at observed FDR {q}"
    return frame[list(shown)].rename(columns=shown)


def summary(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    columns = [f"{k}_{q}" for k in ("fdp", "power") for q in TARGETS]
    columns += [f"power_at_fdp_{q}" for q in TARGETS]
    out = []
    for tool, group in frame.groupby("tool", sort=False):
        row = {"tool": tool, "seeds": len(group)}
        for c in columns:
            row[c] = f"{group[c].mean():.3f} ({group[c].min():.3f}-{group[c].max():.3f})"
        out.append(row)
    names = {f"fdp_{q}": f"observed FDR @{q}" for q in TARGETS}
    names |= {f"power_{q}": f"power @{q}" for q in TARGETS}
    names |= {f"power_at_fdp_{q}": f"power at observed FDR {q}" for q in TARGETS}
    return pd.DataFrame(out).rename(columns=names)


def coverage_lines(rows: list[dict]) -> list[str]:
    """pyrosc's interval coverage, per seed."""
    mine = [r for r in rows if "ci95_coverage_de_genes" in r]
    if not mine:
        return []
    covered = ", ".join(f"{r['ci95_coverage_de_genes']:.2f}" for r in mine)
    within = ", ".join(f"{r['ci95_within_delta_unchanged']:.2f}" for r in mine)
    seeds = ", ".join(str(r["seed"]) for r in mine)
    return [
        f"pyrosc's 95% credible intervals covered the true LFC (on its pseudocount scale) of "
        f"{covered} of the {mine[0]['n_de']} changed genes, and lay within +-{DELTA} for "
        f"{within} of the unchanged ones (seeds {seeds})."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cells", type=int, default=1500)
    parser.add_argument("--n-de", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--generator-epochs", type=int, default=400)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="smoke tests: 0.01")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results_de_calibration.md")
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "SIM", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--generator", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    epochs = max(1, round(args.epochs * args.epoch_scale))
    if args.child:
        tool, sim, out = args.child
        if tool == "generator":
            torch.set_num_threads(args.threads)
            fit_generator(args.data_dir, epochs, Path(out))
        else:
            child(tool, Path(sim), Path(out), epochs, args.seed, args.threads)
        return

    started = datetime.datetime.now(datetime.timezone.utc)
    rows, raw = [], []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        generator, log = work / "generator.npz", work / "generator.log"
        generator_epochs = max(1, round(args.generator_epochs * args.epoch_scale))
        command = [__file__, "--child", "generator", "-", str(generator)]
        command += ["--epochs", str(generator_epochs), "--threads", str(args.threads)]
        command += ["--data-dir", str(args.data_dir)]
        if run_python(command, log).returncode != 0:
            sys.exit(f"generator failed:\n{log.read_text()[-3000:]}")
        print(f"generator fitted ({generator_epochs} epochs)", flush=True)
        for seed in args.seeds:
            adata, truth = simulate(generator, args.cells, args.n_de, seed)
            sim = work / f"sim{seed}.h5ad"
            adata.write_h5ad(sim)
            designed = np.asarray(truth["designed_lfc"])
            true_lfc = np.asarray(truth["true_lfc"])
            untouched = np.abs(true_lfc[designed == 0]).max()
            print(f"seed {seed}: max |true LFC| of unchanged genes {untouched:.3f}", flush=True)
            for tool in args.tools:
                out, log = work / f"{tool}{seed}.json", work / f"{tool}{seed}.log"
                command = [__file__, "--child", tool, str(sim), str(out), "--seed", str(seed)]
                command += ["--epochs", str(args.epochs), "--epoch-scale", str(args.epoch_scale)]
                command += ["--threads", str(args.threads)]
                if run_python(command, log).returncode != 0:
                    sys.exit(f"{tool} failed:\n{log.read_text()[-3000:]}")
                result = json.loads(out.read_text())
                if "pseudocount_cp10k" in result:  # the truth on pyrosc's scale
                    g = np.load(generator)
                    offset = result["pseudocount_cp10k"] / 1e4
                    cells = [int(name[4:]) for name in adata.obs_names]
                    rho = g["rho"][cells]
                    changed = rho * 2.0**designed
                    changed /= changed.sum(axis=1, keepdims=True)
                    truth["true_lfc_pc"] = (
                        np.log2(changed.mean(axis=0) + offset) - np.log2(rho.mean(axis=0) + offset)
                    ).tolist()
                scores = score(result, truth)
                row = {"seed": seed, "tool": tool, **scores}
                row |= {k: result[k] for k in ("fit_seconds", "de_seconds")}
                row["max_abs_true_lfc_unchanged"] = float(untouched)
                rows.append(row)
                raw.append({**row, "result": result, "designed_lfc": truth["designed_lfc"]})
                print(json.dumps(row), flush=True)
    info = machine()
    load = os.getloadavg()
    lines = [
        *report_header(
            "Differential expression on simulated fold changes: pyrosc vs scvi-tools 1.4.2",
            started,
            info,
            args.threads,
            "de_calibration.py",
            sys.argv[1:],
        ),
        "",
        f"{args.cells} cells of PBMC 3k (2,000 genes) per seed, split at random into A and B; "
        f"{args.n_de} genes changed in B by log2 fold changes ±{LOG2_FOLD_CHANGES}; NB counts "
        f"from a pyrosc VAE fitted {generator_epochs} epochs (see the script's docstring). Each "
        f"tool: scVI (NB) fitted {epochs} epochs, change mode, delta {DELTA}. A call is false "
        "when the gene is not one of the changed ones or its LFC has the wrong sign.",
        "",
        "Mean over seeds (min-max):",
        "",
        markdown_table(summary(rows)),
        "",
        "Per seed:",
        "",
        markdown_table(table(rows)),
        "",
        *coverage_lines(rows),
        "",
        f"Largest |true LFC| of an unchanged gene (renormalisation): "
        f"{max(r['max_abs_true_lfc_unchanged'] for r in rows):.3f}. Load average at the end: "
        f"{load[0]:.2f} (timings not reported here).",
    ]
    write_results(args.out, lines, raw)


if __name__ == "__main__":
    main()
