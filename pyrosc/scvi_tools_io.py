"""Open a model saved by scvi-tools' ``SCVI.save`` as a fitted :class:`pyrosc.SCVI`, and write a
fitted :class:`pyrosc.SCVI` as a directory that scvi-tools' ``SCVI.load`` reads.

The opened model is pyrosc's scVI (:func:`pyrosc.models.scvi_model` and its guide) with the
saved weights: every question of a fitted pyrosc model (``latent``, ``log_likelihood``,
``normalized_expression``, ``counterfactual``, ``predictive_check``, differential expression,
``load_query_data``, ``save``) works on it, and its numbers are scvi-tools' (the same
networks, priors and likelihood). Three steps, each in its own module:

* :mod:`pyrosc.scvi_tools_file` reads ``model.pt`` without running code from it;
* :mod:`pyrosc.scvi_tools_settings` turns the saved settings into pyrosc's (or refuses a
  variant pyrosc cannot represent, naming it);
* :mod:`pyrosc.scvi_tools_weights` maps the tensors onto pyrosc's networks and parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch

from pyrosc.api import persistence
from pyrosc.scvi_tools_file import MODEL_FILE, read_model_file
from pyrosc.scvi_tools_settings import read_settings, write_settings
from pyrosc.scvi_tools_weights import from_scvi, to_scvi
from pyrosc.train import free_parameter_names, resolve_device

if TYPE_CHECKING:
    from pyrosc.api.scvi import SCVI


def open_scvi_tools(
    cls: type[SCVI], path: str | Path, adata: ad.AnnData, device: str = "cpu"
) -> SCVI:
    """The scvi-tools SCVI saved in the directory ``path``, as a fitted ``cls`` (pyrosc's
    :class:`~pyrosc.SCVI`) set up on ``adata``.

    ``adata`` holds raw counts of the saved genes, in their order, where the model read them
    (``adata.X`` or the saved ``layer``), and the saved batch and covariate columns in obs.
    Category codes follow scvi-tools' (its registry's order), so a category of ``adata`` that
    the model never saw is an error, as in pyrosc's own ``load``; ``adata`` may hold fewer.

    Args:
        cls: :class:`pyrosc.SCVI` (not a subclass).
        path: the directory scvi-tools' ``model.save(path)`` wrote.
        adata: the cells, never modified (results of later questions go to it).
        device: where the model answers: ``"cpu"``, ``"cuda"`` or ``"auto"``.

    Raises:
        TypeError: ``cls`` is not pyrosc's SCVI.
        FileNotFoundError: no ``model.pt`` in ``path``.
        ValueError: a file that names a type other than tensors, numpy arrays and plain values
            (refused before anything is unpickled); an scvi-tools model or setting that pyrosc
            cannot represent (named); genes of ``adata`` that are not the saved ones.
    """
    from pyrosc.api.scvi import SCVI

    if cls is not SCVI:
        raise TypeError(
            f"{cls.__name__}.from_scvi_tools: scvi-tools' SCVI opens as pyrosc.SCVI (for an "
            "scANVI on top of it: pyrosc.SCANVI.from_scvi(pyrosc.SCVI.from_scvi_tools(...)))"
        )
    saved = read_model_file(path)
    settings = read_settings(saved["attr_dict"])
    var_names = [str(name) for name in np.asarray(saved["var_names"]).ravel()]
    persistence.check_genes(adata, var_names)
    model = cls(adata, **settings.config)
    # Codes as scvi-tools made them (its registry's order), all its categories included.
    model.data = model._validated(adata, None, settings.categories)
    model.device = resolve_device(device)
    networks = model._networks()
    network_state, params = from_scvi(saved["model_state_dict"], networks, settings.config)
    history = pd.DataFrame({"epoch": pd.Series(dtype=np.int64)})
    persistence.install(model, network_state, params, history)
    return model


def write_scvi_tools(model: SCVI, path: str | Path, overwrite: bool = False) -> Path:
    """Write the fitted pyrosc ``model`` as the directory scvi-tools' ``SCVI.save`` would,
    for ``scvi.model.SCVI.load(path, adata)``.

    Only ``model.pt`` is written (tensors, numpy arrays and plain values: the settings and
    registry of scvi-tools 1.4.2, which holds the genes and the category names in pyrosc's
    code order). A model without a ``batch_key`` is one batch, coded 0, as scvi-tools sets it up.

    Args:
        model: a fitted :class:`pyrosc.SCVI` (not a SCANVI).
        path: the directory to write (created).
        overwrite: replace a ``model.pt`` already there.

    Returns:
        ``path``.

    Raises:
        TypeError: ``model`` is not a pyrosc SCVI.
        ValueError: a setting scvi-tools' SCVI lacks (the "zip" likelihood); a
            ``model.pt`` in ``path`` without ``overwrite``.
    """
    from pyrosc.api.scvi import SCVI

    if type(model) is not SCVI:
        raise TypeError(f"to_scvi_tools writes a pyrosc SCVI, not a {type(model).__name__}")
    path = Path(path)
    target = path / MODEL_FILE
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass overwrite=True to replace it")
    var_names = [str(name) for name in model.data.var_names]
    attr_dict = write_settings(
        model.config, model.data.covariate_categories, var_names, model.data.n_cells
    )
    with model._scope() as (_, _, networks):
        store = pyro.get_param_store()
        params = {name: store[name].detach() for name in free_parameter_names(networks)}
        state = to_scvi(networks, params, model.config)
    path.mkdir(parents=True, exist_ok=True)
    saved = {
        "model_state_dict": state,
        "var_names": np.asarray(var_names, dtype=str),
        "attr_dict": attr_dict,
    }
    torch.save(saved, target)
    return path
