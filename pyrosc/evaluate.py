"""Honest evaluation of any (model, guide) pair: per-cell ELBO, importance-sampled log p(x),
and each cell's and gene's score.

The ELBO and log p(x) come from the same quantity, the per-cell log importance weight

    log w_k = log p(x, z_k) - log q(z_k | x),      z_k ~ q(z | x),

computed from the guide traced and the model replayed against it on a vectorised
``particles`` plate, discrete sites enumerated (:func:`pyrosc.traces.enumerated_traces`), so K
samples cost one pass. The ELBO is the mean of ``log w_k``; the importance-sampled
log-likelihood is ``logsumexp_k log w_k - log K``, a lower bound that tightens to log p(x) as K
grows (Burda et al. 2016). :func:`cell_scores` reports it per cell, with each gene's
posterior-mean log-likelihood (:func:`gene_log_likelihood`) beside it.

Nothing here knows which model it was given: per-cell terms are found from the plate named
``cells`` that every local site lives in. A ``pyro.factor`` in a guide (scANVI's classification
term) is part of the objective the trainer optimises, not of ``q``'s density: the ELBO and the
log-likelihood here leave it out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyrosc.data import CountData
from pyrosc.posterior import PosteriorDraws
from pyrosc.traces import (
    CHUNK_FLOATS,
    COUNTS,
    cell_chunks,
    check_n_samples,
    enumerated_traces,
    eval_mode,
    model_kwargs,
    probe,
    seeded,
    trace_pair,
)


def check_local(model: Callable, guide: Callable, kwargs: dict) -> None:
    """Raise unless every sample site of the pair lies inside the plate ``cells``.

    Per-cell scores need each random variable to belong to one cell; a global latent (one
    shared by all cells) has no per-cell share.
    """
    for trace in trace_pair(model, guide, kwargs):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if not any(frame.name == "cells" for frame in site["cond_indep_stack"]):
                raise ValueError(
                    f"sample site {site['name']!r} is not inside the plate 'cells'; per-cell "
                    "evaluation needs every latent and observed site to be local to a cell"
                )


def _per_cell_log_prob(site: dict, rank: int) -> Tensor:
    """A site's log-density summed over every plate but particles and cells.

    Returns ``(enumeration..., particles, cells)``: any dimensions left of the ``rank`` plate
    dimensions are enumeration dimensions (discrete values summed out exactly); sizes of 1
    broadcast.
    """
    log_prob = site["fn"].log_prob(site["value"])
    log_prob = log_prob.reshape((1,) * (rank - log_prob.dim()) + log_prob.shape)
    cells_dim = next(f.dim for f in site["cond_indep_stack"] if f.name == "cells")
    other_plates = [
        f.dim
        for f in site["cond_indep_stack"]
        if f.vectorized and f.name not in ("cells", "particles")
    ]
    if other_plates:  # e.g. a plate of genes inside the cells: a cell's share is their sum
        log_prob = log_prob.sum(dim=other_plates, keepdim=True)
    enumeration = log_prob.shape[: log_prob.dim() - rank]
    return log_prob.reshape(*enumeration, log_prob.shape[-rank], log_prob.shape[cells_dim])


def per_dimension_log_prob(site: dict) -> Tensor:
    """A site's log-density before its last event dimension is summed: ``(..., cells, dims)``
    (a latent's per dimension, the counts' per gene); a site without an event dimension gets a
    trailing dimension of size 1."""
    fn = site["fn"]
    if isinstance(fn, Independent):
        return fn.base_dist.log_prob(site["value"])
    return fn.log_prob(site["value"]).unsqueeze(-1)


def log_importance_weights(
    model: Callable, guide: Callable, minibatch: dict[str, Tensor], n_samples: int
) -> Tensor:
    """Per-cell ``log p(x, z_k) - log q(z_k | x)`` for ``n_samples`` draws ``z_k ~ q``.

    Discrete sites marked for enumeration are summed out exactly, as ``TraceEnum_ELBO`` does:
    one enumerated only in the model contributes ``log sum_y p(y) p(z | y)``; one enumerated
    in the guide gives the stratified weight ``sum_y p(x, y, z_y) / q(z_y | x, y)``, whose
    expectation is p(x) (its ``q(y | x)`` factor cancels, so it is not scored).

    Args:
        model, guide: a pair following the pyrosc contract.
        minibatch: from :meth:`CountData.minibatch`; evaluated as a whole (no scaling).
        n_samples: K, the number of draws per cell.

    Returns:
        ``(n_samples, cells)`` log weights.
    """
    return _log_joint(model, guide, minibatch, n_samples).logsumexp(dim=0)


def elbo_terms(
    model: Callable, guide: Callable, minibatch: dict[str, Tensor], n_samples: int
) -> Tensor:
    """Per-cell ELBO of each of ``n_samples`` draws: the quantity ``TraceEnum_ELBO`` (or
    ``Trace_ELBO``) optimises, cell by cell.

    Without discrete sites in the guide this is ``log p(x, z_k) - log q(z_k | x)``, the sites
    the model enumerates summed out of ``p`` exactly. A site ``y`` the guide enumerates is
    averaged over exactly, with its own density in the bound::

        sum_y q(y | x) [log p(x, y, z_y) - log q(y | x) - log q(z_y | x, y)]

    Args and shapes as :func:`log_importance_weights`.
    """
    log_joint, log_q, n_guide = _log_terms(model, guide, minibatch, n_samples)
    if log_q is None:
        return _configurations(log_joint).logsumexp(dim=0)
    # The model's enumerated dimensions lie left of the guide's: sum them out of p first.
    log_joint = log_joint.reshape((1,) * max(0, n_guide + 2 - log_joint.dim()) + log_joint.shape)
    n_model = log_joint.dim() - 2 - n_guide
    if n_model:
        log_joint = log_joint.logsumexp(dim=tuple(range(n_model)))
    log_q = log_q.reshape((1,) * (log_joint.dim() - log_q.dim()) + log_q.shape)
    # A value the guide gives probability 0 adds nothing (TraceEnum_ELBO drops it too), even
    # where its terms are infinite (scANVI's labelled cells: q(y) is a point mass).
    terms = torch.where(log_q > -math.inf, log_q.exp() * (log_joint - log_q), 0.0)
    return terms.sum(dim=tuple(range(n_guide))) if n_guide else terms


def _is_enumerated(site: dict) -> bool:
    return site["infer"].get("_enumerate_dim") is not None


def _log_terms(
    model: Callable,
    guide: Callable,
    minibatch: dict[str, Tensor],
    n_samples: int,
    at_mean: bool = False,
) -> tuple[Tensor, Tensor | None, int]:
    """The per-cell terms of the bound at each enumerated value of the discrete sites.

    Returns:
        ``log p(x, y, z) - log q(z | x, y)``, ``(*enumeration, n_samples, cells)`` with one
        (possibly size-1) dimension per enumerated site, the model's left of the guide's;
        ``log q(y | x)`` of the sites the guide enumerates, ``(*guide enumeration, n_samples,
        cells)``, or None when it enumerates none; and how many sites the guide enumerates.
    """
    guide_trace, model_trace, rank = enumerated_traces(model, guide, minibatch, n_samples, at_mean)
    n_batch = minibatch["counts"].shape[0]
    log_joint = minibatch["counts"].new_zeros(n_samples, n_batch)
    log_q, n_guide = None, 0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if trace is guide_trace and site["is_observed"]:
                continue  # a guide's pyro.factor: a term of the training objective, not of q
            term = _per_cell_log_prob(site, rank)
            if trace is guide_trace and _is_enumerated(site):
                log_q = term if log_q is None else log_q + term
                n_guide += 1
                continue
            log_joint = log_joint + sign * term
    return log_joint, log_q, n_guide


def _log_joint(
    model: Callable,
    guide: Callable,
    minibatch: dict[str, Tensor],
    n_samples: int,
    at_mean: bool = False,
) -> Tensor:
    """``log p(x, y, z_k) - log q(z_k | x, y)`` per enumerated configuration y of the discrete
    sites: ``(configurations, n_samples, cells)`` (one configuration without discrete sites).
    """
    log_joint, _, _ = _log_terms(model, guide, minibatch, n_samples, at_mean)
    return _configurations(log_joint)


def _configurations(log_joint: Tensor) -> Tensor:
    """``(*enumeration, n_samples, cells)`` flattened to ``(configurations, n_samples, cells)``."""
    return log_joint.reshape(-1, *log_joint.shape[-2:])


@torch.no_grad()
def posterior_mean(
    guide: Callable, minibatch: dict[str, Tensor], site: str = "z", nesting: int = 1
) -> Tensor:
    """The guide's mean of a continuous site, ``E_q[z]``: ``(cells, dims)``.

    Discrete sites that the guide enumerates (as scVAE's ``q(y | x) q(z | x, y)``) are averaged
    over exactly: ``sum_y q(y | x) E_q[z | x, y]``.

    Args:
        guide: a guide following the pyrosc contract.
        minibatch: from :meth:`CountData.minibatch`.
        site: the site's name.
        nesting: the plates the guide nests (1: only ``cells``).
    """
    guide = poutine.enum(guide, first_available_dim=-1 - nesting)
    with poutine.block():
        trace = poutine.trace(guide).get_trace(**model_kwargs(guide, minibatch, None))
    mean = trace.nodes[site]["fn"].mean
    log_weight = mean.new_zeros(())
    for node in trace.nodes.values():
        if node["type"] == "sample" and _is_enumerated(node):
            log_weight = log_weight + node["fn"].log_prob(node["value"])
    weight = log_weight.exp().unsqueeze(-1)
    n_leading = max(0, (weight * mean).dim() - 2)
    return (weight * mean).sum(dim=tuple(range(n_leading))) if n_leading else mean


@torch.no_grad()
def discrete_posterior(
    model: Callable,
    guide: Callable,
    data: CountData,
    site: str,
    *,
    networks: nn.Module | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Posterior probabilities of an enumerated discrete site (e.g. the GMVAE's cluster ``y``).

    If the guide enumerates the site, this is the guide's ``q(y | x)``. If only the model does,
    it is ``p(y | z, x)`` at the guide's mean of the continuous latents: the site's enumerated
    log-joint, normalised over its values.

    Returns:
        ``(cells, n_values)`` float64 probabilities; each row sums to one.
    """
    chunks = []
    with eval_mode(networks):
        for start in range(0, data.n_cells, batch_size):
            minibatch = data.minibatch(
                np.arange(start, min(start + batch_size, data.n_cells)), device
            )
            guide_trace, _, _ = enumerated_traces(model, guide, minibatch, 1, at_mean=True)
            if site in guide_trace.nodes:
                probs = guide_trace.nodes[site]["fn"].probs
            else:
                probs = _log_joint(model, guide, minibatch, 1, at_mean=True)[:, 0].softmax(dim=0).T
            chunks.append(probs.reshape(minibatch["counts"].shape[0], -1).cpu())
    return torch.cat(chunks).double().numpy()


@torch.no_grad()
def _per_cell(
    terms: Callable[..., Tensor],
    reduce: Callable[[Tensor], Tensor],
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int,
    networks: nn.Module | None,
    batch_size: int | None,
    device: torch.device | str,
) -> np.ndarray:
    check_n_samples(n_samples)
    particles_per_pass = max(1, min(n_samples, CHUNK_FLOATS // max(1, data.n_genes)))
    results = []
    with eval_mode(networks):
        for number, index in enumerate(cell_chunks(data, particles_per_pass, batch_size)):
            minibatch = data.minibatch(index, device)
            if number == 0:
                check_local(model, guide, {**minibatch, "n_cells": None})
            weights = []
            for start in range(0, n_samples, particles_per_pass):
                k = min(particles_per_pass, n_samples - start)
                weights.append(terms(model, guide, minibatch, k))
            results.append(reduce(torch.cat(weights)).cpu())
    return torch.cat(results).numpy().astype(np.float64)


def log_likelihood(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 200,
    *,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Importance-sampled log-likelihood of every cell, ``log p(x_n)``.

    ``log p(x) ~ logsumexp_k [log p(x, z_k) - log q(z_k | x)] - log K`` with ``z_k ~ q(z | x)``,
    over all cells of ``data`` (not one minibatch). Networks are put in evaluation mode.

    Args:
        model, guide: a fitted pair, called inside the parameter-store scope that holds its
            parameters.
        data: the cells to score.
        n_samples: K, importance samples per cell.
        networks: the modules of the pair, switched to evaluation mode while scoring.
        batch_size: cells per pass (default: as many as keep memory near 256 MB).
        device: where to compute.

    Returns:
        ``(cells,)`` float64 log-likelihoods in nats.
    """

    def reduce(log_weights: Tensor) -> Tensor:
        return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])

    return _per_cell(
        log_importance_weights, reduce, model, guide, data, n_samples, networks, batch_size, device
    )


def elbo(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 1,
    *,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Per-cell evidence lower bound, ``E_q[log p(x, z) - log q(z | x)]``, estimated with
    ``n_samples`` draws: the bound the trainer optimises (less a guide's factor, e.g. scANVI's
    classification term), with sites the guide enumerates averaged over exactly (see
    :func:`elbo_terms`). Same arguments as :func:`log_likelihood`.

    Returns:
        ``(cells,)`` float64 ELBO values in nats.
    """

    def reduce(terms: Tensor) -> Tensor:
        return terms.mean(dim=0)

    return _per_cell(
        elbo_terms, reduce, model, guide, data, n_samples, networks, batch_size, device
    )


# -- per-cell and per-gene scores ------------------------------------------------------------


@torch.no_grad()
def gene_log_likelihood(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 200,
    *,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """Each gene's share of each cell's fit: the posterior-mean log-likelihood of its count,
    ``E_q[log p(x_ng | latents)]``, over ``n_samples`` posterior draws of the latents (as
    :func:`pyrosc.predictive.posterior_predictive` draws them). Summed over the genes it is the
    expected reconstruction term of the ELBO, not ``log p(x_n)``.

    Args:
        as :func:`cell_scores`; ``n_samples`` draws per cell, averaged.

    Returns:
        ``(cells, genes)`` float64 DataFrame indexed by ``data``'s obs_names, columns its genes.
    """
    check_n_samples(n_samples)
    chunks = []
    with eval_mode(networks), seeded(seed, device):
        draws = PosteriorDraws(model, guide, probe(data, device))
        for index in cell_chunks(data, n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            (trace,) = draws.traces(minibatch, n_samples, sample_counts=False)
            per_gene = per_dimension_log_prob(trace.nodes[COUNTS])  # (n_samples, cells, genes)
            chunks.append(per_gene.double().mean(dim=0).cpu())
    values = torch.cat(chunks).numpy()
    return pd.DataFrame(values, index=data.obs_names.copy(), columns=data.var_names.copy())


def cell_scores(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 200,
    *,
    per_gene: bool = False,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """How plausible the model finds each cell: its importance-sampled ``log p(x_n)``
    (:func:`log_likelihood`, the held-out score of a cell the model has not
    seen). Low values flag cells unlike the rest: low-quality cells, doublets.

    ``log p(x)`` falls with the library size, so compare cells of similar depth, or per count.

    Args:
        model, guide, data, networks, batch_size, device: as :func:`log_likelihood`.
        n_samples: importance samples K per cell (and posterior draws for ``per_gene``).
        seed: seeds the draws (the global generator is left as it was); None: the global one.
        per_gene: add each gene's posterior-mean log-likelihood (:func:`gene_log_likelihood`),
            one column per gene.

    Returns:
        a float64 DataFrame indexed by ``data``'s obs_names: ``log_likelihood`` (nats) and, with
        ``per_gene``, one column per gene.
    """
    with seeded(seed, device):
        scores = log_likelihood(
            model, guide, data, n_samples, networks=networks, batch_size=batch_size, device=device
        )
    table = pd.DataFrame({"log_likelihood": scores}, index=data.obs_names.copy())
    if not per_gene:
        return table
    genes = gene_log_likelihood(
        model,
        guide,
        data,
        n_samples,
        seed=seed,
        networks=networks,
        batch_size=batch_size,
        device=device,
    )
    return pd.concat([table, genes], axis=1)
