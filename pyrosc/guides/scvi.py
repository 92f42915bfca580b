"""Amortized guide of scVI: q(z | x [, c]) and, for a latent library, q(l | x [, c])."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyrosc.nets import GaussianEncoder
from pyrosc.plates import cells_plate


def scvi_guide(
    counts: Tensor,
    covariates: Tensor,
    continuous_covariates: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    encoder: GaussianEncoder,
    library_encoder: GaussianEncoder | None = None,
) -> None:
    """Variational posterior of scVI::

        q(z_n | x_n)     = Normal(mu_z(log1p x_n, c_n), diag sigma_z(log1p x_n, c_n)^2)
        q(l_n | x_n)     = LogNormal(mu_l(log1p x_n, c_n), sigma_l(log1p x_n, c_n)^2)

    The encoders read ``log1p`` counts (raw counts span five orders of magnitude; the log keeps
    the first layer's inputs on a sane scale). They see the covariates ``c_n`` only if they were
    built with ``covariate_sizes`` (scVI's ``encode_covariates``); otherwise the codes are
    ignored. ``q(l | x)`` is scVI's library encoder: a Normal over ``log l``.

    Args:
        counts: ``(cells, genes)`` observed counts of the minibatch's cells.
        covariates: ``(cells, n_covariates)`` codes of every categorical covariate.
        continuous_covariates: ``(cells, k)`` values of the continuous covariates.
        cell_index: ``(batch,)`` positions of the cells in the dataset (the plate's indices).
        n_cells: size of the dataset the minibatch comes from (for minibatch scaling).
        encoder: ``(..., genes)`` [and covariates] -> ``(..., n_latent)`` loc and scale of z.
        library_encoder: ``(..., genes)`` [and covariates] -> ``(..., 1)`` loc and scale of
            ``log l``; None when the library is observed (the model has no ``library`` site).
    """
    pyro.module("encoder", encoder)
    if library_encoder is not None:
        pyro.module("library_encoder", library_encoder)
    with cells_plate(cell_index, n_cells):
        x = torch.log1p(counts)
        loc, scale = encoder(x, covariates, continuous_covariates)
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        if library_encoder is not None:
            log_library_loc, log_library_scale = library_encoder(
                x, covariates, continuous_covariates
            )
            library_posterior = dist.LogNormal(log_library_loc[..., 0], log_library_scale[..., 0])
            pyro.sample("library", library_posterior)
