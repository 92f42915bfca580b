"""The plate every local (per-cell) variable lives in, shared by models and guides.

When a model sees a minibatch of a larger dataset, ``n_cells`` is the size of that dataset and
the plate scales the minibatch's log-density by ``n_cells / batch`` (Pyro's plate subsampling),
so the ELBO of a minibatch is an unbiased estimate of the ELBO of all cells.
"""

from __future__ import annotations

import pyro
import torch


def cells_plate(counts: torch.Tensor, n_cells: int | None = None) -> pyro.plate:
    """The plate named ``cells`` for a minibatch ``counts`` of shape ``(batch, genes)``.

    Args:
        counts: ``(batch, genes)`` counts of the cells in the minibatch.
        n_cells: size of the whole dataset the minibatch was drawn from; None means the
            minibatch is all there is (no scaling).
    """
    batch = counts.shape[0]
    subsample = torch.arange(batch, device=counts.device)
    return pyro.plate("cells", batch if n_cells is None else n_cells, subsample=subsample)
