"""Differential expression for every notebook class: :class:`DifferentialExpression`, a base of
:class:`pyrosc.api.base.PyroscModel`. The analysis is
:func:`pyrosc.differential_expression.differential_expression`; here, the obs column becomes the
groups and the table is also written to ``adata.uns["pyrosc_de"]`` in scanpy's layout
(:func:`pyrosc.de_results.rank_genes_groups`). :class:`pyrosc.api.batches.BatchModel` adds
``batch_correction``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anndata as ad
import pandas as pd

from pyrosc import de_results
from pyrosc import differential_expression as de
from pyrosc.api import results

if TYPE_CHECKING:
    from pyrosc.api.base import PyroscModel


class DifferentialExpression:
    """``differential_expression`` on any fitted model. Mixed into PyroscModel."""

    def differential_expression(
        self: PyroscModel,
        groupby: str,
        group1: str | None = None,
        group2: str | None = None,
        *,
        mode: str = "change",
        delta: float | None = None,
        fdr_target: float = 0.05,
        n_samples: int = 100,
        max_cells_per_group: int = 500,
        pseudocount: float = 0.1,
        min_detection: float = 0.05,
        sampling_noise: bool = True,
        shrink: bool = True,
        seed: int = 0,
        adata: ad.AnnData | None = None,
    ) -> pd.DataFrame:
        """Which genes differ between groups of cells, from the model: the posterior of each
        gene's log fold change of mean normalised expression, and the genes called at a
        posterior expected FDR (:func:`pyrosc.differential_expression.differential_expression`).

        ``proba_de`` is, in change mode, the larger of ``P(LFC > delta)`` and
        ``P(LFC < -delta)``; in vanilla mode, of ``P(rho1 > rho2)`` and ``P(rho1 < rho2)``.
        The genes called (``is_de_fdr_<fdr_target>``) are, among those detected in at least
        ``min_detection`` of the cells of either group, the largest set, by ``proba_de``,
        whose mean ``1 - proba_de`` is at most ``fdr_target``: the share of false discoveries
        the model expects among its calls, given the data. It is a posterior expectation under
        the fitted model, not a frequentist guarantee: it holds as far as the model fits.

        Also written to ``adata.uns["pyrosc_de"]`` in the layout of scanpy's
        ``rank_genes_groups`` (:func:`pyrosc.de_results.rank_genes_groups`; ``pvals`` is
        ``1 - proba_de``, ``pvals_adj`` the running expected FDR: not p-values), so
        ``sc.get.rank_genes_groups_df(adata, None, key="pyrosc_de")`` and
        ``sc.pl.rank_genes_groups_dotplot(adata, key="pyrosc_de")`` read it.

        Args:
            groupby: the obs column of the groups; cells with no label are in none.
            group1, group2: ``group1`` against ``group2``; ``group1`` against the rest (no
                ``group2``); each group against the rest (neither).
            mode: ``"change"`` or ``"vanilla"``.
            delta: change mode's threshold on ``|LFC|`` (log2); None: 0.25. Not with vanilla.
            fdr_target: the posterior expected FDR of the calls, in (0, 1).
            n_samples: posterior draws (each of every drawn cell, with fresh Bayesian
                bootstrap weights over the group's cells).
            max_cells_per_group: a larger group is represented by this many of its cells,
                drawn at random.
            pseudocount: counts in a cell of the compared cells' median depth, added to both
                groups' expression before the log ratio.
            min_detection: genes detected in less than this share of the cells of both
                groups are never called.
            sampling_noise: each group's mean expression at a draw also gets the sampling
                noise of the counts behind it (a normal draw with the variance the model's
                likelihood gives ``x / l``, summed over the group's cells), which the
                amortised posterior of rho leaves out. False: rho alone (narrower intervals
                that miss it; see :mod:`pyrosc.differential_expression`).
            shrink: adaptive shrinkage (:mod:`pyrosc.de_shrinkage`): the LFC's prior is
                learnt from all genes of the comparison, most of which do not change, so a
                gene a few standard errors from 0 is not called on its own say-so. False:
                each gene's posterior from the model alone (a flat prior on its LFC).
            seed: seeds every draw (the global random state is left as it was).
            adata: the cells, with the training genes and the ``groupby`` column (default:
                the training AnnData); the layout is written to its ``uns``.

        Returns:
            one row per gene and comparison (columns: see
            :func:`pyrosc.differential_expression.differential_expression`).

        Raises:
            ValueError: an unknown ``groupby`` or group, a group with no cells, fewer than two
                groups, ``group2`` without ``group1``, a bad option.
        """
        options = {
            "mode": mode,
            "delta": delta,
            "fdr_target": fdr_target,
            "n_samples": n_samples,
            "max_cells_per_group": max_cells_per_group,
            "pseudocount": pseudocount,
            "min_detection": min_detection,
            "sampling_noise": sampling_noise,
            "shrink": shrink,
            "seed": seed,
        }
        return self._differential_expression(groupby, group1, group2, None, adata, options)

    def _differential_expression(
        self: PyroscModel,
        groupby: str,
        group1: str | None,
        group2: str | None,
        covariates: Mapping[str, str] | Sequence[Mapping[str, str]] | None,
        adata: ad.AnnData | None,
        options: dict[str, Any],
    ) -> pd.DataFrame:
        """:meth:`differential_expression` with every cell decoded under ``covariates``."""
        target = self._adata(adata)
        groups = results.obs_column(target, groupby)
        de_table = self._call(
            de.differential_expression,
            adata,
            groups,
            group1,
            group2,
            covariates=covariates,
            **options,
        )
        results.store_uns(
            target, de_results.UNS_KEY, de_results.rank_genes_groups(de_table, groupby)
        )
        return de_table
