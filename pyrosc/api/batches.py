"""What a model with batches answers beyond the others: cells simulated in a batch, decoded as
if from another (a counterfactual), normalised expression in a chosen batch, and differential
expression between cells decoded into the same batches.

:class:`BatchModel` is the base of the notebook classes whose decoder sees a batch
(``batch_key``, the first categorical covariate) and other categorical covariates: today
:class:`pyrosc.api.SCVI`. A model without batches has none of these arguments. Through
:class:`pyrosc.api.query.ReferenceMapping`, each such class also maps a query onto a fitted
reference (``load_query_data``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pyrosc import predictive
from pyrosc.api.base import PyroscModel
from pyrosc.api.query import ReferenceMapping


class BatchModel(ReferenceMapping, PyroscModel):
    """A :class:`PyroscModel` set up with ``batch_key`` (None: one batch) and categorical
    covariates, whose questions can name the batch and covariates to decode in, and onto which
    a query can be mapped (:meth:`load_query_data`)."""

    def _refuse_batches(self, argument: str) -> ValueError:
        """The error for a batch asked of a model set up without a ``batch_key``."""
        return ValueError(
            f"{argument} needs a model with a batch_key; this {type(self).__name__} has none"
        )

    def _covariates(self, batch: str | None, covariates: Mapping[str, str] | None) -> dict:
        """``batch`` and the other ``covariates`` as one obs column -> category mapping."""
        named = dict(covariates or {})
        if batch is not None:
            key = self.config["batch_key"]
            if key is None:
                raise self._refuse_batches(f"batch={batch!r}")
            named[key] = batch
        return named

    def _transform_batches(self, transform_batch: str | Sequence[str]) -> list[dict[str, str]]:
        """One covariate setting per batch name in ``transform_batch`` (one name or several)."""
        key = self.config["batch_key"]
        if key is None:
            raise self._refuse_batches("transform_batch")
        names = [transform_batch] if isinstance(transform_batch, str) else list(transform_batch)
        if not names:
            raise ValueError("transform_batch is an empty list; give at least one batch name")
        known = self.data.covariate_categories[key]
        unknown = [name for name in names if str(name) not in known]
        if unknown:
            raise ValueError(
                f"transform_batch names batch(es) {unknown} that are not in obs[{key!r}] of the "
                f"training data; the known batches are: {known}"
            )
        return [{key: str(name)} for name in names]

    def simulate(
        self,
        n_cells: int,
        batch: str | None = None,
        covariates: Mapping[str, str] | None = None,
        library: float | np.ndarray | None = None,
        seed: int = 0,
    ) -> ad.AnnData:
        """New cells from the generative model with its fitted parameters
        (:func:`pyrosc.predictive.simulate`).

        Each cell's other covariates and library size come from a training cell drawn at random
        among those of ``batch`` (and ``covariates``); a latent library is drawn from its prior.

        Args:
            n_cells: how many cells.
            batch: the batch of every cell; None: as the templates.
            covariates: other categorical covariates, obs column -> category.
            library: a library size for every cell (a number or ``(n_cells,)``); None: the
                templates' (or, for a latent library, its prior).
            seed: seeds the simulation (the global random state is left as it was).

        Returns:
            AnnData ``(n_cells, genes)``: integer counts in ``X`` (CSR), covariates and
            ``library`` in obs, latents in obs (``y``) and obsm (``z``).
        """
        return self._simulate(n_cells, self._covariates(batch, covariates), library, seed)

    def counterfactual(
        self,
        adata: ad.AnnData | None = None,
        batch: str | None = None,
        covariates: Mapping[str, str] | None = None,
        n_samples: int = 1,
        library_size: float | str = 1e4,
        seed: int = 0,
    ) -> ad.AnnData:
        """Each cell decoded as if it came from ``batch`` (and ``covariates``): its latents
        inferred with its real batch, its counts drawn with the new one
        (:func:`pyrosc.predictive.counterfactual`).

        Args:
            adata: the cells, with the training genes (default: the training AnnData).
            batch: the batch to decode in; None: each cell's own.
            covariates: other categorical covariates to set, obs column -> category.
            n_samples: posterior draws per cell.
            library_size: ``l'`` of ``layers["normalized"]`` (``l' rho``), or ``"latent"``.
            seed: seeds the draws; with the same seed, decoding into each cell's own batch
                gives :meth:`posterior_predictive`'s counts exactly.

        Returns:
            the AnnData of :meth:`posterior_predictive` with the new covariates in obs and the
            normalised expression in ``layers["normalized"]``.
        """
        return self._call(
            predictive.counterfactual,
            adata,
            self._covariates(batch, covariates),
            n_samples,
            library_size=library_size,
            seed=seed,
        )

    def normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        transform_batch: str | Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Posterior mean of each cell's expected expression ``l' rho``, as scvi-tools'
        ``get_normalized_expression`` (:func:`pyrosc.predictive.normalized_expression`).

        ``rho`` is decoded from the posterior (``n_samples`` draws, averaged), read from the
        model's ``proportions`` site: the guide is traced with the cell's own batch, and the
        model rerun at its draws with the batch replaced (a counterfactual: the cell as if it
        came from that batch).

        Args:
            adata: cells to decode, with the training genes (default: the training AnnData).
            transform_batch: None (each cell's own batch), a batch name (every cell decoded as
                if from that batch), or a list of names (the mean over those batches).
            library_size: ``l'``, a positive number (1: proportions; 1e4: counts per 10k), or
                ``"latent"``: each cell's library (its total count, or draws of the latent
                library from ``q(l | x)``).
            n_samples: draws from the posterior per cell.
            batch_size: cells per pass.

        Returns:
            ``(cells, genes)`` float32 array.

        Raises:
            ValueError: an unknown batch name, a model without a batch_key given a
                transform_batch, a bad library_size or n_samples.
        """
        settings = None if transform_batch is None else self._transform_batches(transform_batch)
        return self._call(
            predictive.normalized_expression,
            adata,
            settings,
            library_size,
            n_samples,
            batch_size=batch_size,
        )

    def differential_expression(
        self,
        groupby: str,
        group1: str | None = None,
        group2: str | None = None,
        *,
        batch_correction: bool = False,
        adata: ad.AnnData | None = None,
        **options: Any,
    ) -> pd.DataFrame:
        """:meth:`PyroscModel.differential_expression
        <pyrosc.api.differential_expression.DifferentialExpression.differential_expression>`
        (the same options), and ``batch_correction``.

        Args:
            batch_correction: decode every cell into each batch of the training data and take,
                at each posterior draw, the mean over the batches (the counterfactual of
                :meth:`normalized_expression` with every batch as ``transform_batch``): the
                groups are compared as if from the same batches, so a batch confounded with a
                group does not read as differential expression. False: each cell as observed.

        Raises:
            ValueError: ``batch_correction`` on a model set up without a ``batch_key``, and as
                the method without it.
        """
        covariates = None
        if batch_correction:
            key = self.config["batch_key"]
            if key is None:
                raise self._refuse_batches("batch_correction")
            covariates = self._transform_batches(self.data.covariate_categories[key])
        return self._differential_expression(groupby, group1, group2, covariates, adata, options)
