"""Amortized Gaussian guide of the VAE: q(z | x)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyrosc.nets import GaussianEncoder
from pyrosc.plates import cells_plate


def vae_guide(
    counts: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    encoder: GaussianEncoder,
) -> None:
    """Variational posterior of the VAE::

        q(z_n | x_n) = Normal(mu(log1p x_n), diag sigma(log1p x_n)^2)

    The encoder reads ``log1p`` counts: raw counts span five orders of magnitude, and the log
    keeps the first layer's inputs, and so its gradients, on a sane scale.

    Args:
        counts: ``(batch, genes)`` observed counts.
        cell_index: ``(batch,)`` positions of the cells in the dataset (the plate's indices).
        n_cells: size of the dataset the minibatch comes from (for minibatch scaling).
        encoder: ``(..., genes) -> (..., n_latent)`` loc and scale.
    """
    pyro.module("encoder", encoder)
    with cells_plate(cell_index, n_cells):
        loc, scale = encoder(torch.log1p(counts))
        pyro.sample("z", dist.Normal(loc, scale).to_event(1))
