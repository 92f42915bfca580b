"""The notebook class of scVI (:func:`pyrosc.models.scvi_model`): its options (dispersion,
library) and networks; what it answers about batches comes from :class:`BatchModel`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from torch import nn

from pyrosc.api.batches import BatchModel
from pyrosc.guides import scvi_guide
from pyrosc.likelihoods import LIKELIHOODS, uses_dispersion, uses_gate
from pyrosc.models import scvi_model
from pyrosc.models.scvi import DISPERSIONS, LibraryPrior
from pyrosc.nets import GaussianEncoder, LayerStyle, ScviDecoder

SCVI_LIBRARIES = ("observed", "latent")
#: Where a normalisation may be used, as scvi-tools' ``use_batch_norm`` and ``use_layer_norm``.
NORM_PLACES = ("both", "encoder", "decoder", "none")


class SCVI(BatchModel):
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
        batch_norm: where hidden layers use BatchNorm: ``"both"`` (encoders and decoder; the
            default, as scvi-tools'), ``"encoder"``, ``"decoder"`` or ``"none"``.
        layer_norm: where they use LayerNorm without affine weights (after BatchNorm where
            both are used): ``"none"`` (the default), ``"encoder"``, ``"decoder"`` or
            ``"both"``. The CELLxGENE Census scVI uses ``batch_norm="none",
            layer_norm="both"``.
        deeply_inject_covariates: the covariates enter every hidden layer (the default, as
            scvi-tools') or only the first.

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
        batch_norm: str = "both",
        layer_norm: str = "none",
        deeply_inject_covariates: bool = True,
    ) -> None:
        for name, value in (("batch_norm", batch_norm), ("layer_norm", layer_norm)):
            if value not in NORM_PLACES:
                raise ValueError(f"{name} must be one of {NORM_PLACES}, got {value!r}")
        if not isinstance(deeply_inject_covariates, bool):
            raise ValueError(
                f"deeply_inject_covariates must be True or False, got {deeply_inject_covariates!r}"
            )
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
            batch_norm=batch_norm,
            layer_norm=layer_norm,
            deeply_inject_covariates=deeply_inject_covariates,
        )

    @classmethod
    def from_scvi_tools(cls, path: str | Path, adata: ad.AnnData, device: str = "cpu") -> SCVI:
        """Open a model saved by scvi-tools' ``SCVI.save`` (its directory) as a fitted SCVI, set
        up on ``adata`` (the saved genes, in order; the saved batch and covariate columns).

        The file is read without running code from it (tensors, numpy arrays and plain values
        only; anything else is refused, named). Encoder, decoder, dispersion and library prior
        map onto this class's networks exactly, so ``latent()`` equals scvi-tools'
        ``get_latent_representation()``; every question of a fitted model works on it. A
        setting pyrosc cannot represent (a logistic-normal latent, batch embeddings, the
        "gene-label" dispersion, ...) is a ``ValueError`` naming it. See
        :func:`pyrosc.scvi_tools_io.open_scvi_tools`.
        """
        from pyrosc.scvi_tools_io import open_scvi_tools  # here: it imports pyrosc.api

        return open_scvi_tools(cls, path, adata, device)

    def to_scvi_tools(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write this fitted SCVI as a directory that scvi-tools' ``SCVI.load(path, adata)``
        reads (its ``model.pt``, as scvi-tools 1.4.2 saves it). The "zip" likelihood, which
        scvi-tools lacks, is a ``ValueError``. See
        :func:`pyrosc.scvi_tools_io.write_scvi_tools`."""
        from pyrosc.scvi_tools_io import write_scvi_tools

        return write_scvi_tools(self, path, overwrite)

    def _layer_style(self, part: str) -> LayerStyle:
        """The hidden layers of the ``part`` networks (``"encoder"``: the encoders of z and of
        the library; ``"decoder"``) under the settings ``batch_norm``, ``layer_norm`` and
        ``deeply_inject_covariates``."""
        c = self.config
        return LayerStyle(
            batch_norm=c["batch_norm"] in (part, "both"),
            layer_norm=c["layer_norm"] in (part, "both"),
            covariates_every_layer=c["deeply_inject_covariates"],
        )

    def _batch_names(self) -> list[str]:
        key = self.config["batch_key"]
        return ["all cells"] if key is None else self.data.covariate_categories[key]

    def _library_prior(self) -> LibraryPrior:
        """The prior of the latent library from the fit's training cells; at load (no split)
        and for a query (whose prior is the reference's, extended) a placeholder of the right
        shape, into which the prior is then loaded."""
        names, key = self._batch_names(), self.config["batch_key"]
        if self._split is None or self.is_query:
            return LibraryPrior(torch.zeros(len(names)), torch.ones(len(names)))
        cells = self._split[0]
        batch = np.zeros(len(cells), np.int64) if key is None else self.data.covariates[key][cells]
        return LibraryPrior.from_library(self.data.library[cells], batch, names)

    def _grow_for_query(self, networks: nn.ModuleDict, reference_sizes: dict[str, int]) -> None:
        """The latent library's prior for the query's new batches: the mean and spread of the
        log library sizes of their cells (:meth:`LibraryPrior.from_library`); the reference's
        batches keep theirs."""
        key = self.config["batch_key"]
        if self.config["library"] != "latent" or key is None:
            return
        n_reference, batch = reference_sizes[key], self.data.covariates[key]
        new = batch >= n_reference
        if not new.any():
            return
        reference_prior = networks["library_prior"]
        names = self._batch_names()[n_reference:]
        query_prior = LibraryPrior.from_library(
            self.data.library[new], batch[new] - n_reference, names
        ).to(reference_prior.loc.device)
        networks["library_prior"] = LibraryPrior(
            torch.cat([reference_prior.loc, query_prior.loc]),
            torch.cat([reference_prior.scale, query_prior.scale]),
        )

    def _networks(self) -> nn.ModuleDict:
        """scVI's networks sized from ``self.data``: ``encoder`` and ``decoder`` and, for a
        latent library, ``library_encoder`` and ``library_prior``."""
        c, data = self.config, self.data
        covariate_sizes = [len(data.covariate_categories[key]) for key in data.covariates]
        n_continuous = len(data.continuous_covariate_keys)
        encoded = covariate_sizes if c["encode_covariates"] else ()
        encoded_continuous = n_continuous if c["encode_covariates"] else 0
        sizes = (c["n_hidden"], c["n_layers"], c["dropout"])
        encoder_style = self._layer_style("encoder")
        encoder = GaussianEncoder(
            data.n_genes,
            c["n_latent"],
            *sizes,
            covariate_sizes=encoded,
            n_continuous=encoded_continuous,
            style=encoder_style,
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
            style=self._layer_style("decoder"),
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
                style=encoder_style,
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
        return networks

    def _build(self) -> tuple[Callable, Callable, nn.Module]:
        networks, c = self._networks(), self.config
        library_encoder, library_prior = library_networks(networks)
        model = partial(
            scvi_model,
            decoder=networks["decoder"],
            library_prior=library_prior,
            likelihood=c["likelihood"],
            dispersion=c["dispersion"],
            n_batches=len(self._batch_names()),
        )
        guide = partial(scvi_guide, encoder=networks["encoder"], library_encoder=library_encoder)
        return model, guide, networks


def library_networks(
    networks: nn.ModuleDict,
) -> tuple[GaussianEncoder | None, LibraryPrior | None]:
    """The encoder of ``q(l | x)`` and the library prior among scVI's ``networks``; both None
    when the library is observed."""
    if "library_prior" not in networks:
        return None, None
    return networks["library_encoder"], networks["library_prior"]
