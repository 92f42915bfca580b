"""scVI (Lopez et al. 2018): a VAE for counts whose decoder sees the batch and other categorical
covariates, with a per-batch prior on a latent library size and a choice of dispersion."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import constraints

from pyrosc.likelihoods import count_distribution, uses_dispersion
from pyrosc.nets import ScviDecoder
from pyrosc.plates import cells_plate

DISPERSIONS = ("gene", "gene-batch", "gene-cell")


class LibraryPrior(nn.Module):
    """The per-batch prior of the latent library size, ``log l_n ~ Normal(mu_s, sigma_s^2)``.

    ``mu_s`` and ``sigma_s`` are fixed from the data, never learned: they are buffers, not
    parameters, so they are saved with the networks and move with them between devices.

    Args:
        loc: ``(n_batches,)`` mean ``mu_s`` of the log library size of each batch.
        scale: ``(n_batches,)`` its standard deviation ``sigma_s``.
    """

    loc: Tensor
    scale: Tensor

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @classmethod
    def from_library(
        cls, library: np.ndarray, batch: np.ndarray, batch_names: Sequence[str]
    ) -> LibraryPrior:
        """The mean and variance of ``log library`` over the cells of each batch (as scvi-tools).

        Args:
            library: ``(cells,)`` total count of each cell.
            batch: ``(cells,)`` batch code of each cell, in ``range(len(batch_names))``.
            batch_names: the name of each batch, for error messages.

        Raises:
            ValueError: a batch whose log library sizes have no spread (fewer than two cells, or
                all of the same size), which would make its prior a point mass.
        """
        log_library = np.log(np.asarray(library, dtype=np.float64))
        locs, variances = [], []
        for code, name in enumerate(batch_names):
            values = log_library[batch == code]
            if len(values) < 2 or values.var() == 0:
                raise ValueError(
                    f"batch {name!r} has {len(values)} training cell(s) with "
                    f"{len(np.unique(values))} distinct library size(s); the prior of the latent "
                    "library needs at least two distinct sizes per batch. Use library='observed' "
                    "or merge that batch with another."
                )
            locs.append(values.mean())
            variances.append(values.var())
        loc = torch.tensor(locs, dtype=torch.float32)
        return cls(loc, torch.tensor(variances, dtype=torch.float32).sqrt())


def scvi_model(
    counts: Tensor,
    library: Tensor,
    batch: Tensor,
    covariates: Tensor,
    continuous_covariates: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    decoder: ScviDecoder,
    library_prior: LibraryPrior | None = None,
    likelihood: str = "zinb",
    dispersion: str | None = "gene",
    n_batches: int = 1,
) -> None:
    """Generative model of the counts ``x`` of cell ``n`` from batch ``s_n`` with covariates
    ``c_n`` (the batch first, then other categorical and continuous covariates)::

        z_n      ~ Normal(0, I)                                latent state, (n_latent,)
        l_n      ~ LogNormal(mu_{s_n}, sigma_{s_n}^2)          library size (latent library)
        rho_n    = softmax(f_w(z_n, c_n))                      expression proportions, (genes,)
        pi_n     = f_h(z_n, c_n)                               gate logits (ZIP, ZINB)
        x_ng     ~ Likelihood(l_n rho_ng, theta, pi_ng)

    With no ``library_prior`` the library is observed: ``l_n`` is the cell's total count and
    there is no ``library`` site. The inverse dispersion ``theta`` (NB and ZINB) is ``theta_g``
    per gene, ``theta_{g s_n}`` per gene and batch, or ``theta_ng = exp(f_r(z_n, c_n))`` from
    the decoder, per ``dispersion``. ``rho_n`` is recorded as the deterministic site
    ``proportions``, so that any utility can read it from a trace of the model. The mean enters
    the likelihood as its log, ``log l_n + log_softmax(f_w)``, finite where ``rho_ng`` underflows.
    ``z`` is marked for KL warm-up (``infer={"kl_warmup": True}``); the library is not
    annealed, as in scVI.

    Args:
        counts: ``(cells, genes)`` observed counts of the minibatch's cells.
        library: ``(cells,)`` total count of each cell: ``l_n`` when the library is observed,
            unused (``l_n`` is the latent site) when a ``library_prior`` is given.
        batch: ``(cells,)`` batch code ``s_n`` of each cell (zeros for a single batch).
        covariates: ``(cells, n_covariates)`` codes ``c_n`` of every categorical covariate.
        continuous_covariates: ``(cells, k)`` values of the continuous covariates, part of
            ``c_n`` (a ``(cells, 0)`` tensor when there are none).
        cell_index: ``(batch,)`` positions of the cells in the dataset (the plate's indices).
        n_cells: size of the dataset the minibatch comes from (for minibatch scaling).
        decoder: the networks ``f``: ``(..., n_latent)`` and covariates -> ``(..., genes)``
            proportion logits, gate logits (ZIP, ZINB) and inverse dispersion ("gene-cell").
        library_prior: the per-batch prior of a latent library; None for an observed library.
        likelihood: ``"poisson"``, ``"nb"``, ``"zip"`` or ``"zinb"``.
        dispersion: ``"gene"``, ``"gene-batch"`` or ``"gene-cell"`` (NB and ZINB; None or
            ignored for Poisson and ZIP, which have none).
        n_batches: number of batches (the rows of the "gene-batch" inverse dispersion).
    """
    if uses_dispersion(likelihood) and dispersion not in DISPERSIONS:
        raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}")
    pyro.module("decoder", decoder)
    n_latent = decoder.n_input
    inverse_dispersion = free_inverse_dispersion(counts, batch, likelihood, dispersion, n_batches)
    with cells_plate(cell_index, n_cells):
        prior = dist.Normal(counts.new_zeros(n_latent), counts.new_ones(n_latent))
        z = pyro.sample("z", prior.to_event(1), infer={"kl_warmup": True})
        if library_prior is not None:
            mu, sigma = library_prior.loc[batch], library_prior.scale[batch]
            library = pyro.sample("library", dist.LogNormal(mu, sigma))
        logits, gate_logits, cell_inverse_dispersion = decoder(z, covariates, continuous_covariates)
        pyro.deterministic("proportions", logits.softmax(-1), event_dim=1)  # rho_n = softmax(f)
        if dispersion == "gene-cell":
            inverse_dispersion = cell_inverse_dispersion
        # log(l_n rho_n), by log_softmax: finite where rho_n underflows to 0 in float32
        log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
        observation = count_distribution(likelihood, log_mean, inverse_dispersion, gate_logits)
        pyro.sample("counts", observation.to_event(1), obs=counts)


def free_inverse_dispersion(
    counts: Tensor,
    batch: Tensor,
    likelihood: str,
    dispersion: str | None,
    n_batches: int,
    initial: Tensor | None = None,
) -> Tensor | None:
    """The inverse dispersion held in the positive Pyro parameter ``inverse_dispersion``, per
    cell's genes: ``(genes,)`` ``theta_g`` for "gene"; for "gene-batch" the rows ``theta_{s_n}``,
    ``(cells, genes)``, of the ``(n_batches, genes)`` parameter. None for "gene-cell" (the
    decoder's) and for the likelihoods without a dispersion.

    Args:
        initial: the parameter's starting value (a fitted model's, for a warm start); ones by
            default. Only read when the parameter is created.
    """
    if dispersion not in ("gene", "gene-batch") or not uses_dispersion(likelihood):
        return None
    shape = (n_batches, counts.shape[-1]) if dispersion == "gene-batch" else counts.shape[-1:]
    initial = counts.new_ones(shape) if initial is None else initial.to(counts)
    theta = pyro.param("inverse_dispersion", initial, constraint=constraints.positive)
    return theta[batch] if dispersion == "gene-batch" else theta
