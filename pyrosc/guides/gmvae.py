"""The two amortized guides of the GMVAE.

``gmvae_marginal_guide``: q(z | x) only. The cluster ``y`` is left to the model, where
``TraceEnum_ELBO`` sums it out of the prior exactly: the ELBO's prior term is then
``log sum_y w_y N(z; mu_y, sigma_y)``. This guide is the VAE's guide, unchanged.

``gmvae_scvae_guide``: scVAE's factorisation q(y | x) q(z | x, y), with ``y`` enumerated in the
guide: the ELBO is an exact, q(y | x)-weighted sum over the K clusters of the terms of each.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyrosc.guides.vae import vae_guide as gmvae_marginal_guide
from pyrosc.nets import Classifier, GaussianEncoder
from pyrosc.plates import cells_plate

__all__ = ["gmvae_marginal_guide", "gmvae_scvae_guide"]


def gmvae_scvae_guide(
    counts: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    classifier: Classifier,
    encoder: GaussianEncoder,
) -> None:
    """Variational posterior ``q(y | x) q(z | x, y)`` of the GMVAE::

        q(y_n | x_n)      = Categorical(softmax(g(log1p x_n)))
        q(z_n | x_n, y_n) = Normal(mu(log1p x_n, y_n), diag sigma(log1p x_n, y_n)^2)

    ``y`` is enumerated: it takes all K values at once, as a ``(K, 1)`` tensor on the left of
    the cells, so ``z`` has shape ``(K, batch, n_latent)``, one draw per cluster.

    Args:
        counts: ``(batch, genes)`` observed counts.
        cell_index: ``(batch,)`` positions of the cells in the dataset (the plate's indices).
        n_cells: size of the dataset the minibatch comes from (for minibatch scaling).
        classifier: ``(..., genes) -> (..., K)`` logits of q(y | x).
        encoder: ``(..., genes)`` and the cluster (a covariate with K categories) ->
            ``(..., n_latent)`` loc and scale.
    """
    pyro.module("classifier", classifier)
    pyro.module("encoder", encoder)
    with cells_plate(cell_index, n_cells):
        x = torch.log1p(counts)
        y = pyro.sample(
            "y", dist.Categorical(logits=classifier(x)), infer={"enumerate": "parallel"}
        )
        loc, scale = encoder(x, y.unsqueeze(-1))
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))
