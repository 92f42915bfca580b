"""The table of :func:`pyrosc.differential_expression.differential_expression` where scanpy
users look for it (``adata.uns`` in the layout of ``sc.tl.rank_genes_groups``) and as a volcano
plot.

The layout is scanpy's, so ``sc.get.rank_genes_groups_df(adata, group=None, key="pyrosc_de")``
and ``sc.pl.rank_genes_groups_dotplot(adata, key="pyrosc_de")`` read it; the values are the
model's, not a test's: ``pvals`` holds ``1 - proba_de`` and ``pvals_adj`` the posterior
expected FDR of calling the gene and every gene ranked above it. Neither is a p-value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pyrosc.de_groups import REST
from pyrosc.differential_expression import signed_score

#: Where the model classes write the scanpy layout in ``adata.uns``.
UNS_KEY = "pyrosc_de"

# The record fields of scanpy's layout and their dtypes, as sc.tl.rank_genes_groups writes them.
_FIELDS = {
    "names": "O",
    "scores": "float32",
    "logfoldchanges": "float32",
    "pvals": "float64",
    "pvals_adj": "float64",
}


def _call_column(results: pd.DataFrame) -> str:
    """The name of the ``is_de_fdr_<target>`` column."""
    return next(column for column in results.columns if column.startswith("is_de_fdr_"))


def rank_genes_groups(results: pd.DataFrame, groupby: str) -> dict:
    """``results`` in the layout of ``adata.uns["rank_genes_groups"]``: one record field per
    comparison, named for its ``group1``, genes in the table's order.

    Fields: ``names``; ``scores`` (the Bayes factor with the LFC's sign,
    :func:`pyrosc.differential_expression.signed_score`); ``logfoldchanges`` (``lfc_mean``,
    log2); ``pvals`` (``1 - proba_de``); ``pvals_adj`` (``expected_fdr``); ``pts`` and
    ``pts_rest`` (detection rates of each group and of what it is compared with, DataFrames
    of genes x groups). ``params`` names ``groupby``, the ``reference`` (``"rest"`` or the
    group2 of a single comparison), ``method`` (``"pyrosc_<mode>"``) and the settings.

    Raises:
        ValueError: two comparisons with the same group1 (scanpy keys its fields by group).
    """
    if results.groupby("group1")["group2"].nunique().max() > 1:
        raise ValueError("scanpy's layout holds one comparison per group1")
    by_group = dict(tuple(results.groupby("group1", sort=False)))
    references = {rows["group2"].iloc[0] for rows in by_group.values()}
    reference = REST if references == {REST} else "|".join(sorted(references))
    columns = {
        "names": lambda rows: rows["gene"].to_numpy(dtype=object),
        "scores": signed_score,
        "logfoldchanges": lambda rows: rows["lfc_mean"].to_numpy(),
        "pvals": lambda rows: 1.0 - rows["proba_de"].to_numpy(),
        "pvals_adj": lambda rows: rows["expected_fdr"].to_numpy(),
    }
    layout = {
        field: pd.DataFrame(
            {str(group): read(rows.reset_index(drop=True)) for group, rows in by_group.items()}
        ).to_records(index=False, column_dtypes=dtype)
        for (field, read), dtype in zip(columns.items(), _FIELDS.values(), strict=True)
    }
    for field, column in (("pts", "detection1"), ("pts_rest", "detection2")):
        layout[field] = pd.DataFrame(
            {str(group): rows.set_index("gene")[column] for group, rows in by_group.items()}
        )
    layout["params"] = {
        "groupby": groupby,
        "reference": reference,
        "method": f"pyrosc_{results.attrs.get('mode', 'change')}",
        "use_raw": False,
        "layer": None,
        "corr_method": "posterior expected FDR",
        **{key: results.attrs[key] for key in ("delta", "fdr_target") if key in results.attrs},
    }
    return layout


def plot_de(
    results: pd.DataFrame,
    *,
    y: str = "proba_de",
    n_labels: int = 8,
    delta: float | None = None,
    ncols: int = 3,
):
    """Volcano plots, one panel per comparison: ``lfc_mean`` against ``proba_de`` (or the
    ``bayes_factor``), the genes called higher in group1 red, lower blue, the others grey;
    dashed lines at ``±delta``; the ``n_labels`` called genes of largest ``|LFC|`` named.

    Args:
        results: a table of :func:`pyrosc.differential_expression.differential_expression`
            (read back from CSV too: then give ``delta``).
        y: ``"proba_de"`` or ``"bayes_factor"``.
        n_labels: called genes named per panel.
        delta: where to draw the threshold lines (default: ``results.attrs["delta"]``; none
            when unknown or 0).
        ncols: panels per row.

    Returns:
        the matplotlib Figure (its axes: ``figure.axes``).
    """
    import matplotlib.pyplot as plt

    if y not in ("proba_de", "bayes_factor"):
        raise ValueError(f"y must be 'proba_de' or 'bayes_factor', got {y!r}")
    if results.empty:
        raise ValueError("results is empty: nothing to plot")
    delta = results.attrs.get("delta") if delta is None else delta
    panels = list(results.groupby(["group1", "group2"], sort=False))
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    figure, axes = plt.subplots(
        nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False, layout="constrained"
    )
    for ax, ((group1, group2), rows) in zip(axes.flat, panels, strict=False):
        _volcano(ax, rows, y, _call_column(results), n_labels, delta)
        ax.set_title(f"{group1} vs {group2}: {int(rows[_call_column(results)].sum())} called")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    return figure


def _volcano(ax, rows: pd.DataFrame, y: str, call: str, n_labels: int, delta: float | None):
    """One comparison's volcano on ``ax``."""
    lfc, value, called = rows["lfc_mean"], rows[y], rows[call].to_numpy()
    colours = np.where(~called, "lightgrey", np.where(lfc > 0, "tab:red", "tab:blue"))
    order = np.argsort(called, kind="stable")  # called genes drawn last, on top
    ax.scatter(lfc.iloc[order], value.iloc[order], c=colours[order], s=8, linewidths=0)
    if delta:
        for x in (-delta, delta):
            ax.axvline(x, color="black", linestyle="--", linewidth=0.7)
    named = rows[called].assign(size=lambda r: r["lfc_mean"].abs()).nlargest(n_labels, "size")
    # Called genes often share the top of the plot (P(DE) = 1): each side's names are stacked
    # one line apart, inwards from their points (the largest LFCs sit at the plot's edges), each
    # tied to its point by a thin line.
    for up in (True, False):
        side = named[(named["lfc_mean"] > 0) == up]
        for line, (gene, x, height) in enumerate(
            zip(side["gene"], side["lfc_mean"], side[y], strict=True)
        ):
            ax.annotate(
                gene,
                (x, height),
                xytext=(-6 if up else 6, -4 - 9 * line),
                textcoords="offset points",
                ha="right" if up else "left",
                va="top",
                fontsize=7,
                arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "0.4"},
            )
    ax.set_xlabel("LFC, posterior mean (log2)")
    ax.set_ylabel("P(DE)" if y == "proba_de" else "log Bayes factor")
