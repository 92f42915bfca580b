"""The notebook class of the VAE for counts (:func:`pyrosc.models.vae_model`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import anndata as ad
from torch import nn

from pyrosc.api.base import PyroscModel
from pyrosc.guides import vae_guide
from pyrosc.likelihoods import uses_gate
from pyrosc.models import vae_model
from pyrosc.nets import CountDecoder, GaussianEncoder


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
