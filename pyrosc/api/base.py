"""The shared base of the notebook classes: set up on an AnnData, fit, and answer questions.

:class:`PyroscModel` validates the data, hands the model/guide pair a subclass builds to
:func:`pyrosc.train.train` on the fit's one train/validation split, and puts results where
scanpy users look for them (``adata.obsm["X_pyrosc"]``). Every question to a fitted model
(latent, scores, simulation, replicates, checks, differential expression) goes through
:meth:`PyroscModel._call`: the validated cells, the model's own parameter-store scope, its
networks and device. Models fitted in one session therefore never see each other's parameters.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch
from torch import nn

from pyrosc import distributed, evaluate, predictive, predictive_checks, streaming, traces
from pyrosc.api import persistence, results
from pyrosc.api.differential_expression import DifferentialExpression
from pyrosc.data import CountData, from_anndata, split_cells
from pyrosc.freezing import Frozen
from pyrosc.likelihoods import LIKELIHOODS
from pyrosc.nets import check_sizes
from pyrosc.train import TrainResult

_LATENT_KEY = "X_pyrosc"
_LOG_LIKELIHOOD_KEY = "pyrosc_log_likelihood"
_SIZE_KEYS = ("n_latent", "n_hidden", "n_layers", "dropout")


class PyroscModel(DifferentialExpression):
    """Shared machinery of the model classes; subclasses define :meth:`_build`. Differential
    expression comes from :class:`pyrosc.api.differential_expression.DifferentialExpression`.

    Attributes:
        adata: the AnnData the model was set up with (results are written to it).
        data: its validated counts.
        history: per-epoch training history (a DataFrame) after :meth:`fit`.
    """

    _latent_site = "z"  # the site whose posterior mean latent() reports

    def __init__(self, adata: ad.AnnData | list[ad.AnnData], **config: Any) -> None:
        likelihood = config.get("likelihood")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        check_sizes(**{key: config[key] for key in _SIZE_KEYS if key in config})
        # Paths (alone or in a list) are opened with their counts on disk.
        self.adata = streaming.opened(adata, config.get("layer"))
        self.config = config
        self.data: CountData = self._validated(self.adata, labels_key=config.get("labels_key"))
        self._params: dict | None = None
        self._split: tuple[np.ndarray, np.ndarray] | None = None
        self._pair: tuple[Callable, Callable, nn.Module] | None = None
        self.device = torch.device("cpu")
        self.train_result: TrainResult | None = None

    def _validated(
        self,
        adata: ad.AnnData,
        labels_key: str | None = None,
        covariate_categories: dict[str, list[str]] | None = None,
    ) -> CountData:
        """``adata``'s counts and covariates, validated with this model's settings."""
        return from_anndata(
            adata,
            layer=self.config.get("layer"),
            batch_key=self.config.get("batch_key"),
            labels_key=labels_key,
            categorical_covariate_keys=self.config.get("categorical_covariate_keys") or (),
            covariate_categories=covariate_categories,
            continuous_covariate_keys=self.config.get("continuous_covariate_keys") or (),
        )

    # -- what a subclass provides ----------------------------------------------------------

    def _build(self) -> tuple[Callable, Callable, nn.Module]:
        """Networks sized from ``self.data`` and the model and guide bound to them."""
        raise NotImplementedError

    def _before_build(self, seed: int, batch_size: int, lr: float) -> None:
        """What a fit computes from its training cells (``self._split[0]``) before the networks
        are built; nothing by default (the GMVAE's warm start)."""

    def _start_state(self) -> dict | None:
        """Called by :meth:`fit` after :meth:`_build`: set the networks to the state training
        starts from and return the Pyro parameter-store state it starts from. By default the
        networks as built and no parameters (each is created at its initial value); a query
        (:mod:`pyrosc.api.query`) starts from the reference's."""
        return None

    def _frozen(self) -> Frozen | None:
        """What a fit leaves frozen (:class:`pyrosc.freezing.Frozen`); nothing by default."""
        return None

    # -- fitting ---------------------------------------------------------------------------

    def fit(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        validation_fraction: float = 0.1,
        early_stopping: bool = False,
        seed: int = 0,
        device: str = "auto",
        progress: bool = True,
        split: tuple[np.ndarray, np.ndarray] | None = None,
        strategy: str | None = None,
        devices: int | None = None,
        accelerator: str | None = None,
        num_nodes: int | None = None,
        **train_options: Any,
    ) -> PyroscModel:
        """Fit the model by SVI (see :func:`pyrosc.train.train` for every option, e.g.
        ``kl_warmup_epochs``, ``free_bits``, ``patience``, ``shuffle``).

        The train/validation split is drawn once, here (from ``validation_fraction`` and
        ``seed``, or given as ``split``), and everything the fit computes from data (the
        GMVAE's warm start, the scVI library prior, the training steps) sees only its training
        cells. With ``validation_fraction=0`` every cell trains (the benchmark setting).
        Refitting starts again from fresh networks and parameters (a query mapped onto a
        reference: from the reference's, see :meth:`load_query_data`).

        Several processes (PyTorch Lightning DDP, the optional extra ``pyrosc[distributed]``;
        see :mod:`pyrosc.distributed`): ``strategy="ddp"`` with ``devices`` processes per node
        (``accelerator="cpu"`` or ``"gpu"``, ``num_nodes``); ``batch_size`` is then per
        process. Without a ``strategy`` the fit runs in this process on ``device``.

        Args:
            max_epochs: passes over the training cells; None (the default) chooses from the
                number of cells, as scvi-tools does: ``min(400, round(20000 / cells * 400))``,
                at least 1 (:func:`pyrosc.train.default_epochs`); the progress bar and
                ``self.train_result.max_epochs_reason`` say how many and why.
            split: ``(train_index, validation_index)``, cell positions, instead of a drawn
                split.
            strategy, devices, accelerator, num_nodes: training on several processes (see
                :func:`pyrosc.distributed.train`).

        Returns:
            self, fitted; the history is in ``self.history``.
        """
        fit_pair, placement = distributed.trainer_for(
            strategy, devices, accelerator, num_nodes, device
        )
        self.device = placement.get("device", torch.device("cpu"))
        self._placement = placement
        self._split = self._draw_split(validation_fraction, seed, split)
        self._before_build(seed, batch_size=batch_size, lr=lr)
        pyro.set_rng_seed(seed)  # the networks' initial weights depend on the seed too
        self._pair = self._build()
        model, guide, networks = self._pair
        with pyro.get_param_store().scope(self._start_state()) as params:
            self.train_result = fit_pair(
                model,
                guide,
                self.data,
                networks=networks,
                max_epochs=max_epochs,
                batch_size=batch_size,
                lr=lr,
                split=self._split,
                early_stopping=early_stopping,
                seed=seed,
                progress=progress,
                frozen=self._frozen(),
                **placement,
                **train_options,
            )
        self._params = params
        if strategy is not None:  # where the fitted networks are (rank 0's, back on the CPU)
            self.device = next(networks.parameters()).device
        return self

    def _draw_split(
        self,
        validation_fraction: float,
        seed: int,
        split: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The fit's one train/validation split of cell positions."""
        if split is None:
            return split_cells(self.data.n_cells, validation_fraction, seed)
        train_index, validation_index = (np.asarray(part, dtype=np.int64) for part in split)
        both = np.concatenate([train_index, validation_index])
        if len(np.unique(both)) != len(both) or (len(both) and both.min() < 0):
            raise ValueError("split must hold distinct, non-negative cell positions")
        if len(both) and both.max() >= self.data.n_cells:
            raise ValueError(f"split holds positions beyond the {self.data.n_cells} cells")
        return train_index, validation_index

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch training history (see :class:`pyrosc.train.TrainResult`)."""
        if self.train_result is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call .fit() first")
        return self.train_result.history

    @contextmanager
    def _scope(self) -> Iterator[tuple[Callable, Callable, nn.Module]]:
        """This model's parameters, loaded into Pyro's (global) parameter store."""
        if self._pair is None or self._params is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call .fit() first")
        with pyro.get_param_store().scope(self._params):
            yield self._pair

    # -- results ---------------------------------------------------------------------------

    def _adata(self, adata: ad.AnnData | list | None) -> ad.AnnData | list[ad.AnnData]:
        """``adata`` (opened, if paths), or the training AnnData when None: where results
        about it are written (:mod:`pyrosc.api.results`)."""
        return self.adata if adata is None else streaming.opened(adata, self.config.get("layer"))

    def _data_for(self, adata: ad.AnnData | list | None) -> CountData:
        """The validated counts of ``adata`` (the training AnnData when None)."""
        if adata is None or adata is self.adata:
            return self.data
        adata = streaming.opened(adata, self.config.get("layer"))
        var_names = streaming.var_names_of(adata)
        if list(var_names) != list(self.data.var_names):
            raise ValueError(
                f"adata has {len(var_names)} genes that are not the {self.data.n_genes} genes "
                "the model was set up with, in the same order; subset it with "
                "adata[:, model.data.var_names]"
            )
        return self._validated(adata, covariate_categories=self.data.covariate_categories)

    def _call(self, function: Callable, adata: ad.AnnData | None, *args: Any, **kwargs: Any) -> Any:
        """``function(model, guide, data, *args, networks=, device=, **kwargs)`` on the
        validated cells of ``adata`` (the training AnnData when None), in this model's
        parameter scope: how every question below reaches :mod:`pyrosc.evaluate` and
        :mod:`pyrosc.predictive`."""
        data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return function(
                model, guide, data, *args, networks=networks, device=self.device, **kwargs
            )

    def latent(
        self,
        adata: ad.AnnData | list | None = None,
        batch_size: int = 1024,
        out: str | os.PathLike | None = None,
    ) -> np.ndarray:
        """Posterior mean of each cell's latent ``z`` under the guide, computed ``batch_size``
        cells at a time (read from disk block by block when the counts are on disk).

        Also written to ``adata.obsm["X_pyrosc"]`` (for a list of AnnData, each its own
        cells' rows), so ``sc.pp.neighbors(adata, use_rep="X_pyrosc")`` works at once. With
        ``out``, written to that new ``.npy`` file instead, chunk by chunk, and nowhere else:
        memory does not grow with the number of cells.

        Args:
            adata: cells to embed, with the training genes (default: the training AnnData).
            batch_size: cells per pass.
            out: path of a new ``.npy`` file (an existing file is an error: results never
                overwrite a file); rows in the order of the cells (files stacked in order).

        Returns:
            ``(cells, n_latent)`` float32 array; with ``out``, the file memory-mapped read-only
            (``np.load(out, mmap_mode="r")``).
        """
        data = self._data_for(adata)
        if out is not None:
            file = results.LatentFile(out, data.n_cells)
            # closing: an error while writing leaves this model's parameter scope at once.
            with closing(self._latent_chunks(data, batch_size)) as chunks:
                for chunk in chunks:
                    file.append(chunk)
            return file.close()
        latent = self._latent(data, batch_size)
        results.store_obsm(self._adata(adata), _LATENT_KEY, latent)
        return latent

    def _latent(self, data: CountData, batch_size: int = 1024) -> np.ndarray:
        """:meth:`latent` of validated counts, written nowhere: ``(cells, n_latent)``."""
        return np.concatenate(list(self._latent_chunks(data, batch_size)))

    def _latent_chunks(self, data: CountData, batch_size: int) -> Iterator[np.ndarray]:
        """:meth:`latent` of ``batch_size`` consecutive cells at a time, ``(chunk, n_latent)``."""
        with torch.no_grad(), self._scope() as (_, guide, networks), traces.eval_mode(networks):
            for start in range(0, data.n_cells, batch_size):
                index = np.arange(start, min(start + batch_size, data.n_cells))
                minibatch = data.minibatch(index, self.device)
                yield evaluate.posterior_mean(guide, minibatch, self._latent_site).cpu().numpy()

    def log_likelihood(self, adata: ad.AnnData | None = None, n_samples: int = 200) -> np.ndarray:
        """Importance-sampled ``log p(x)`` of each cell (:func:`pyrosc.evaluate.log_likelihood`).

        Args:
            adata: cells to score, e.g. held-out cells (default: the training AnnData).
            n_samples: importance samples K per cell.

        Returns:
            ``(cells,)`` float64 log-likelihoods in nats.
        """
        return self._call(evaluate.log_likelihood, adata, n_samples)

    def elbo(self, adata: ad.AnnData | None = None, n_samples: int = 1) -> np.ndarray:
        """Per-cell ELBO (see :func:`pyrosc.evaluate.elbo`); ``(cells,)`` float64."""
        return self._call(evaluate.elbo, adata, n_samples)

    # -- asking the model (pyrosc.predictive) ---------------------------------------------
    # A model without batches decodes every cell as it is; BatchModel (batches.py) adds the
    # batch arguments: simulate in a batch, decode in another.

    def simulate(
        self, n_cells: int, library: float | np.ndarray | None = None, seed: int = 0
    ) -> ad.AnnData:
        """New cells from the generative model with its fitted parameters
        (:func:`pyrosc.predictive.simulate`).

        Each cell's library size comes from a training cell drawn at random; a latent library
        is drawn from its prior.

        Args:
            n_cells: how many cells.
            library: a library size for every cell (a number or ``(n_cells,)``); None: the
                templates' (or, for a latent library, its prior).
            seed: seeds the simulation (the global random state is left as it was).

        Returns:
            AnnData ``(n_cells, genes)``: integer counts in ``X`` (CSR), covariates and
            ``library`` in obs, latents in obs (``y``) and obsm (``z``).
        """
        return self._simulate(n_cells, {}, library, seed)

    def _simulate(
        self, n_cells: int, covariates: dict, library: float | np.ndarray | None, seed: int
    ) -> ad.AnnData:
        """:meth:`simulate` with ``covariates`` (obs column -> category) set in every cell."""
        # Not through _call: simulation reads no guide, and its templates are the training cells.
        with self._scope() as (model, _, networks):
            return predictive.simulate(
                model,
                n_cells,
                data=self.data,
                covariates=covariates,
                library=library,
                seed=seed,
                networks=networks,
                device=self.device,
            )

    def posterior_predictive(
        self, adata: ad.AnnData | None = None, n_samples: int = 1, seed: int = 0
    ) -> ad.AnnData:
        """Replicated counts of the cells of ``adata``: latents from the posterior, counts from
        the model (:func:`pyrosc.predictive.posterior_predictive`).

        Args:
            adata: the cells, with the training genes (default: the training AnnData).
            n_samples: replicates per cell.
            seed: seeds the draws (the global random state is left as it was).

        Returns:
            AnnData of ``n_samples * cells`` rows (replicate ``r`` of cell ``i`` in row
            ``r * cells + i``; obs ``cell`` and ``replicate``), integer counts in ``X``.
        """
        return self._call(predictive.posterior_predictive, adata, n_samples, seed=seed)

    def counterfactual(
        self,
        adata: ad.AnnData | None = None,
        n_samples: int = 1,
        library_size: float | str = 1e4,
        seed: int = 0,
    ) -> ad.AnnData:
        """Each cell's counts decoded from its posterior latents, with the normalised
        expression beside them (:func:`pyrosc.predictive.counterfactual`). A model without
        batches has no other setting to decode in: this is :meth:`posterior_predictive` with
        ``layers["normalized"]``.

        Args:
            adata: the cells, with the training genes (default: the training AnnData).
            n_samples: posterior draws per cell.
            library_size: ``l'`` of ``layers["normalized"]`` (``l' rho``), or ``"latent"``.
            seed: seeds the draws; with the same seed, gives :meth:`posterior_predictive`'s
                counts exactly.

        Returns:
            the AnnData of :meth:`posterior_predictive` with the normalised expression in
            ``layers["normalized"]``.
        """
        return self._call(
            predictive.counterfactual,
            adata,
            {},
            n_samples,
            library_size=library_size,
            seed=seed,
        )

    def predictive_check(
        self, adata: ad.AnnData | None = None, n_samples: int = 100, seed: int = 0
    ) -> predictive_checks.PredictiveCheck:
        """Posterior predictive checks: each gene's mean, variance and fraction of zeros and
        each cell's library size and coefficient of variation against their distribution over
        ``n_samples`` replicated datasets (:func:`pyrosc.predictive_checks.predictive_check`).

        Returns:
            a :class:`pyrosc.predictive_checks.PredictiveCheck`: ``.genes``, ``.cells``,
            ``.summary`` (the share of each statistic inside its replicated 95% interval) and
            ``.plot()``.
        """
        return self._call(predictive_checks.predictive_check, adata, n_samples, seed=seed)

    def cell_scores(
        self,
        adata: ad.AnnData | list | None = None,
        n_samples: int = 200,
        per_gene: bool = False,
        seed: int = 0,
        out: str | os.PathLike | None = None,
        chunk_cells: int = 4096,
    ) -> pd.DataFrame | Path:
        """How plausible the model finds each cell: the importance-sampled ``log p(x)`` of
        :meth:`log_likelihood`, to flag low-quality cells or doublets
        (:func:`pyrosc.evaluate.cell_scores`).

        Also written to ``adata.obs["pyrosc_log_likelihood"]``; with ``out``, written to that
        new CSV file instead, ``chunk_cells`` cells at a time, and nowhere else (the table
        with ``per_gene`` is cells x genes: it need not fit in memory).

        Args:
            adata: the cells, with the training genes (default: the training AnnData).
            n_samples: importance samples K per cell.
            per_gene: add one column per gene: its posterior-mean log-likelihood
                ``E_q[log p(x_g | z)]``.
            seed: seeds the draws (the global random state is left as it was). With ``out``,
                chunk ``k`` is seeded with ``seed + k``: one chunk gives the table of a call
                without ``out`` exactly; several, other draws of the same estimates.
            out: path of a new ``.csv`` file (an existing file is an error).
            chunk_cells: cells scored and written at a time (with ``out``).

        Returns:
            DataFrame indexed by obs_names: ``log_likelihood`` (nats) [and one column per gene];
            with ``out``, the path of the file written, holding the same table.
        """
        if out is None:
            scores = self._call(
                evaluate.cell_scores, adata, n_samples, per_gene=per_gene, seed=seed
            )
            results.store_obs(
                self._adata(adata), _LOG_LIKELIHOOD_KEY, scores["log_likelihood"].to_numpy()
            )
            return scores
        path = results.new_file(out, ".csv")
        data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            options = {"per_gene": per_gene, "networks": networks, "device": self.device}
            for number, start in enumerate(range(0, data.n_cells, chunk_cells)):
                part = data.subset(np.arange(start, min(start + chunk_cells, data.n_cells)))
                table = evaluate.cell_scores(
                    model, guide, part, n_samples, seed=seed + number, **options
                )
                table.to_csv(path, mode="a", header=number == 0)
        return path

    def normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Posterior mean of each cell's expected expression ``l' rho``, as scvi-tools'
        ``get_normalized_expression`` (:func:`pyrosc.predictive.normalized_expression`).

        ``rho`` is decoded from the posterior (``n_samples`` draws, averaged), read from the
        model's ``proportions`` site.

        Args:
            adata: cells to decode, with the training genes (default: the training AnnData).
            library_size: ``l'``, a positive number (1: proportions; 1e4: counts per 10k), or
                ``"latent"``: each cell's library (its total count, or draws of the latent
                library from ``q(l | x)``).
            n_samples: draws from the posterior per cell.
            batch_size: cells per pass.

        Returns:
            ``(cells, genes)`` float32 array.

        Raises:
            ValueError: a bad library_size or n_samples.
        """
        return self._call(
            predictive.normalized_expression,
            adata,
            None,
            library_size,
            n_samples,
            batch_size=batch_size,
        )

    # -- persistence (persistence.py) -----------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to the directory ``path`` (created if needed).

        Files: ``config.json`` (class, settings, genes, covariate categories), ``model.pt``
        (tensors only: network weights and Pyro parameters) and ``history.csv``.
        """
        return persistence.save(self, path)

    @classmethod
    def load(cls, path: str | Path, adata: ad.AnnData, device: str = "cpu") -> PyroscModel:
        """Load a model written by :meth:`save`, set up on ``adata`` (same genes).

        Only tensors are read (``torch.load(weights_only=True)``): no arbitrary object is ever
        unpickled.
        """
        return persistence.load(cls, path, adata, device)
