"""Frozen weights during a fit: what :func:`pyrosc.train.train` leaves exactly as it is.

Reference mapping (:mod:`pyrosc.surgery`) trains a few new entries of a fitted model and keeps
every reference weight to the bit. Two mechanisms, chosen per tensor:

* A fully frozen tensor gets ``requires_grad=False`` for the fit: no gradient is computed for
  it, Adam never sees it, and its weight decay never applies. That is where the speed of a
  query fit comes from (a frozen encoder costs a forward pass only).
* A partly frozen tensor (a first layer's weight with new covariate columns, a per-batch free
  parameter with new rows) trains as a whole, and its frozen entries are written back from a
  saved copy after every optimiser step: exact, whatever Adam's moments and weight decay did.

Frozen BatchNorm layers stay in evaluation mode, so that their running statistics do not move.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import torch
from torch import Tensor, nn

#: What ``pyro.module`` warns when it skips a parameter with ``requires_grad=False`` in training
#: mode: the frozen tensors here, on purpose.
_SKIPPED_PARAMETER = re.escape("was not registered in the param store because requires_grad=False")


@dataclass(frozen=True)
class Frozen:
    """What a fit must leave exactly as it is.

    Attributes:
        masks: parameter name -> boolean mask of its frozen entries (True: frozen), of the
            parameter's shape. A name is one of ``networks.named_parameters()`` (e.g.
            ``"decoder.expression.body.linears.0.weight"``) or of Pyro's parameter store (a
            free parameter such as ``"inverse_dispersion"``, whose unconstrained value is
            frozen). A parameter not named trains as usual.
        eval_modules: names in ``networks.named_modules()`` of modules kept in evaluation mode
            while training (frozen BatchNorm layers: their running statistics stay).
    """

    masks: Mapping[str, Tensor]
    eval_modules: tuple[str, ...] = ()


class FrozenFit:
    """A :class:`Frozen` applied to the tensors of one fit.

    Made before the pair is first traced, it puts the frozen modules in evaluation mode at
    once (a trace in training mode would move their running statistics). Entered around the
    training loop (after that trace, so that the free parameters exist in the parameter store),
    it gives fully frozen tensors ``requires_grad=False``; on exit they get it back, so the
    networks leave the fit as plain modules. Call :meth:`after_step` after each optimiser step
    and :meth:`keep_eval` after each switch of the networks to training mode.

    Raises:
        ValueError: an eval module is not among the networks' modules; on entering, a mask
            names no parameter of the networks or the store, or has the wrong shape.
    """

    def __init__(self, frozen: Frozen, networks: nn.Module | None) -> None:
        self.frozen, self.networks = frozen, networks
        named_modules = dict(networks.named_modules()) if networks is not None else {}
        unknown = [name for name in frozen.eval_modules if name not in named_modules]
        if unknown:
            raise ValueError(f"frozen eval_modules {unknown} are not modules of the networks")
        self.eval_modules = [named_modules[name] for name in frozen.eval_modules]
        self.keep_eval()
        self.fully: list[Tensor] = []
        self.partly: list[tuple[Tensor, Tensor, Tensor]] = []

    def __enter__(self) -> FrozenFit:
        parameters = dict(pyro.get_param_store().named_parameters())
        if self.networks is not None:
            parameters |= dict(self.networks.named_parameters())
        for name, mask in self.frozen.masks.items():
            tensor = _parameter(parameters, name, mask)
            mask = mask.to(tensor.device, torch.bool)
            if bool(mask.all()):
                self.fully.append(tensor)
            elif bool(mask.any()):
                self.partly.append((tensor, mask, tensor.detach().clone()))
        for tensor in self.fully:
            tensor.requires_grad_(False)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for tensor in self.fully:
            tensor.requires_grad_(True)

    def after_step(self) -> None:
        """Write the frozen entries of the partly frozen tensors back, bit for bit (one
        elementwise pass, with no data-dependent shape: no host synchronisation on CUDA)."""
        with torch.no_grad():
            for tensor, mask, saved in self.partly:
                tensor.copy_(torch.where(mask, saved, tensor))

    def to(self, device: torch.device | str) -> None:
        """Move the masks and saved entries of the partly frozen tensors to ``device``, where
        the tensors went after :meth:`__enter__` (a process of a distributed fit: its device)."""
        self.partly = [
            (tensor, mask.to(device), saved.to(device)) for tensor, mask, saved in self.partly
        ]

    def keep_eval(self) -> None:
        """Put the frozen modules (BatchNorm) back in evaluation mode."""
        for module in self.eval_modules:
            module.eval()


def _parameter(parameters: dict[str, Tensor], name: str, mask: Tensor) -> Tensor:
    """The parameter ``name`` of a fit, checked against its mask."""
    if name not in parameters:
        raise ValueError(
            f"frozen names {name!r}, which is neither a parameter of the networks nor a Pyro "
            "parameter of this fit; name parameters as networks.named_parameters() or "
            "pyro.get_param_store() do"
        )
    tensor = parameters[name]
    if mask.shape != tensor.shape:
        raise ValueError(
            f"the frozen mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
            f"{tuple(tensor.shape)}"
        )
    return tensor


def quiet_about_frozen(loss_fn: Callable) -> Callable:
    """``loss_fn`` without the warning ``pyro.module`` gives, in training mode, for each
    parameter it skips because ``requires_grad=False``: with frozen tensors that is intended,
    and the warning would repeat at every step. Other warnings pass."""

    def loss(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f".*{_SKIPPED_PARAMETER}")
            return loss_fn(*args, **kwargs)

    return loss
