"""Cells drawn from a model (simulated, replicated or decoded under other covariates) gathered
into the AnnData that :mod:`pyrosc.predictive` returns, chunk by chunk, draw by draw.

Nothing here touches Pyro: it receives tensors of ``(n_samples, cells, ...)`` per chunk of cells
and lays them out where scanpy users look: counts in ``X`` (CSR int64), covariates as
categorical ``obs`` columns, one value per cell in ``obs``, a vector per cell in ``obsm``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from torch import Tensor

from pyrosc.data import CountData


class DrawnCells:
    """Chunks of cells at ``n_samples`` draws each, gathered into AnnData rows draw by draw:
    row ``r * cells + i`` holds draw ``r`` of cell ``i``.

    Args:
        data: the data the draws came from: its genes and covariate categories.
    """

    def __init__(self, data: CountData) -> None:
        self.data = data
        self.counts: list[list[sp.csr_matrix]] = []  # per chunk, per draw
        self.values: list[dict[str, np.ndarray]] = []  # per chunk: (n_samples, cells, ...)
        self.layers: list[dict[str, np.ndarray]] = []

    def add(
        self,
        counts: Tensor,
        values: Mapping[str, Tensor],
        layers: Mapping[str, Tensor] | None = None,
    ) -> None:
        """One chunk of cells.

        Args:
            counts: ``(n_samples, cells, genes)`` integer-valued.
            values: name -> ``(n_samples, cells)`` (to obs; covariate codes for the names in
                ``data.covariate_categories``) or ``(n_samples, cells, ...)`` (to obsm).
            layers: name -> ``(n_samples, cells, genes)``, stored as float32 layers.
        """
        counts = counts.cpu().numpy()
        self.counts.append([sp.csr_matrix(draw.astype(np.int64)) for draw in counts])
        self.values.append({name: value.cpu().numpy() for name, value in values.items()})
        self.layers.append({name: value.cpu().numpy() for name, value in (layers or {}).items()})

    def anndata(self, obs_names: Sequence[str], **obs_columns: np.ndarray) -> ad.AnnData:
        """The rows as an AnnData; ``obs_columns`` are added to obs as given."""
        n_samples = len(self.counts[0])
        counts = sp.vstack([chunk[r] for r in range(n_samples) for chunk in self.counts], "csr")
        obs, obsm = pd.DataFrame(index=pd.Index(obs_names)), {}
        for column, values in obs_columns.items():
            obs[column] = values
        for name in self.values[0]:
            value = _draw_major([chunk[name] for chunk in self.values])
            if name in self.data.covariate_categories:
                categories = self.data.covariate_categories[name]
                obs[name] = pd.Categorical.from_codes(value, categories=categories)
            elif value.ndim == 1:
                obs[name] = value
            else:
                obsm[name] = value.reshape(len(value), -1)
        layers = {
            name: _draw_major([chunk[name] for chunk in self.layers]).astype(np.float32)
            for name in self.layers[0]
        }
        var = pd.DataFrame(index=self.data.var_names.copy())
        return ad.AnnData(counts, obs=obs, var=var, obsm=obsm, layers=layers)


def _draw_major(chunks: list[np.ndarray]) -> np.ndarray:
    """``(n_samples, cells, ...)`` chunks joined along the cells: ``(n_samples * cells, ...)``."""
    joined = np.concatenate(chunks, axis=1)
    return joined.reshape(-1, *joined.shape[2:])
