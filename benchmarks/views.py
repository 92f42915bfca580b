"""The benchmark views of ../shared/data/hvg2000/ (fixed genes and train/test split), shared by
the benchmark scripts, and a markdown table for their results."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import pandas as pd

#: ../shared/data/hvg2000 beside this repository (not shipped with it).
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hvg2000"


def load_view(data_dir: Path, dataset: str) -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """All cells of ``<data_dir>/<dataset>.h5ad``, and copies of its "train" and "test" cells."""
    adata = ad.read_h5ad(data_dir / f"{dataset}.h5ad")
    train = adata[adata.obs["split"] == "train"].copy()
    test = adata[adata.obs["split"] == "test"].copy()
    return adata, train, test


def markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    """``table`` as a GitHub markdown table, floats rounded to ``digits`` places."""

    def cell(value: object) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def write_results(out: Path, lines: list[str], results: list[dict]) -> None:
    """Write a benchmark's markdown report to ``out`` and its raw results beside it, one JSON
    object per line in ``out`` with the suffix ``.jsonl``."""
    out.write_text("\n".join(lines) + "\n")
    with out.with_suffix(".jsonl").open("w") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    print(f"wrote {out}")


def report_header(title: str, started, info: dict, threads: int, script: str, argv: list[str]):
    """The first lines of a benchmark report: title, when and where, versions, the command."""
    return [
        f"# {title}",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {info['cpu']} ({info['logical_cpus']} "
        f"logical CPUs), {threads} torch threads. Python {info['python']}, torch "
        f"{info['torch']}, pyro-ppl {info['pyro-ppl']}, scvi-tools {info['scvi-tools']}, "
        f"pyrosc {info['pyrosc_commit']}.",
        "",
        f"Command: `python benchmarks/{script} {' '.join(argv)}`".rstrip(),
    ]
