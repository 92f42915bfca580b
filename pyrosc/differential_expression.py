"""Differential expression from the generative model, for any model/guide pair.

A gene's log fold change between two groups of cells is a quantity of the model: the log ratio
of the groups' mean normalised expression, ``rho`` read from the model's ``proportions`` site.
Its posterior is drawn with the effect handlers of :func:`pyrosc.predictive.expression_draws`
(the latents drawn from the guide, the model decoded at them; with ``covariates``, decoded into
each setting, the counterfactual way), so a model a user writes gets differential expression
unchanged. At each of ``n_samples`` draws ``s``:

* every drawn cell ``i`` of group ``k`` is decoded at its own posterior draw, ``rho_i^s``;
* the group's mean is a Bayesian bootstrap over its cells, ``m_k^s = sum_i w_i^s rho_i^s`` with
  ``w^s ~ Dirichlet(1, ..., 1)``, so the draws carry both the posterior uncertainty of each cell
  and the uncertainty of a mean over finitely many cells (two random halves of one group differ
  by no more than that);
* plus the counts' sampling noise (``sampling_noise``): the group's observed mean of ``x / l``
  departs from its mean ``rho`` by about ``N(0, sum_i Var(x_i / l_i) / N_k^2)`` over its
  ``N_k`` cells, the variance read off the model's ``counts`` distribution at the draw. The
  amortised posterior of ``rho`` leaves that noise out (on unchanged genes of a simulation its
  sd was 0.05 against an error of 0.13), although the decoded ``rho`` follow the counts that
  carry it;
* ``LFC^s = log2(m_1^s + c) - log2(m_2^s + c)``, both in counts per 10,000, with the pseudocount
  ``c`` of :func:`pseudocount_cp10k`.

With ``shrink`` (the default) each gene's LFC is then shrunk by an empirical-Bayes prior learnt
from all the genes of the comparison (:mod:`pyrosc.de_shrinkage`): the draws' mean and sd are
the gene's estimate and standard error, the prior a point mass at 0 and normals around it, and
every summary and probability below is of the shrunk posterior. Without it a gene is judged
on its own, and the few unchanged genes of thousands that land a few standard errors from 0
are called with posterior probabilities of 0.8-0.95.

Change mode calls a gene differentially expressed when the LFC lies beyond ``delta`` on one
side: ``proba_de = max(P(LFC > delta), P(LFC < -delta))``. The direction is part of the
hypothesis (scvi-tools issue #1343): a wide posterior centred on zero is not evidence of a
change. Vanilla mode asks only which group is higher: ``max(P(m_1 > m_2), P(m_1 < m_2))``,
change mode at ``delta = 0`` (the pseudocount does not change which group is higher; the
shrunk posterior's point mass at 0 is on neither side).

Genes are called at a posterior expected false discovery rate: among the genes detected in at
least ``min_detection`` of the cells of either group, sorted by ``proba_de``, the largest set
whose mean ``1 - proba_de`` is at most ``fdr_target``. That mean is the share of false
discoveries the model expects among the calls, given the data; it is not a frequentist
guarantee, and it is as good as the model's fit and its posterior's calibration.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pyrosc.data import CountData
from pyrosc.de_groups import (
    Comparison,
    CountSummaries,
    comparisons,
    count_summaries,
    group_codes,
)
from pyrosc.de_shrinkage import fit_prior
from pyrosc.predictive import Covariates, expression_draws
from pyrosc.traces import check_n_samples, seeded

MODES = ("change", "vanilla")
#: The LFC threshold of change mode by default (log2 units: a change of about 19%).
DEFAULT_DELTA = 0.25
#: Normalised expression is reported in counts per 10,000.
CP10K = 1e4
#: Posterior draws at which the counts' variance is read (their mean is used at every draw).
NOISE_DRAWS = 4


# -- posterior draws of the groups' means ------------------------------------------------------


def drawn_cells(
    codes: np.ndarray, groups: Sequence[int], max_cells: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``max_cells`` cells of each group, drawn without replacement.

    Returns:
        the cells' positions, ascending, ``(cells,)``, and the number of the group's cells
        each stands for, ``(cells,)`` float64 (1 where a group is drawn whole), which keeps
        the share of each group in "the rest" what it is in the data.
    """
    chosen, stands_for = [], []
    for group in groups:
        members = np.flatnonzero(codes == group)
        drawn = members
        if len(members) > max_cells:
            drawn = rng.choice(members, size=max_cells, replace=False)
        chosen.append(drawn)
        stands_for.append(np.full(len(drawn), len(members) / len(drawn)))
    cells, weights = np.concatenate(chosen), np.concatenate(stands_for)
    order = np.argsort(cells)
    return cells[order], weights[order]


@dataclass(frozen=True)
class GroupDraws:
    """What each group's mean looks like at each posterior draw, from :func:`group_draws`.

    Attributes:
        sums: Bayesian-bootstrap sums of the cells' proportions, ``(n_samples, n_groups,
            genes)``; ``totals``: of their weights, ``(n_samples, n_groups)``: the group's
            mean at draw ``s`` is ``sums[s, k] / totals[s, k]``, a union of groups sums both.
        noise: the summed variance of the cells' normalised counts ``x / l`` around their
            proportions, each cell counted as often as it stands for, ``(n_groups, genes)``,
            the same at every draw (None without the counts' sampling noise); ``sizes``: the
            cells each group stands for, ``(n_groups,)``. The observed group mean of ``x / l``
            departs from the mean of the proportions by about ``N(0, noise / sizes**2)``.
    """

    sums: Tensor
    totals: Tensor
    noise: Tensor | None
    sizes: Tensor

    def side_means(self, groups: tuple[int, ...], normals: np.ndarray | None = None) -> np.ndarray:
        """The mean proportions of the union of ``groups`` at each draw, ``(n_samples,
        genes)``; with ``normals`` (standard normal draws of that shape), plus the counts'
        sampling noise, floored at 0."""
        side = list(groups)
        mean = self.sums[:, side].sum(dim=1) / self.totals[:, side].sum(dim=1, keepdim=True)
        mean = mean.numpy()
        if normals is None or self.noise is None:
            return mean
        sd = np.sqrt(self.noise[side].sum(dim=0).numpy()) / float(self.sizes[side].sum())
        return np.maximum(mean + sd * normals, 0.0)


@torch.no_grad()
def group_draws(
    model: Callable,
    guide: Callable,
    data: CountData,
    codes: np.ndarray,
    stands_for: np.ndarray,
    n_groups: int,
    covariates: Covariates | Sequence[Covariates] | None,
    n_samples: int,
    *,
    sampling_noise: bool,
    networks: nn.Module | None,
    batch_size: int | None,
    device: torch.device | str,
) -> GroupDraws:
    """Each group's mean proportions at each posterior draw (:class:`GroupDraws`).

    Each cell of ``data`` gets, at each draw, the weight ``Exp(1) * stands_for`` (normalised
    per group, Exp(1) weights are Dirichlet(1, ..., 1)). The counts' variance is summed with
    the weights ``stands_for`` (no bootstrap: it is the sampling noise of every cell of the
    group, not of a resampled few), from a second decoding at :data:`NOISE_DRAWS` draws,
    averaged: a sum over a group's cells barely moves from draw to draw, and reading it at
    every draw would cost a third of the time.

    Args:
        data: the drawn cells; ``codes`` and ``stands_for``: theirs, ``(cells,)``.
        sampling_noise: also sum the counts' variance.

    Returns:
        float64 tensors on the CPU.
    """
    sums = torch.zeros(n_samples, n_groups, data.n_genes, dtype=torch.float64)
    totals = torch.zeros(n_samples, n_groups, dtype=torch.float64)
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(codes), n_groups).double()
    one_hot *= torch.from_numpy(stands_for).unsqueeze(-1)
    options = {"networks": networks, "batch_size": batch_size, "device": device}
    draws = expression_draws(model, guide, data, covariates, 1.0, n_samples, **options)
    for index, proportions, _ in draws:
        bootstrap = torch.empty(n_samples, len(index), dtype=torch.float64).exponential_()
        weights = bootstrap.unsqueeze(-1) * one_hot[index]  # (n_samples, cells, n_groups)
        # (n_samples, n_groups, cells) @ (n_samples, cells, genes): one pass for every group;
        # a chunk's sum in float32, the running sums in float64.
        chunk = weights.float().transpose(1, 2).to(proportions.device) @ proportions
        sums += chunk.cpu().double()
        totals += weights.sum(dim=1)
    noise = None
    if sampling_noise:
        noise = torch.zeros(n_groups, data.n_genes, dtype=torch.float64)
        draws = expression_draws(
            model, guide, data, covariates, 1.0, NOISE_DRAWS, count_variance=True, **options
        )
        for index, _, variance in draws:
            members = one_hot[index].T.float().to(variance.device)  # (n_groups, cells)
            noise += (members @ variance.mean(dim=0)).cpu().double()
    sizes = torch.from_numpy(np.bincount(codes, weights=stands_for, minlength=n_groups))
    return GroupDraws(sums, totals, noise, sizes)


# -- one comparison ----------------------------------------------------------------------------


def pseudocount_cp10k(pseudocount: float, median_library: float) -> float:
    """The pseudocount added to both groups' expression before the log ratio, in counts per
    10,000: ``pseudocount`` counts in a cell of the compared cells' median library size.

    The default (0.1 counts, in a cell where such a gene is seen about once in ten cells)
    pulls the LFC of genes expressed below that level in both groups towards 0, so that a
    ratio of two near-zero numbers does not read as a large change.
    """
    return pseudocount * CP10K / median_library


def log_posterior_odds(probability: np.ndarray, n_samples: int) -> np.ndarray:
    """``log(p / (1 - p))``, natural log, to the resolution of ``n_samples`` draws: ``p`` is
    rounded to a multiple of ``1 / n_samples`` and moved ``1 / (2 n_samples)`` away from 0 and
    1. A shrunk posterior's ``p`` is exact given the draws' mean and sd, but those come from
    ``n_samples`` draws: two genes whose ``p`` differ by less are tied (the table orders ties by
    LFC), so near-certain genes rank by their effect, not by a tail probability of 1 - 1e-12
    against 1 - 1e-9."""
    eps = 0.5 / n_samples
    resolved = np.round(probability * n_samples) / n_samples
    return np.log(resolved + eps) - np.log(1.0 - resolved + eps)


def expected_fdr(proba_de: np.ndarray, eligible: np.ndarray, tie_break: np.ndarray) -> np.ndarray:
    """The posterior expected FDR of calling each gene and every eligible gene ranked above it.

    Eligible genes are ranked by ``proba_de``, descending (ties: ``tie_break``, descending);
    at rank ``r`` the expected FDR is the mean of ``1 - proba_de`` over the top ``r``. It
    grows with the rank, so the genes whose value is at most a target are the largest set
    whose expected FDR is within it. Ineligible genes get 1: they are never called.
    """
    fdr = np.ones(len(proba_de))
    candidates = np.flatnonzero(eligible)
    order = candidates[np.lexsort((-tie_break[candidates], -proba_de[candidates]))]
    fdr[order] = np.cumsum(1.0 - proba_de[order]) / np.arange(1, len(order) + 1)
    return fdr


def compare(
    comparison: Comparison,
    draws: GroupDraws,
    counts: CountSummaries,
    genes: pd.Index,
    *,
    delta: float,
    fdr_target: float,
    pseudocount: float,
    min_detection: float,
    shrink: bool,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """One row per gene: the LFC posterior of ``comparison``, its call and the raw summaries,
    from the draws of :func:`group_draws`; ``rng`` draws the counts' sampling noise."""
    # The noise is drawn for the sides in a fixed order, so that B against A mirrors A against B.
    normals = {}
    if draws.noise is not None:
        for side in sorted((comparison.side1, comparison.side2)):
            normals[side] = rng.standard_normal(draws.sums[:, 0].shape)
    expression1, expression2 = (
        draws.side_means(side, normals.get(side)) * CP10K
        for side in (comparison.side1, comparison.side2)
    )
    median_library = counts.median_library(comparison.side1 + comparison.side2)
    offset = pseudocount_cp10k(pseudocount, median_library)
    lfc = np.log2(expression1 + offset) - np.log2(expression2 + offset)
    detection1, raw_mean1 = counts.side(comparison.side1)
    detection2, raw_mean2 = counts.side(comparison.side2)
    expressed = np.maximum(detection1, detection2) >= min_detection
    summary = lfc_summary(lfc, delta, expressed if shrink else None)
    proba_de = np.maximum(summary.pop("proba_up"), summary.pop("proba_down"))
    fdr = expected_fdr(proba_de, expressed, np.abs(summary["lfc_mean"]))
    frame = pd.DataFrame(
        {
            "group1": comparison.group1,
            "group2": comparison.group2,
            "gene": np.asarray(genes, dtype=object),
            **summary,
            "proba_de": proba_de,
            "bayes_factor": log_posterior_odds(proba_de, len(lfc)),
            "expected_fdr": fdr,
            f"is_de_fdr_{fdr_target:g}": fdr <= fdr_target,
            "expressed": expressed,
            "expression1": expression1.mean(axis=0),
            "expression2": expression2.mean(axis=0),
            "pseudocount": offset,
            "detection1": detection1,
            "detection2": detection2,
            "raw_mean1": raw_mean1,
            "raw_mean2": raw_mean2,
        }
    )
    order = np.lexsort((-frame["lfc_mean"].to_numpy(), -signed_score(frame)))
    return frame.iloc[order].reset_index(drop=True)


def lfc_summary(
    lfc: np.ndarray, delta: float, shrink_over: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The LFC's posterior summaries from its draws, ``lfc`` ``(n_samples, genes)``.

    Without ``shrink_over``: the draws' mean, median, sd, 2.5% and 97.5% quantiles and the
    shares beyond ``delta``. With it (a ``(genes,)`` mask): the draws' mean and sd are each
    gene's estimate and standard error for adaptive shrinkage (:mod:`pyrosc.de_shrinkage`),
    its prior fitted to the genes of the mask, and the summaries are of each gene's shrunk
    posterior; the draws' mean and sd are kept as ``lfc_unshrunk``/``lfc_unshrunk_std``.

    Returns:
        columns ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_ci95_low``,
        ``lfc_ci95_high`` (with shrinkage also the two unshrunk ones), and ``proba_up``
        (``P(LFC > delta)``) and ``proba_down`` (``P(LFC < -delta)``), each ``(genes,)``.
    """
    if shrink_over is None or not shrink_over.any():
        low, median, high = np.quantile(lfc, [0.025, 0.5, 0.975], axis=0)
        return {
            "lfc_mean": lfc.mean(axis=0),
            "lfc_median": median,
            "lfc_std": lfc.std(axis=0),
            "lfc_ci95_low": low,
            "lfc_ci95_high": high,
            "proba_up": (lfc > delta).mean(axis=0),
            "proba_down": (lfc < -delta).mean(axis=0),
        }
    # A gene whose draws are all equal (zero in both groups at every draw) has no spread:
    # a floor far below any real one keeps its likelihood finite (it is not called anyway).
    estimate, spread = lfc.mean(axis=0), lfc.std(axis=0)
    se = np.maximum(spread, 1e-6)
    posterior = fit_prior(estimate[shrink_over], se[shrink_over]).posterior(estimate, se)
    # (a mixture's weights sum to 1 only to rounding: no probability a hair above 1)
    up, down = (np.clip(side, 0.0, 1.0) for side in posterior.beyond(delta))
    return {
        "lfc_mean": posterior.mean(),
        "lfc_median": posterior.quantile(0.5),
        "lfc_std": posterior.std(),
        "lfc_ci95_low": posterior.quantile(0.025),
        "lfc_ci95_high": posterior.quantile(0.975),
        "lfc_unshrunk": estimate,
        "lfc_unshrunk_std": spread,
        "proba_up": up,
        "proba_down": down,
    }


def signed_score(results: pd.DataFrame) -> np.ndarray:
    """The Bayes factor with the sign of the LFC (positive: higher in group1), 0 for a gene
    the detection filter excludes: the order of each comparison's rows, the ``scores`` of the
    scanpy layout."""
    sign = np.sign(results["lfc_median"].to_numpy())
    return sign * results["bayes_factor"].to_numpy() * results["expressed"].to_numpy()


# -- the whole analysis ------------------------------------------------------------------------


def _checked_options(
    mode: str,
    delta: float | None,
    fdr_target: float,
    n_samples: int,
    max_cells_per_group: int,
    pseudocount: float,
    min_detection: float,
) -> float:
    """Raise a ValueError for an option out of range; return the LFC threshold in force."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "vanilla" and delta is not None:
        raise ValueError(
            "delta applies to mode='change'; mode='vanilla' asks only which group is higher "
            "(change mode with delta=0): leave delta out"
        )
    delta = DEFAULT_DELTA if delta is None else delta
    real = (numbers.Real, np.floating)
    if not isinstance(delta, real) or not delta >= 0:
        raise ValueError(f"delta (a threshold on |LFC|, log2) must be 0 or more, got {delta!r}")
    if not isinstance(fdr_target, real) or not 0 < fdr_target < 1:
        raise ValueError(f"fdr_target must lie strictly between 0 and 1, got {fdr_target!r}")
    check_n_samples(n_samples)
    if not isinstance(max_cells_per_group, numbers.Integral) or max_cells_per_group < 1:
        raise ValueError(f"max_cells_per_group must be 1 or more, got {max_cells_per_group!r}")
    if not isinstance(pseudocount, real) or not pseudocount >= 0:
        raise ValueError(f"pseudocount (counts) must be 0 or more, got {pseudocount!r}")
    if not isinstance(min_detection, real) or not 0 <= min_detection <= 1:
        raise ValueError(f"min_detection must lie in [0, 1], got {min_detection!r}")
    return 0.0 if mode == "vanilla" else float(delta)


def differential_expression(
    model: Callable,
    guide: Callable,
    data: CountData,
    groups: pd.Series | Sequence,
    group1: str | None = None,
    group2: str | None = None,
    *,
    mode: str = "change",
    delta: float | None = None,
    fdr_target: float = 0.05,
    covariates: Covariates | Sequence[Covariates] | None = None,
    n_samples: int = 100,
    max_cells_per_group: int = 500,
    pseudocount: float = 0.1,
    min_detection: float = 0.05,
    sampling_noise: bool = True,
    shrink: bool = True,
    seed: int | None = 0,
    networks: nn.Module | None = None,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """Posterior of each gene's log fold change between groups of cells, and the genes called
    differentially expressed at a posterior expected FDR (see the module's docstring).

    Args:
        model, guide: a fitted pair following the pyrosc contract, called inside the
            parameter-store scope that holds it.
        data: the cells.
        groups: each cell's group, ``(cells,)`` (e.g. ``adata.obs["cell_type"]``); cells
            without a label (NaN) are in no group.
        group1, group2: ``group1`` against ``group2``; ``group1`` against all other labelled
            cells (no ``group2``); or each group against the rest (neither).
        mode: ``"change"`` (``P(LFC > delta)`` or ``P(LFC < -delta)``, the larger) or
            ``"vanilla"`` (which group is higher).
        delta: change mode's threshold on ``|LFC|`` (log2); None: 0.25.
        fdr_target: the posterior expected FDR of the calls.
        covariates: decode every cell under these settings, at each draw their mean (one per
            batch: a batch-corrected comparison); None: each cell's own.
        n_samples: posterior draws (each of every drawn cell, with its own bootstrap weights).
        max_cells_per_group: cells drawn at random from a larger group (without replacement),
            weighted by how many cells each stands for.
        pseudocount: counts in a cell of the median depth, added before the log ratio
            (:func:`pseudocount_cp10k`).
        min_detection: only genes detected (a count above 0) in at least this share of the
            cells of either group can be called.
        sampling_noise: add the counts' sampling noise to each group's mean (see above).
        shrink: adaptive shrinkage of the LFCs (:mod:`pyrosc.de_shrinkage`).
        seed: seeds the draws of cells, latents, bootstrap weights and noise (the global
            random state is left as it was); None: the global generators.
        networks, batch_size, device: as :func:`pyrosc.predictive.normalized_expression`.

    Returns:
        one row per gene and comparison; each comparison's rows from the most confidently
        higher in ``group1`` to the most confidently lower (by :func:`signed_score`, ties by
        LFC). Columns: ``group1``, ``group2`` (a group or ``"rest"``), ``gene``; the LFC
        posterior (log2, ``group1`` over ``group2``): ``lfc_mean``, ``lfc_median``, ``lfc_std``,
        ``lfc_ci95_low``/``lfc_ci95_high`` (equal-tailed 95% credible interval; shrunk: 0 to 0
        for a gene whose posterior is mostly the point mass at 0); with ``shrink``, also
        ``lfc_unshrunk``/``lfc_unshrunk_std`` (the draws' mean and sd); ``proba_de``;
        ``bayes_factor`` (``log(proba_de / (1 - proba_de))``: the Bayes factor at even prior
        odds); ``expected_fdr`` (of calling this gene and every gene ranked above it);
        ``is_de_fdr_<fdr_target>`` (the call); ``expressed`` (passes the detection filter);
        ``expression1``/``expression2`` (posterior mean of the group's mean normalised
        expression, counts per 10,000); ``pseudocount`` (the one added, counts per 10,000);
        ``detection1``/``detection2`` (share of cells with a count); ``raw_mean1``/
        ``raw_mean2`` (mean raw count). ``attrs`` holds the settings.

    Raises:
        ValueError: a bad option, or groups that cannot be compared (:func:`comparisons`).
    """
    delta = _checked_options(
        mode, delta, fdr_target, n_samples, max_cells_per_group, pseudocount, min_detection
    )
    codes, names, what = group_codes(groups)
    if len(codes) != data.n_cells:
        raise ValueError(f"groups holds {len(codes)} labels for {data.n_cells} cells")
    asked = comparisons(codes, names, what, group1, group2)
    involved = sorted({k for c in asked for k in c.side1 + c.side2})
    cells, stands_for = drawn_cells(
        codes, involved, max_cells_per_group, np.random.default_rng(seed)
    )
    with seeded(seed, device):
        draws = group_draws(
            model,
            guide,
            data.subset(cells),
            codes[cells],
            stands_for,
            len(names),
            covariates,
            n_samples,
            sampling_noise=sampling_noise,
            networks=networks,
            batch_size=batch_size,
            device=device,
        )
    counts = count_summaries(data, codes, len(names))
    options = {
        "delta": delta,
        "fdr_target": fdr_target,
        "pseudocount": pseudocount,
        "min_detection": min_detection,
        "shrink": shrink,
    }
    rng = np.random.default_rng(None if seed is None else [seed, 1])
    frames = [compare(c, draws, counts, data.var_names, **options, rng=rng) for c in asked]
    results = pd.concat(frames, ignore_index=True)
    results.attrs.update(mode=mode, n_samples=n_samples, sampling_noise=sampling_noise, **options)
    return results
