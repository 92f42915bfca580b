"""Ask a fitted model things: simulate new cells, replicate the observed ones, decode them under
other covariates, check the replicates against the data, and score each cell.

Everything here is Pyro's effect handlers on the model and guide functions, so it works for any
pair that follows the pyrosc contract, one a user writes included:

* a simulation runs the model with its counts unobserved (``poutine.uncondition``);
* a posterior draw traces the guide, samples the discrete sites that the model sums out from
  their posterior (``infer_discrete``: the GMVAE's ``y ~ p(y | z, x)``), and runs the model
  again with its latents fixed at those values (``poutine.condition``) and its counts drawn;
* a counterfactual is the same draw with the model's covariate argument replaced: the latents
  are inferred with the cell's real covariates, the counts decoded with the new ones. With the
  same seed, a counterfactual into a cell's own batch is its factual decoding, exactly.

What is read off a model is named by the contract, here and nowhere else: the observed site
``counts``, the library size (a ``library`` sample site when the model infers it, else its
``library`` argument) and, for normalised expression, the deterministic site ``proportions``
(rho). Data arguments are matched by name (:func:`pyrosc.evaluate.model_kwargs`); the batch is
the first covariate (:meth:`pyrosc.data.CountData.minibatch`). ``n_samples`` draws per cell are
vectorised on a ``particles`` plate left of the model's plates, as in :mod:`pyrosc.evaluate`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from pyro import poutine
from pyro.infer import infer_discrete
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyrosc.data import CountData
from pyrosc.evaluate import (
    cell_chunks,
    eval_mode,
    log_likelihood,
    model_kwargs,
    per_dimension_log_prob,
    plate_nesting,
    trace_pair,
)

#: The observed sample site of the counts: ``(cells, genes)``, one event dimension.
COUNTS = "counts"
#: The library size: a sample site when the model infers it, else the model's argument.
LIBRARY = "library"
#: The deterministic site of the expression proportions rho: ``(cells, genes)``.
PROPORTIONS = "proportions"

#: Covariate values by obs column, e.g. ``{"batch": "batch2"}``: names, as in the AnnData.
Covariates = Mapping[str, str]

#: The statistics of :func:`predictive_check`: of each gene over the cells, of each cell.
GENE_STATISTICS = ("mean", "variance", "zero_fraction")
CELL_STATISTICS = ("library_size", "cv")


# -- what a pair declares ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What posterior draws need to know about a pair, read once from a trace of it.

    Attributes:
        nesting: how many plates the pair nests (1: only ``cells``); the particles go left.
        model_enumerates: whether the model enumerates a discrete site the guide leaves to it
            (the GMVAE's ``y`` with the marginal guide), to be drawn by ``infer_discrete``.
    """

    nesting: int
    model_enumerates: bool


def _layout(model: Callable, guide: Callable, minibatch: dict[str, Tensor]) -> _Layout:
    guide_trace, model_trace = trace_pair(model, guide, {**minibatch, "n_cells": None})
    model_enumerates = any(
        site["type"] == "sample"
        and site["infer"].get("enumerate") == "parallel"
        and name not in guide_trace
        for name, site in model_trace.nodes.items()
    )
    return _Layout(plate_nesting(guide_trace, model_trace), model_enumerates)


def _probe(data: CountData, device: torch.device | str) -> dict[str, Tensor]:
    """Two cells of ``data`` (or its one), to trace a pair once."""
    return data.minibatch(np.arange(min(2, data.n_cells)), device)


def _particles(fn: Callable, n_samples: int, nesting: int) -> Callable:
    """``fn`` run inside a plate of ``n_samples`` particles left of its own ``nesting`` plates:
    each of its sites gains a leading ``(n_samples,)`` dimension. (The plate is inside the
    function so that handlers which hide their inner traces, as infer_discrete, still see it.)"""

    def vectorized(**kwargs):
        with pyro.plate("particles", n_samples, dim=-1 - nesting):
            return fn(**kwargs)

    return vectorized


def _latent_values(trace: poutine.Trace) -> dict[str, Tensor]:
    """Values of the unobserved sample sites of a trace (plate subsample sites left out)."""
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


# -- interventions on the covariates -----------------------------------------------------------


def _covariate_codes(data: CountData, covariates: Covariates) -> dict[int, int]:
    """Column -> code of each named covariate value, checked against ``data``'s categories."""
    keys = list(data.covariate_categories)
    codes = {}
    for key, name in covariates.items():
        if key not in keys:
            known = f"its covariates are {keys} (the batch first)" if keys else "it has none"
            raise ValueError(f"covariate {key!r} is not one the model was set up with; {known}")
        categories = data.covariate_categories[key]
        if str(name) not in categories:
            raise ValueError(
                f"covariate {key!r} has no category {name!r} in the training data; the known "
                f"categories are: {categories}"
            )
        codes[keys.index(key)] = categories.index(str(name))
    return codes


def _intervened(minibatch: dict[str, Tensor], codes: dict[int, int]) -> dict[str, Tensor]:
    if not codes:
        return minibatch
    covariates = minibatch["covariates"].clone()
    for column, code in codes.items():
        covariates[:, column] = code
    return {**minibatch, "covariates": covariates, "batch": covariates[:, 0].clone()}


def intervene(
    minibatch: dict[str, Tensor], data: CountData, covariates: Covariates
) -> dict[str, Tensor]:
    """The minibatch with every cell's covariates set as ``covariates`` says: the intervention
    ``do(c = c')`` on the model's data arguments. The batch follows its covariate.

    Args:
        minibatch: from :meth:`CountData.minibatch`; among the rest ``covariates``
            ``(cells, n_covariates)`` and ``batch`` ``(cells,)`` codes.
        data: the data the codes refer to (its ``covariate_categories``).
        covariates: obs column -> category name, e.g. ``{"batch": "batch2"}``.

    Returns:
        a new minibatch dict (the input is not modified).

    Raises:
        ValueError: a covariate or category the data does not have.
    """
    return _intervened(minibatch, _covariate_codes(data, covariates))


def _covariate_settings(
    covariates: Covariates | Sequence[Covariates] | None,
) -> list[Covariates]:
    """One setting, several, or None (the factual: no intervention) as a list of settings."""
    if covariates is None:
        return [{}]
    if isinstance(covariates, Mapping):
        return [covariates]
    settings = list(covariates)
    if not settings:
        raise ValueError("covariates is an empty list; give at least one setting")
    return settings


# -- posterior draws ---------------------------------------------------------------------------


def _posterior_latents(
    model: Callable,
    guide: Callable,
    minibatch: dict[str, Tensor],
    n_samples: int,
    layout: _Layout,
) -> dict[str, Tensor]:
    """Every latent site at ``n_samples`` joint posterior draws, each ``(n_samples, cells, ...)``:
    the guide's draws, and the discrete sites the model enumerates drawn from their posterior
    given those and the counts (``infer_discrete`` at temperature 1)."""
    guide_trace = poutine.trace(_particles(guide, n_samples, layout.nesting)).get_trace(
        **model_kwargs(guide, minibatch, None)
    )
    values = _latent_values(guide_trace)
    if layout.model_enumerates:
        # condition, not replay: the enumeration must see the fixed sites to score them.
        conditioned = poutine.condition(_particles(model, n_samples, layout.nesting), data=values)
        discrete = infer_discrete(
            conditioned, first_available_dim=-2 - layout.nesting, strict_enumeration_warning=False
        )
        trace = poutine.trace(discrete).get_trace(**model_kwargs(model, minibatch, None))
        values |= _latent_values(trace)
    return values


def _decode(
    model: Callable,
    values: dict[str, Tensor],
    minibatch: dict[str, Tensor],
    n_samples: int,
    nesting: int,
    sample_counts: bool,
) -> poutine.Trace:
    """A trace of the model given ``minibatch`` with its latents fixed at ``values`` (each
    ``(n_samples, cells, ...)``); with ``sample_counts`` the counts are drawn, not observed."""
    vectorized = _particles(model, n_samples, nesting)
    if sample_counts:
        vectorized = poutine.uncondition(vectorized)
    conditioned = poutine.condition(vectorized, data=values)
    return poutine.trace(conditioned).get_trace(**model_kwargs(model, minibatch, None))


def _traces(
    model: Callable,
    guide: Callable,
    minibatch: dict[str, Tensor],
    n_samples: int,
    interventions: Sequence[dict[str, Tensor]],
    sample_counts: bool,
    layout: _Layout,
) -> list[poutine.Trace]:
    with poutine.block():
        values = _posterior_latents(model, guide, minibatch, n_samples, layout)
        return [
            _decode(model, values, given, n_samples, layout.nesting, sample_counts)
            for given in interventions
        ]


@torch.no_grad()
def posterior_traces(
    model: Callable,
    guide: Callable,
    minibatch: dict[str, Tensor],
    n_samples: int = 1,
    *,
    interventions: Sequence[dict[str, Tensor]] | None = None,
    sample_counts: bool = True,
) -> list[poutine.Trace]:
    """Traces of the model at ``n_samples`` posterior draws of each cell's latents.

    The latents are drawn once, given the minibatch as observed (the guide's sites, then the
    discrete sites the model enumerates, from their posterior), and the model is decoded at
    those values once per entry of ``interventions``: the data it is given, e.g. the minibatch
    with another batch (:func:`intervene`). Put the networks in evaluation mode first.

    Args:
        model, guide: a fitted pair following the pyrosc contract.
        minibatch: from :meth:`CountData.minibatch`.
        n_samples: draws per cell, on a ``particles`` plate: every site gains a leading
            ``(n_samples,)`` dimension, e.g. ``counts`` is ``(n_samples, cells, genes)``.
        interventions: the data to decode with (default: the minibatch: the factual decoding).
        sample_counts: draw the ``counts`` site from the model (a replicate) instead of
            observing it.

    Returns:
        one model trace per intervention, all at the same draws of the latents.
    """
    given = [minibatch] if interventions is None else list(interventions)
    layout = _layout(model, guide, minibatch)
    return _traces(model, guide, minibatch, n_samples, given, sample_counts, layout)


# -- what a trace holds ------------------------------------------------------------------------


def _library(trace: poutine.Trace, minibatch: dict[str, Tensor]) -> Tensor:
    """The library size the model used, ``(n_samples, cells)``: its ``library`` site, else
    its ``library`` argument."""
    shape = trace.nodes[COUNTS]["fn"].batch_shape
    if LIBRARY in trace.nodes:
        return trace.nodes[LIBRARY]["value"].expand(shape)
    return minibatch["library"].expand(shape)


def _scaled_proportions(
    trace: poutine.Trace, minibatch: dict[str, Tensor], library_size: float | str
) -> Tensor:
    """``l' rho`` at each draw, ``(n_samples, cells, genes)``: rho from the ``proportions``
    site; ``l'`` is ``library_size``, or with ``"latent"`` the library the model used."""
    if PROPORTIONS not in trace.nodes:
        raise ValueError(
            f"the model records no deterministic site {PROPORTIONS!r}; normalised expression "
            f"reads rho from it: add pyro.deterministic({PROPORTIONS!r}, rho, event_dim=1)"
        )
    proportions = trace.nodes[PROPORTIONS]["value"]
    if library_size == "latent":
        return _library(trace, minibatch).unsqueeze(-1) * proportions
    return library_size * proportions


def _reported_values(
    trace: poutine.Trace, minibatch: dict[str, Tensor], data: CountData
) -> dict[str, Tensor]:
    """What a simulated or replicated cell reports, each ``(n_samples, cells, ...)``: its latent
    sites (not the counts, nor deterministic sites), the library size and the covariates the
    model was given."""
    library = _library(trace, minibatch)
    values = {
        key: minibatch["covariates"][:, column].expand(library.shape)
        for column, key in enumerate(data.covariate_categories)
    }
    values[LIBRARY] = library
    for name, site in trace.nodes.items():
        if (
            site["type"] == "sample"
            and name not in (COUNTS, LIBRARY)
            and not site_is_subsample(site)
            and not site["infer"].get("_deterministic", False)
        ):
            # (infer_discrete drops plates of size 1: its draws may lack the particles.)
            values[name] = site["value"].expand(site["fn"].shape())
    return values


def _check_library_size(library_size: float | str) -> None:
    number = isinstance(library_size, numbers.Real) and not isinstance(library_size, bool)
    if not (library_size == "latent" or (number and library_size > 0)):
        raise ValueError(f"library_size must be 'latent' or positive, got {library_size!r}")


def _check_n_samples(n_samples: int) -> None:
    if not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer of at least 1, got {n_samples!r}")


@contextmanager
def _seeded(seed: int | None, device: torch.device | str) -> Iterator[None]:
    """Draw from ``seed`` when given, leaving the global generator as it was; else from it."""
    if seed is None:
        yield
        return
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _Rows:
    """Chunks of cells at ``n_samples`` draws each, gathered into AnnData rows draw by draw:
    row ``r * cells + i`` holds draw ``r`` of cell ``i``."""

    def __init__(self, data: CountData) -> None:
        self.data = data
        self.counts: list[list[sp.csr_matrix]] = []  # per chunk, per draw
        self.values: list[dict[str, np.ndarray]] = []  # per chunk: (n_samples, cells, ...)
        self.layers: list[dict[str, np.ndarray]] = []

    def add(
        self,
        trace: poutine.Trace,
        minibatch: dict[str, Tensor],
        layers: Mapping[str, Tensor] | None = None,
    ) -> None:
        counts = trace.nodes[COUNTS]["value"].cpu().numpy()
        self.counts.append([sp.csr_matrix(draw.astype(np.int64)) for draw in counts])
        values = _reported_values(trace, minibatch, self.data)
        self.values.append({name: value.cpu().numpy() for name, value in values.items()})
        self.layers.append({name: value.cpu().numpy() for name, value in (layers or {}).items()})

    def anndata(self, obs_names: Sequence[str], **obs_columns: np.ndarray) -> ad.AnnData:
        """The rows as an AnnData; ``obs_columns`` are added to obs as given."""
        n_samples = len(self.counts[0])
        counts = sp.vstack([chunk[r] for r in range(n_samples) for chunk in self.counts], "csr")
        obs, obsm = pd.DataFrame(index=pd.Index(obs_names)), {}
        for column, values in obs_columns.items():
            obs[column] = values
        for name in self.values[0]:
            value = _draw_major([chunk[name] for chunk in self.values])
            if name in self.data.covariate_categories:
                categories = self.data.covariate_categories[name]
                obs[name] = pd.Categorical.from_codes(value, categories=categories)
            elif value.ndim == 1:
                obs[name] = value
            else:
                obsm[name] = value.reshape(len(value), -1)
        layers = {
            name: _draw_major([chunk[name] for chunk in self.layers]).astype(np.float32)
            for name in self.layers[0]
        }
        var = pd.DataFrame(index=self.data.var_names.copy())
        return ad.AnnData(counts, obs=obs, var=var, obsm=obsm, layers=layers)


def _draw_major(chunks: list[np.ndarray]) -> np.ndarray:
    """``(n_samples, cells, ...)`` chunks joined along the cells: ``(n_samples * cells, ...)``."""
    joined = np.concatenate(chunks, axis=1)
    return joined.reshape(-1, *joined.shape[2:])


# -- simulation --------------------------------------------------------------------------------


@torch.no_grad()
def simulate(
    model: Callable,
    n_cells: int,
    *,
    data: CountData,
    covariates: Covariates | None = None,
    library: float | np.ndarray | None = None,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> ad.AnnData:
    """New cells drawn from the generative model with its fitted global parameters.

    Each simulated cell starts from a template: a cell of ``data`` drawn at random (with
    replacement) among those with the given ``covariates``, which lends it its other covariates
    and its total count. The model then runs with its counts unobserved: every latent from its
    prior (``z``, the GMVAE's cluster ``y``, a latent library from its per-batch prior), the
    counts from the likelihood.

    Args:
        model: a fitted model following the pyrosc contract, called inside the parameter-store
            scope that holds its parameters. Its ``counts`` argument is a placeholder of zeros,
            for the shape, dtype and device only (as the contract's models use it).
        n_cells: how many cells to simulate.
        data: the data the model was fitted on: its genes and covariate categories, and the
            cells the templates are drawn from.
        covariates: obs column -> category for every simulated cell, e.g. ``{"batch": "b"}``;
            None: the templates' own.
        library: the library size of every cell, a positive number or an ``(n_cells,)`` array.
            It is the model's ``library`` argument, and it fixes (conditions) the model's
            ``library`` site if it has one. None: each template's total count, which a model
            with a latent library leaves aside, drawing the library from its prior.
        seed: seeds the templates and the draws (the global generators are left as they were);
            None draws from the global generators.
        networks: the pair's modules, switched to evaluation mode while simulating.
        batch_size: cells per pass.
        device: where to compute.

    Returns:
        an AnnData of ``n_cells`` cells (obs_names ``simulated_0``, ...) and ``data``'s genes:
        ``X`` the counts, CSR int64; ``obs`` each covariate (categorical), ``library`` (the
        library size the model used) and every latent site with one value per cell (the
        GMVAE's ``y``); ``obsm`` every latent site with a vector per cell (``z``:
        ``(n_cells, n_latent)``).

    Raises:
        ValueError: no cell of ``data`` has the given covariates, an unknown covariate, or a
            library size that is not positive.
    """
    if not isinstance(n_cells, numbers.Integral) or n_cells < 1:
        raise ValueError(f"n_cells must be an integer of at least 1, got {n_cells!r}")
    codes = _covariate_codes(data, covariates or {})
    keys = list(data.covariate_categories)
    matches = np.ones(data.n_cells, dtype=bool)
    for column, code in codes.items():
        matches &= data.covariates[keys[column]] == code
    if not matches.any():
        raise ValueError(
            f"no cell of the data has covariates {dict(covariates or {})}; the templates of the "
            "simulated cells (their other covariates and library sizes) are drawn from those"
        )
    templates = np.random.default_rng(seed).choice(np.flatnonzero(matches), size=n_cells)
    fixed_library = None
    if library is not None:
        fixed_library = np.broadcast_to(np.asarray(library, dtype=np.float32), (n_cells,))
        if not np.all(np.isfinite(fixed_library) & (fixed_library > 0)):
            raise ValueError("library must hold positive, finite library sizes")

    rows = _Rows(data)
    with eval_mode(networks), _seeded(seed, device), poutine.block():
        nesting = plate_nesting(
            poutine.trace(model).get_trace(**model_kwargs(model, _probe(data, device), None))
        )
        sampled = poutine.uncondition(_particles(model, 1, nesting))
        for start in range(0, n_cells, batch_size):
            positions = np.arange(start, min(start + batch_size, n_cells))
            minibatch = _intervened(data.minibatch(templates[positions], device), codes)
            minibatch["counts"] = torch.zeros_like(minibatch["counts"])
            fixed = {}
            if fixed_library is not None:
                minibatch["library"] = torch.as_tensor(fixed_library[positions]).to(device)
                fixed[LIBRARY] = minibatch["library"]
            trace = poutine.trace(poutine.condition(sampled, data=fixed)).get_trace(
                **model_kwargs(model, minibatch, None)
            )
            rows.add(trace, minibatch)
    return rows.anndata([f"simulated_{i}" for i in range(n_cells)])


# -- posterior predictive and counterfactuals --------------------------------------------------


def _replicates(
    model: Callable,
    guide: Callable,
    data: CountData,
    covariates: Covariates,
    n_samples: int,
    library_size: float | str | None,
    seed: int | None,
    networks: nn.Module | None,
    batch_size: int | None,
    device: torch.device | str,
) -> ad.AnnData:
    """Counts of ``data``'s cells decoded under ``covariates`` at ``n_samples`` posterior draws,
    with the normalised expression when a ``library_size`` is given (and the model records
    rho)."""
    _check_n_samples(n_samples)
    codes = _covariate_codes(data, covariates)
    rows = _Rows(data)
    with eval_mode(networks), _seeded(seed, device):
        layout = _layout(model, guide, _probe(data, device))
        for index in cell_chunks(data, n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            given = _intervened(minibatch, codes)
            (trace,) = _traces(model, guide, minibatch, n_samples, [given], True, layout)
            layers = {}
            if library_size is not None and PROPORTIONS in trace.nodes:
                layers["normalized"] = _scaled_proportions(trace, given, library_size)
            rows.add(trace, given, layers)
    cells = np.tile(np.asarray(data.obs_names, dtype=object), n_samples)
    replicate = np.repeat(np.arange(n_samples), data.n_cells)
    names = cells if n_samples == 1 else [f"{c}-{r}" for c, r in zip(cells, replicate, strict=True)]
    return rows.anndata(names, cell=cells, replicate=replicate)


@torch.no_grad()
def posterior_predictive(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 1,
    *,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> ad.AnnData:
    """Replicated counts of the observed cells: latents drawn from the posterior (the guide, and
    the discrete sites the model sums out from their posterior), counts from the model.

    Args:
        model, guide: a fitted pair, called inside the parameter-store scope that holds it.
        data: the cells to replicate.
        n_samples: replicates per cell (each its own posterior draw).
        seed: seeds the draws (the global generator is left as it was); None: the global one.
        networks: the pair's modules, switched to evaluation mode meanwhile.
        batch_size: cells per pass (default: as many as keep memory near 256 MB per tensor).
        device: where to compute.

    Returns:
        an AnnData of ``n_samples * cells`` rows, replicate by replicate (row ``r * cells + i``
        is replicate ``r`` of cell ``i``; obs_names are the cells' own with one replicate, else
        ``"{cell}-{r}"``), and ``data``'s genes: ``X`` the counts, CSR int64; ``obs`` ``cell``
        (the observed cell's name), ``replicate``, each covariate, ``library`` (the library
        size the model used) and every latent site with one value per cell (the GMVAE's ``y``);
        ``obsm`` every latent with a vector per cell (``z``: ``(rows, n_latent)``).
    """
    return _replicates(model, guide, data, {}, n_samples, None, seed, networks, batch_size, device)


@torch.no_grad()
def counterfactual(
    model: Callable,
    guide: Callable,
    data: CountData,
    covariates: Covariates,
    n_samples: int = 1,
    *,
    library_size: float | str = 1e4,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> ad.AnnData:
    """Each cell decoded as if its covariates were ``covariates`` (e.g. another batch).

    Abduction, intervention, prediction: the latents are drawn from the posterior given the
    cell's counts and real covariates, exactly as in :func:`posterior_predictive`; then the same
    model function is run at those latents with its covariate argument replaced
    (:func:`intervene`), and the counts are drawn. With the same seed, a counterfactual into the
    cells' own covariates equals :func:`posterior_predictive`, value for value.

    Args:
        model, guide, data, n_samples, seed, networks, batch_size, device: as
            :func:`posterior_predictive`.
        covariates: obs column -> category name, e.g. ``{"batch": "batch2"}``.
        library_size: ``l'`` of the normalised expression ``l' rho``: a positive number (1e4:
            counts per 10k), or ``"latent"``: the library the model used (the cell's total
            count, or its draw of a latent library).

    Returns:
        the AnnData of :func:`posterior_predictive`, with the intervened covariates in obs and,
        when the model records rho as its ``proportions`` site (every pyrosc model does),
        ``layers["normalized"]``: ``l' rho`` at each draw, float32.
    """
    _check_library_size(library_size)
    return _replicates(
        model, guide, data, covariates, n_samples, library_size, seed, networks, batch_size, device
    )


@torch.no_grad()
def normalized_expression(
    model: Callable,
    guide: Callable,
    data: CountData,
    covariates: Covariates | Sequence[Covariates] | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
    *,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Posterior mean of each cell's normalised expression ``l' rho``, decoded under
    ``covariates`` (as scvi-tools' ``get_normalized_expression`` with ``transform_batch``).

    Args:
        model, guide, data, networks, batch_size, device: as :func:`posterior_predictive`.
        covariates: None (each cell's own), one setting (e.g. ``{"batch": "b"}``), or several:
            the mean over them, all decoded from the same draws of the latents.
        library_size: as :func:`counterfactual`; 1 gives the proportions rho.
        n_samples: posterior draws per cell, averaged.

    Returns:
        ``(cells, genes)`` float32.
    """
    _check_library_size(library_size)
    _check_n_samples(n_samples)
    codes = [_covariate_codes(data, setting) for setting in _covariate_settings(covariates)]
    chunks = []
    with eval_mode(networks):
        layout = _layout(model, guide, _probe(data, device))
        for index in cell_chunks(data, n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            given = [_intervened(minibatch, c) for c in codes]
            traces = _traces(model, guide, minibatch, n_samples, given, False, layout)
            expression = [
                _scaled_proportions(trace, g, library_size).mean(dim=0)
                for trace, g in zip(traces, given, strict=True)
            ]
            chunks.append(torch.stack(expression).mean(dim=0).cpu())
    return torch.cat(chunks).numpy().astype(np.float32)


# -- posterior predictive checks ---------------------------------------------------------------


class _Statistics:
    """Sufficient sums for the statistics of :func:`predictive_check`, chunk by chunk.

    Per gene over the cells: the mean, the variance (with ``cells - 1``) and the fraction of
    zeros; per cell: the library size (total count) and the coefficient of variation of its
    counts over the genes (standard deviation / mean, both over genes; 0 for a cell without
    counts). Sums are float64.
    """

    def __init__(self) -> None:
        self.n_cells = 0
        self.sums: Tensor | None = None  # (3, draws, genes): x, x^2, 1[x = 0]
        self.cells: dict[str, list[Tensor]] = {name: [] for name in CELL_STATISTICS}

    def add(self, counts: Tensor) -> None:
        """``counts``: ``(draws, cells, genes)``."""
        counts = counts.double()
        sums = torch.stack([counts.sum(1), (counts**2).sum(1), (counts == 0).sum(1).double()])
        self.sums = sums if self.sums is None else self.sums + sums
        self.n_cells += counts.shape[1]
        library = counts.sum(-1)
        self.cells["library_size"].append(library.cpu())
        # A replicate without counts has no variation: cv 0 (not 0 / 0).
        spread, mean = counts.std(-1, correction=0), counts.mean(-1)
        self.cells["cv"].append(torch.where(mean > 0, spread / mean.clamp(min=1e-300), 0.0).cpu())

    def of_genes(self) -> dict[str, np.ndarray]:
        """Statistic -> ``(draws, genes)``."""
        total, squares, zeros = self.sums.cpu()
        n = self.n_cells
        return {
            "mean": (total / n).numpy(),
            "variance": ((squares - total**2 / n) / max(n - 1, 1)).numpy(),
            "zero_fraction": (zeros / n).numpy(),
        }

    def of_cells(self) -> dict[str, np.ndarray]:
        """Statistic -> ``(draws, cells)``."""
        return {name: torch.cat(parts, dim=1).numpy() for name, parts in self.cells.items()}


def _check_table(
    level: str,
    names: pd.Index,
    observed: dict[str, np.ndarray],
    replicated: dict[str, np.ndarray],
) -> pd.DataFrame:
    """One row per item (gene or cell) and statistic: the observed value against the 2.5%,
    50% and 97.5% percentiles of its replicates."""
    tables = []
    for statistic, values in replicated.items():
        lower, median, upper = np.percentile(values, [2.5, 50, 97.5], axis=0)
        seen = observed[statistic][0]
        tables.append(
            pd.DataFrame(
                {
                    level: np.asarray(names),
                    "statistic": statistic,
                    "observed": seen,
                    "replicated_lower": lower,
                    "replicated_median": median,
                    "replicated_upper": upper,
                    "inside": (seen >= lower) & (seen <= upper),
                }
            )
        )
    return pd.concat(tables, ignore_index=True)


@dataclass
class PredictiveCheck:
    """Posterior predictive checks: observed statistics against their replicated distribution.

    Attributes:
        genes: one row per gene and statistic (``mean``, ``variance``, ``zero_fraction`` over
            the cells): ``gene``, ``statistic``, ``observed``, ``replicated_lower``,
            ``replicated_median``, ``replicated_upper`` (the 2.5%, 50% and 97.5% percentiles over
            the replicated datasets) and ``inside`` (observed within those two).
        cells: the same per cell (``cell``) for ``library_size`` and ``cv`` (the coefficient of
            variation of the cell's counts over the genes).
        n_samples: the number of replicated datasets.
    """

    genes: pd.DataFrame
    cells: pd.DataFrame
    n_samples: int

    @property
    def summary(self) -> pd.DataFrame:
        """Calibration per statistic: ``level`` (gene or cell), ``share_inside`` (the share of
        genes or cells whose observed statistic lies inside its replicated 95% interval: about
        0.95 or more for a model that fits, much less where it misses) and ``n``."""
        rows = []
        for level, table in (("gene", self.genes), ("cell", self.cells)):
            for statistic, group in table.groupby("statistic", sort=False):
                rows.append(
                    {
                        "statistic": statistic,
                        "level": level,
                        "share_inside": float(group["inside"].mean()),
                        "n": len(group),
                    }
                )
        return pd.DataFrame(rows).set_index("statistic")

    def plot(self, axes: Sequence | None = None):
        """Observed (x) against replicated (y: median, bar: 95% interval) for each statistic,
        one panel each, on log axes (the zero fraction on linear ones), with the identity
        line; points outside their interval in red.

        Args:
            axes: five matplotlib axes to draw on (default: a new figure of five panels).

        Returns:
            the matplotlib figure.
        """
        import matplotlib.pyplot as plt

        panels = [("gene", s, self.genes) for s in GENE_STATISTICS]
        panels += [("cell", s, self.cells) for s in CELL_STATISTICS]
        if axes is None:
            _, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        summary = self.summary
        for ax, (level, statistic, table) in zip(axes, panels, strict=True):
            rows = table[table["statistic"] == statistic]
            for inside, colour in ((True, "tab:blue"), (False, "tab:red")):
                part = rows[rows["inside"] == inside]
                median = part["replicated_median"].to_numpy()
                ax.errorbar(
                    part["observed"].to_numpy(),
                    median,
                    yerr=[
                        median - part["replicated_lower"].to_numpy(),
                        part["replicated_upper"].to_numpy() - median,
                    ],
                    fmt="o",
                    markersize=2,
                    elinewidth=0.5,
                    color=colour,
                    label="inside" if inside else "outside",
                )
            if statistic != "zero_fraction":
                ax.set_xscale("log")
                ax.set_yscale("log")
            low = np.nanmin(rows[["observed", "replicated_lower"]].to_numpy())
            high = np.nanmax(rows[["observed", "replicated_upper"]].to_numpy())
            ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
            share = summary.loc[statistic, "share_inside"]
            ax.set_title(f"{statistic} per {level}: {share:.0%} inside")
            ax.set_xlabel("observed")
            ax.set_ylabel("replicated")
        axes[0].legend(loc="upper left")
        figure = axes[0].figure
        figure.tight_layout()
        return figure


@torch.no_grad()
def predictive_check(
    model: Callable,
    guide: Callable,
    data: CountData,
    n_samples: int = 100,
    *,
    seed: int | None = None,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> PredictiveCheck:
    """Posterior predictive checks of ``data`` (Gelman et al.): replicate the whole dataset
    ``n_samples`` times (:func:`posterior_predictive`) and set each observed statistic against
    its replicated distribution.

    Statistics: per gene over the cells, the mean, the variance and the fraction of zeros; per
    cell, the library size and the coefficient of variation over the genes. A model that fits
    puts about 95% of them (or more: the data also fitted the model) inside their replicated
    95% interval; a Poisson fitted to overdispersed counts puts few variances inside.

    Args:
        model, guide, data, seed, networks, batch_size, device: as
            :func:`posterior_predictive`.
        n_samples: replicated datasets (the percentiles of 100 are good to about 1%).

    Returns:
        a :class:`PredictiveCheck`: per-gene and per-cell tables, ``summary`` and ``plot()``.
    """
    _check_n_samples(n_samples)
    observed, replicated = _Statistics(), _Statistics()
    with eval_mode(networks), _seeded(seed, device):
        layout = _layout(model, guide, _probe(data, device))
        # A quarter of the usual chunk: the sums are taken in float64, next to the draws.
        for index in cell_chunks(data, 4 * n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            (trace,) = _traces(model, guide, minibatch, n_samples, [minibatch], True, layout)
            replicated.add(trace.nodes[COUNTS]["value"])
            observed.add(minibatch["counts"].unsqueeze(0))
    genes = _check_table("gene", data.var_names, observed.of_genes(), replicated.of_genes())
    cells = _check_table("cell", data.obs_names, observed.of_cells(), replicated.of_cells())
    return PredictiveCheck(genes=genes, cells=cells, n_samples=n_samples)


# -- per-cell scores ---------------------------------------------------------------------------


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
    :func:`posterior_predictive` draws them). Summed over the genes it is the expected
    reconstruction term of the ELBO, not ``log p(x_n)``.

    Args:
        as :func:`posterior_predictive`; ``n_samples`` draws per cell, averaged.

    Returns:
        ``(cells, genes)`` float64 DataFrame indexed by ``data``'s obs_names, columns its genes.
    """
    _check_n_samples(n_samples)
    chunks = []
    with eval_mode(networks), _seeded(seed, device):
        layout = _layout(model, guide, _probe(data, device))
        for index in cell_chunks(data, n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            (trace,) = _traces(model, guide, minibatch, n_samples, [minibatch], False, layout)
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
    (:func:`pyrosc.evaluate.log_likelihood`, the held-out score of a cell the model has not
    seen). Low values flag cells unlike the rest: low-quality cells, doublets.

    ``log p(x)`` falls with the library size, so compare cells of similar depth, or per count.

    Args:
        model, guide, data, seed, networks, batch_size, device: as
            :func:`posterior_predictive`.
        n_samples: importance samples K per cell (and posterior draws for ``per_gene``).
        per_gene: add each gene's posterior-mean log-likelihood (:func:`gene_log_likelihood`),
            one column per gene.

    Returns:
        a float64 DataFrame indexed by ``data``'s obs_names: ``log_likelihood`` (nats) and, with
        ``per_gene``, one column per gene.
    """
    with _seeded(seed, device):
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
