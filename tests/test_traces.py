"""The vectorised-trace primitive against plain Pyro: K particles in one trace score as K
separate traces at the same values, and an enumerated mixture scores as its density written out
by hand."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from conftest import simulate_counts
from pyro import poutine

from pyrosc.data import from_anndata
from pyrosc.plates import cells_plate
from pyrosc.traces import enumerated_traces, vectorize

WEIGHTS = torch.tensor([0.2, 0.5, 0.3])
LOCS = torch.tensor([[-2.0, 0.0], [1.0, 1.0], [0.0, -1.5]])
LOADINGS = torch.tensor([[0.3, -0.2, 0.1, 0.4], [-0.1, 0.2, 0.3, -0.3]])


def mixture_model(counts, library, cell_index, n_cells=None):
    """y ~ Cat(w); z | y ~ N(mu_y, I); x ~ Poisson(l softmax(z W)): y summed out."""
    with cells_plate(cell_index, n_cells):
        y = pyro.sample("y", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
        z = pyro.sample("z", dist.Normal(LOCS[y], 1.0).to_event(1))
        rate = library.unsqueeze(-1) * torch.softmax(z @ LOADINGS, dim=-1)
        pyro.sample("counts", dist.Poisson(rate).to_event(1), obs=counts)


def guide(counts, cell_index, n_cells=None):
    """q(z | x): a Normal around a summary of the counts (it does not take the library)."""
    with cells_plate(cell_index, n_cells):
        loc = torch.log1p(counts[:, :2])
        pyro.sample("z", dist.Normal(loc, 0.5).to_event(1))


def minibatch() -> dict[str, torch.Tensor]:
    data = from_anndata(simulate_counts(n_cells=40, n_genes=4))
    return data.minibatch(np.arange(6))


def test_k_vectorised_particles_score_as_k_separate_traces():
    batch, k = minibatch(), 5
    data = {**batch, "n_cells": None}
    with poutine.block():
        trace = poutine.trace(vectorize(guide, k, nesting=1)).get_trace(**data)
    z = trace.nodes["z"]["value"]
    assert z.shape == (k, 6, 2)
    vectorised = trace.nodes["z"]["fn"].log_prob(z)
    for particle in range(k):
        # The same value in a plain trace, bound to its data by hand.
        fixed = poutine.condition(guide, data={"z": z[particle]})
        single = poutine.trace(fixed).get_trace(batch["counts"], batch["cell_index"])
        site = single.nodes["z"]
        torch.testing.assert_close(vectorised[particle], site["fn"].log_prob(site["value"]))


def test_an_enumerated_site_scores_as_the_mixture_written_out():
    k = 3
    guide_trace, model_trace, rank = enumerated_traces(mixture_model, guide, minibatch(), k)
    assert rank == 2  # particles and cells
    z = guide_trace.nodes["z"]["value"]  # (k, cells, 2)
    y = model_trace.nodes["y"]
    assert y["value"].reshape(-1).tolist() == [0, 1, 2]  # one value per enumerated dimension
    log_prior = y["fn"].log_prob(y["value"])  # (3, 1, 1)
    log_z = model_trace.nodes["z"]["fn"].log_prob(z)  # (3, k, cells)
    assert log_z.shape == (3, k, 6)
    by_hand = torch.stack(
        [
            WEIGHTS[c].log() + dist.Normal(LOCS[c], 1.0).log_prob(z).sum(-1)
            for c in range(len(WEIGHTS))
        ]
    ).logsumexp(dim=0)
    torch.testing.assert_close((log_prior + log_z).logsumexp(dim=0), by_hand)
