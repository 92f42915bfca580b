"""The speed path of the NB and ZINB log-probabilities: private, one entry point.

:mod:`pyrosc.likelihoods` defines every log-probability by a reference form of a few lines
of lgamma and softplus. The negative binomial is the largest cost of a training step, and in
float32 its reference form loses up to a nat at large theta (lgamma(x + t) - lgamma(t)
cancels terms ~1e7 at t = 1e6). This package computes the same numbers faster and accurately
in float32:

* :mod:`~pyrosc._fast.tables`: the lgamma terms from per-gene count tables and Stirling
  remainders;
* :mod:`~pyrosc._fast.eager`: the eager, in-place NB and ZINB with hand-written gradients
  (evaluation with many particles, float64, theta per cell);
* :mod:`~pyrosc._fast.compiled`: the training step's NB and ZINB as one compiled loop.

:func:`negative_binomial_log_prob` decides which applies, or that none does. Everything here
is tested against the reference forms and scipy (tests/test_fast.py, test_likelihoods.py).
"""

from __future__ import annotations

from functools import reduce

import torch
from pyro.distributions import constraints
from torch import Tensor

from pyrosc._fast import compiled, eager
from pyrosc._fast.eager import broadcast_shapes

__all__ = ["NONNEGATIVE_INTEGERS", "broadcast_shapes", "negative_binomial_log_prob"]


def negative_binomial_log_prob(
    log_mean: Tensor,
    theta: Tensor,
    value: Tensor,
    gate_logits: Tensor | None = None,
    counts_checked: bool = False,
) -> Tensor | None:
    """log NB(value | exp(log_mean), theta), or with ``gate_logits`` the ZINB, elementwise on
    the broadcast shape of the arguments; None where the reference form must run instead.

    That is on any device but the CPU (the tables and the rare cases read sizes and positions
    to the host, a synchronisation on CUDA, where the reference is plain elementwise work) and
    for counts that need a gradient (the reference differentiates in them plainly).

    Args:
        log_mean: log mu, ``(..., genes)``.
        theta: the inverse dispersion, broadcastable; fastest as ``(genes,)``.
        value: the counts, broadcastable; need not be integers.
        gate_logits: logit pi of the ZINB, broadcastable; None for the NB.
        counts_checked: whether value is known to hold non-negative integers (validated).
    """
    tensors = [log_mean, theta, value] + ([] if gate_logits is None else [gate_logits])
    if value.requires_grad or any(tensor.device.type != "cpu" for tensor in tensors):
        return None
    dtype = reduce(torch.promote_types, (tensor.dtype for tensor in tensors))
    log_mean, theta, value = log_mean.to(dtype), theta.to(dtype), value.to(dtype)
    if gate_logits is not None:
        gate_logits = gate_logits.to(dtype)
    result = compiled.log_prob(log_mean, theta, value, gate_logits)
    if result is None:
        result = eager.log_prob(log_mean, theta, value, gate_logits, counts_checked)
    return result


class _NonnegativeIntegers(type(constraints.nonnegative_integer)):
    """``constraints.nonnegative_integer`` with a cheaper, equivalent check.

    With validation on (Pyro's default) the support is checked on every log_prob call, and
    the stock check's ``value % 1`` alone costs ~0.4 ms on a (128, 2000) batch, as much as a
    third of the whole log-probability. floor(x) == x, with the floor clamped to [0, max
    finite], is false for exactly the same values: non-integers, negatives, +-inf and NaN.
    """

    def check(self, value: Tensor) -> Tensor:
        if not value.is_floating_point():
            return value >= 0
        return value.floor().clamp_(0, torch.finfo(value.dtype).max) == value


#: The support of the count distributions.
NONNEGATIVE_INTEGERS = _NonnegativeIntegers(0)
