"""Amortized guide of scANVI: q(z1 | x) q(y | z1) q(z2 | z1, y) [q(l | x)], and scANVI's
classification term for the labelled cells."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor
from torch.nn import functional as F

from pyrosc.nets import Classifier, GaussianEncoder
from pyrosc.plates import cells_plate


def scanvi_guide(
    counts: Tensor,
    label: Tensor,
    covariates: Tensor,
    continuous_covariates: Tensor,
    cell_index: Tensor,
    n_cells: int | None = None,
    *,
    encoder: GaussianEncoder,
    classifier: Classifier,
    z2_encoder: GaussianEncoder,
    library_encoder: GaussianEncoder | None = None,
    classification_weight: float = 0.0,
) -> None:
    """Variational posterior of scANVI::

        q(z1_n | x_n)       = Normal(mu_z(log1p x_n, c_n), diag sigma_z(log1p x_n, c_n)^2)
        q(l_n | x_n)        = LogNormal(mu_l(log1p x_n, c_n), sigma_l(log1p x_n, c_n)^2)
        q(y_n | z1_n)       = Categorical(softmax(g(z1_n)))     unlabelled cells
        q(y_n)              = 1{y_n = label_n}                  labelled cells
        q(z2_n | z1_n, y_n) = Normal(mu(z1_n, y_n), diag sigma(z1_n, y_n)^2)

    and scANVI's classification term, ``alpha * log q(label_n | z1_n)`` for each labelled
    cell, added to the objective, so that the classifier ``g`` also learns from the labels
    directly (the ELBO alone never trains it on labelled cells, whose ``y`` is known).

    ``q(z1 | x)`` and ``q(l | x)`` are scVI's (:func:`pyrosc.guides.scvi_guide`). ``y`` is
    enumerated: it takes all K values at once, as a ``(K, 1)`` tensor left of the cells, so
    ``z2`` is drawn once per type, ``(K, cells, n_latent)``. For a labelled cell, ``q(y)``
    is a point mass: logits 0 at the label and -inf elsewhere, so ``log q = 0`` at the label
    and the other values have probability exactly 0, which ``TraceEnum_ELBO`` (and
    :mod:`pyrosc.evaluate`) leave out of the sum.

    Args:
        counts, covariates, continuous_covariates, cell_index, n_cells: as
            :func:`pyrosc.guides.scvi_guide`, and so are ``encoder`` (which gives ``z1``) and
            ``library_encoder``.
        label: ``(cells,)`` code of each cell's type, -1 where it is unlabelled.
        classifier: ``(..., n_latent)`` ``z1`` -> ``(..., K)`` logits of ``q(y | z1)``.
        z2_encoder: ``(..., n_latent)`` ``z1`` and the type (a covariate with K categories) ->
            loc and scale of ``z2``.
        classification_weight: ``alpha``, per labelled cell (0: the plain ELBO).
    """
    pyro.module("encoder", encoder)
    pyro.module("classifier", classifier)
    pyro.module("z2_encoder", z2_encoder)
    if library_encoder is not None:
        pyro.module("library_encoder", library_encoder)
    labelled = label >= 0
    known = F.one_hot(label.clamp(min=0), classifier.logits.out_features).log()  # 0 or -inf
    with cells_plate(cell_index, n_cells):
        x = torch.log1p(counts)
        loc, scale = encoder(x, covariates, continuous_covariates)
        z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
        if library_encoder is not None:
            log_library_loc, log_library_scale = library_encoder(
                x, covariates, continuous_covariates
            )
            library_posterior = dist.LogNormal(log_library_loc[..., 0], log_library_scale[..., 0])
            pyro.sample("library", library_posterior)
        type_logits = classifier(z1)
        log_q_label = dist.Categorical(logits=type_logits).log_prob(label.clamp(min=0))
        # A guide's factor enters the ELBO as -log q: the minus makes it +alpha log q(label).
        classification = torch.where(labelled, log_q_label, 0.0)
        pyro.factor("classification", -classification_weight * classification, has_rsample=True)
        logits = torch.where(labelled.unsqueeze(-1), known, type_logits)
        y = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
        z2_loc, z2_scale = z2_encoder(z1, y.unsqueeze(-1))
        pyro.sample("z2", dist.Normal(z2_loc, z2_scale).to_event(1))
