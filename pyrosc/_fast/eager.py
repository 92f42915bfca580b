"""The NB and ZINB log-probabilities in eager PyTorch, with hand-written gradients.

The speed path for everything but a training step (which is :mod:`pyrosc._fast.compiled`):
evaluation with many particles, float64, theta per cell, broadcasting. It computes the same
numbers as the reference forms of :mod:`pyrosc.likelihoods`, and is tested against them.

With mean m, inverse dispersion t and count x, the reference

    log p = lgamma(x + t) - lgamma(t) - lgamma(x + 1) + t log(t / (t + m)) + x log(m / (t + m))

cancels terms ~1e7 in float32 at t = 1e6 (0.8 nats wrong at x = 1). It is rewritten (exactly)
as

    log p = t q + x w + E(t, x),      q = log((t + x) / (t + m)),
                                      w = log(m (t + x) / ((t + m) (x + 1))),

with E(t, x) the lgamma terms of :mod:`pyrosc._fast.tables`. Everything that involves the
mean is in the first two terms, which cost one log1p each and are accurate in float32 for
every t, x and m: each log is of a ratio of two positive numbers A / B, taken as
sign(A - B) log1p(|A - B| / min(A, B)) with A - B formed without cancellation, and neither
t q nor x w is a large number that cancels against another. (Splitting x w as x q +
x log(m / (x + 1)) would cancel terms ~1e6 at x = 1e5, t = 1e-3.) With F = dE/dt the
gradients are

    d log p / d log m = t (x - m) / (t + m)
    d log p / dt      = q + (m - x) / (t + m) + F(t, x)

which :class:`_NegativeBinomialLogProb` forms in the forward pass, sharing its intermediates,
instead of letting autograd record a dozen (batch, genes) intermediates and differentiate
lgamma (digamma, which costs twice lgamma) through both branches of a torch.where.

E and F are where the time goes if done elementwise: on the CPU lgamma costs as much as ~35
additions and digamma ~70. But in the usual case theta is one number per gene (the
distribution keeps it unbroadcast) and counts are small integers, so E and F only take
TABLE_SIZE * genes distinct values: they are tabulated per gene, and each element is one
table look-up. The other elements (counts >= TABLE_SIZE, non-integers) take Stirling
remainders; so does everything when theta varies per cell, but only where the count is not 0
(E = F = 0 there). What is left is ~30 cheap elementwise passes over (batch, genes), for which
memory traffic and fresh allocations matter as much as arithmetic: they are done in place.

CPU only: the table sizes, the positions of the rare cases and a rare branch are read to the
host, which on CUDA would synchronise (the dispatch in :mod:`pyrosc._fast` sends CUDA tensors
to the reference).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from pyrosc._fast.tables import TABLE_SIZE, count_tables, remainder_terms

#: Below this, m (t + x) is formed from log m instead (see :func:`_log_prob_and_gradients`).
TINY_PRODUCT = 1e-30


def broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
    """``torch.broadcast_shapes`` for plain shapes, without its symbolic-shape machinery
    (~40 us a call, paid several times per training step): same result, same error."""
    ndim = max(len(shape) for shape in shapes)
    result = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if result[i] not in (1, size):
                    raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                result[i] = size
    return torch.Size(result)


def _fill_remainder_terms(
    terms: list[Tensor | None], where: Tensor, theta: Tensor, value: Tensor
) -> None:
    """Overwrite E and F (``terms``; F may be None) at ``where`` with :func:`remainder_terms`.

    ``where`` holds flat positions in the (contiguous) ``terms`` and in ``value``, which has
    their shape; ``theta`` is theta at those positions. (index_select and index_copy_ on flat
    positions are ~3x faster than indexing with a mask or with one index per dimension.)
    """
    exact = remainder_terms(theta, value.reshape(-1).index_select(0, where), terms[1] is not None)
    for result, replacement in zip(terms, exact, strict=True):
        if result is not None:
            result.view(-1).index_copy_(0, where, replacement)


def _per_gene(theta: Tensor, shape: torch.Size) -> Tensor | None:
    """``theta`` as a ``(genes,)`` vector if it is one value per gene of ``shape``, else None.

    That is the case when all but its last dimension have size 1 (a scalar counts too), and
    when tabulating pays: ``shape`` (that of theta + counts) has at least as many elements as
    the tables (:data:`TABLE_SIZE` rows of genes).
    """
    if len(shape) == 0 or math.prod(theta.shape[:-1]) != 1:
        return None
    if shape.numel() < TABLE_SIZE * shape[-1]:
        return None
    return theta.reshape(-1).expand(shape[-1])


def _log_gamma_terms(
    theta: Tensor, value: Tensor, with_derivative: bool, counts_checked: bool
) -> tuple[Tensor, Tensor | None]:
    """E(theta, value) and, if asked, dE/dtheta, on the broadcast shape of theta and value.

    By table look-up where theta is per gene and the count is a small integer, else from
    :func:`remainder_terms`. Same values either way (float64 tables, rounded once).
    ``counts_checked``: value is known to hold non-negative integers (it was validated).
    """
    shape = broadcast_shapes(theta.shape, value.shape)
    dtype = torch.promote_types(theta.dtype, value.dtype)
    value = value.expand(shape)
    per_gene = _per_gene(theta, shape)
    if per_gene is None:
        # E and F are exactly 0 at a count of 0, which most counts are in single-cell data:
        # they are only computed at the others (also keeping them exactly 0, whereas R(theta)
        # and R(theta + 0) may round differently: a vectorised loop versus its scalar tail).
        terms = [value.new_zeros(shape, dtype=dtype)]
        terms.append(torch.zeros_like(terms[0]) if with_derivative else None)
        where = value.reshape(-1).nonzero().squeeze(-1)
        theta = theta.expand(shape).reshape(-1).index_select(0, where)
        _fill_remainder_terms(terms, where, theta, value)
        return terms[0], terms[1]

    genes = shape[-1]
    # The row of a count in the tables is the count itself, and the tables need only go up to
    # the largest count, TABLE_SIZE - 1 at most. In the usual case every count is an integer in the
    # tables (checked with reductions, which are cheap; integrality is known when the
    # distribution has validated the counts). Otherwise the elements the tables do not hold
    # (larger counts, non-integers, and the negative or NaN values that validation rejects,
    # which must not index outside the tables when it is off) are masked, looked up at a
    # clamped row, and replaced below.
    low, high = (float(bound) for bound in torch.aminmax(value))
    size = int(min(high, TABLE_SIZE - 1)) + 1 if high >= 0 else 1
    untabulated = None
    if low >= 0 and high < size and (counts_checked or torch.equal(value.floor(), value)):
        rows = value
    else:
        rows = value.clamp(0, size - 1).floor_()
        untabulated = rows != value
        rows.nan_to_num_(0.0)
    # One flat index into the (size, genes) tables, row * genes + column, in int32:
    # index_select on a flat table is ~3x faster than gather along dim 0.
    columns = torch.arange(genes, dtype=torch.int32, device=rows.device)
    index = rows.int().mul_(genes).add_(columns).reshape(-1)

    looked_up = [
        None if table is None else table.to(dtype).reshape(-1).index_select(0, index).view(shape)
        for table in count_tables(per_gene, size, with_derivative)
    ]
    if untabulated is not None:
        where = untabulated.view(-1).nonzero().squeeze(-1)
        _fill_remainder_terms(looked_up, where, per_gene.index_select(0, where % genes), value)
    return looked_up[0], looked_up[1]


def _log_prob_and_gradients(
    log_mean: Tensor,
    theta: Tensor,
    value: Tensor,
    counts_checked: bool,
    mean_grad: bool = False,
    theta_grad: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """NB log-probability and its elementwise derivatives in log mean and theta (None unless
    asked).

    All three on the broadcast shape of the arguments; each argument broadcasts as given, so
    theta-only work is done once per gene and count-only work once per count.
    ``counts_checked``: value is known to hold non-negative integers (it was validated).

    The mean enters as its log: a mean that underflows to 0 in float32 (a softmax proportion
    below ~1e-38) still has a finite log-probability and a finite derivative, the derivative
    in log m, t (x - m) / (t + m), where that in m, t (x - m) / (m (t + m)), is 0 / 0.
    """
    log_gamma_terms, log_gamma_derivative = _log_gamma_terms(
        theta, value, theta_grad, counts_checked
    )
    # Every (batch, genes) temporary is a fresh allocation, and in a training step a fresh
    # allocation is often fresh memory from the OS, which costs more to fault in than the
    # arithmetic done on it; so the work below is done in place, and buffers that are done
    # with are reused (each reuse is marked). With the mean and the counts expanded to the
    # full shape (views), every result has the full shape and can be written into.
    shape = broadcast_shapes(log_mean.shape, theta.shape, value.shape)
    log_mean, value = log_mean.expand(shape), value.expand(shape)
    mean = log_mean.exp()
    theta_plus_mean = theta + mean
    difference = value - mean
    # q = log((t + x) / (t + m)) = sign(x - m) log1p(|x - m| / (t + min(x, m))).
    denominator = torch.minimum(value, mean).add_(theta)
    q = difference.abs().div_(denominator).log1p_().copysign_(difference)
    # w = log(A / B), A = m (t + x), B = (t + m) (x + 1), as -log(B / A), because B - A =
    # m + t (x + 1 - m) has no cancellation. The floor on min(A, B) keeps x w = 0 (not NaN) for
    # x = 0 even if m t underflows.
    b = torch.addcmul(theta_plus_mean, theta_plus_mean, value, out=denominator)  # reuse
    smaller = (theta + value).mul_(mean)
    torch.minimum(smaller, b, out=smaller)
    # Where A = m (t + x) is below ~1e-30 (m far below t), -w = -log m - log1p(x / t) +
    # log1p(x), from log m itself: the ratio form would divide by a floored A.
    underflow = smaller < TINY_PRODUCT
    smaller.clamp_(min=torch.finfo(smaller.dtype).tiny)
    excess = torch.add(difference, 1, out=b)  # reuse
    torch.addcmul(mean, excess, theta, out=excess)  # B - A
    minus_w = torch.div(excess, smaller, out=smaller).abs_().log1p_().copysign_(excess)  # reuse
    if bool(underflow.any()):  # rare: spare the other evaluations three passes
        direct = torch.log1p(value).sub_(torch.log1p(value / theta)).sub_(log_mean)
        minus_w = torch.where(underflow, direct, minus_w)
    # log p = t q + x w + E; E is a fresh tensor of ours, written into when it has the shape.
    if log_gamma_terms.shape == shape:
        log_prob = log_gamma_terms.addcmul_(theta, q)
    else:
        log_prob = torch.addcmul(log_gamma_terms, theta, q)
    log_prob.addcmul_(value, minus_w, value=-1)
    grad_mean = grad_theta = None
    if mean_grad or theta_grad:
        ratio = difference.div_(theta_plus_mean)  # (x - m) / (t + m); reuse
    if mean_grad:
        # In log m: t (x - m) / (t + m) = t x / (t + m) - t m / (t + m), finite for any m.
        grad_mean = torch.mul(ratio, theta)
    if theta_grad:
        grad_theta = q.sub_(ratio).add_(log_gamma_derivative)  # reuse
    return log_prob, grad_mean, grad_theta


class _NegativeBinomialLogProb(torch.autograd.Function):
    """log p(value | log mean, theta) with hand-written gradients (see the module notes).

    Forward saves the two elementwise derivatives; backward only multiplies them by the
    incoming gradient and sums them to the shapes of log mean and theta. Not twice
    differentiable, and not in the counts (the dispatch sends counts that need a gradient to
    the reference).
    """

    @staticmethod
    def forward(
        ctx, log_mean: Tensor, theta: Tensor, value: Tensor, counts_checked: bool
    ) -> Tensor:
        mean_grad, theta_grad = ctx.needs_input_grad[:2]
        log_prob, grad_mean, grad_theta = _log_prob_and_gradients(
            log_mean, theta, value, counts_checked, mean_grad, theta_grad
        )
        ctx.save_for_backward(grad_mean, grad_theta)
        ctx.shapes = log_mean.shape, theta.shape
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads = [
            None if derivative is None else (grad_output * derivative).sum_to_size(shape)
            for derivative, shape in zip(ctx.saved_tensors, ctx.shapes, strict=True)
        ]
        return (*grads, None, None)  # value, counts_checked


def _zero_inflate(
    log_prob: Tensor, gate_logits: Tensor, zero: Tensor, grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """log(pi 1[x = 0] + (1 - pi) p(x)) and its derivatives in log p and in g = logit pi.

    log pi = -softplus(-g) and log(1 - pi) = -softplus(g) (both from one log1p(exp(-|g|)), so
    both accurate); at x = 0 the log-probability is log pi + softplus(log p - g) (as Pyro forms
    it: no cancellation), elsewhere log p + log(1 - pi). The derivative in log p is
    sigmoid(log p - g) at x = 0 and 1 elsewhere, that in g is 1 - (that in log p) - pi.
    ``zero`` is 1. where x = 0 and 0. elsewhere; the two cases are selected with lerp, which is
    exact at weights 0 and 1 and, unlike torch.where, a single vectorised pass. All arguments
    have the same shape, and fresh buffers are reused (as in :func:`_log_prob_and_gradients`).
    """
    shared = gate_logits.abs().neg_().exp_().log1p_()  # log1p(exp(-|g|))
    minus_log_gate = gate_logits.neg().clamp_(min=0).add_(shared)  # softplus(-g)
    log_not_gate = gate_logits.clamp(min=0).add_(shared).neg_()  # -softplus(g)
    odds = log_prob - gate_logits  # log((1 - pi) p(x) / pi)
    at_zero = F.softplus(odds).sub_(minus_log_gate)
    result = torch.lerp(log_not_gate.add_(log_prob), at_zero, zero, out=at_zero)  # reuse
    if not grads:
        return result, None, None
    grad_log_prob = odds.sigmoid_().sub_(1).mul_(zero).add_(1)  # reuse
    pi = torch.sigmoid(gate_logits, out=minus_log_gate)  # reuse
    grad_gate = pi.add_(grad_log_prob).neg_().add_(1)
    return result, grad_log_prob, grad_gate


class _ZeroInflationLogProb(torch.autograd.Function):
    """:func:`_zero_inflate` as an autograd function (its derivatives formed in the forward)."""

    @staticmethod
    def forward(ctx, log_prob: Tensor, gate_logits: Tensor, zero: Tensor) -> Tensor:
        result, grad_log_prob, grad_gate = _zero_inflate(log_prob, gate_logits, zero, True)
        ctx.save_for_backward(grad_log_prob, grad_gate)
        ctx.shapes = log_prob.shape, gate_logits.shape
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (grad_log_prob, grad_gate), (log_prob_shape, gate_shape) = ctx.saved_tensors, ctx.shapes
        return (
            (grad_output * grad_log_prob).sum_to_size(log_prob_shape),
            (grad_output * grad_gate).sum_to_size(gate_shape),
            None,
        )


def _negative_binomial(
    log_mean: Tensor, theta: Tensor, value: Tensor, counts_checked: bool
) -> Tensor:
    """log NB, through :class:`_NegativeBinomialLogProb` when a gradient is needed."""
    if torch.is_grad_enabled() and (log_mean.requires_grad or theta.requires_grad):
        return _NegativeBinomialLogProb.apply(log_mean, theta, value, counts_checked)
    return _log_prob_and_gradients(log_mean, theta, value, counts_checked)[0]


def log_prob(
    log_mean: Tensor,
    theta: Tensor,
    value: Tensor,
    gate_logits: Tensor | None,
    counts_checked: bool,
) -> Tensor:
    """log NB(value | exp(log_mean), theta), or the ZINB with ``gate_logits``, elementwise on
    the broadcast shape; differentiable in all but ``value``.

    Args:
        log_mean, theta, value, gate_logits: CPU tensors of one floating dtype, broadcastable;
            theta fastest as one value per gene, ``(genes,)``. Counts need not be integers.
        counts_checked: whether value is known to hold non-negative integers (validated).
    """
    log_prob = _negative_binomial(log_mean, theta, value, counts_checked)
    if gate_logits is None:
        return log_prob
    shape = broadcast_shapes(log_prob.shape, gate_logits.shape, value.shape)
    log_prob, gate_logits = log_prob.expand(shape), gate_logits.expand(shape)
    # (Written straight into a float buffer: a bool tensor converted costs ~7x more.)
    zero = torch.eq(value, 0, out=value.new_empty(value.shape, dtype=log_prob.dtype))
    zero = zero.expand(shape)
    if torch.is_grad_enabled() and (log_prob.requires_grad or gate_logits.requires_grad):
        return _ZeroInflationLogProb.apply(log_prob, gate_logits, zero)
    return _zero_inflate(log_prob, gate_logits, zero, False)[0]
