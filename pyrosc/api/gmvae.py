"""The notebook class of the Gaussian-mixture VAE (:func:`pyrosc.models.gmvae_model`): clusters
next to the latent, its warm start, and the cluster posterior."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn

from pyrosc import evaluate
from pyrosc.api import results
from pyrosc.api.base import PyroscModel
from pyrosc.api.vae import VAE
from pyrosc.guides import gmvae_marginal_guide, gmvae_scvae_guide
from pyrosc.likelihoods import uses_gate
from pyrosc.models import gmvae_model
from pyrosc.models.gmvae import MIXTURE_WEIGHTS
from pyrosc.nets import Classifier, CountDecoder, GaussianEncoder

GMVAE_GUIDES = ("marginal", "scvae")
_CLUSTER_PROBS_KEY = "pyrosc_cluster_probs"
_CLUSTER_KEY = "pyrosc_cluster"


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
        max_epochs: int | None = None,
        *,
        init: str = "kmeans",
        init_epochs: int | None = None,
        seed: int = 0,
        **fit_options: Any,
    ) -> GMVAE:
        """Fit by SVI with ``TraceEnum_ELBO`` (see :meth:`PyroscModel.fit` for the options).

        Args:
            max_epochs: epochs of the GMVAE itself; None (the default) chooses from the
                number of cells, as :meth:`PyroscModel.fit`.
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
        # On the processes of the GMVAE's fit (self._placement: device, or strategy, devices...)
        vae.fit(max_epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, split=no_validation,
                progress=False, **self._placement)  # fmt: skip
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
        probs = self._call(evaluate.discrete_posterior, adata, "y")
        results.store_obsm(self._adata(adata), _CLUSTER_PROBS_KEY, probs)
        return probs

    def clusters(self, adata: ad.AnnData | None = None) -> np.ndarray:
        """Most probable cluster of each cell, ``argmax_y p(y | x)``: ``(cells,)`` int64.

        Also written to ``adata.obs["pyrosc_cluster"]`` (categorical) and, via
        :meth:`cluster_probabilities`, ``adata.obsm["pyrosc_cluster_probs"]``.
        """
        adata = self._adata(adata)
        labels = self.cluster_probabilities(adata).argmax(axis=1)
        names = pd.Categorical(
            labels.astype(str), categories=[str(i) for i in range(self.config["n_clusters"])]
        )
        results.store_obs(adata, _CLUSTER_KEY, names)
        return labels
