"""Posterior draws: a discrete latent drawn by Bayes' rule when the model sums it out, from the
guide when the guide samples it."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from conftest import simulate_counts
from torch.distributions import constraints

from pyrosc import posterior
from pyrosc.data import from_anndata
from pyrosc.guides import gmvae_scvae_guide
from pyrosc.models import gmvae_model
from pyrosc.nets import Classifier, CountDecoder, GaussianEncoder
from pyrosc.plates import cells_plate


def test_cluster_draws_follow_bayes_rule_or_the_guides_q_y():
    """The GMVAE's y: drawn from p(y | z) when the model sums it out (marginal guide), from
    q(y | x) when the guide samples it (scVAE guide)."""
    torch.manual_seed(0)
    data = from_anndata(simulate_counts(n_cells=4, n_genes=5, seed=2))
    minibatch = data.minibatch(np.arange(4))
    locs = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.5]])
    model = partial(
        gmvae_model,
        decoder=CountDecoder(2, 5, n_hidden=8).eval(),
        component_locs_init=locs,
        mixture_weights="learned",
    )
    weights, scales = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([[0.8], [1.2], [1.0]])
    pyro.param("mixture_weights", weights, constraint=constraints.simplex)
    pyro.param("component_scales", scales.expand(3, 2).clone(), constraint=constraints.positive)
    point = torch.tensor([[-0.8, 0.2], [0.9, 0.4], [0.0, -1.0], [0.3, -0.3]])

    def point_guide(counts, library, cell_index, n_cells=None):
        with cells_plate(cell_index, n_cells):
            pyro.sample("z", dist.Delta(point).to_event(1))

    n = 4000
    (trace,) = posterior.posterior_traces(model, point_guide, minibatch, n, sample_counts=False)
    frequencies = torch.stack([(trace.nodes["y"]["value"] == k).double().mean(0) for k in range(3)])
    log_joint = weights.log()[:, None] + torch.stack(
        [dist.Normal(locs[k], scales[k]).log_prob(point).sum(-1) for k in range(3)]
    )
    bayes = log_joint.softmax(dim=0).double()
    assert torch.all((frequencies - bayes).abs() < 4.5 * (bayes * (1 - bayes) / n).sqrt() + 1e-3)

    classifier = Classifier(5, 3, n_hidden=8).eval()
    encoder = GaussianEncoder(5, 2, n_hidden=8, covariate_sizes=(3,)).eval()
    guide = partial(gmvae_scvae_guide, classifier=classifier, encoder=encoder)
    (trace,) = posterior.posterior_traces(model, guide, minibatch, n, sample_counts=False)
    frequencies = torch.stack([(trace.nodes["y"]["value"] == k).double().mean(0) for k in range(3)])
    q_y = classifier(torch.log1p(minibatch["counts"])).softmax(-1).T.double().detach()
    assert torch.all((frequencies - q_y).abs() < 4.5 * (q_y * (1 - q_y) / n).sqrt() + 1e-3)
