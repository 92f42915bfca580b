"""scANVI (Xu et al. 2021): scVI with a cell type ``y`` above its latent state, observed where a
cell is labelled and summed out exactly by ``TraceEnum_ELBO`` where it is not."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import Tensor

from pyrosc.likelihoods import count_distribution, uses_dispersion
from pyrosc.models.scvi import DISPERSIONS, LibraryPrior, free_inverse_dispersion
from pyrosc.nets import GaussianEncoder, ScviDecoder
from pyrosc.plates import cells_plate


def scanvi_model(
    counts: Tensor,
    library: Tensor,
    label: Tensor,
    batch: Tensor,
    covariates: Tensor,
    continuous_covariates: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    decoder: ScviDecoder,
    z1_prior: GaussianEncoder,
    n_labels: int,
    library_prior: LibraryPrior | None = None,
    likelihood: str = "zinb",
    dispersion: str | None = "gene",
    n_batches: int = 1,
    inverse_dispersion_init: Tensor | None = None,
) -> None:
    """Generative model of the counts ``x`` of cell ``n`` of type ``y_n``, from batch ``s_n``
    with covariates ``c_n``::

        y_n      ~ Categorical(1/K, ..., 1/K)                   cell type, one of K
        label_n  = y_n                                          observed where n is labelled
        z2_n     ~ Normal(0, I)                                 (n_latent,)
        z1_n     ~ Normal(mu(z2_n, y_n), diag sigma(z2_n, y_n)^2)   cell state, (n_latent,)
        l_n      ~ LogNormal(mu_{s_n}, sigma_{s_n}^2)             library size (latent library)
        rho_n    = softmax(f_w(z1_n, c_n))                      expression proportions, (genes,)
        pi_n     = f_h(z1_n, c_n)                               gate logits (ZIP, ZINB)
        x_ng     ~ Likelihood(l_n rho_ng, theta, pi_ng)

    Below ``z1`` this is :func:`pyrosc.models.scvi_model` line for line (library, dispersion,
    likelihood and the ``proportions`` site alike). The type prior is uniform and fixed, as
    scvi-tools': the labelled cells' proportions say how cells were annotated (often a few per
    type), not how common each type is, and learned weights tend to starve rare types.

    ``y`` is one site for every cell. Where a cell is labelled, the ``label`` site observes it
    (its log-density is 0 at the label, -inf elsewhere, and masked out for unlabelled cells),
    and the guide puts all of ``q(y)`` on the label: the enumeration over ``y`` then keeps that
    value alone, and the cell's term is exactly its labelled ELBO. Where a cell is unlabelled,
    ``y`` is summed out exactly over the guide's ``q(y | z1)``. Either way the bound is exact
    for a minibatch that mixes both (see :func:`pyrosc.guides.scanvi_guide`).

    ``y``, ``z2`` and ``z1`` are marked for KL warm-up: the weight then scales the KL of the
    whole hierarchy ``q(y, z2, z1 | x)`` against its prior, as scVI's warm-up scales the KL of
    its ``z``. The library is not annealed, as in scVI.

    Args:
        counts, library, batch, covariates, continuous_covariates, cell_index, n_cells: as
            :func:`pyrosc.models.scvi_model`.
        label: ``(cells,)`` code of each cell's type, -1 where it is unlabelled.
        decoder, library_prior, likelihood, dispersion, n_batches: as
            :func:`pyrosc.models.scvi_model`.
        z1_prior: the networks ``(mu, sigma)``: ``(..., n_latent)`` ``z2`` and the type (a
            covariate with K categories) -> loc and scale of ``z1``.
        n_labels: K, the number of cell types.
        inverse_dispersion_init: starting value of the free inverse dispersion (a fitted
            scVI's, see :meth:`pyrosc.SCANVI.from_scvi`); ones by default.
    """
    if uses_dispersion(likelihood) and dispersion not in DISPERSIONS:
        raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}")
    pyro.module("decoder", decoder)
    pyro.module("z1_prior", z1_prior)
    n_latent = decoder.n_input
    inverse_dispersion = free_inverse_dispersion(
        counts, batch, likelihood, dispersion, n_batches, inverse_dispersion_init
    )
    type_probs = counts.new_full((n_labels,), 1.0 / n_labels)
    with cells_plate(cell_index, n_cells):
        y = pyro.sample("y", dist.Categorical(type_probs), infer={"kl_warmup": True})
        # label_n = y_n where observed; a distribution's own mask, so every scorer sees it
        pyro.sample("label", dist.Delta(y).mask(label >= 0), obs=label)
        standard = dist.Normal(counts.new_zeros(n_latent), counts.new_ones(n_latent))
        z2 = pyro.sample("z2", standard.to_event(1), infer={"kl_warmup": True})
        z1_loc, z1_scale = z1_prior(z2, y.unsqueeze(-1))
        z1_given = dist.Normal(z1_loc, z1_scale).to_event(1)
        z1 = pyro.sample("z1", z1_given, infer={"kl_warmup": True})
        if library_prior is not None:
            mu, sigma = library_prior.loc[batch], library_prior.scale[batch]
            library = pyro.sample("library", dist.LogNormal(mu, sigma))
        logits, gate_logits, cell_theta = decoder(z1, covariates, continuous_covariates)
        pyro.deterministic("proportions", logits.softmax(-1), event_dim=1)  # rho_n = softmax(f)
        if dispersion == "gene-cell":
            inverse_dispersion = cell_theta
        # log(l_n rho_n), by log_softmax: finite where rho_n underflows to 0 in float32
        log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
        observation = count_distribution(likelihood, log_mean, inverse_dispersion, gate_logits)
        pyro.sample("counts", observation.to_event(1), obs=counts)
