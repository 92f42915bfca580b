"""The Gaussian-mixture VAE of scVAE (Grønbech et al. 2020): unsupervised clusters ``y`` next to
the continuous latent ``z``, with ``y`` summed out exactly by ``TraceEnum_ELBO``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import Tensor
from torch.distributions import constraints

from pyrosc.likelihoods import count_distribution, gene_inverse_dispersion
from pyrosc.nets import CountDecoder
from pyrosc.plates import cells_plate

MIXTURE_WEIGHTS = ("uniform", "learned")


def gmvae_model(
    counts: Tensor,
    library: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    decoder: CountDecoder,
    component_locs_init: Tensor,
    likelihood: str = "nb",
    mixture_weights: str = "uniform",
) -> None:
    """Generative model of the counts ``x`` of cell ``n``::

        y_n      ~ Categorical(w)                        cluster, one of K
        z_n      ~ Normal(mu_{y_n}, diag sigma_{y_n}^2)  latent state, (n_latent,)
        rho_n    = softmax(f(z_n))                       expression proportions, (genes,)
        x_ng     ~ Likelihood(l_n rho_ng, theta_g, pi_ng)

    ``y`` is marked for parallel enumeration: ``TraceEnum_ELBO`` sums it out exactly (a vector
    of K values, an extra dimension on the left), so it is never sampled during training.
    The mixture weights ``w`` are uniform or a learned point on the simplex; the component
    means ``mu`` and scales ``sigma`` are learned parameters.
    ``rho_n`` is recorded as the deterministic site ``proportions``, so that any utility can
    read it from a trace of the model (:mod:`pyrosc.predictive`). The mean enters the likelihood
    as its log, ``log l_n + log_softmax(f(z_n))``, finite where a proportion underflows to 0.
    ``z`` is marked for KL warm-up (``infer={"kl_warmup": True}``); the cluster ``y`` is not
    annealed.

    Args:
        counts: ``(batch, genes)`` observed counts.
        library: ``(batch,)`` total count of each cell.
        cell_index: ``(batch,)`` positions of the cells in the dataset (the plate's indices).
        n_cells: size of the dataset the minibatch comes from (for minibatch scaling).
        decoder: the network ``f``: ``(..., n_latent) -> (..., genes)`` proportion logits and
            gate logits.
        component_locs_init: ``(K, n_latent)`` initial component means (distinct, to break
            the symmetry between components).
        likelihood: ``"poisson"``, ``"nb"``, ``"zip"`` or ``"zinb"``.
        mixture_weights: ``"uniform"`` or ``"learned"``.
    """
    pyro.module("decoder", decoder)
    n_clusters, n_latent = component_locs_init.shape
    weights = counts.new_full((n_clusters,), 1.0 / n_clusters)
    if mixture_weights == "learned":
        weights = pyro.param("mixture_weights", weights, constraint=constraints.simplex)
    component_locs = pyro.param("component_locs", component_locs_init.to(counts))
    component_scales = pyro.param(
        "component_scales", counts.new_ones(n_clusters, n_latent), constraint=constraints.positive
    )
    inverse_dispersion = gene_inverse_dispersion(counts, likelihood)
    with cells_plate(cell_index, n_cells):
        y = pyro.sample("y", dist.Categorical(weights), infer={"enumerate": "parallel"})
        prior = dist.Normal(component_locs[y], component_scales[y]).to_event(1)
        z = pyro.sample("z", prior, infer={"kl_warmup": True})
        logits, gate_logits = decoder(z)  # f(z_n), logit pi_n
        pyro.deterministic("proportions", logits.softmax(-1), event_dim=1)  # rho_n = softmax(f)
        # log(l_n rho_n), by log_softmax: finite where rho_n underflows to 0 in float32
        log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
        observation = count_distribution(likelihood, log_mean, inverse_dispersion, gate_logits)
        pyro.sample("counts", observation.to_event(1), obs=counts)
