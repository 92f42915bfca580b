"""What a fit optimises: the negative ELBO of a (model, guide) pair, read off the pair itself.

Whether any site is marked for enumeration decides the ELBO (``TraceEnum_ELBO``, so discrete
latents are summed out exactly instead of sampled, or ``Trace_ELBO``); free bits replace it
with :func:`free_bits_loss`. KL warm-up and free bits are effect handlers around the model and
the guide, not edits of the loss by hand: :class:`ScaleLatents` multiplies the log-density of
the latent sites that the model marks with ``infer={"kl_warmup": True}`` (the models here mark
``z``; a latent library and the GMVAE's cluster are not annealed, as in scVI) by the warm-up
weight, in both the model and the guide, which scales ``log p(z) - log q(z)`` (that KL term)
and leaves the rest of the ELBO untouched. :func:`pyrosc.train.train` and the processes of
:mod:`pyrosc.distributed` build their loss from the same :class:`Objective`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from pyrosc.evaluate import per_dimension_log_prob
from pyrosc.freezing import quiet_about_frozen
from pyrosc.traces import data_kwargs, plate_nesting, trace_pair

#: The ``infer`` key with which a model marks a latent site for KL warm-up.
KL_WARMUP = "kl_warmup"


class ScaleLatents(Messenger):
    """Multiply the log-density of the latent sites named in ``sites`` by ``weight``.

    Applied to both the model and the guide, it turns the ELBO into
    ``E_q[log p(x | z)] - weight * KL(q(z | x) || p(z))`` for those sites: the KL warm-up of
    Bowman et al. (2016) and scVI. :func:`pyrosc.train.train` passes the sites the model marks with
    ``infer={"kl_warmup": True}``.
    """

    def __init__(self, weight: float, sites: frozenset[str] | set[str]) -> None:
        super().__init__()
        self.weight = weight
        self.sites = frozenset(sites)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] in self.sites and not msg["is_observed"]:
            msg["scale"] = self.weight * msg["scale"]


def annealed_sites(model: Callable, data: dict) -> frozenset[str]:
    """The names of the latent sites ``model`` marks for KL warm-up (``infer["kl_warmup"]``),
    read off a trace of the model alone (a trace replayed against a guide carries the guide's
    ``infer`` instead)."""
    with poutine.block():
        model_trace = poutine.trace(model).get_trace(**data_kwargs(model, data))
    return frozenset(
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and site["infer"].get(KL_WARMUP)
    )


def _latent_sites(trace: poutine.Trace) -> list[dict]:
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def _traces(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return guide_trace, model_trace


class _LogDensity(Messenger):
    """Sum the log-densities of the sample sites it sees (scale and mask applied), as
    ``Trace.log_prob_sum`` would, without building a trace; with ``replay``, first give each
    latent site named there that value (as ``poutine.replay`` would).

    Attributes after the run: ``total``, the sum; ``latents``, each latent site's value;
    ``reparameterized``, whether every latent site could be drawn by reparameterisation.
    Subsample sites (log-density 0) and ``pyro.deterministic`` sites (log-density 0 at their
    own value) are skipped.
    """

    def __init__(self, replay: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self.replay = replay
        self.latents: dict[str, Tensor] = {}
        self.total: Tensor | float = 0.0
        self.reparameterized = True

    def _pyro_sample(self, msg: dict) -> None:
        if self.replay is not None and not msg["is_observed"] and msg["name"] in self.replay:
            msg["value"] = self.replay[msg["name"]]
            msg["done"] = True

    def _pyro_post_sample(self, msg: dict) -> None:
        if site_is_subsample(msg) or msg["infer"].get("_deterministic"):
            return
        fn = msg["fn"]
        if not msg["is_observed"]:
            self.latents[msg["name"]] = msg["value"]
            self.reparameterized = self.reparameterized and fn.has_rsample
        log_density = fn.log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        self.total = self.total + scale_and_mask(log_density, msg["scale"], msg["mask"]).sum()


def reparameterized_loss(model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
    """The negative ELBO of one draw, ``log q(z) - log p(x, z)`` summed over every sample site
    (scale and mask applied), for a guide that draws each latent by reparameterisation.

    For such a pair it is ``Trace_ELBO().differentiable_loss``, value and gradient, on the
    same draws: the guide's score-function terms vanish. The guide runs under a handler that
    sums its log-densities as it goes and keeps the latent values, and the model runs under one
    that replays those values and sums its own; no trace is built, copied or pruned, and no
    check runs, which saves ~1-2 ms of a ~12 ms scVI step and changes no number. The trainer
    takes Pyro's own loss for any step run with Pyro's validation on (its checks are the point
    there), and this one after.

    Should a draw of the guide hold a latent site without reparameterisation after all (one
    that only some minibatches reach), the step is ``Trace_ELBO``'s, whose score-function
    terms that site needs.
    """
    with _LogDensity() as guide_density:
        guide(*args, **kwargs)
    if not guide_density.reparameterized:
        return Trace_ELBO().differentiable_loss(model, guide, *args, **kwargs)
    with _LogDensity(replay=guide_density.latents) as model_density:
        model(*args, **kwargs)
    return guide_density.total - model_density.total


def free_bits_loss(free_bits: float) -> Callable:
    """A loss for :class:`pyro.infer.SVI`: the negative ELBO with free bits (Kingma et al. 2016).

    Each latent dimension ``d`` of each local site pays ``max(KL_d, free_bits)`` nats per cell
    instead of ``KL_d``, where ``KL_d`` is the minibatch mean of ``log q(z_d) - log p(z_d)``.
    Below the threshold a dimension's KL costs nothing, so the optimiser has no reason to shut
    it down (posterior collapse). Written as ``KL + relu(free_bits - KL_d)`` on the same draws,
    so the gradient is exactly zero for a dimension under its budget.

    Needs reparameterised continuous latents (Normal ``z``); models with enumerated discrete
    sites are trained with ``TraceEnum_ELBO`` and cannot use free bits.
    """

    def loss(model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        guide_trace, model_trace = _traces(model, guide, args, kwargs)
        elbo_value = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        for guide_site in _latent_sites(guide_trace):
            if not guide_site["fn"].has_rsample:
                raise ValueError(
                    f"free bits need reparameterised latents; site {guide_site['name']!r} "
                    "is not (use free_bits=0)"
                )
            model_site = model_trace.nodes[guide_site["name"]]
            log_ratio = per_dimension_log_prob(guide_site) - per_dimension_log_prob(model_site)
            kl_per_dimension = log_ratio.reshape(-1, log_ratio.shape[-1]).mean(dim=0)
            n_scaled_cells = guide_site["scale"] * log_ratio[..., 0].numel()
            shortfall = torch.relu(free_bits - kl_per_dimension).sum()
            elbo_value = elbo_value - n_scaled_cells * shortfall
        return -elbo_value

    return loss


@dataclass(frozen=True)
class Objective:
    """The loss a fit optimises, read off one trace of the pair (:func:`read_objective`).

    Plain data, so that it can travel to other processes (:mod:`pyrosc.distributed`), each of
    which builds the loss with :meth:`loss`.

    Attributes:
        annealed: the latent sites the model marks for KL warm-up.
        enumeration_nesting: for a pair with sites marked for parallel enumeration, the
            plates they nest at most (the loss is then ``TraceEnum_ELBO``); None otherwise.
        free_bits: nats per latent dimension exempt from the KL penalty (0: off).
        reparameterized: every latent site of the guide is drawn by reparameterisation (then
            the plain ELBO is :func:`reparameterized_loss` once Pyro's validation is off).
    """

    annealed: frozenset[str]
    enumeration_nesting: int | None = None
    free_bits: float = 0.0
    reparameterized: bool = False

    @property
    def name(self) -> str:
        """``"TraceEnum_ELBO"``, ``"free_bits"`` or ``"Trace_ELBO"``."""
        if self.enumeration_nesting is not None:
            return "TraceEnum_ELBO"
        return "free_bits" if self.free_bits > 0 else "Trace_ELBO"

    def loss(self, frozen: bool = False) -> Callable[..., Tensor]:
        """``loss(model, guide, **data)``: the differentiable negative ELBO of one minibatch
        (scaled by the ``cells`` plate to all training cells).

        Args:
            frozen: the fit freezes some tensors; ``pyro.module``'s warning about each of them,
                at every step, is silenced (:func:`pyrosc.freezing.quiet_about_frozen`).
        """
        if self.enumeration_nesting is not None:
            loss_fn = TraceEnum_ELBO(max_plate_nesting=self.enumeration_nesting).differentiable_loss
        elif self.free_bits > 0:
            loss_fn = free_bits_loss(self.free_bits)
        elif self.reparameterized:
            loss_fn = _checked_or_lean(Trace_ELBO().differentiable_loss, reparameterized_loss)
        else:
            loss_fn = Trace_ELBO().differentiable_loss
        return quiet_about_frozen(loss_fn) if frozen else loss_fn


def _checked_or_lean(checked: Callable, lean: Callable) -> Callable[..., Tensor]:
    """``checked`` while Pyro's validation is on (a first step, or every step on request),
    ``lean`` otherwise: the same loss without the checks."""

    def loss(model: Callable, guide: Callable, *args, **kwargs) -> Tensor:
        return (checked if is_validation_enabled() else lean)(model, guide, *args, **kwargs)

    return loss


def read_objective(
    model: Callable, guide: Callable, probe: dict, free_bits: float, kl_warmup_epochs: int
) -> Objective:
    """The :class:`Objective` of ``model`` and ``guide``, from one trace of the pair on the
    data dictionary ``probe`` (which creates the pair's parameters in the current store).

    Raises:
        ValueError: free bits with enumerated sites, or ``kl_warmup_epochs`` for a model that
            marks no site for KL warm-up.
    """
    guide_trace, model_trace = trace_pair(model, guide, probe)
    enumerated = any(
        site["type"] == "sample" and site["infer"].get("enumerate") == "parallel"
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
    )
    if enumerated and free_bits > 0:
        raise ValueError("free bits are not available for models with enumerated sites")
    annealed = annealed_sites(model, probe)
    if kl_warmup_epochs and not annealed:
        raise ValueError(
            "kl_warmup_epochs is set but the model marks no site for KL warm-up; mark one with "
            'pyro.sample(name, prior, infer={"kl_warmup": True})'
        )
    nesting = plate_nesting(guide_trace, model_trace) if enumerated else None
    reparameterized = all(site["fn"].has_rsample for site in _latent_sites(guide_trace))
    return Objective(annealed, nesting, free_bits, reparameterized)


def warmup_weight(epoch: int, kl_warmup_epochs: int) -> float:
    """The KL weight of ``epoch`` (counted from 1): rises linearly to 1 over
    ``kl_warmup_epochs`` (0: always 1)."""
    return min(1.0, epoch / kl_warmup_epochs) if kl_warmup_epochs else 1.0
