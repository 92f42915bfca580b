"""The notebook class of scANVI (:func:`pyrosc.models.scanvi_model`): scVI's options and
networks, a column of cell-type labels in which some cells are unlabelled, and the predictions
of its classifier. What it answers about batches comes from :class:`BatchModel`, via SCVI."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import warnings
from collections.abc import Callable, Sequence
from functools import partial

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import torch
from torch import nn

from pyrosc import input_checks as checks
from pyrosc import streaming, traces
from pyrosc.api.scvi import SCVI, library_networks
from pyrosc.data import CountData
from pyrosc.guides import scanvi_guide
from pyrosc.models import scanvi_model
from pyrosc.nets import Classifier, GaussianEncoder
from pyrosc.train import free_parameter_names


class SCANVI(SCVI):
    """scANVI (Xu et al. 2021): scVI with a cell type ``y`` above its latent state, learned from
    the labelled cells and inferred for the others.

    ``y ~ Categorical(1/K, ..., 1/K)``, ``z2 ~ N(0, I)``, ``z1 | z2, y ~ N(mu(z2, y),
    sigma(z2, y)^2)``, and the counts decoded from ``z1`` and the covariates as in
    :class:`SCVI`. ``y`` is observed where a cell is labelled and summed out exactly
    (``TraceEnum_ELBO``) where it is not; see :func:`pyrosc.models.scanvi.scanvi_model`.
    :meth:`latent` gives the posterior mean of ``z1``; :meth:`predict` the classifier's types.
    :meth:`elbo` and :meth:`log_likelihood` score ``log p(x, label)`` for a labelled cell and
    ``log p(x)`` for an unlabelled one (new cells are unlabelled); they leave the
    classification term out.

    Args:
        adata: raw counts in ``adata.X`` or ``adata.layers[layer]``, cells x genes.
        labels_key: obs column of the cell types.
        unlabeled_category: the value in that column that marks an unlabelled cell.
        batch_key, likelihood, dispersion, library, layer: as :class:`SCVI`, and so are
            ``categorical_covariate_keys``, ``continuous_covariate_keys``,
            ``encode_covariates``, ``n_latent``, ``n_hidden``, ``n_layers``, ``dropout``,
            ``batch_norm``, ``layer_norm`` and ``deeply_inject_covariates``; the classifier and
            the networks of ``z2`` have the same sizes (as scvi-tools'), and scVI's default
            layers.
        classification_ratio: weight of the classification term, as scvi-tools' (default 50):
            per cell, the objective is the ELBO plus ``classification_ratio`` times the mean of
            ``log q(label | z1)`` over the labelled training cells. Each labelled cell's term is
            thus weighted ``classification_ratio * cells / labelled cells``. 0: the plain ELBO.
        label_categories: the cell types in the order of the classifier's outputs (default: the
            labels in the column, in its categories' order for a categorical column, else
            sorted); saved with the model.

    Example::

        m = pyrosc.SCANVI(adata, "cell_type", "Unknown", batch_key="batch").fit()
        adata.obs["predicted"] = m.predict()
    """

    _latent_site = "z1"

    def __init__(
        self,
        adata: ad.AnnData,
        labels_key: str,
        unlabeled_category: str,
        batch_key: str | None = None,
        likelihood: str = "zinb",
        dispersion: str | None = None,
        library: str = "observed",
        layer: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        encode_covariates: bool = False,
        classification_ratio: float = 50.0,
        label_categories: Sequence[str] | None = None,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        batch_norm: str = "both",
        layer_norm: str = "none",
        deeply_inject_covariates: bool = True,
    ) -> None:
        ratio = classification_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio >= 0:
            raise ValueError(f"classification_ratio must be a number >= 0, got {ratio!r}")
        # Read by _validated, which the base constructor calls to encode the labels.
        self.unlabeled_category = str(unlabeled_category)
        adata = streaming.opened(adata, layer)  # paths: opened once, counts left on disk
        self.label_categories = _label_categories(
            streaming.cells_of(adata, [labels_key]),
            labels_key,
            self.unlabeled_category,
            label_categories,
        )
        self._scvi_start: tuple[dict, dict] | None = None
        super().__init__(
            adata,
            batch_key=batch_key,
            likelihood=likelihood,
            dispersion=dispersion,
            library=library,
            layer=layer,
            labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            encode_covariates=encode_covariates,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            batch_norm=batch_norm,
            layer_norm=layer_norm,
            deeply_inject_covariates=deeply_inject_covariates,
        )
        self.config.update(
            unlabeled_category=self.unlabeled_category,
            classification_ratio=float(ratio),
            label_categories=self.label_categories,
        )

    @classmethod
    def from_scvi(
        cls,
        scvi_model: SCVI,
        labels_key: str,
        unlabeled_category: str,
        classification_ratio: float = 50.0,
    ) -> SCANVI:
        """A SCANVI on the fitted ``scvi_model``'s AnnData and settings that starts from its
        fit, as scvi-tools' ``from_scvi_model``: its encoder as ``q(z1 | x)``, its decoder,
        library networks and dispersion. The classifier and the networks of ``z2`` start fresh.
        Call :meth:`fit` next; each fit starts from the SCVI again.

        Raises:
            ValueError: ``scvi_model`` is not an SCVI (or is a SCANVI); the label arguments
                as :class:`SCANVI`.
            RuntimeError: ``scvi_model`` is not fitted.
        """
        if not isinstance(scvi_model, SCVI) or isinstance(scvi_model, SCANVI):
            kind = type(scvi_model).__name__
            raise ValueError(f"from_scvi starts from a fitted SCVI, got a {kind}")
        with scvi_model._scope() as (_, _, networks):
            states = {name: copy.deepcopy(net.state_dict()) for name, net in networks.items()}
            store = pyro.get_param_store()
            params = {n: store[n].detach().clone() for n in free_parameter_names(networks)}
        settings = {key: value for key, value in scvi_model.config.items() if key != "labels_key"}
        model = cls(
            scvi_model.adata,
            labels_key,
            unlabeled_category,
            classification_ratio=classification_ratio,
            **settings,
        )
        model._scvi_start = (states, params)
        return model

    def _validated(
        self,
        adata: ad.AnnData,
        labels_key: str | None = None,
        covariate_categories: dict[str, list[str]] | None = None,
    ) -> CountData:
        """As :meth:`PyroscModel._validated`, with the label codes of ``obs[labels_key]``; all
        -1 (unlabelled) without a ``labels_key``, as for new cells to :meth:`predict`."""
        data = super()._validated(adata, labels_key, covariate_categories)
        return dataclasses.replace(data, label=self._label_codes(data))

    def _label_codes(self, data: CountData) -> np.ndarray:
        """``(cells,)`` int64 index of each cell's label in ``label_categories``; -1 where it
        is unlabelled."""
        if data.labels is None:
            return np.full(data.n_cells, -1, dtype=np.int64)
        names = data.labels.astype(str).to_numpy()
        codes = pd.Index(self.label_categories).get_indexer(names)
        unknown = sorted(set(names[(codes < 0) & (names != self.unlabeled_category)]))
        if unknown:
            raise ValueError(
                f"obs[{self.config['labels_key']!r}] holds label(s) {unknown} that are not among "
                f"the model's cell types {self.label_categories} nor unlabeled_category "
                f"{self.unlabeled_category!r}"
            )
        return codes.astype(np.int64)

    @classmethod
    def _query_config(cls, config: dict, adata: ad.AnnData) -> dict:
        """A query keeps the reference's ``labels_key``: its labelled cells (if any) are
        observed, the others summed out, as in the reference."""
        key, unlabeled = config["labels_key"], config["unlabeled_category"]
        if key not in adata.obs.columns:
            raise ValueError(
                f"the query has no obs[{key!r}], the reference SCANVI's labels_key; add it, "
                f"with {unlabeled!r} (the unlabeled_category) for every cell whose type is unknown"
            )
        return config

    def _classification_weight(self) -> float:
        """``alpha`` per labelled cell: ``classification_ratio * cells / labelled cells`` of
        the fit's training cells (see the class notes); 0 when not fitting (a loaded model) and
        for a query without labelled cells."""
        if self._split is None:
            return 0.0
        codes = self.data.label[self._split[0]]
        n_labelled = int((codes >= 0).sum())
        if n_labelled == 0 and self.is_query:
            return 0.0
        if n_labelled == 0:
            raise ValueError(
                "none of the training cells is labelled (the labelled cells all fell in the "
                "validation split); use a smaller validation_fraction or pass a split"
            )
        return self.config["classification_ratio"] * len(codes) / n_labelled

    def _build(self) -> tuple[Callable, Callable, nn.Module]:
        networks, c = self._networks(), self.config
        k, sizes = len(self.label_categories), (c["n_hidden"], c["n_layers"], c["dropout"])
        networks["classifier"] = Classifier(c["n_latent"], k, *sizes)
        # y enters as a covariate of the latent kind: reference mapping leaves it as it is.
        networks["z2_encoder"] = GaussianEncoder(
            c["n_latent"], c["n_latent"], *sizes, covariate_sizes=(k,), covariate_role="latent"
        )
        # p(z1 | z2, y) is a generative network: no dropout, as scVI's decoder.
        networks["z1_prior"] = GaussianEncoder(
            c["n_latent"],
            c["n_latent"],
            c["n_hidden"],
            c["n_layers"],
            0.0,
            covariate_sizes=(k,),
            covariate_role="latent",
        )
        inverse_dispersion = None
        if self._scvi_start is not None:
            states, params = self._scvi_start
            for name, state in states.items():
                networks[name].load_state_dict(state)
            inverse_dispersion = params.get("inverse_dispersion")
        library_encoder, library_prior = library_networks(networks)
        model = partial(
            scanvi_model,
            decoder=networks["decoder"],
            z1_prior=networks["z1_prior"],
            n_labels=k,
            library_prior=library_prior,
            likelihood=c["likelihood"],
            dispersion=c["dispersion"],
            n_batches=len(self._batch_names()),
            inverse_dispersion_init=inverse_dispersion,
        )
        guide = partial(
            scanvi_guide,
            encoder=networks["encoder"],
            classifier=networks["classifier"],
            z2_encoder=networks["z2_encoder"],
            library_encoder=library_encoder,
            classification_weight=self._classification_weight(),
        )
        return model, guide, networks

    @torch.no_grad()
    def predict(
        self, adata: ad.AnnData | None = None, soft: bool = False
    ) -> np.ndarray | pd.DataFrame:
        """Each cell's type by the classifier, ``argmax_y q(y | z1)`` at the posterior mean of
        ``z1``. Labelled cells are predicted too: the classifier never sees a label.

        Args:
            adata: the cells, with the training genes (default: the training AnnData); their
                labels, if any, are not read.
            soft: return the probabilities ``q(y | z1)`` instead.

        Returns:
            ``(cells,)`` array of type names; with ``soft``, a ``(cells, types)`` float64
            DataFrame indexed by obs_names, one column per type, rows summing to one.
        """
        data = self._data_for(adata)
        z1 = torch.from_numpy(self._latent(data)).to(self.device)
        with self._scope() as (_, _, networks), traces.eval_mode(networks):
            chunks = [networks["classifier"](part).softmax(-1).cpu() for part in z1.split(4096)]
        probs = torch.cat(chunks).double().numpy()
        if soft:
            return pd.DataFrame(probs, index=data.obs_names, columns=self.label_categories)
        return np.asarray(self.label_categories, dtype=object)[probs.argmax(axis=1)]


def _label_categories(
    adata: ad.AnnData,
    labels_key: str | None,
    unlabeled_category: str,
    given: Sequence[str] | None,
) -> list[str]:
    """The cell types of ``adata.obs[labels_key]``: ``given`` (checked to hold every label),
    or the labels found (a categorical column's order, else sorted), ``unlabeled_category``
    left out.

    Raises:
        ValueError: an unknown labels_key, missing values, no labelled cell (unless ``given``:
            a query may have none), fewer than two types, or ``given`` without a label.
    """
    checks.check_anndata(adata)
    if labels_key is None or labels_key not in adata.obs.columns:
        raise ValueError(
            f"labels_key {labels_key!r} is not a column of adata.obs; its columns are "
            f"{list(adata.obs.columns)}"
        )
    checks.check_no_missing_values(adata, labels_key)
    column = adata.obs[labels_key]
    names = column.astype(str)
    if not (names == unlabeled_category).any():
        # Every cell labelled is a fine reference; a misspelt marker would make it a type.
        warnings.warn(
            f"unlabeled_category {unlabeled_category!r} does not occur in obs[{labels_key!r}], "
            f"whose values are {sorted(set(names))[:10]}: every cell is taken as labelled. If "
            "some are not, mark them with unlabeled_category.",
            UserWarning,
            stacklevel=3,
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        found = [str(c) for c in column.cat.remove_unused_categories().cat.categories]
    else:
        found = sorted(set(names))
    found = [name for name in found if name != unlabeled_category]
    if not found and given is None:
        raise ValueError(
            f"no cell of obs[{labels_key!r}] is labelled: all are {unlabeled_category!r}; "
            "scANVI learns the cell types from the labelled cells"
        )
    categories = found if given is None else [str(name) for name in given]
    missing = [name for name in found if name not in categories]
    if missing or unlabeled_category in categories or len(set(categories)) < len(categories):
        raise ValueError(
            f"label_categories {categories} must list each type once, every label of "
            f"obs[{labels_key!r}] ({found}) included, and not {unlabeled_category!r}"
        )
    if len(categories) < 2:
        raise ValueError(
            f"obs[{labels_key!r}] has one cell type, {categories}; a classifier needs two or more"
        )
    return categories
