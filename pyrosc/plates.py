"""The plate every local (per-cell) variable lives in, shared by models and guides.

The plate subsamples the minibatch's real cell indices (``cell_index``, positions in the
dataset), so a per-cell parameter indexed the Pyro way reads the right cells::

    offset = pyro.param("offset", torch.zeros(n_dataset_cells))
    with cells_plate(cell_index, n_cells) as cells:
        ... offset[cells] ...

When a model sees a minibatch of a larger set of cells, ``n_cells`` is the size of that set and
the plate scales the minibatch's log-density by ``n_cells / batch`` (Pyro's plate subsampling),
so the ELBO of a minibatch is an unbiased estimate of the ELBO of all cells.
"""

from __future__ import annotations

import pyro
import torch


def cells_plate(cell_index: torch.Tensor, n_cells: int | None = None) -> pyro.plate:
    """The plate named ``cells`` over the minibatch's cells.

    Args:
        cell_index: ``(batch,)`` int64 positions of the minibatch's cells in the dataset (the
            ``cell_index`` data argument); the plate's indices.
        n_cells: how many cells the minibatch stands for (the training cells); None means the
            minibatch is all there is (no scaling).
    """
    batch = cell_index.shape[0]
    return pyro.plate("cells", batch if n_cells is None else n_cells, subsample=cell_index)
