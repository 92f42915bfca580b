"""Notebook-facing classes: build a model from an AnnData, fit it, and put results where scanpy
users look for them (``adata.obsm["X_pyrosc"]``).

Each class is a thin wrapper: it validates the data, builds the networks, binds them to the
model and guide functions of :mod:`pyrosc.models` and :mod:`pyrosc.guides`, and hands the pair
to :func:`pyrosc.train.train` and :mod:`pyrosc.evaluate`. Every fitted object owns its Pyro
parameters (a private parameter-store scope), so models fitted in one session never interfere.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from torch import nn

from pyrosc import evaluate, predictive, predictive_checks, traces
from pyrosc.data import CountData, from_anndata, split_cells
from pyrosc.guides import gmvae_marginal_guide, gmvae_scvae_guide, scvi_guide, vae_guide
from pyrosc.likelihoods import LIKELIHOODS, uses_dispersion, uses_gate
from pyrosc.models import gmvae_model, scvi_model, vae_model
from pyrosc.models.gmvae import MIXTURE_WEIGHTS
from pyrosc.models.scvi import DISPERSIONS, LibraryPrior
from pyrosc.nets import Classifier, CountDecoder, GaussianEncoder, ScviDecoder, check_sizes
from pyrosc.train import TrainResult, free_parameter_names, resolve_device, train

GMVAE_GUIDES = ("marginal", "scvae")
_LATENT_KEY = "X_pyrosc"
_CLUSTER_PROBS_KEY = "pyrosc_cluster_probs"
_CLUSTER_KEY = "pyrosc_cluster"
_LOG_LIKELIHOOD_KEY = "pyrosc_log_likelihood"
_SAVE_FORMAT = 1
_SIZE_KEYS = ("n_latent", "n_hidden", "n_layers", "dropout")


class PyroscModel:
    """Shared machinery of the model classes; subclasses define :meth:`_build`.

    Attributes:
        adata: the AnnData the model was set up with (results are written to it).
        data: its validated counts.
        history: per-epoch training history (a DataFrame) after :meth:`fit`.
    """

    #: the constructor arguments that define the model (saved with it).
    _config_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, adata: ad.AnnData, **config: Any) -> None:
        likelihood = config.get("likelihood")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        check_sizes(**{key: config[key] for key in _SIZE_KEYS if key in config})
        self.adata = adata
        self.config = config
        self.data: CountData = self._validated(adata, labels_key=config.get("labels_key"))
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

    # -- fitting ---------------------------------------------------------------------------

    def fit(
        self,
        max_epochs: int = 400,
        batch_size: int = 128,
        lr: float = 1e-3,
        validation_fraction: float = 0.1,
        early_stopping: bool = False,
        seed: int = 0,
        device: str = "auto",
        progress: bool = True,
        split: tuple[np.ndarray, np.ndarray] | None = None,
        **train_options: Any,
    ) -> PyroscModel:
        """Fit the model by SVI (see :func:`pyrosc.train.train` for every option, e.g.
        ``kl_warmup_epochs``, ``free_bits``, ``patience``).

        The train/validation split is drawn once, here (from ``validation_fraction`` and
        ``seed``, or given as ``split``), and everything the fit computes from data (the
        GMVAE's warm start, the scVI library prior, the training steps) sees only its training
        cells. With ``validation_fraction=0`` every cell trains (the benchmark setting).
        Refitting starts again from fresh networks and parameters.

        Args:
            split: ``(train_index, validation_index)``, cell positions, instead of a drawn
                split.

        Returns:
            self, fitted; the history is in ``self.history``.
        """
        self.device = resolve_device(device)
        self._split = self._draw_split(validation_fraction, seed, split)
        self._before_build(seed, batch_size=batch_size, lr=lr)
        pyro.set_rng_seed(seed)  # the networks' initial weights depend on the seed too
        self._pair = self._build()
        model, guide, networks = self._pair
        with pyro.get_param_store().scope() as params:
            self.train_result = train(
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
                device=self.device,
                progress=progress,
                **train_options,
            )
        self._params = params
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
        return self._fitted_result().history

    def _fitted_result(self) -> TrainResult:
        if self.train_result is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call .fit() first")
        return self.train_result

    @contextmanager
    def _scope(self) -> Iterator[tuple[Callable, Callable, nn.Module]]:
        """This model's parameters, loaded into Pyro's (global) parameter store."""
        if self._pair is None or self._params is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call .fit() first")
        with pyro.get_param_store().scope(self._params):
            yield self._pair

    # -- results ---------------------------------------------------------------------------

    def _data_for(self, adata: ad.AnnData | None) -> tuple[ad.AnnData, CountData]:
        """The validated counts of ``adata`` (the training AnnData when None)."""
        if adata is None or adata is self.adata:
            return self.adata, self.data
        if list(adata.var_names) != list(self.data.var_names):
            raise ValueError(
                f"adata has {adata.n_vars} genes that are not the {self.data.n_genes} genes the "
                "model was set up with, in the same order; subset it with "
                "adata[:, model.data.var_names]"
            )
        return adata, self._validated(adata, covariate_categories=self.data.covariate_categories)

    @torch.no_grad()
    def latent(self, adata: ad.AnnData | None = None, batch_size: int = 1024) -> np.ndarray:
        """Posterior mean of each cell's latent ``z`` under the guide.

        Also written to ``adata.obsm["X_pyrosc"]``, so ``sc.pp.neighbors(adata,
        use_rep="X_pyrosc")`` works at once.

        Args:
            adata: cells to embed, with the training genes (default: the training AnnData).
            batch_size: cells per pass.

        Returns:
            ``(cells, n_latent)`` float32 array.
        """
        adata, data = self._data_for(adata)
        latent = self._latent(data, batch_size)
        adata.obsm[_LATENT_KEY] = latent
        return latent

    @torch.no_grad()
    def _latent(self, data: CountData, batch_size: int = 1024) -> np.ndarray:
        """:meth:`latent` of validated counts, written nowhere: ``(cells, n_latent)``."""
        chunks = []
        with self._scope() as (_, guide, networks), traces.eval_mode(networks):
            for start in range(0, data.n_cells, batch_size):
                index = np.arange(start, min(start + batch_size, data.n_cells))
                minibatch = data.minibatch(index, self.device)
                chunks.append(evaluate.posterior_mean(guide, minibatch, "z").cpu())
        return torch.cat(chunks).numpy()

    def log_likelihood(self, adata: ad.AnnData | None = None, n_samples: int = 200) -> np.ndarray:
        """Importance-sampled ``log p(x)`` of each cell (:func:`pyrosc.evaluate.log_likelihood`).

        Args:
            adata: cells to score, e.g. held-out cells (default: the training AnnData).
            n_samples: importance samples K per cell.

        Returns:
            ``(cells,)`` float64 log-likelihoods in nats.
        """
        _, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return evaluate.log_likelihood(
                model, guide, data, n_samples, networks=networks, device=self.device
            )

    def elbo(self, adata: ad.AnnData | None = None, n_samples: int = 1) -> np.ndarray:
        """Per-cell ELBO (see :func:`pyrosc.evaluate.elbo`); ``(cells,)`` float64."""
        _, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return evaluate.elbo(
                model, guide, data, n_samples, networks=networks, device=self.device
            )

    # -- asking the model (pyrosc.predictive) ---------------------------------------------

    def _covariates(self, batch: str | None, covariates: Mapping[str, str] | None) -> dict:
        """``batch`` and the other ``covariates`` as one obs column -> category mapping."""
        named = dict(covariates or {})
        if batch is not None:
            key = self.config.get("batch_key")
            if key is None:
                raise ValueError(
                    f"batch={batch!r} needs a model with a batch_key; this "
                    f"{type(self).__name__} has none"
                )
            named[key] = batch
        return named

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
            batch: the batch of every cell (a model with a batch_key); None: as the templates.
            covariates: other categorical covariates, obs column -> category.
            library: a library size for every cell (a number or ``(n_cells,)``); None: the
                templates' (or, for a latent library, its prior).
            seed: seeds the simulation (the global random state is left as it was).

        Returns:
            AnnData ``(n_cells, genes)``: integer counts in ``X`` (CSR), covariates and
            ``library`` in obs, latents in obs (``y``) and obsm (``z``).
        """
        named = self._covariates(batch, covariates)
        with self._scope() as (model, _, networks):
            return predictive.simulate(
                model,
                n_cells,
                data=self.data,
                covariates=named,
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
        _, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return predictive.posterior_predictive(
                model, guide, data, n_samples, seed=seed, networks=networks, device=self.device
            )

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
        named = self._covariates(batch, covariates)
        _, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return predictive.counterfactual(
                model,
                guide,
                data,
                named,
                n_samples,
                library_size=library_size,
                seed=seed,
                networks=networks,
                device=self.device,
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
        _, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return predictive_checks.predictive_check(
                model, guide, data, n_samples, seed=seed, networks=networks, device=self.device
            )

    def cell_scores(
        self,
        adata: ad.AnnData | None = None,
        n_samples: int = 200,
        per_gene: bool = False,
        seed: int = 0,
    ) -> pd.DataFrame:
        """How plausible the model finds each cell: the importance-sampled ``log p(x)`` of
        :meth:`log_likelihood`, to flag low-quality cells or doublets
        (:func:`pyrosc.evaluate.cell_scores`).

        Also written to ``adata.obs["pyrosc_log_likelihood"]``.

        Args:
            adata: the cells, with the training genes (default: the training AnnData).
            n_samples: importance samples K per cell.
            per_gene: add one column per gene: its posterior-mean log-likelihood
                ``E_q[log p(x_g | z)]``.
            seed: seeds the draws (the global random state is left as it was).

        Returns:
            DataFrame indexed by obs_names: ``log_likelihood`` (nats) [and one column per gene].
        """
        adata, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            scores = evaluate.cell_scores(
                model,
                guide,
                data,
                n_samples,
                per_gene=per_gene,
                seed=seed,
                networks=networks,
                device=self.device,
            )
        adata.obs[_LOG_LIKELIHOOD_KEY] = scores["log_likelihood"].to_numpy()
        return scores

    def _transform_batches(self, transform_batch: str | Sequence[str]) -> list[dict[str, str]]:
        """One covariate setting per batch name in ``transform_batch`` (one name or several)."""
        key = self.config.get("batch_key")
        if key is None:
            raise ValueError("transform_batch needs a model with a batch_key; this one has none")
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
        _, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            return predictive.normalized_expression(
                model,
                guide,
                data,
                settings,
                library_size,
                n_samples,
                networks=networks,
                batch_size=batch_size,
                device=self.device,
            )

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to the directory ``path`` (created if needed).

        Files: ``config.json`` (class, settings, genes, covariate categories), ``model.pt``
        (tensors only: network weights and Pyro parameters) and ``history.csv``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self._scope() as (_, _, networks):
            store = pyro.get_param_store()  # module weights are saved with their module
            params = {name: store[name].detach().cpu() for name in free_parameter_names(networks)}
        tensors = {
            "networks": {k: v.cpu() for k, v in networks.state_dict().items()},
            "params": params,
        }
        torch.save(tensors, path / "model.pt")
        meta = {
            "format": _SAVE_FORMAT,
            "class": type(self).__name__,
            "config": self.config,
            "var_names": list(map(str, self.data.var_names)),
            "covariate_categories": self.data.covariate_categories,
        }
        (path / "config.json").write_text(json.dumps(meta, indent=2))
        self.history.to_csv(path / "history.csv", index=False)
        return path

    @classmethod
    def load(cls, path: str | Path, adata: ad.AnnData, device: str = "cpu") -> PyroscModel:
        """Load a model written by :meth:`save`, set up on ``adata`` (same genes).

        Only tensors are read (``torch.load(weights_only=True)``): no arbitrary object is ever
        unpickled.
        """
        path = Path(path)
        meta = json.loads((path / "config.json").read_text())
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{path} holds a {meta.get('class')}, not a {cls.__name__}")
        if [str(v) for v in adata.var_names] != meta["var_names"]:
            raise ValueError(
                f"adata's genes differ from the {len(meta['var_names'])} genes the model was "
                "trained on; subset it to the saved var_names, in order"
            )
        self = cls(adata, **meta["config"])
        if self.data.covariate_categories != meta["covariate_categories"]:
            # Codes must mean what they meant in training (adata may hold fewer categories).
            self.data = self._validated(
                adata, self.config.get("labels_key"), meta["covariate_categories"]
            )
        self.device = resolve_device(device)
        tensors = torch.load(path / "model.pt", map_location=self.device, weights_only=True)
        self._pair = self._build()
        model, guide, networks = self._pair
        networks.load_state_dict(tensors["networks"])
        networks.to(self.device).eval()
        with pyro.get_param_store().scope() as params:
            # Run the pair once so each parameter is created with its constraint, then set it.
            probe = self.data.minibatch(np.arange(min(2, self.data.n_cells)), self.device)
            with poutine.block(), torch.no_grad():
                traces.trace_pair(model, guide, {**probe, "n_cells": None})
            store = pyro.get_param_store()
            for name, value in tensors["params"].items():
                store[name] = value
        self._params = params
        history = pd.read_csv(path / "history.csv")
        self.train_result = TrainResult(
            history=history,
            train_index=np.array([], dtype=np.int64),
            validation_index=np.array([], dtype=np.int64),
            best_epoch=int(history["epoch"].iloc[-1]) if len(history) else 0,
        )
        return self


class VAE(PyroscModel):
    """The VAE for counts of scVAE: ``z ~ N(0, I)``, counts ``~ Likelihood(l softmax(f(z)))``.

    Args:
        adata: raw counts in ``adata.X`` or ``adata.layers[layer]``, cells x genes.
        likelihood: ``"poisson"``, ``"nb"``, ``"zip"`` or ``"zinb"``.
        layer: the layer holding counts (None: ``adata.X``).
        labels_key: obs column of cell labels (kept for scoring; not used in training).
        n_latent, n_hidden, n_layers, dropout: network sizes (scvi-tools' defaults).

    Example::

        m = pyrosc.VAE(adata, likelihood="nb").fit(max_epochs=400)
        sc.pp.neighbors(adata, use_rep="X_pyrosc")  # after m.latent()
    """

    def __init__(
        self,
        adata: ad.AnnData,
        likelihood: str = "nb",
        layer: str | None = None,
        labels_key: str | None = None,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(
            adata,
            likelihood=likelihood,
            layer=layer,
            labels_key=labels_key,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
        )

    def _build(self) -> tuple[Callable, Callable, nn.Module]:
        c, n_genes = self.config, self.data.n_genes
        encoder = GaussianEncoder(
            n_genes, c["n_latent"], c["n_hidden"], c["n_layers"], c["dropout"]
        )
        decoder = CountDecoder(
            c["n_latent"], n_genes, c["n_hidden"], c["n_layers"], gate=uses_gate(c["likelihood"])
        )
        model = partial(vae_model, decoder=decoder, likelihood=c["likelihood"])
        guide = partial(vae_guide, encoder=encoder)
        return model, guide, nn.ModuleDict({"encoder": encoder, "decoder": decoder})


class GMVAE(PyroscModel):
    """The Gaussian-mixture VAE of scVAE: unsupervised clusters next to the latent ``z``.

    ``y ~ Categorical(w)``, ``z | y ~ N(mu_y, sigma_y^2)``, counts as in :class:`VAE`; the
    cluster ``y`` is summed out exactly (``TraceEnum_ELBO``), never sampled.

    Args:
        adata: raw counts, cells x genes.
        n_clusters: K, the number of mixture components.
        likelihood: ``"poisson"``, ``"nb"``, ``"zip"`` or ``"zinb"``.
        guide: ``"scvae"`` (the default: q(y | x) q(z | x, y), scVAE's factorisation; y
            enumerated in the guide) or ``"marginal"`` (q(z | x); y enumerated in the model,
            cheaper: the decoder runs once, not K times). On the benchmark views the scVAE
            guide gave the better clusters and held-out likelihood (Zeisel, K = 7: ARI 0.722
            vs 0.640; PBMC 3k, K = 9: ARI 0.546 vs 0.515, log p(x) -654.4 vs -668.7;
            ``benchmarks/gmvae_clusters.py``), hence the default.
        mixture_weights: ``"uniform"`` or ``"learned"``.
        layer, labels_key, n_latent, n_hidden, n_layers, dropout: as :class:`VAE`.

    Mixture models have local optima. :meth:`fit` therefore starts, by default, from a short
    VAE fit (``init="kmeans"``): its decoder (and, for the marginal guide, its encoder) seed the
    GMVAE's networks, and k-means (K clusters, 10 restarts) of its latent seeds the component
    means.
    """

    def __init__(
        self,
        adata: ad.AnnData,
        n_clusters: int = 10,
        likelihood: str = "nb",
        guide: str = "scvae",
        mixture_weights: str = "uniform",
        layer: str | None = None,
        labels_key: str | None = None,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        if guide not in GMVAE_GUIDES:
            raise ValueError(f"guide must be one of {GMVAE_GUIDES}, got {guide!r}")
        if mixture_weights not in MIXTURE_WEIGHTS:
            raise ValueError(
                f"mixture_weights must be one of {MIXTURE_WEIGHTS}, got {mixture_weights!r}"
            )
        if not isinstance(n_clusters, int) or n_clusters < 2:
            raise ValueError(f"n_clusters must be an integer of at least 2, got {n_clusters!r}")
        super().__init__(
            adata,
            n_clusters=n_clusters,
            likelihood=likelihood,
            guide=guide,
            mixture_weights=mixture_weights,
            layer=layer,
            labels_key=labels_key,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
        )
        self._warm_start: tuple[np.ndarray, dict[str, dict]] | None = None
        self._init_epochs: int | None = None  # the next fit's warm start (None: init="random")

    def fit(
        self,
        max_epochs: int = 400,
        *,
        init: str = "kmeans",
        init_epochs: int | None = None,
        seed: int = 0,
        **fit_options: Any,
    ) -> GMVAE:
        """Fit by SVI with ``TraceEnum_ELBO`` (see :meth:`PyroscModel.fit` for the options).

        Args:
            max_epochs: epochs of the GMVAE itself.
            init: ``"kmeans"`` (a VAE warm start of ``init_epochs`` epochs, then k-means of its
                latent: see the class notes) or ``"random"`` (component means ~ N(0, I)).
            init_epochs: epochs of the warm-start VAE (``init="kmeans"`` only; default 50).
            seed: as :meth:`PyroscModel.fit`; also seeds the warm start and k-means.

        The warm start and k-means see the training cells only, never the validation cells.
        """
        if init not in ("kmeans", "random"):
            raise ValueError(f"init must be 'kmeans' or 'random', got {init!r}")
        if init_epochs is not None and init != "kmeans":
            raise ValueError("init_epochs is the warm start's: it applies to init='kmeans' only")
        self._init_epochs = None
        if init == "kmeans":
            self._init_epochs = 50 if init_epochs is None else init_epochs
        super().fit(max_epochs=max_epochs, seed=seed, **fit_options)
        return self

    def _before_build(self, seed: int, batch_size: int, lr: float) -> None:
        self._warm_start = None
        if self._init_epochs is not None:
            self._warm_start = self._vae_warm_start(self._init_epochs, seed, batch_size, lr)

    def _vae_warm_start(
        self, epochs: int, seed: int, batch_size: int, lr: float
    ) -> tuple[np.ndarray, dict[str, dict]]:
        """Fit a VAE of the same sizes to the fit's training cells; k-means centres of their
        latent and the VAE's network weights."""
        from sklearn.cluster import KMeans

        c, train_index = self.config, self._split[0]
        vae = VAE(self.adata, c["likelihood"], c["layer"], None, c["n_latent"], c["n_hidden"],
                  c["n_layers"], c["dropout"])  # fmt: skip
        no_validation = (train_index, np.zeros(0, dtype=np.int64))
        vae.fit(max_epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=self.device,
                split=no_validation, progress=False)  # fmt: skip
        # The user's adata keeps no trace of the warm start.
        latent = vae._latent(vae.data.subset(train_index))
        kmeans = KMeans(c["n_clusters"], n_init=10, random_state=seed).fit(latent)
        _, _, networks = vae._pair
        states = {name: module.state_dict() for name, module in networks.items()}
        return kmeans.cluster_centers_.astype(np.float32), states

    def _build(self) -> tuple[Callable, Callable, nn.Module]:
        c, n_genes = self.config, self.data.n_genes
        k, scvae = c["n_clusters"], c["guide"] == "scvae"
        encoder = GaussianEncoder(
            n_genes,
            c["n_latent"],
            c["n_hidden"],
            c["n_layers"],
            c["dropout"],
            covariate_sizes=(k,) if scvae else (),
        )
        decoder = CountDecoder(
            c["n_latent"], n_genes, c["n_hidden"], c["n_layers"], gate=uses_gate(c["likelihood"])
        )
        networks = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
        locs_init = torch.randn(k, c["n_latent"])
        if self._warm_start is not None:
            centers, states = self._warm_start
            locs_init = torch.from_numpy(centers)
            decoder.load_state_dict(states["decoder"])
            if not scvae:
                encoder.load_state_dict(states["encoder"])
        model = partial(
            gmvae_model,
            decoder=decoder,
            component_locs_init=locs_init,
            likelihood=c["likelihood"],
            mixture_weights=c["mixture_weights"],
        )
        if scvae:
            classifier = Classifier(n_genes, k, c["n_hidden"], c["n_layers"], c["dropout"])
            networks["classifier"] = classifier
            guide = partial(gmvae_scvae_guide, classifier=classifier, encoder=encoder)
        else:
            guide = partial(gmvae_marginal_guide, encoder=encoder)
        return model, guide, networks

    def cluster_probabilities(self, adata: ad.AnnData | None = None) -> np.ndarray:
        """Posterior cluster probabilities ``p(y | x)`` of each cell.

        For the scVAE guide, its ``q(y | x)``; for the marginal guide, ``p(y | z)`` at the
        posterior mean of ``z`` (see :func:`pyrosc.evaluate.discrete_posterior`). Also written
        to ``adata.obsm["pyrosc_cluster_probs"]``.

        Returns:
            ``(cells, n_clusters)`` float64; rows sum to one.
        """
        adata, data = self._data_for(adata)
        with self._scope() as (model, guide, networks):
            probs = evaluate.discrete_posterior(
                model, guide, data, "y", networks=networks, device=self.device
            )
        adata.obsm[_CLUSTER_PROBS_KEY] = probs
        return probs

    def clusters(self, adata: ad.AnnData | None = None) -> np.ndarray:
        """Most probable cluster of each cell, ``argmax_y p(y | x)``: ``(cells,)`` int64.

        Also written to ``adata.obs["pyrosc_cluster"]`` (categorical) and, via
        :meth:`cluster_probabilities`, ``adata.obsm["pyrosc_cluster_probs"]``.
        """
        adata = self.adata if adata is None else adata
        labels = self.cluster_probabilities(adata).argmax(axis=1)
        adata.obs[_CLUSTER_KEY] = pd.Categorical(
            labels.astype(str), categories=[str(i) for i in range(self.config["n_clusters"])]
        )
        return labels


SCVI_LIBRARIES = ("observed", "latent")


class SCVI(PyroscModel):
    """scVI (Lopez et al. 2018): a VAE whose decoder sees the batch and other covariates.

    ``z ~ N(0, I)``; counts ``~ Likelihood(l rho, theta, pi)`` with ``rho`` and ``pi`` decoded
    from ``z`` and the cell's covariates (one-hot, injected into every decoder layer), so that
    ``z`` is free of the batch. See :func:`pyrosc.models.scvi.scvi_model` for the math.

    Args:
        adata: raw counts in ``adata.X`` or ``adata.layers[layer]``, cells x genes.
        batch_key: obs column of the batch (the first covariate); None (the default) for a
            single batch.
        likelihood: ``"zinb"`` (scvi-tools' default), ``"nb"``, ``"poisson"`` or ``"zip"``.
        dispersion: the inverse dispersion of NB and ZINB: ``"gene"`` (one per gene; the
            default), ``"gene-batch"`` (one per gene and batch) or ``"gene-cell"`` (from the
            decoder). Poisson and ZIP have none: passing one with them is an error.
        library: ``"observed"`` (each cell's total count; the default, as scvi-tools 1.4.2's
            ``use_observed_lib_size=True``) or ``"latent"`` (a latent ``l`` with a lognormal
            prior per batch, fixed from the training cells, and an amortized ``q(l | x)``).
        layer: the layer holding counts (None: ``adata.X``).
        labels_key: obs column of cell labels (kept for scoring; not used in training).
        categorical_covariate_keys: further categorical obs columns the decoder sees.
        continuous_covariate_keys: numeric obs columns the decoder sees (e.g. percent
            mitochondrial counts, cell-cycle scores), appended to its input as in scvi-tools.
        encode_covariates: whether the encoders also see the covariates (scvi-tools' default:
            no, so ``q(z | x)`` cannot lean on the batch).
        n_latent, n_hidden, n_layers, dropout: network sizes (scvi-tools' defaults); the
            library encoder has one hidden layer, as scvi-tools'.

    Example::

        m = pyrosc.SCVI(adata, batch_key="batch").fit(max_epochs=400)
        m.latent()  # adata.obsm["X_pyrosc"], for sc.pp.neighbors(adata, use_rep="X_pyrosc")
        expression = m.normalized_expression(transform_batch="batch1", library_size=1e4)
    """

    def __init__(
        self,
        adata: ad.AnnData,
        batch_key: str | None = None,
        likelihood: str = "zinb",
        dispersion: str | None = None,
        library: str = "observed",
        layer: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        encode_covariates: bool = False,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        if likelihood in LIKELIHOODS and not uses_dispersion(likelihood) and dispersion:
            raise ValueError(
                f"dispersion={dispersion!r} does not apply to likelihood={likelihood!r}, which "
                "has no dispersion; leave dispersion unset, or use 'nb' or 'zinb'."
            )
        if likelihood in LIKELIHOODS and uses_dispersion(likelihood):
            dispersion = dispersion or "gene"
            if dispersion not in DISPERSIONS:
                raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}")
        if library not in SCVI_LIBRARIES:
            raise ValueError(f"library must be one of {SCVI_LIBRARIES}, got {library!r}")
        if batch_key is None and categorical_covariate_keys:
            # The batch is the first covariate (CountData's `batch`): without a batch_key it
            # would silently be the first of these.
            raise ValueError(
                "categorical_covariate_keys need a batch_key: the library prior and the "
                "gene-batch dispersion are per batch. Pass the batch column as batch_key."
            )
        if encode_covariates and batch_key is None and not continuous_covariate_keys:
            raise ValueError(
                "encode_covariates=True but there are no covariates to encode: pass a "
                "batch_key or continuous_covariate_keys, or leave encode_covariates off."
            )
        super().__init__(
            adata,
            batch_key=batch_key,
            likelihood=likelihood,
            dispersion=dispersion,
            library=library,
            layer=layer,
            labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            encode_covariates=encode_covariates,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
        )

    def _batch_names(self) -> list[str]:
        key = self.config["batch_key"]
        return ["all cells"] if key is None else self.data.covariate_categories[key]

    def _library_prior(self) -> LibraryPrior:
        """The prior of the latent library from the fit's training cells; at load (no split)
        a placeholder of the right shape, into which the saved prior is then loaded."""
        names, key = self._batch_names(), self.config["batch_key"]
        if self._split is None:
            return LibraryPrior(torch.zeros(len(names)), torch.ones(len(names)))
        cells = self._split[0]
        batch = np.zeros(len(cells), np.int64) if key is None else self.data.covariates[key][cells]
        return LibraryPrior.from_library(self.data.library[cells], batch, names)

    def _build(self) -> tuple[Callable, Callable, nn.Module]:
        c, data = self.config, self.data
        covariate_sizes = [len(data.covariate_categories[key]) for key in data.covariates]
        n_continuous = len(data.continuous_covariate_keys)
        encoded = covariate_sizes if c["encode_covariates"] else ()
        encoded_continuous = n_continuous if c["encode_covariates"] else 0
        sizes = (c["n_hidden"], c["n_layers"], c["dropout"])
        encoder = GaussianEncoder(
            data.n_genes,
            c["n_latent"],
            *sizes,
            covariate_sizes=encoded,
            n_continuous=encoded_continuous,
        )
        decoder = ScviDecoder(
            c["n_latent"],
            data.n_genes,
            c["n_hidden"],
            c["n_layers"],
            covariate_sizes=covariate_sizes,
            gate=uses_gate(c["likelihood"]),
            cell_dispersion=c["dispersion"] == "gene-cell",
            n_continuous=n_continuous,
        )
        networks = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
        library_prior = library_encoder = None
        if c["library"] == "latent":
            library_prior = self._library_prior()
            library_encoder = GaussianEncoder(
                data.n_genes,
                1,
                c["n_hidden"],
                1,
                c["dropout"],
                covariate_sizes=encoded,
                n_continuous=encoded_continuous,
            )
            # Start q(log l | x) at the prior: log library sizes are ~7-11, and from an output
            # near 0, Adam at lr 1e-3 needs thousands of steps just to get there (meanwhile the
            # decoder fits the wrong scale). The weights still learn each cell's deviation.
            with torch.no_grad():
                library_encoder.loc.bias.fill_(float(library_prior.loc.mean()))
                library_encoder.log_variance.bias.fill_(
                    float(library_prior.scale.square().mean().log())
                )
            networks.update({"library_encoder": library_encoder, "library_prior": library_prior})
        model = partial(
            scvi_model,
            decoder=decoder,
            library_prior=library_prior,
            likelihood=c["likelihood"],
            dispersion=c["dispersion"],
            n_batches=len(self._batch_names()),
        )
        guide = partial(scvi_guide, encoder=encoder, library_encoder=library_encoder)
        return model, guide, networks
