"""Posterior predictive checks (Gelman et al.): replicate the whole dataset from the fitted
model and set each observed statistic against its replicated distribution, with a plot.

The replicates are the model's counts at posterior draws of each cell's latents
(:mod:`pyrosc.posterior`, as :func:`pyrosc.predictive.posterior_predictive` draws them); the
statistics are summed chunk by chunk, so the replicated datasets are never held whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pyrosc.data import CountData
from pyrosc.posterior import PosteriorDraws
from pyrosc.traces import COUNTS, cell_chunks, check_n_samples, eval_mode, probe, seeded

#: The statistics of :func:`predictive_check`: of each gene over the cells, of each cell.
GENE_STATISTICS = ("mean", "variance", "zero_fraction")
CELL_STATISTICS = ("library_size", "cv")


class _Statistics:
    """Sufficient sums for the statistics of :func:`predictive_check`, chunk by chunk.

    Per gene over the cells: the mean, the variance (with ``cells - 1``) and the fraction of
    zeros; per cell: the library size (total count) and the coefficient of variation of its
    counts over the genes (standard deviation / mean, both over genes; 0 for a cell without
    counts). Sums are float64.
    """

    def __init__(self) -> None:
        self.n_cells = 0
        self.sums: Tensor | None = None  # (3, draws, genes): x, x^2, 1[x = 0]
        self.cells: dict[str, list[Tensor]] = {name: [] for name in CELL_STATISTICS}

    def add(self, counts: Tensor) -> None:
        """``counts``: ``(draws, cells, genes)``."""
        counts = counts.double()
        sums = torch.stack([counts.sum(1), (counts**2).sum(1), (counts == 0).sum(1).double()])
        self.sums = sums if self.sums is None else self.sums + sums
        self.n_cells += counts.shape[1]
        library = counts.sum(-1)
        self.cells["library_size"].append(library.cpu())
        # A replicate without counts has no variation: cv 0 (not 0 / 0).
        spread, mean = counts.std(-1, correction=0), counts.mean(-1)
        self.cells["cv"].append(torch.where(mean > 0, spread / mean.clamp(min=1e-300), 0.0).cpu())

    def of_genes(self) -> dict[str, np.ndarray]:
        """Statistic -> ``(draws, genes)``."""
        total, squares, zeros = self.sums.cpu()
        n = self.n_cells
        return {
            "mean": (total / n).numpy(),
            "variance": ((squares - total**2 / n) / max(n - 1, 1)).numpy(),
            "zero_fraction": (zeros / n).numpy(),
        }

    def of_cells(self) -> dict[str, np.ndarray]:
        """Statistic -> ``(draws, cells)``."""
        return {name: torch.cat(parts, dim=1).numpy() for name, parts in self.cells.items()}


def _check_table(
    level: str,
    names: pd.Index,
    observed: dict[str, np.ndarray],
    replicated: dict[str, np.ndarray],
) -> pd.DataFrame:
    """One row per item (gene or cell) and statistic: the observed value against the 2.5%,
    50% and 97.5% percentiles of its replicates."""
    tables = []
    for statistic, values in replicated.items():
        lower, median, upper = np.percentile(values, [2.5, 50, 97.5], axis=0)
        seen = observed[statistic][0]
        tables.append(
            pd.DataFrame(
                {
                    level: np.asarray(names),
                    "statistic": statistic,
                    "observed": seen,
                    "replicated_lower": lower,
                    "replicated_median": median,
                    "replicated_upper": upper,
                    "inside": (seen >= lower) & (seen <= upper),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)


@dataclass
class PredictiveCheck:
    """Posterior predictive checks: observed statistics against their replicated distribution.

    Attributes:
        genes: one row per gene and statistic (``mean``, ``variance``, ``zero_fraction`` over
            the cells): ``gene``, ``statistic``, ``observed``, ``replicated_lower``,
            ``replicated_median``, ``replicated_upper`` (the 2.5%, 50% and 97.5% percentiles over
            the replicated datasets) and ``inside`` (observed within those two).
        cells: the same per cell (``cell``) for ``library_size`` and ``cv`` (the coefficient of
            variation of the cell's counts over the genes).
        n_samples: the number of replicated datasets.
    """

    genes: pd.DataFrame
    cells: pd.DataFrame
    n_samples: int

    @property
    def summary(self) -> pd.DataFrame:
        """Calibration per statistic: ``level`` (gene or cell), ``share_inside`` (the share of
        genes or cells whose observed statistic lies inside its replicated 95% interval: about
        0.95 or more for a model that fits, much less where it misses) and ``n``."""
        rows = []
        for level, table in (("gene", self.genes), ("cell", self.cells)):
            for statistic, group in table.groupby("statistic", sort=False):
                rows.append(
                    {
                        "statistic": statistic,
                        "level": level,
                        "share_inside": float(group["inside"].mean()),
                        "n": len(group),
                    }
                )
        return pd.DataFrame(rows).set_index("statistic")

    def plot(self, axes: Sequence | None = None):
        """Observed (x) against replicated (y: median, bar: 95% interval) for each statistic,
        one panel each, on log axes (the zero fraction on linear ones), with the identity
        line; points outside their interval in red.

        Args:
            axes: five matplotlib axes to draw on (default: a new figure of five panels).

        Returns:
            the matplotlib figure.
        """
        import matplotlib.pyplot as plt

        panels = [("gene", s, self.genes) for s in GENE_STATISTICS]
        panels += [("cell", s, self.cells) for s in CELL_STATISTICS]
        if axes is None:
            _, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        summary = self.summary
        for ax, (level, statistic, table) in zip(axes, panels, strict=True):
            rows = table[table["statistic"] == statistic]
            for inside, colour in ((True, "tab:blue"), (False, "tab:red")):
                part = rows[rows["inside"] == inside]
                median = part["replicated_median"].to_numpy()
                ax.errorbar(
                    part["observed"].to_numpy(),
                    median,
                    yerr=[
                        median - part["replicated_lower"].to_numpy(),
                        part["replicated_upper"].to_numpy() - median,
                    ],
                    fmt="o",
                    markersize=2,
                    elinewidth=0.5,
                    color=colour,
                    label="inside" if inside else "outside",
                )
            if statistic != "zero_fraction":
                ax.set_xscale("log")
                ax.set_yscale("log")
            low = np.nanmin(rows[["observed", "replicated_lower"]].to_numpy())
            high = np.nanmax(rows[["observed", "replicated_upper"]].to_numpy())
            ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
            share = summary.loc[statistic, "share_inside"]
            ax.set_title(f"{statistic} per {level}: {share:.0%} inside")
            ax.set_xlabel("observed")
            ax.set_ylabel("replicated")
        axes[0].legend(loc="upper left")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


@torch.no_grad()
def predictive_check(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 100,
    *,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> PredictiveCheck:
    """Posterior predictive checks of ``data`` (Gelman et al.): replicate the whole dataset
    ``n_samples`` times (:func:`pyrosc.predictive.posterior_predictive`) and set each observed
    statistic against its replicated distribution.

    Statistics: per gene over the cells, the mean, the variance and the fraction of zeros; per
    cell, the library size and the coefficient of variation over the genes. A model that fits
    puts about 95% of them (or more: the data also fitted the model) inside their replicated
    95% interval; a Poisson fitted to overdispersed counts puts few variances inside.

    Args:
        model, guide, data, seed, networks, batch_size, device: as
            :func:`pyrosc.predictive.posterior_predictive`.
        n_samples: replicated datasets (the percentiles of 100 are good to about 1%).

    Returns:
        a :class:`PredictiveCheck`: per-gene and per-cell tables, ``summary`` and ``plot()``.
    """
    check_n_samples(n_samples)
    observed, replicated = _Statistics(), _Statistics()
    with eval_mode(networks), seeded(seed, device):
        draws = PosteriorDraws(model, guide, probe(data, device))
        # A quarter of the usual chunk: the sums are taken in float64, next to the draws.
        for index in cell_chunks(data, 4 * n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            (trace,) = draws.traces(minibatch, n_samples)
            replicated.add(trace.nodes[COUNTS]["value"])
            observed.add(minibatch["counts"].unsqueeze(0))
    genes = _check_table("gene", data.var_names, observed.of_genes(), replicated.of_genes())
    cells = _check_table("cell", data.obs_names, observed.of_cells(), replicated.of_cells())
    return PredictiveCheck(genes=genes, cells=cells, n_samples=n_samples)
