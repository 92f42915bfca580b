"""Count observation models, chosen by name and parameterised by their mean or its log.

Every model in pyrosc decodes a cell into an expected count per gene, as its log
``log l + log_softmax(f(z))`` (:func:`expression_likelihood`: finite where a softmax proportion
underflows to 0 in float32), and then observes the counts through one of four likelihoods:

==========  ============================================  ===========================
name        distribution                                  extra parameters
==========  ============================================  ===========================
poisson     Poisson(mu)                                   none
nb          NegativeBinomial(mu, theta)                   inverse_dispersion (theta)
zip         pi * delta_0 + (1 - pi) * Poisson(mu)         gate_logits (logit pi)
zinb        pi * delta_0 + (1 - pi) * NB(mu, theta)       both
==========  ============================================  ===========================

with NB mean mu and variance mu + mu^2 / theta, and pi the probability of an extra
(structural) zero. From a log mean the Poisson is :class:`PoissonLogRate` (from a mean, Pyro's
own), the ZIP Pyro's ZeroInflatedDistribution around it. The negative binomial is
:class:`NegativeBinomial`, parameterised by (log mu, theta) directly, whose log-probability stays
accurate in float32 for large theta and is fast (it is the largest cost of a training step):
see the notes before :data:`_TABLE_SIZE`. The ZINB is Pyro's ZeroInflatedDistribution around
it, with the mixture's log-probability fused (:class:`_ZeroInflatedNegativeBinomial`).
In a training step (float32 on the CPU, a gradient needed, theta per gene) the NB and ZINB
log-probabilities run as one compiled loop each (:mod:`pyrosc.fused`, same formulas); every
other case runs the eager code here. Log-probabilities are tested against scipy.stats over
counts 0..1e5, means 1e-3..1e4 and theta 1e-3..1e6, and the fused ones against float64 truth
and the eager code.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.autograd.function import once_differentiable

from pyrosc import fused

LIKELIHOODS: tuple[str, ...] = ("poisson", "nb", "zip", "zinb")


# The parameters each likelihood takes, besides the mean.
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "poisson": (),
    "nb": ("inverse_dispersion",),
    "zip": ("gate_logits",),
    "zinb": ("inverse_dispersion", "gate_logits"),
}


def _parameters(likelihood: str) -> tuple[str, ...]:
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"Unknown likelihood {likelihood!r}; expected one of: {', '.join(LIKELIHOODS)}."
        )
    return _PARAMETERS[likelihood]


def uses_dispersion(likelihood: str) -> bool:
    """Whether ``likelihood`` takes an ``inverse_dispersion`` (true for "nb" and "zinb")."""
    return "inverse_dispersion" in _parameters(likelihood)


def uses_gate(likelihood: str) -> bool:
    """Whether ``likelihood`` takes ``gate_logits`` (true for "zip" and "zinb")."""
    return "gate_logits" in _parameters(likelihood)


def _check_arguments(likelihood: str, given: dict[str, Tensor | None]) -> None:
    """Raise if a parameter ``likelihood`` needs is missing, or one it does not use is given."""
    needed = _parameters(likelihood)
    for name, value in given.items():
        if name in needed and value is None:
            raise ValueError(f"Likelihood {likelihood!r} needs {name}, but none was given.")
        if name not in needed and value is not None:
            users = " and ".join(repr(lik) for lik in LIKELIHOODS if name in _PARAMETERS[lik])
            raise ValueError(
                f"Likelihood {likelihood!r} does not use {name}, but {name} was given; "
                f"only {users} take it."
            )


def _broadcast_shapes(*shapes: tuple[int, ...]) -> torch.Size:
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


# Stirling's formula: lgamma(z) = (z - 1/2) log z - z + log(2 pi) / 2 + a remainder that is
# 1 / (12 z) - 1 / (360 z^3) + 1 / (1260 z^5) - 1 / (1680 z^7) + O(z^-9); for z >= 10 the
# omitted terms are below 1 / (1188 * 10^9) < 1e-12.
_SERIES_FROM = 10.0
_REMAINDER_AT_ONE = 1 - 0.5 * math.log(2 * math.pi)


def _stirling_remainder(z: Tensor) -> Tensor:
    """lgamma(z) - (z - 1/2) log z + z - 1 for z > 0, elementwise: zero at z = 1.

    Stirling's remainder shifted by its value at 1, so that the remainders cancel exactly in
    :func:`_remainder_terms` for a count of 0. It is small (|.| < 1) for z >= 1;
    below 10 it is computed from lgamma itself, which is small there.
    """
    small = z.clamp(max=_SERIES_FROM)
    direct = torch.lgamma(small) - (small - 0.5) * small.log() + small - 1
    r = z.clamp(min=_SERIES_FROM).reciprocal()
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680))) - _REMAINDER_AT_ONE
    # Both branches are finite everywhere (clamped), so the unused one's zero gradient is not NaN.
    return torch.where(z < _SERIES_FROM, direct, series)


def _stirling_remainder_derivative(z: Tensor) -> Tensor:
    """d/dz :func:`_stirling_remainder` = digamma(z) - log z + 1 / (2 z), elementwise, z > 0.

    From 10 on it is the derivative of the series, -1 / (12 z^2) + 1 / (120 z^4)
    - 1 / (252 z^6) + 1 / (240 z^8), with omitted terms below 1 / (132 * 10^10) < 1e-12.
    Unlike digamma(z) itself (~ log z), it is small for large z, so differences of it are
    accurate in float32. No gradient flows through it (it is only used to form gradients).
    """
    small = z.clamp(max=_SERIES_FROM)
    direct = torch.digamma(small) - small.log() + 0.5 / small
    r2 = z.clamp(min=_SERIES_FROM).reciprocal().square()
    series = -r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 / 240)))
    return torch.where(z < _SERIES_FROM, direct, series)


# ---------------------------------------------------------------------------------------------
# The fast mean-parameterised negative binomial.
#
# With mean m, inverse dispersion t and count x, the log-probability
#
#     log p = t log(t / (t + m)) + x log(m / (t + m)) + lgamma(t + x) - lgamma(t) - lgamma(x + 1)
#
# is rewritten (exactly) as
#
#     log p = t q + x w + E(t, x),      q = log((t + x) / (t + m)),
#                                       w = log(m (t + x) / ((t + m) (x + 1))),
#     E(t, x) = lgamma(t + x) - lgamma(t) - lgamma(x + 1) - (t + x) log(t + x) + t log t
#               + x log(x + 1).
#
# Everything that involves the mean is in the first two terms, which cost one log1p each and
# are accurate in float32 for every t, x and m: each log is of a ratio of two positive numbers
# A / B, taken as sign(A - B) log1p(|A - B| / min(A, B)) with A - B formed without
# cancellation, and neither t q nor x w is a large number that cancels against another. (Pyro's
# form, t log(t / (t + m)) + x log(m / (t + m)) plus three lgammas, cancels terms ~1e7 at
# t = 1e6; splitting x w as x q + x log(m / (x + 1)) cancels terms ~1e6 at x = 1e5, t = 1e-3.)
# E does not involve the mean; it is small (E = -log(2 pi x) / 2 + O(1 / x) for large x, and
# -log(1 + x / t) / 2 + O(1 / t) for large t), and computed so that it is accurate (below). Its
# derivative in t, F(t, x) = digamma(t + x) - digamma(t) - log(1 + x / t), gives the gradients
#
#     d log p / dm = t (x - m) / (m (t + m))
#     d log p / dt = q + (m - x) / (t + m) + F(t, x)
#
# which :class:`_NegativeBinomialLogProb` forms in the forward pass, sharing its intermediates,
# instead of letting autograd record a dozen (batch, genes) intermediates and differentiate
# lgamma (digamma, which costs twice lgamma) through both branches of a torch.where.
#
# E and F are where the time goes if done elementwise: on the CPU lgamma costs as much as ~35
# additions and digamma ~70. But in the usual case theta is one number per gene (the
# distribution keeps it unbroadcast) and counts are small integers, so E and F only take
# K * genes distinct values: :func:`_count_tables` tabulates them per gene for counts 0..K-1
# (in float64, from sums of logs), and each element is then one table look-up. The other
# elements (counts >= K, non-integers) go through :func:`_remainder_terms`, from Stirling
# remainders (:func:`_remainder_terms`); so does everything when theta varies per cell, but
# only where the count is not 0 (E = F = 0 there).
#
# What is left is ~30 cheap elementwise passes over (batch, genes), for which memory traffic
# and fresh allocations matter as much as arithmetic: they are done in place where possible.
# In a training step they are one compiled loop instead (pyrosc.fused), which also handles the
# counts beyond the tables inside the loop, from the same Stirling remainders.
# ---------------------------------------------------------------------------------------------

# Counts below this are looked up in per-gene tables. In single-cell data nearly all counts
# are: in pbmc3k 0.02 % are >= 32 (0.4 % on its 2000 most variable genes). The tables take
# 2 * K * genes float64 numbers to build.
_TABLE_SIZE = fused.TABLE_SIZE
#: Below this, m (t + x) is formed from log m instead (see :func:`_log_prob_and_gradients`).
_TINY_PRODUCT = fused.TINY_PRODUCT


def _remainder_terms(
    theta: Tensor, value: Tensor, with_derivative: bool
) -> tuple[Tensor, Tensor | None]:
    """E(theta, value) and, if asked, F = dE/dtheta, elementwise for any theta and value >= 0.

    With R the Stirling remainder (:func:`_stirling_remainder`), lgamma(z) = (z - 1/2) log z -
    z + 1 + R(z), so that

        E = R(theta + value) - R(theta) - R(value + 1) - log1p(value / theta) / 2
            - log1p(value) / 2
        F = R'(theta + value) - R'(theta) + value / (2 theta (theta + value))

    in which every term is small. Costs three lgamma and two digamma per element: see
    :func:`_log_gamma_terms` for when it is used.
    """
    total = theta + value
    log_gamma_terms = (
        _stirling_remainder(total)
        - _stirling_remainder(theta)
        - _stirling_remainder(value + 1)
        - 0.5 * torch.log1p(value / theta)
        - 0.5 * torch.log1p(value)
    )
    if not with_derivative:
        return log_gamma_terms, None
    derivative = (
        _stirling_remainder_derivative(total)
        - _stirling_remainder_derivative(theta)
        + value / (2 * theta * total)
    )
    return log_gamma_terms, derivative


def _fill_remainder_terms(
    terms: list[Tensor | None], where: Tensor, theta: Tensor, value: Tensor
) -> None:
    """Overwrite E and F (``terms``; F may be None) at ``where`` with :func:`_remainder_terms`.

    ``where`` holds flat positions in the (contiguous) ``terms`` and in ``value``, which has
    their shape; ``theta`` is theta at those positions. (index_select and index_copy_ on flat
    positions are ~3x faster than indexing with a mask or with one index per dimension.)
    """
    exact = _remainder_terms(theta, value.reshape(-1).index_select(0, where), terms[1] is not None)
    for result, replacement in zip(terms, exact, strict=True):
        if result is not None:
            result.view(-1).index_copy_(0, where, replacement)


def _count_tables(theta: Tensor, size: int, with_derivative: bool) -> tuple[Tensor, Tensor | None]:
    """E(theta, k) and, if asked, F(theta, k) for k = 0..size-1: ``(size, genes)`` each.

    ``theta`` is ``(genes,)``. For integer k, lgamma(t + k) - lgamma(t) = sum_{j<k} log(t + j)
    and digamma(t + k) - digamma(t) = sum_{j<k} 1 / (t + j), so with L_k = log1p(k / t)

        E(t, k) = sum_{j<k} L_j - (t + k) L_k + k log(k + 1) - lgamma(k + 1)
        F(t, k) = sum_{j<k} 1 / (t + j) - L_k

    Written with log1p(k / t) rather than log(t + k), nothing of the size of t log t appears,
    whatever t is. The tables are computed in float64 (they are small, and E cancels terms of
    size ~k) and returned in float64: the caller casts.
    """
    t = theta.detach().to(torch.float64)
    k = torch.arange(size, dtype=torch.float64, device=theta.device).unsqueeze(-1)  # (size, 1)
    shifted = t + k  # (size, genes)
    log_ratio = torch.log1p(k / t)  # L_k
    count_only = k * torch.log1p(k) - torch.lgamma(k + 1)  # (size, 1)
    # sum_{j<k} L_j is the cumulative sum minus its last term, so that
    # E = cumsum(L) - (t + k + 1) L + k log(k + 1) - lgamma(k + 1).
    log_gamma_terms = (
        log_ratio.cumsum(0).addcmul_(shifted + 1, log_ratio, value=-1).add_(count_only)
    )
    if not with_derivative:
        return log_gamma_terms, None
    reciprocals = shifted.reciprocal_()
    derivative = reciprocals.cumsum(0).sub_(reciprocals).sub_(log_ratio)
    return log_gamma_terms, derivative


def _per_gene(theta: Tensor, shape: torch.Size) -> Tensor | None:
    """``theta`` as a ``(genes,)`` vector if it is one value per gene of ``shape``, else None.

    That is the case when all but its last dimension have size 1 (a scalar counts too), and
    when tabulating pays: ``shape`` (that of theta + counts) has at least as many elements as
    the tables (:data:`_TABLE_SIZE` rows of genes).
    """
    if len(shape) == 0 or math.prod(theta.shape[:-1]) != 1:
        return None
    if shape.numel() < _TABLE_SIZE * shape[-1]:
        return None
    return theta.reshape(-1).expand(shape[-1])


def _log_gamma_terms(
    theta: Tensor, value: Tensor, with_derivative: bool, counts_checked: bool
) -> tuple[Tensor, Tensor | None]:
    """E(theta, value) and, if asked, dE/dtheta, on the broadcast shape of theta and value.

    By table look-up where theta is per gene and the count is a small integer, else from
    :func:`_remainder_terms`. Same values either way (float64 tables, rounded once).
    ``counts_checked``: value is known to hold non-negative integers (it was validated).
    """
    shape = _broadcast_shapes(theta.shape, value.shape)
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
    # the largest count, K - 1 at most. In the usual case every count is an integer in the
    # tables (checked with reductions, which are cheap; integrality is known when the
    # distribution has validated the counts). Otherwise the elements the tables do not hold
    # (counts >= K, non-integers, and the negative or NaN values that validation rejects,
    # which must not index outside the tables when it is off) are masked, looked up at a
    # clamped row, and replaced below.
    low, high = (float(bound) for bound in torch.aminmax(value))
    size = int(min(high, _TABLE_SIZE - 1)) + 1 if high >= 0 else 1
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
        for table in _count_tables(per_gene, size, with_derivative)
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
    shape = _broadcast_shapes(log_mean.shape, theta.shape, value.shape)
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
    underflow = smaller < _TINY_PRODUCT
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
    """log p(value | log mean, theta) with hand-written gradients (see the notes above).

    Forward saves the two elementwise derivatives; backward only multiplies them by the
    incoming gradient and sums them to the shapes of log mean and theta. Not twice
    differentiable.
    """

    @staticmethod
    def forward(
        ctx, log_mean: Tensor, theta: Tensor, value: Tensor, counts_checked: bool
    ) -> Tensor:
        mean_grad, theta_grad, value_grad, _ = ctx.needs_input_grad
        log_prob, grad_mean, grad_theta = _log_prob_and_gradients(
            log_mean, theta, value, counts_checked, mean_grad, theta_grad
        )
        saved = (log_mean, theta, value) if value_grad else ()
        ctx.save_for_backward(grad_mean, grad_theta, *saved)
        ctx.shapes = log_mean.shape, theta.shape, value.shape
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_mean, grad_theta, *inputs = ctx.saved_tensors
        mean_shape, theta_shape, value_shape = ctx.shapes
        grads = []
        for derivative, shape in ((grad_mean, mean_shape), (grad_theta, theta_shape)):
            grads.append(
                None if derivative is None else (grad_output * derivative).sum_to_size(shape)
            )
        if inputs:
            # Counts are data; this is only so that a value that requires grad gets a correct
            # gradient, computed plainly: log(m / (t + m)) + digamma(t + x) - digamma(x + 1).
            log_mean, theta, value = inputs
            derivative = (
                log_mean
                - torch.logaddexp(theta.log(), log_mean)
                + torch.digamma(theta + value)
                - torch.digamma(value + 1)
            )
            grads.append((grad_output * derivative).sum_to_size(value_shape))
        else:
            grads.append(None)
        return (*grads, None)


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


def _gene_terms(theta: Tensor) -> tuple[Tensor, ...]:
    """What :mod:`pyrosc.fused` needs of ``theta`` ``(genes,)``: the tables of E and F for
    counts 0..TABLE_SIZE-1 (:func:`_count_tables`), flattened to ``(TABLE_SIZE * genes,)``,
    the Stirling remainder R(theta) and its derivative, and 1 / theta, ``(genes,)``; all in
    theta's dtype.
    """
    tables = _count_tables(theta, _TABLE_SIZE, with_derivative=True)
    flat = (table.to(theta.dtype).reshape(-1) for table in tables)
    remainders = _stirling_remainder(theta), _stirling_remainder_derivative(theta)
    return (*flat, *remainders, theta.reciprocal())


def _fused_log_prob(
    log_mean: Tensor, theta: Tensor, value: Tensor, gate_logits: Tensor | None = None
) -> Tensor | None:
    """The NB (or, with ``gate_logits``, ZINB) log-probability from :mod:`pyrosc.fused` in the
    training case it applies to; None where the eager code must run."""
    if not fused.applies(log_mean, theta, value, gate_logits):
        return None
    gene_terms = fused.run("gene terms", _gene_terms, theta.detach())
    if gene_terms is None:
        return None
    return fused.log_prob(log_mean, theta, value, gene_terms, gate_logits)


def _negative_binomial_log_prob(
    log_mean: Tensor, inverse_dispersion: Tensor, value: Tensor, counts_checked: bool = False
) -> Tensor:
    """log NB(value | exp(log_mean), inverse_dispersion), elementwise on the broadcast shape.

    Args:
        log_mean: log mu, any shape broadcastable with the others.
        inverse_dispersion: theta > 0; fastest as one value per gene, ``(genes,)``.
        value: counts x >= 0; need not be integers.
        counts_checked: whether value is known to hold non-negative integers (validated).

    Differentiable in all three (in value only for completeness: it is computed plainly).
    """
    dtype = torch.promote_types(
        torch.promote_types(log_mean.dtype, inverse_dispersion.dtype), value.dtype
    )
    log_mean, inverse_dispersion, value = (
        tensor.to(dtype) for tensor in (log_mean, inverse_dispersion, value)
    )
    log_prob = _fused_log_prob(log_mean, inverse_dispersion, value)
    if log_prob is not None:
        return log_prob
    if torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (log_mean, inverse_dispersion, value)
    ):
        return _NegativeBinomialLogProb.apply(log_mean, inverse_dispersion, value, counts_checked)
    return _log_prob_and_gradients(log_mean, inverse_dispersion, value, counts_checked)[0]


class NegativeBinomial(TorchDistribution):
    """Negative binomial with mean mu and inverse dispersion ``inverse_dispersion`` (theta).

    Variance mu + mu^2 / theta; theta -> inf gives the Poisson. The same distribution as Pyro's
    NegativeBinomial(total_count=theta, logits=log(mu / theta)), but:

    * parameterised by ``log_mean`` (or ``mean``, whose log is taken): the models decode a
      log mean, ``log l + log_softmax(f(z))``, which stays finite where a softmax proportion
      underflows to 0 in float32, and so do the log-probability and its gradient;
    * its log-probability is accurate in float32 for any theta (Pyro's is off by 0.8 nats at
      theta = 1e6 and a count of 1), and fast, with hand-written gradients (see
      :func:`_negative_binomial_log_prob`);
    * the parameters are stored as given, not broadcast: a ``(genes,)`` theta stays one
      number per gene, so that everything that depends on theta alone is computed once per
      gene. ``batch_shape`` is the broadcast shape, and :meth:`expand` only changes it.

    Args:
        mean: ``(..., genes)``, mu > 0; or
        log_mean: ``(..., genes)``, log mu (exactly one of the two).
        inverse_dispersion: theta > 0, broadcastable to the mean; typically ``(genes,)``.
    """

    arg_constraints = {"log_mean": constraints.real, "inverse_dispersion": constraints.positive}
    support = _NonnegativeIntegers(0)

    def __init__(
        self,
        mean: Tensor | None = None,
        inverse_dispersion: Tensor | None = None,
        validate_args: bool | None = None,
        *,
        log_mean: Tensor | None = None,
    ) -> None:
        if (mean is None) == (log_mean is None):
            raise ValueError("NegativeBinomial takes exactly one of mean and log_mean")
        if inverse_dispersion is None:
            raise ValueError("NegativeBinomial needs an inverse_dispersion")
        self._log_mean = log_mean if log_mean is not None else mean.log()
        self.inverse_dispersion = inverse_dispersion  # as given (not broadcast)
        batch_shape = _broadcast_shapes(self._log_mean.shape, inverse_dispersion.shape)
        super().__init__(batch_shape, validate_args=validate_args)
        if mean is not None and self._validate_args and not bool((mean > 0).all()):
            raise ValueError(
                "Expected parameter mean of NegativeBinomial to be positive; a mean that may "
                "underflow to 0 is better passed as log_mean."
            )

    @property
    def log_mean(self) -> Tensor:
        """log mu, broadcast to ``batch_shape``."""
        return self._log_mean.expand(self.batch_shape)

    @property
    def _mean(self) -> Tensor:
        return self._log_mean.exp()

    @property
    def mean(self) -> Tensor:
        """mu, broadcast to ``batch_shape``."""
        return self._mean.expand(self.batch_shape)

    @property
    def variance(self) -> Tensor:
        """mu + mu^2 / theta, broadcast to ``batch_shape``."""
        mean = self._mean
        return (mean + mean**2 / self.inverse_dispersion).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None) -> NegativeBinomial:
        """The same distribution with a larger ``batch_shape``; the parameters are not copied."""
        new = self._get_checked_instance(NegativeBinomial, _instance)
        batch_shape = torch.Size(batch_shape)
        if _broadcast_shapes(batch_shape, self.batch_shape) != batch_shape:
            raise ValueError(f"Cannot expand batch shape {self.batch_shape} to {batch_shape}.")
        new._log_mean = self._log_mean
        new.inverse_dispersion = self.inverse_dispersion
        super(NegativeBinomial, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        """Gamma-Poisson draws: lambda ~ Gamma(theta, rate theta / mu), x ~ Poisson(lambda)."""
        theta = self.inverse_dispersion
        with torch.no_grad():
            rate = theta * torch.exp(-self._log_mean)
            gamma = dist.Gamma(theta, rate.clamp(max=torch.finfo(rate.dtype).max))
            return torch.poisson(gamma.expand(self.batch_shape).sample(sample_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of counts ``value``, on the broadcast shape of value and batch_shape."""
        if self._validate_args:
            self._validate_sample(value)
        log_prob = _negative_binomial_log_prob(
            self._log_mean, self.inverse_dispersion, value, counts_checked=bool(self._validate_args)
        )
        shape = _broadcast_shapes(self.batch_shape, value.shape)
        return log_prob if log_prob.shape == shape else log_prob.expand(shape)


class PoissonLogRate(TorchDistribution):
    """Poisson with log rate ``log_rate``: ``log p(x) = x log r - r - log x!``, finite (with a
    finite gradient) where the rate itself underflows to 0.

    Args:
        log_rate: ``(..., genes)``, log r.
    """

    arg_constraints = {"log_rate": constraints.real}
    support = _NonnegativeIntegers(0)

    def __init__(self, log_rate: Tensor, validate_args: bool | None = None) -> None:
        self.log_rate = log_rate
        super().__init__(log_rate.shape, validate_args=validate_args)

    @property
    def mean(self) -> Tensor:
        """The rate r."""
        return self.log_rate.exp()

    @property
    def variance(self) -> Tensor:
        """The rate r."""
        return self.log_rate.exp()

    def expand(self, batch_shape, _instance=None) -> PoissonLogRate:
        new = self._get_checked_instance(PoissonLogRate, _instance)
        new.log_rate = self.log_rate.expand(batch_shape)
        super(PoissonLogRate, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        with torch.no_grad():
            return torch.poisson(self.log_rate.exp().expand(self._extended_shape(sample_shape)))

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return value * self.log_rate - self.log_rate.exp() - torch.lgamma(value + 1)


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


class _ZeroInflatedNegativeBinomial(dist.ZeroInflatedDistribution):
    """Pyro's ZeroInflatedDistribution around :class:`NegativeBinomial`, with a faster log_prob.

    Constructed as ``_ZeroInflatedNegativeBinomial(NegativeBinomial(...), gate_logits=...)``;
    everything but log_prob is Pyro's. Pyro's log_prob validates the counts twice (itself and
    the base distribution) and forms the mixture with two softplus, a torch.where and their
    autograd graph, which together cost more than the NB log-probability itself; this one
    validates once and fuses the mixture (:func:`_zero_inflate`). Same values.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-probability of counts ``value``, on the broadcast shape of value and batch_shape."""
        if "gate_logits" not in self.__dict__:  # made with gate probabilities: Pyro's way
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        base = self.base_dist
        result = _fused_log_prob(base._log_mean, base.inverse_dispersion, value, self.gate_logits)
        if result is not None:
            return result
        log_prob = _negative_binomial_log_prob(
            base._log_mean, base.inverse_dispersion, value, counts_checked=bool(self._validate_args)
        )
        dtype = torch.promote_types(log_prob.dtype, self.gate_logits.dtype)
        log_prob, gate_logits = log_prob.to(dtype), self.gate_logits.to(dtype)
        shape = _broadcast_shapes(log_prob.shape, gate_logits.shape, value.shape)
        log_prob, gate_logits = log_prob.expand(shape), gate_logits.expand(shape)
        # (Written straight into a float buffer: a bool tensor converted costs ~7x more.)
        zero = torch.eq(value, 0, out=value.new_empty(value.shape, dtype=log_prob.dtype))
        zero = zero.expand(shape)
        if torch.is_grad_enabled() and (log_prob.requires_grad or gate_logits.requires_grad):
            return _ZeroInflationLogProb.apply(log_prob, gate_logits, zero)
        return _zero_inflate(log_prob, gate_logits, zero, False)[0]


def count_distribution(
    likelihood: str,
    mean: Tensor | None = None,
    inverse_dispersion: Tensor | None = None,
    gate_logits: Tensor | None = None,
    *,
    log_mean: Tensor | None = None,
) -> dist.Distribution:
    """Observation model for counts by name, parameterised by its mean (or its log).

    Args:
        likelihood: one of :data:`LIKELIHOODS`.
        mean: ``(..., genes)``, expected counts mu of the (non-inflated) count model; strictly
            positive. Or:
        log_mean: ``(..., genes)``, log mu (exactly one of the two). The models pass this: a
            log mean stays finite where mu underflows to 0 in float32, and so do the
            log-probability and its gradient.
        inverse_dispersion: theta, positive, broadcastable to the mean; for "nb" and "zinb"
            only. The NB variance is mu + mu^2 / theta (theta -> inf gives the Poisson). Fastest
            as one value per gene, ``(genes,)``.
        gate_logits: logit of pi, the probability of an extra (structural) zero,
            broadcastable to the mean; for "zip" and "zinb" only.

    Returns:
        A distribution over non-negative integers with ``batch_shape`` the broadcast shape of
        the parameters and empty ``event_shape``; the caller decides on ``.to_event``.
        Extra leading dimensions (e.g. from Pyro's enumeration) broadcast through.

    Raises:
        ValueError: for an unknown name, a missing parameter the likelihood needs, a parameter
            given that it does not use, or not exactly one of mean and log_mean.
    """
    _check_arguments(
        likelihood, {"inverse_dispersion": inverse_dispersion, "gate_logits": gate_logits}
    )
    if (mean is None) == (log_mean is None):
        raise ValueError("count_distribution takes exactly one of mean and log_mean")

    if likelihood in ("poisson", "zip"):
        if log_mean is None:
            poisson = dist.Poisson(rate=mean)
        else:
            poisson = PoissonLogRate(log_mean)
        if likelihood == "poisson":
            return poisson
        return dist.ZeroInflatedDistribution(poisson, gate_logits=gate_logits)

    negative_binomial = NegativeBinomial(mean, inverse_dispersion, log_mean=log_mean)
    if likelihood == "nb":
        return negative_binomial
    return _ZeroInflatedNegativeBinomial(negative_binomial, gate_logits=gate_logits)


def gene_inverse_dispersion(counts: Tensor, likelihood: str) -> Tensor | None:
    """The gene-wise inverse dispersion ``theta_g`` of NB and ZINB, a positive Pyro parameter
    named ``inverse_dispersion`` (initialised to 1); None for the likelihoods without one.

    Args:
        counts: ``(batch, genes)`` counts, for the number of genes, dtype and device.
        likelihood: one of :data:`LIKELIHOODS`.

    Returns:
        ``(genes,)`` theta, or None.
    """
    if not uses_dispersion(likelihood):
        return None
    initial = counts.new_ones(counts.shape[-1])
    return pyro.param("inverse_dispersion", initial, constraint=constraints.positive)


def expression_likelihood(
    likelihood: str,
    library: Tensor,
    proportion_logits: Tensor,
    inverse_dispersion: Tensor | None = None,
    gate_logits: Tensor | None = None,
) -> dist.Distribution:
    """``x_n ~ Likelihood(l_n softmax(f_n), theta, pi_n)``: a cell's counts over all genes, one
    event, from the decoder's logits ``f_n``.

    The mean enters as its log, ``log l_n + log_softmax(f_n)``: a proportion far below the
    others underflows to 0.0 in float32 as ``softmax(f_n)``, which makes the mean 0 and its
    log-probability and gradient infinite or NaN; its log stays finite.

    Args:
        likelihood: one of :data:`LIKELIHOODS`.
        library: ``(..., cells)`` library sizes ``l``.
        proportion_logits: ``(..., cells, genes)`` logits ``f`` of the expression proportions
            ``rho = softmax(f)``.
        inverse_dispersion: ``theta``, broadcastable to ``(..., cells, genes)`` (NB, ZINB).
        gate_logits: ``(..., cells, genes)`` zero-inflation logits (ZIP, ZINB).

    Returns:
        a distribution with batch shape ``(..., cells)`` and event shape ``(genes,)``.
    """
    log_mean = library.log().unsqueeze(-1) + torch.log_softmax(proportion_logits, dim=-1)
    return count_distribution(
        likelihood, None, inverse_dispersion, gate_logits, log_mean=log_mean
    ).to_event(1)
