"""Ask a fitted model for cells: simulate new ones, replicate the observed ones, decode them
under other covariates, and read their normalised expression.

Everything here is Pyro's effect handlers on the model and guide functions, so it works for any
pair that follows the pyrosc contract, one a user writes included:

* a simulation runs the model with its counts unobserved (``poutine.uncondition``);
* a replicate is the model decoded at a posterior draw of the cell's latents
  (:mod:`pyrosc.posterior`), its counts drawn;
* a counterfactual is the same draw with the model's covariate argument replaced: the latents
  are inferred with the cell's real covariates, the counts decoded with the new ones. With the
  same seed, a counterfactual into a cell's own batch is its factual decoding, exactly.

What is read off a model is named by the contract (:mod:`pyrosc.traces`): ``counts``, the
library size and, for normalised expression, ``proportions`` (rho). Data arguments are matched
by name; the batch is the first covariate (:meth:`pyrosc.data.CountData.minibatch`). The cells
drawn come back as AnnData rows, draw by draw. Checks of the replicates against the data are in
:mod:`pyrosc.predictive_checks`, per-cell and per-gene scores in :mod:`pyrosc.evaluate`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence

import anndata as ad
import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyrosc.data import CountData
from pyrosc.drawn_cells import DrawnCells
from pyrosc.posterior import PosteriorDraws
from pyrosc.traces import (
    COUNTS,
    LIBRARY,
    PROPORTIONS,
    cell_chunks,
    check_n_samples,
    eval_mode,
    model_kwargs,
    plate_nesting,
    probe,
    seeded,
    vectorize,
)

#: Covariate values by obs column, e.g. ``{"batch": "batch2"}``: names, as in the AnnData.
Covariates = Mapping[str, str]


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
    return proportions if library_size == 1 else library_size * proportions


def _scaled_variance(
    trace: poutine.Trace, minibatch: dict[str, Tensor], library_size: float | str
) -> Tensor:
    """``Var(l' x / l)`` of the ``counts`` site's distribution, ``(n_samples, cells, genes)``;
    with ``"latent"``, ``l'`` is ``l``: the counts' own variance."""
    variance = trace.nodes[COUNTS]["fn"].variance
    if library_size == "latent":
        return variance
    return variance * (library_size / _library(trace, minibatch).unsqueeze(-1)) ** 2


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

    rows = DrawnCells(data)
    with eval_mode(networks), seeded(seed, device), poutine.block():
        nesting = plate_nesting(
            poutine.trace(model).get_trace(**model_kwargs(model, probe(data, device), None))
        )
        sampled = poutine.uncondition(vectorize(model, 1, nesting))
        for start in range(0, n_cells, batch_size):
            positions = np.arange(start, min(start + batch_size, n_cells))
            minibatch = _intervened(data.minibatch(templates[positions], device), codes)
            minibatch["counts"] = torch.zeros_like(minibatch["counts"])
            fixed = {}
            if fixed_library is not None:
                minibatch["library"] = torch.as_tensor(fixed_library[positions]).to(device)
                fixed[LIBRARY] = minibatch["library"]
            trace = poutine.trace(poutine.condition(sampled, data=fixed)).get_trace(
                **minibatch, n_cells=None
            )
            rows.add(trace.nodes[COUNTS]["value"], _reported_values(trace, minibatch, data))
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
    check_n_samples(n_samples)
    codes = _covariate_codes(data, covariates)
    rows = DrawnCells(data)
    with eval_mode(networks), seeded(seed, device):
        draws = PosteriorDraws(model, guide, probe(data, device))
        for index in cell_chunks(data, n_samples, batch_size):
            minibatch = data.minibatch(index, device)
            given = _intervened(minibatch, codes)
            (trace,) = draws.traces(minibatch, n_samples, [given])
            layers = {}
            if library_size is not None and PROPORTIONS in trace.nodes:
                layers["normalized"] = _scaled_proportions(trace, given, library_size)
            rows.add(trace.nodes[COUNTS]["value"], _reported_values(trace, given, data), layers)
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
def expression_draws(
    model: Callable,
    guide: Callable,
    data: CountData,
    covariates: Covariates | Sequence[Covariates] | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
    *,
    count_variance: bool = False,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[np.ndarray, Tensor, Tensor | None]]:
    """Each cell's normalised expression ``l' rho`` at ``n_samples`` posterior draws, decoded
    under ``covariates``, a chunk of cells at a time: what :func:`normalized_expression`
    averages and :mod:`pyrosc.differential_expression` compares.

    Args:
        model, guide, data, networks, batch_size, device: as :func:`posterior_predictive`.
        covariates: None (each cell's own), one setting (e.g. ``{"batch": "b"}``), or several:
            at each draw, the mean over them, all decoded from the same draws of the latents.
        library_size: as :func:`counterfactual`; 1 gives the proportions rho.
        n_samples: posterior draws per cell.
        count_variance: also the variance of the cell's counts on the same scale,
            ``Var(l' x / l)``, read from the ``counts`` site's distribution at each draw (``l``
            the library the model used; several settings: the mean of theirs).

    Yields:
        ``(index, expression, variance)``: the chunk's cell positions in ``data``,
        ``(cells,)``; its expression and (None unless ``count_variance``) the variance,
        ``(n_samples, cells, genes)`` float32 on ``device``.
    """
    _check_library_size(library_size)
    check_n_samples(n_samples)
    codes = [_covariate_codes(data, setting) for setting in _covariate_settings(covariates)]
    with eval_mode(networks):
        draws = PosteriorDraws(model, guide, probe(data, device))
        # One decoding per setting is held at once: size the chunks for all of them.
        for index in cell_chunks(data, n_samples * len(codes), batch_size):
            minibatch = data.minibatch(index, device)
            given = [_intervened(minibatch, c) for c in codes]
            # The data were checked on the way in: no distribution need check them again.
            with pyro.validation_enabled(False):
                traces = draws.traces(minibatch, n_samples, given, sample_counts=False)
            expression = [
                _scaled_proportions(trace, g, library_size)
                for trace, g in zip(traces, given, strict=True)
            ]
            variance = None
            if count_variance:
                variance = _mean(
                    [
                        _scaled_variance(t, g, library_size)
                        for t, g in zip(traces, given, strict=True)
                    ]
                )
            yield index, _mean(expression), variance


def _mean(tensors: list[Tensor]) -> Tensor:
    """The mean of equal-shaped tensors; one is its own mean (no copy of a large tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).mean(0)


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
    draws = expression_draws(
        model,
        guide,
        data,
        covariates,
        library_size,
        n_samples,
        networks=networks,
        batch_size=batch_size,
        device=device,
    )
    chunks = [expression.mean(dim=0).cpu() for _, expression, _ in draws]
    return torch.cat(chunks).numpy().astype(np.float32)
