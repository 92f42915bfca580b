"""Posterior draws of each cell's latents, and the model decoded at them: what posterior
predictive replicates, counterfactuals, predictive checks and per-gene scores are made of.

Effect handlers on the model and guide functions, so any pair that follows the pyrosc contract
works, one a user writes included:

* the guide is traced at ``n_samples`` draws per cell (:func:`pyrosc.traces.vectorize`);
* the discrete sites that the model sums out are drawn from their posterior given those draws
  and the counts (``infer_discrete`` at temperature 1: the GMVAE's ``y ~ p(y | z, x)``);
* the model is run again with its latents fixed at those values (``poutine.condition``), its
  counts observed or drawn, once per setting of its data: decoded with another batch
  (:func:`pyrosc.predictive.intervene`) this is a counterfactual; with the cells' own data, the
  factual decoding, draw for draw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro import poutine
from pyro.infer import infer_discrete
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyrosc.traces import plate_nesting, trace_pair, vectorize


class PosteriorDraws:
    """Posterior draws of a pair's latents and the model decoded at them, a minibatch at a
    time. What the draws need to know about the pair is read once, from a trace of ``probe``.

    Attributes:
        nesting: how many plates the pair nests (1: only ``cells``); the particles go left.
        model_enumerates: whether the model enumerates a discrete site the guide leaves to it
            (the GMVAE's ``y`` with the marginal guide), to be drawn by ``infer_discrete``.
    """

    def __init__(self, model: Callable, guide: Callable, probe: dict[str, Tensor]) -> None:
        guide_trace, model_trace = trace_pair(model, guide, {**probe, "n_cells": None})
        self.model, self.guide = model, guide
        self.nesting = plate_nesting(guide_trace, model_trace)
        self.model_enumerates = any(
            site["type"] == "sample"
            and site["infer"].get("enumerate") == "parallel"
            and name not in guide_trace
            for name, site in model_trace.nodes.items()
        )

    @torch.no_grad()
    def traces(
        self,
        minibatch: dict[str, Tensor],
        n_samples: int,
        interventions: Sequence[dict[str, Tensor]] | None = None,
        sample_counts: bool = True,
    ) -> list[poutine.Trace]:
        """Traces of the model at ``n_samples`` posterior draws of each cell's latents: drawn
        once given ``minibatch`` as observed, decoded once per entry of ``interventions`` (the
        data to decode with; default: the minibatch itself), with the ``counts`` site drawn
        (``sample_counts``: a replicate) or observed. Every site is ``(n_samples, cells, ...)``.
        """
        given = [minibatch] if interventions is None else list(interventions)
        with poutine.block():
            values = self._latents(minibatch, n_samples)
            return [self._decode(values, data, n_samples, sample_counts) for data in given]

    def _latents(self, minibatch: dict[str, Tensor], n_samples: int) -> dict[str, Tensor]:
        """Every latent site at ``n_samples`` joint posterior draws, ``(n_samples, cells, ...)``:
        the guide's draws, then the sites the model enumerates, from their posterior."""
        data = {**minibatch, "n_cells": None}
        guide = vectorize(self.guide, n_samples, self.nesting)
        values = _latent_values(poutine.trace(guide).get_trace(**data))
        if self.model_enumerates:
            # condition, not replay: the enumeration must see the fixed sites to score them.
            model = poutine.condition(vectorize(self.model, n_samples, self.nesting), data=values)
            discrete = infer_discrete(
                model, first_available_dim=-2 - self.nesting, strict_enumeration_warning=False
            )
            values |= _latent_values(poutine.trace(discrete).get_trace(**data))
        return values

    def _decode(
        self,
        values: dict[str, Tensor],
        minibatch: dict[str, Tensor],
        n_samples: int,
        sample_counts: bool,
    ) -> poutine.Trace:
        """A trace of the model given ``minibatch`` with its latents fixed at ``values``."""
        model = vectorize(self.model, n_samples, self.nesting)
        if sample_counts:
            model = poutine.uncondition(model)
        conditioned = poutine.condition(model, data=values)
        return poutine.trace(conditioned).get_trace(**minibatch, n_cells=None)


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
    with another batch (:func:`pyrosc.predictive.intervene`). Put the networks in evaluation
    mode first.

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
    draws = PosteriorDraws(model, guide, minibatch)
    return draws.traces(minibatch, n_samples, interventions, sample_counts)


def _latent_values(trace: poutine.Trace) -> dict[str, Tensor]:
    """Values of the unobserved sample sites of a trace (plate subsample sites left out)."""
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }
