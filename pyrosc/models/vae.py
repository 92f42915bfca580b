"""The VAE for counts of scVAE (Grønbech et al. 2020) with an observed library size."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import Tensor

from pyrosc.likelihoods import count_distribution, gene_inverse_dispersion
from pyrosc.nets import CountDecoder
from pyrosc.plates import cells_plate


def vae_model(
    counts: Tensor,
    library: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    decoder: CountDecoder,
    likelihood: str = "nb",
) -> None:
    """Generative model of the counts ``x`` of cell ``n``::

        z_n      ~ Normal(0, I)                          latent state, (n_latent,)
        rho_n    = softmax(f(z_n))                       expression proportions, (genes,)
        x_ng     ~ Likelihood(l_n rho_ng, theta_g, pi_ng)

    with ``l_n`` the cell's observed total count, ``theta_g`` a gene-wise inverse dispersion
    (NB and ZINB) and ``pi_ng`` zero-inflation gate logits from the decoder (ZIP and ZINB).
    ``rho_n`` is recorded as the deterministic site ``proportions``, so that any utility can
    read it from a trace of the model (:mod:`pyrosc.predictive`). The mean enters the likelihood
    as its log, ``log l_n + log_softmax(f(z_n))``, finite where a proportion underflows to 0.
    ``z`` is marked for KL warm-up (``infer={"kl_warmup": True}``).

    Args:
        counts: ``(batch, genes)`` observed counts.
        library: ``(batch,)`` total count of each cell.
        cell_index: ``(batch,)`` positions of the cells in the dataset (the plate's indices).
        n_cells: size of the dataset the minibatch comes from (for minibatch scaling).
        decoder: the network ``f``: ``(..., n_latent) -> (..., genes)`` proportion logits and
            gate logits.
        likelihood: ``"poisson"``, ``"nb"``, ``"zip"`` or ``"zinb"``.
    """
    pyro.module("decoder", decoder)
    n_latent = decoder.n_input
    inverse_dispersion = gene_inverse_dispersion(counts, likelihood)
    with cells_plate(cell_index, n_cells):
        prior = dist.Normal(counts.new_zeros(n_latent), counts.new_ones(n_latent))
        z = pyro.sample("z", prior.to_event(1), infer={"kl_warmup": True})
        logits, gate_logits = decoder(z)  # f(z_n), logit pi_n
        pyro.deterministic("proportions", logits.softmax(-1), event_dim=1)  # rho_n = softmax(f)
        # log(l_n rho_n), by log_softmax: finite where rho_n underflows to 0 in float32
        log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
        observation = count_distribution(likelihood, log_mean, inverse_dispersion, gate_logits)
        pyro.sample("counts", observation.to_event(1), obs=counts)
