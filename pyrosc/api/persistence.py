"""Saving and loading a fitted notebook model, as a directory of three files.

``config.json`` (JSON: the class, its constructor settings, the genes and the covariate
categories), ``model.pt`` (tensors only: network weights and Pyro parameters, read back with
``torch.load(weights_only=True)``, so loading never unpickles an arbitrary object) and
``history.csv``. These functions restore the fitted state of a :class:`PyroscModel` (its
networks, parameter scope and training result); the classes call them from ``save``/``load``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine

from pyrosc import streaming, traces
from pyrosc.distributed import is_rank_zero
from pyrosc.train import TrainResult, free_parameter_names, resolve_device

if TYPE_CHECKING:
    from pyrosc.api.base import PyroscModel

FORMAT = 1


def save(model: PyroscModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write the fitted ``model`` to the directory ``path`` (created if needed), with the
    JSON-able ``extra`` entries (e.g. a query's reference sizes) in ``config.json``.

    In processes that a launcher started (torchrun), which all hold the fitted model, rank 0
    writes and the others only return ``path``."""
    path = Path(path)
    if not is_rank_zero():
        return path
    path.mkdir(parents=True, exist_ok=True)
    with model._scope() as (_, _, networks):
        store = pyro.get_param_store()  # module weights are saved with their module
        params = {name: store[name].detach().cpu() for name in free_parameter_names(networks)}
    tensors = {
        "networks": {k: v.cpu() for k, v in networks.state_dict().items()},
        "params": params,
    }
    torch.save(tensors, path / "model.pt")
    meta = {
        "format": FORMAT,
        "class": type(model).__name__,
        "config": model.config,
        "var_names": list(map(str, model.data.var_names)),
        "covariate_categories": model.data.covariate_categories,
        **(extra or {}),
    }
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    model.history.to_csv(path / "history.csv", index=False)
    return path


def read_meta(path: str | Path) -> dict:
    """The JSON of ``config.json`` in the saved model directory ``path``."""
    return json.loads((Path(path) / "config.json").read_text())


def check_genes(adata: ad.AnnData, var_names: list[str]) -> None:
    """Raise unless ``adata``'s genes are the model's ``var_names``, in their order."""
    genes = [str(v) for v in streaming.var_names_of(adata)]
    if genes == var_names:
        return
    missing = len(set(var_names) - set(genes))
    extra = len(set(genes) - set(var_names))
    if not missing and not extra:
        found = "the same genes in another order"
    else:
        found = f"{missing} of them missing and {extra} other gene(s)"
    raise ValueError(
        f"adata's genes differ from the {len(var_names)} genes the model was trained on "
        f"({found}); subset it to the saved var_names, in order: adata[:, var_names]"
    )


def load(
    cls: type[PyroscModel], path: str | Path, adata: ad.AnnData, device: str = "cpu"
) -> PyroscModel:
    """A ``cls`` written by :func:`save`, set up on ``adata`` (the same genes), fitted."""
    path = Path(path)
    meta = read_meta(path)
    if meta.get("class") != cls.__name__:
        raise ValueError(f"{path} holds a {meta.get('class')}, not a {cls.__name__}")
    adata = streaming.opened(adata, meta["config"].get("layer"))  # paths: counts left on disk
    check_genes(adata, meta["var_names"])
    model = cls(adata, **meta["config"])
    if model.data.covariate_categories != meta["covariate_categories"]:
        # Codes must mean what they meant in training (adata may hold fewer categories).
        model.data = model._validated(
            model.adata, model.config.get("labels_key"), meta["covariate_categories"]
        )
    model.device = resolve_device(device)
    tensors = torch.load(path / "model.pt", map_location=model.device, weights_only=True)
    install(model, tensors["networks"], tensors["params"], pd.read_csv(path / "history.csv"))
    return model


def install(
    model: PyroscModel,
    network_state: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    history: pd.DataFrame,
) -> None:
    """Make ``model`` (set up on its data, ``device`` set) the fitted model whose networks hold
    ``network_state`` and whose free Pyro parameters are ``params`` (name -> constrained
    value), trained as ``history`` says: build its model/guide pair, load the networks (in
    evaluation mode) and create its parameter-store scope."""
    model._pair = model._build()
    pyro_model, guide, networks = model._pair
    networks.load_state_dict(network_state)
    networks.to(model.device).eval()
    with pyro.get_param_store().scope() as store_state:
        # Run the pair once so each parameter is created with its constraint, then set it.
        probe = model.data.minibatch(np.arange(min(2, model.data.n_cells)), model.device)
        with poutine.block(), torch.no_grad():
            traces.trace_pair(pyro_model, guide, {**probe, "n_cells": None})
        store = pyro.get_param_store()
        for name, value in params.items():
            store[name] = value.to(model.device)
    model._params = store_state
    model.train_result = TrainResult(
        history=history,
        train_index=np.array([], dtype=np.int64),
        validation_index=np.array([], dtype=np.int64),
        best_epoch=int(history["epoch"].iloc[-1]) if len(history) else 0,
    )
