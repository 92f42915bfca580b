"""Traces of a (model, guide) pair, vectorised over draws: the one primitive under evaluation,
posterior draws and simulation.

* Data by signature: each function receives the entries of one data dictionary that its own
  signature names (:func:`bind_data`), so a guide that does not read the library does not take
  it.
* Draws on a plate: K draws per cell run in one pass on a ``particles`` plate left of the pair's
  own plates (:func:`vectorize`); every site gains a leading ``(K,)`` dimension.
* Enumeration as ``TraceEnum_ELBO`` does it (:func:`enumerated_traces`): the guide's enumerated
  sites left of the plates, the model's left of the guide's.

What a trace holds is named by the contract, here and nowhere else: the observed site
``counts``, the library size (a ``library`` sample site when the model infers it, else its
``library`` argument) and the deterministic site ``proportions`` (rho).
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import pyro
import torch
from pyro import poutine
from torch import Tensor, nn

from pyrosc.data import CountData

#: The observed sample site of the counts: ``(cells, genes)``, one event dimension.
COUNTS = "counts"
#: The library size: a sample site when the model infers it, else the model's argument.
LIBRARY = "library"
#: The deterministic site of the expression proportions rho: ``(cells, genes)``.
PROPORTIONS = "proportions"

#: Floats per pass (particles x cells x genes); bounds memory at about 256 MB per tensor.
CHUNK_FLOATS = 2**26


# -- data by signature -------------------------------------------------------------------------


def _parameters(fn: Callable) -> Mapping[str, inspect.Parameter] | None:
    """``fn``'s parameters; None when it takes ``**kwargs`` or has no signature to read (a
    function wrapped by a Pyro handler), which then receives every entry."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return parameters


def data_kwargs(fn: Callable, data: dict) -> dict:
    """The entries of ``data`` that ``fn`` names in its signature (all for ``**kwargs``)."""
    parameters = _parameters(fn)
    if parameters is None:
        return dict(data)
    return {name: value for name, value in data.items() if name in parameters}


def model_kwargs(fn: Callable, minibatch: dict[str, Tensor], n_cells: int | None) -> dict:
    """The keyword arguments of ``fn`` that a minibatch supplies.

    A model or guide declares the data it needs by naming it in its signature, from the
    entries of :meth:`CountData.minibatch` and ``n_cells`` (the number of cells a minibatch
    stands for). Functions taking ``**kwargs`` get all.
    """
    return data_kwargs(fn, {**minibatch, "n_cells": n_cells})


def bind_data(fn: Callable) -> Callable:
    """``fn`` called with the whole data dictionary by keyword, receiving only the entries its
    own signature names (read once, here). This is how the trainer hands one minibatch
    dictionary to a model and a guide that take different data."""
    parameters = _parameters(fn)
    if parameters is None:
        return fn
    names = tuple(parameters)

    def call(**data):
        return fn(**{name: data[name] for name in names if name in data})

    return call


# -- one trace of a pair -----------------------------------------------------------------------


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
    """Traces of the guide and of the model replayed against it, hidden from outer handlers;
    each function receives the entries of ``kwargs`` that it names."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(**data_kwargs(guide, kwargs))
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            **data_kwargs(model, kwargs)
        )
    return guide_trace, model_trace


def max_plate_nesting(model: Callable, guide: Callable, kwargs: dict) -> int:
    """How many plates the pair nests at most (1 for a model with only the ``cells`` plate)."""
    return plate_nesting(*trace_pair(model, guide, kwargs))


def plate_nesting(*traces: poutine.Trace) -> int:
    """How many plates the sample sites of ``traces`` nest at most."""
    return max(
        (
            sum(frame.vectorized for frame in site["cond_indep_stack"])
            for trace in traces
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ),
        default=0,
    )


def probe(data: CountData, device: torch.device | str) -> dict[str, Tensor]:
    """Two cells of ``data`` (or its one), to trace a pair once."""
    return data.minibatch(np.arange(min(2, data.n_cells)), device)


# -- many draws in one trace -------------------------------------------------------------------


def vectorize(fn: Callable, n_particles: int, nesting: int) -> Callable:
    """``fn`` bound to its data by signature (:func:`bind_data`) and run inside a plate of
    ``n_particles`` particles left of its own ``nesting`` plates: each of its sites gains a
    leading ``(n_particles,)`` dimension.

    The plate is inside the function, as ``TraceEnum_ELBO(vectorize_particles=True)`` puts it,
    so that handlers which hide their inner traces (``infer_discrete``) still see it.
    """
    bound = bind_data(fn)

    def vectorized(**data):
        with pyro.plate("particles", n_particles, dim=-1 - nesting):
            return bound(**data)

    return vectorized


def enumerated_traces(
    model: Callable,
    guide: Callable,
    minibatch: dict[str, Tensor],
    n_particles: int,
    at_mean: bool = False,
) -> tuple[poutine.Trace, poutine.Trace, int]:
    """Guide and model traces at ``n_particles`` draws, enumerating as ``TraceEnum_ELBO`` does:
    the guide's sites marked for parallel enumeration get dimensions left of the plates, the
    model's left of the guide's (its enumeration continues where the guide's stopped); the
    model is replayed against the guide, its counts observed.

    With ``at_mean``, continuous latents take their guide means instead of random draws.

    Returns:
        the traces and the number of plate dimensions, particles included: each site's
        log-density is ``(*enumeration, n_particles, cells)`` when summed over its other plates.
    """
    data = {**minibatch, "n_cells": None}
    nesting = max_plate_nesting(model, guide, data)
    guide = poutine.enum(vectorize(guide, n_particles, nesting), first_available_dim=-2 - nesting)
    model = poutine.enum(vectorize(model, n_particles, nesting))
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(**data)
        if at_mean:
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and site["fn"].has_rsample:
                    site["value"] = site["fn"].mean
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**data)
    return guide_trace, model_trace, nesting + 1


# -- passes over the data ----------------------------------------------------------------------


def cell_chunks(
    data: CountData, n_particles: int, batch_size: int | None = None
) -> Iterator[np.ndarray]:
    """Consecutive ``(cells,)`` positions of ``data``'s cells, ``batch_size`` at a time, or by
    default as many as keep an ``(n_particles, cells, genes)`` float tensor near 256 MB."""
    if batch_size is None:
        batch_size = max(1, CHUNK_FLOATS // max(1, n_particles * data.n_genes))
    for start in range(0, data.n_cells, batch_size):
        yield np.arange(start, min(start + batch_size, data.n_cells))


def check_n_samples(n_samples: int) -> None:
    """Raise unless ``n_samples`` (draws per cell) is a whole number of at least 1."""
    if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer of at least 1, got {n_samples!r}")


@contextmanager
def seeded(seed: int | None, device: torch.device | str) -> Iterator[None]:
    """Draw from ``seed`` when given, leaving the global generator as it was; else from it."""
    if seed is None:
        yield
        return
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
