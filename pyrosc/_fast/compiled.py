"""The NB and ZINB log-probabilities of a training step, each compiled into one fused loop.

Written elementwise in eager PyTorch (:mod:`pyrosc._fast.eager`), the log-probability of a
(cells, genes) minibatch and its derivatives take ~40 passes over the whole array plus a dozen
small operations for the counts beyond the count tables, each one reading and writing memory
or paying PyTorch's per-operation overhead: on a 2-core CPU ~40 % of an scVI training step.
Here the same formulas are written once, as functions of the elementwise inputs, and compiled
by PyTorch's inductor into one vectorised loop that reads the log mean, counts and gate logits
once and writes the log-probability and its derivatives once. They are compiled ahead of time,
once per machine, and loaded by each process from a cache on disk (:mod:`pyrosc._fast.ahead`),
so that a process pays ~10 ms for them, not the seconds of ``torch.compile``.

What is compiled is only arithmetic: the autograd function below forms the derivatives in the
forward pass (as its eager counterparts do) and the backward multiplies them by the incoming
gradient, so no autograd graph is traced. The per-gene terms (count tables E(theta, k),
F(theta, k) for k < :data:`TABLE_SIZE`, and the Stirling remainder of theta) are
:func:`pyrosc._fast.tables.gene_terms`; counts beyond the tables take the Stirling form of
:func:`pyrosc._fast.tables.remainder_terms` inside the loop.

The fused path is taken for the training case only (:func:`applies`): float32 on the CPU, a
gradient needed, a 2-D ``(cells, genes)`` log mean (and gate) with the counts' shape, and one
``theta`` per gene. Everything else runs the eager code, and so does a training fit of fewer
than :data:`COMPILE_MIN_STEPS` steps (:func:`planned_steps`) on a machine where the kernels
are not built yet. Both are tested against the reference log-probabilities of
:mod:`pyrosc.likelihoods` and against float64 truth. Set the environment
variable ``PYROSC_COMPILE=0`` to turn it off; if compiling fails (no C++ compiler, say) pyrosc
warns once and uses the eager code from then on.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pyrosc._fast import ahead, tables
from pyrosc._fast.eager import TINY_PRODUCT
from pyrosc._fast.tables import TABLE_SIZE

_TINY = torch.finfo(torch.float32).tiny


def _invalid(value: Tensor) -> Tensor:
    """Whether any count is negative, not an integer, infinite or NaN (a 0-d bool): then the
    tables do not apply, and the caller runs the eager code."""
    return ((value < 0) | (value != value.floor()) | (value == math.inf)).any()


def _negative_binomial(
    log_mean: Tensor,
    theta: Tensor,
    value: Tensor,
    table_e: Tensor,
    table_f: Tensor,
    remainder: Tensor,
    remainder_derivative: Tensor,
    inverse_theta: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log NB(value | exp(log_mean), theta), its derivatives in log mean and theta, and
    :func:`_invalid`.

    The formulas of :mod:`pyrosc._fast.eager` (see the notes there):
    log p = t q + x w + E with q = log((t + x) / (t + m)) and w = log(m (t + x) / ((t + m)
    (x + 1))), each a log1p of a ratio formed without cancellation. E and F = dE/dt are looked
    up in ``table_e``, ``table_f`` (flat ``(TABLE_SIZE * genes,)``, row = count) for counts
    below :data:`TABLE_SIZE`; for larger ones they are :func:`pyrosc._fast.tables.remainder_terms`
    from ``remainder`` = R(theta), ``remainder_derivative`` = R'(theta) and ``inverse_theta``
    (each ``(genes,)``), with the series cut to two terms (the next is < 3e-11 from 32 on) and
    the two half-logs merged into one log of a number >= 33, so that the branch costs one
    division and one log.
    """
    genes = value.shape[-1]
    mean = log_mean.exp()
    rows = value.clamp(0, TABLE_SIZE - 1).long()
    index = rows * genes + torch.arange(genes, device=value.device)
    total = theta + value
    both = total * (value + 1)
    reciprocal = both.reciprocal()
    r_total, r_count = (value + 1) * reciprocal, total * reciprocal  # 1 / (t + x), 1 / (x + 1)
    r2_total, r2_count = r_total * r_total, r_count * r_count
    series_e = (
        r_total * (1 / 12 - r2_total / 360)
        - r_count * (1 / 12 - r2_count / 360)
        - remainder
        - 0.5 * torch.log(both * inverse_theta)
    )
    series_f = (
        -r2_total * (1 / 12 - r2_total / 120)
        - remainder_derivative
        + 0.5 * value * inverse_theta * r_total
    )
    large = value >= TABLE_SIZE
    e = torch.where(large, series_e, table_e[index])
    f = torch.where(large, series_f, table_f[index])
    difference = value - mean
    q = torch.log1p(difference.abs() / (torch.minimum(value, mean) + theta)).copysign(difference)
    theta_plus_mean = theta + mean
    smaller = torch.minimum(total * mean, theta_plus_mean * (value + 1))
    excess = mean + theta * (difference + 1)  # B - A
    minus_w = torch.log1p(excess.abs() / smaller.clamp(min=_TINY)).copysign(excess)
    # A mean far below theta (m (t + x) < 1e-30): -w from log m, as the eager code does.
    direct = torch.log1p(value) - torch.log1p(value * inverse_theta) - log_mean
    minus_w = torch.where(smaller < TINY_PRODUCT, direct, minus_w)
    log_prob = e + theta * q - value * minus_w
    ratio = difference / theta_plus_mean
    return log_prob, ratio * theta, q - ratio + f, _invalid(value)


def _zero_inflated_negative_binomial(
    log_mean: Tensor, theta: Tensor, gate_logits: Tensor, value: Tensor, *gene_terms: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """log ZINB, its derivatives in log mean, theta and the gate logits g, and
    :func:`_invalid`.

    The zero inflation of :mod:`pyrosc._fast.eager` around :func:`_negative_binomial`, with two
    exponentials, one division and one log per element: with a = exp(-|g|) and b = exp(-|o|)
    for the odds o = log p - g, pi = sigmoid(g) and sigmoid(o) share the reciprocal of
    (1 + a)(1 + b); at a zero count the log-probability is softplus(o) - softplus(-g) =
    max(o, 0) - max(-g, 0) + log1p((b - a) / (1 + a)), elsewhere log p - softplus(g) =
    log p - max(g, 0) - log1p(a).
    """
    log_prob, grad_mean, grad_theta, invalid = _negative_binomial(
        log_mean, theta, value, *gene_terms
    )
    odds = log_prob - gate_logits
    a, b = torch.exp(-gate_logits.abs()), torch.exp(-odds.abs())
    reciprocal = ((1 + a) * (1 + b)).reciprocal()
    pi = torch.where(gate_logits >= 0, 1.0, a) * (1 + b) * reciprocal
    sigmoid_odds = torch.where(odds >= 0, 1.0, b) * (1 + a) * reciprocal
    zero = value == 0
    log_term = torch.log1p(torch.where(zero, (b - a) * (1 + b) * reciprocal, a))
    at_zero = odds.clamp(min=0) - (-gate_logits).clamp(min=0) + log_term
    result = torch.where(zero, at_zero, log_prob - gate_logits.clamp(min=0) - log_term)
    grad_log_prob = torch.where(zero, sigmoid_odds, 1.0)
    grad_gate = 1 - (pi + grad_log_prob)
    return result, grad_log_prob * grad_mean, grad_log_prob * grad_theta, grad_gate, invalid


_MATRIX, _TABLE = "cells genes", "table genes"
_GENE_TERM_SHAPES = (_TABLE, _TABLE, "genes", "genes", "genes")  # what GENE_TERMS returns
GENE_TERMS = ahead.Kernel("gene terms", tables.gene_terms, ("genes",), TABLE_SIZE)
NEGATIVE_BINOMIAL = ahead.Kernel(
    "nb", _negative_binomial, (_MATRIX, "genes", _MATRIX, *_GENE_TERM_SHAPES), TABLE_SIZE
)
ZERO_INFLATED_NEGATIVE_BINOMIAL = ahead.Kernel(
    "zinb",
    _zero_inflated_negative_binomial,
    (_MATRIX, "genes", _MATRIX, _MATRIX, *_GENE_TERM_SHAPES),
    TABLE_SIZE,
)
#: Every kernel of the training step (what ``pyrosc build-kernels`` builds).
KERNELS = (GENE_TERMS, NEGATIVE_BINOMIAL, ZERO_INFLATED_NEGATIVE_BINOMIAL)

_KERNELS: dict[str, Callable] = {}  # the kernels this process has loaded
_FAILED: list[str] = []
_SHORT_FIT: list[bool] = [False]

#: Fewer planned training steps than this run the eager code when the kernels are not built
#: yet on this machine. Building them (:func:`pyrosc._fast.ahead.build`) costs ~30-40 s once
#: per machine, PyTorch version and pyrosc version; loading built ones ~10 ms a process. The
#: fused NB step is ~5-7 ms faster than the eager one on a (128, 2000) minibatch (2 CPU cores),
#: so a first fit of 500 steps pays part of the build and every later fit profits.
COMPILE_MIN_STEPS = 500

#: Inductor settings of the kernels' build: the CPU's own report of its vector instruction set
#: is trusted (inductor would otherwise re-check each one by building a test library and
#: loading it in a fresh Python), and the kernels, one short C++ loop each, need no
#: precompiled header.
INDUCTOR_OPTIONS = {"cpp.vec_isa_ok": True, "cpp_cache_precompile_headers": False}


def enabled() -> bool:
    """Whether the fused path may be used: not turned off, and compiling has not failed."""
    return os.environ.get("PYROSC_COMPILE", "1") != "0" and not _FAILED


@contextmanager
def planned_steps(steps: int) -> Iterator[None]:
    """Within: a fit of ``steps`` training steps, which builds no kernel that is not built yet
    when ``steps`` < :data:`COMPILE_MIN_STEPS` (a short fit is faster eager than building)."""
    previous = _SHORT_FIT[0]
    _SHORT_FIT[0] = steps < COMPILE_MIN_STEPS
    try:
        yield
    finally:
        _SHORT_FIT[0] = previous


def run(kernel: ahead.Kernel, *args: Tensor) -> tuple[Tensor, ...] | None:
    """``kernel.function(*args)``, by the kernel built ahead of time (:mod:`pyrosc._fast.ahead`):
    loaded from the machine's cache once per process, or built first if it is not there; None,
    after a warning, if building or running it fails (no C++ compiler, say), and from then on
    the eager code runs. One build serves every number of cells and genes.

    None, quietly, in a short fit (:func:`planned_steps`) that would have to build it.
    """
    function = _KERNELS.get(kernel.name)
    try:
        if function is None:
            path = ahead.package_path(kernel)
            if not path.exists() and _SHORT_FIT[0]:
                return None
            function = _load_or_build(kernel, path)
            _KERNELS[kernel.name] = function
        return tuple(ahead.call(function, args))
    except Exception as error:  # noqa: BLE001 - any failure to build or run means: use eager
        _FAILED.append(f"{type(error).__name__}: {error}")
        warnings.warn(
            f"pyrosc could not compile its fused likelihood ({_FAILED[-1][:300]}); using the "
            "eager one, which is slower (set PYROSC_COMPILE=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _load_or_build(kernel: ahead.Kernel, path: Path) -> Callable[..., list[Tensor]]:
    """Load the package at ``path``; build it first if it is missing, or again if it does not
    load (a file damaged on disk)."""
    if path.exists():
        try:
            return ahead.load(path)
        except Exception:  # noqa: BLE001 - rebuilt below; a second failure is raised
            pass
    failure = ahead.failure_path(kernel)
    if failure.exists():  # no second attempt in every process (a machine without a compiler)
        raise RuntimeError(
            f"building it failed before on this machine ({failure.read_text()[:300]}); "
            f"delete {failure} to try again"
        )
    ahead.build(kernel, INDUCTOR_OPTIONS)
    return ahead.load(path)


def applies(
    log_mean: Tensor, theta: Tensor, value: Tensor, gate_logits: Tensor | None = None
) -> bool:
    """Whether the arguments are the training case the fused kernels are for (see the module
    notes): float32 on the CPU, a gradient needed, log mean (and gate) with the counts' 2-D shape,
    theta one value per gene, and plain tensors (not subclasses such as the provenance-tracking
    tensors of Pyro's TraceGraph_ELBO, which must see every operation)."""
    tensors = [log_mean, theta, value] + ([] if gate_logits is None else [gate_logits])
    return (
        enabled()
        and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
        and torch.is_grad_enabled()
        and any(tensor.requires_grad for tensor in tensors)
        and not value.requires_grad
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and value.dim() == 2
        and log_mean.shape == value.shape
        and (gate_logits is None or gate_logits.shape == value.shape)
        and theta.shape == value.shape[-1:]
    )


class _Fallback(Exception):
    """Raised inside the fused forward when the eager code must run instead (compiling failed,
    or the counts are not non-negative integers)."""


class _FusedLogProb(torch.autograd.Function):
    """Fused NB (no gate) or ZINB log-probability, ``(cells, genes)``; its derivatives are
    formed in the forward, and the backward only multiplies them by the incoming gradient."""

    @staticmethod
    def forward(
        ctx,
        log_mean: Tensor,
        theta: Tensor,
        gate_logits: Tensor | None,
        value: Tensor,
        *gene_terms: Tensor,
    ) -> Tensor:
        if gate_logits is None:
            outputs = run(NEGATIVE_BINOMIAL, log_mean, theta, value, *gene_terms)
        else:
            kernel = ZERO_INFLATED_NEGATIVE_BINOMIAL
            outputs = run(kernel, log_mean, theta, gate_logits, value, *gene_terms)
        if outputs is None or bool(outputs[-1]):
            raise _Fallback
        log_prob, *derivatives = outputs[:-1]
        ctx.save_for_backward(*derivatives)
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_mean, grad_theta, *grad_gate = ctx.saved_tensors
        grads = [grad_output * grad_mean, (grad_output * grad_theta).sum(0)]
        grads.append(grad_output * grad_gate[0] if grad_gate else None)
        return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))  # value, gene terms


def log_prob(
    log_mean: Tensor, theta: Tensor, value: Tensor, gate_logits: Tensor | None = None
) -> Tensor | None:
    """log NB(value | exp(log_mean), theta), or the ZINB with ``gate_logits``,
    ``(cells, genes)``, differentiable in log mean and gate logits ``(cells, genes)`` and theta
    ``(genes,)``; None where the eager code must run instead: arguments that :func:`applies`
    does not accept, compiling failed, or counts that are not non-negative integers.
    """
    if not applies(log_mean, theta, value, gate_logits):
        return None
    terms = run(GENE_TERMS, theta)
    if terms is None:
        return None
    try:
        return _FusedLogProb.apply(log_mean, theta, gate_logits, value, *terms)
    except _Fallback:
        return None
