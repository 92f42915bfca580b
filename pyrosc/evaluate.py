"""Honest evaluation of any (model, guide) pair: per-cell ELBO and importance-sampled log p(x).

Both come from the same quantity, the per-cell log importance weight

    log w_k = log p(x, z_k) - log q(z_k | x),      z_k ~ q(z | x),

computed by tracing the guide and replaying the model against it under a vectorised
``particles`` plate, so K samples cost one pass. The ELBO is the mean of ``log w_k``; the
importance-sampled log-likelihood is ``logsumexp_k log w_k - log K``, a lower bound that
tightens to log p(x) as K grows (Burda et al. 2016).

Nothing here knows which model it was given: per-cell terms are found from the plate named
``cells`` that every local site lives in.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyrosc.data import CountData

#: Floats per evaluation chunk (particles x cells x genes); bounds memory at about 256 MB.
_CHUNK_FLOATS = 2**26


def model_kwargs(fn: Callable, minibatch: dict[str, Tensor], n_cells: int | None) -> dict:
    """The keyword arguments of ``fn`` that a minibatch supplies.

    A model or guide declares the data it needs by naming it in its signature, from
    ``counts``, ``library``, ``batch``, ``covariates`` (see :meth:`CountData.minibatch`) and
    ``n_cells`` (the dataset size, for minibatch scaling). Functions taking ``**kwargs`` get all.
    """
    available = {**minibatch, "n_cells": n_cells}
    parameters = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return available
    return {name: value for name, value in available.items() if name in parameters}


@contextmanager
def eval_mode(networks: nn.Module | None) -> Iterator[None]:
    """Switch ``networks`` to evaluation mode (no dropout, BatchNorm running statistics) and
    back to the mode they were in."""
    if networks is None:
        yield
        return
    was_training = networks.training
    networks.eval()
    try:
        yield
    finally:
        networks.train(was_training)


def trace_pair(
    model: Callable, guide: Callable, kwargs: dict
) -> tuple[poutine.Trace, poutine.Trace]:
    """Traces of the guide and of the model replayed against it, hidden from outer handlers."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(**kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**kwargs)
    return guide_trace, model_trace


def max_plate_nesting(model: Callable, guide: Callable, kwargs: dict) -> int:
    """How many plates the pair nests at most (1 for a model with only the ``cells`` plate)."""
    return max(
        (
            sum(frame.vectorized for frame in site["cond_indep_stack"])
            for trace in trace_pair(model, guide, kwargs)
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ),
        default=0,
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
    """A site's log-density summed over every dimension but particles and cells.

    Returns ``(particles, cells)``, or something broadcastable to it.
    """
    frames = {frame.name: frame for frame in site["cond_indep_stack"] if frame.vectorized}
    log_prob = site["fn"].log_prob(site["value"])
    if log_prob.dim() > rank:
        raise ValueError(
            f"sample site {site['name']!r} has more batch dimensions than plates; "
            "mark the gene axis with .to_event(1)"
        )
    log_prob = log_prob.reshape((1,) * (rank - log_prob.dim()) + log_prob.shape)
    keep = {0, rank + frames["cells"].dim}  # positions of the particle and cell dimensions
    summed = [d for d in range(rank) if d not in keep]
    if summed:
        log_prob = log_prob.sum(dim=summed)
    return log_prob.reshape(log_prob.shape[0], log_prob.shape[-1])


def log_importance_weights(
    model: Callable, guide: Callable, minibatch: dict[str, Tensor], n_samples: int
) -> Tensor:
    """Per-cell ``log p(x, z_k) - log q(z_k | x)`` for ``n_samples`` draws ``z_k ~ q``.

    Args:
        model, guide: a pair following the pyrosc contract.
        minibatch: from :meth:`CountData.minibatch`; evaluated as a whole (no scaling).
        n_samples: K, the number of draws per cell.

    Returns:
        ``(n_samples, cells)`` log weights.
    """
    model_args = model_kwargs(model, minibatch, None)
    guide_args = model_kwargs(guide, minibatch, None)
    nesting = max_plate_nesting(model, guide, guide_args | model_args)
    rank = nesting + 1
    with poutine.block(), pyro.plate("particles", n_samples, dim=-rank):
        guide_trace = poutine.trace(guide).get_trace(**guide_args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            **model_args
        )
    n_batch = minibatch["counts"].shape[0]
    log_weights = minibatch["counts"].new_zeros(n_samples, n_batch)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            log_weights = log_weights + sign * _per_cell_log_prob(site, rank)
    return log_weights


def _chunks(data: CountData, n_samples: int, batch_size: int | None) -> Iterator[np.ndarray]:
    """Consecutive cell positions, in chunks that keep particles x cells x genes bounded."""
    if batch_size is None:
        batch_size = max(1, _CHUNK_FLOATS // max(1, n_samples * data.n_genes))
    for start in range(0, data.n_cells, batch_size):
        yield np.arange(start, min(start + batch_size, data.n_cells))


@torch.no_grad()
def _per_cell(
    reduce: Callable[[Tensor], Tensor],
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int,
    networks: nn.Module | None,
    batch_size: int | None,
    device: torch.device | str,
) -> np.ndarray:
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    particles_per_pass = max(1, min(n_samples, _CHUNK_FLOATS // max(1, data.n_genes)))
    results = []
    with eval_mode(networks):
        for number, index in enumerate(_chunks(data, particles_per_pass, batch_size)):
            minibatch = data.minibatch(index, device)
            if number == 0:
                check_local(model, guide, model_kwargs(model, minibatch, None))
            weights = []
            for start in range(0, n_samples, particles_per_pass):
                k = min(particles_per_pass, n_samples - start)
                weights.append(log_importance_weights(model, guide, minibatch, k))
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

    return _per_cell(reduce, model, guide, data, n_samples, networks, batch_size, device)


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
    ``n_samples`` draws. Same arguments as :func:`log_likelihood`.

    Returns:
        ``(cells,)`` float64 ELBO values in nats.
    """

    def reduce(log_weights: Tensor) -> Tensor:
        return log_weights.mean(dim=0)

    return _per_cell(reduce, model, guide, data, n_samples, networks, batch_size, device)
