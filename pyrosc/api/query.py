"""Reference mapping for the notebook classes whose networks take categorical covariates: a
query dataset mapped onto a fitted reference without refitting it (scArches architecture
surgery, as scvi-tools' ``load_query_data``).

:class:`ReferenceMapping` is a base of :class:`pyrosc.api.batches.BatchModel`, so every class
with batches gets ``load_query_data``. The surgery itself (wider covariate inputs, more
per-category slices, the masks of the reference's entries) is :mod:`pyrosc.surgery`; freezing
during the fit is :mod:`pyrosc.freezing`. Here: matching the query's genes and categories to the
reference's, and a query's life as a model (fit, save, load).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import torch
from torch import Tensor, nn

from pyrosc import surgery
from pyrosc.api import persistence
from pyrosc.data import align_genes
from pyrosc.freezing import Frozen
from pyrosc.input_checks import quoted

if TYPE_CHECKING:
    from pyrosc.api.base import PyroscModel


@dataclass
class QueryOptions:
    """How a query was mapped (saved with it, in ``config.json``).

    Attributes:
        reference_sizes: covariate key -> number of the reference's categories (the query's
            come after them).
        train_encoder_batchnorm: the encoders' BatchNorm layers train.
        unfrozen: every weight trains.
    """

    reference_sizes: dict[str, int]
    train_encoder_batchnorm: bool = False
    unfrozen: bool = False


@dataclass
class QueryState:
    """A query's mapping: its options, what its fits leave frozen, and where they start
    (the reference's weights, extended: a networks ``state_dict`` and a Pyro parameter-store
    state of the free parameters, both on the CPU)."""

    options: QueryOptions
    frozen: Frozen | None
    start: tuple[dict[str, Tensor], dict] = field(repr=False)


class ReferenceMapping:
    """What a model with categorical covariates adds: ``load_query_data`` and the query's fit,
    save and load. Mixed into :class:`pyrosc.api.batches.BatchModel`."""

    #: The mapping of a query model; None for a model fitted from scratch.
    _query: QueryState | None = None

    @classmethod
    def load_query_data(
        cls,
        adata: ad.AnnData,
        reference: PyroscModel,
        *,
        train_encoder_batchnorm: bool = False,
        unfrozen: bool = False,
    ) -> PyroscModel:
        """A model of the query cells ``adata`` built on the fitted ``reference``: its networks
        and parameters extended to the query's new categories, to be trained with
        ``query.fit(max_epochs=200)`` (scvi-tools' tutorial count; a query fit trains few
        weights on few cells, so it is fast).

        * Genes are matched by name: reordered to the reference's; a reference gene the query
          lacks is filled with zeros, a query gene the reference lacks is dropped (one warning
          says how many of each); under half of the reference's genes present is an error.
        * Categories of every categorical covariate (the batch and the others) that the
          reference has keep its codes; new ones are appended after them. Each network layer
          that sees a covariate gets a column per new category, the "gene-batch" inverse
          dispersion a row per new batch (both start at the mean of the reference's), and a
          latent library's prior the empirical log-library mean and spread of the query cells
          of each new batch.
        * Every reference weight is frozen: a query fit trains only the new categories'
          columns and rows, on the query cells only, and keeps every BatchNorm layer in
          evaluation mode. The reference is not touched (the query works on copies).

        Results go to ``adata`` (e.g. ``obsm["X_pyrosc"]`` from ``latent()``), which is not
        otherwise modified. A query answers (``latent()``, ...) before it is fitted too, with
        the reference's weights; every ``fit`` starts again from them.

        Args:
            adata: raw counts of the query cells, with the reference's covariate obs columns.
            reference: a fitted model of this class (fitted here, or loaded with ``load``).
            train_encoder_batchnorm: the encoders' BatchNorm layers train too (weights and
                running statistics), as scvi-tools' ``freeze_batchnorm_encoder=False``.
            unfrozen: train every weight, as scvi-tools' ``unfrozen=True`` (slower, and the
                reference's latent space may drift).

        Returns:
            the query model, an instance of this class.

        Raises:
            TypeError: a reference of another class.
            RuntimeError: a reference that is not fitted.
            ValueError: a reference without categorical covariates, a covariate column missing
                from the query, too few shared genes, or both options at once.
        """
        _check_reference(cls, reference)
        if unfrozen and train_encoder_batchnorm:
            raise ValueError(
                "train_encoder_batchnorm applies to a frozen reference; with unfrozen=True every "
                "weight, BatchNorm included, trains already. Pass one of them."
            )
        _check_query_columns(adata, reference)
        config = cls._query_config(dict(reference.config), adata)
        aligned = align_genes(adata, reference.data.var_names, config.get("layer"))
        with _zero_genes_expected():
            query = cls(aligned, **config)
        # The reference's categories keep their codes; the query's new ones come after.
        categories = {
            key: names + [new for new in query.data.covariate_categories[key] if new not in names]
            for key, names in reference.data.covariate_categories.items()
        }
        query.data = query._validated(aligned, config.get("labels_key"), categories)
        query.adata = adata
        options = QueryOptions(
            {key: len(names) for key, names in reference.data.covariate_categories.items()},
            train_encoder_batchnorm,
            unfrozen,
        )
        _, _, reference_networks = reference._pair
        networks, params, frozen = surgery.map_query(
            reference_networks,
            reference._params,
            query._reference_sizes(options),
            [len(names) for names in categories.values()],
            query._category_parameters(),
            query._trained_batchnorm(reference_networks, options),
            unfrozen,
        )
        query._grow_for_query(networks, options.reference_sizes)
        query._pair = query._build()
        query._pair[2].load_state_dict(networks.state_dict())
        query._pair[2].eval()
        query._query = QueryState(options, frozen, _start(query._pair[2], params))
        query._params = _param_state(params, query.device)
        return query

    # -- what a class may override ---------------------------------------------------------

    @classmethod
    def _query_config(cls, config: dict, adata: ad.AnnData) -> dict:
        """The query's settings, from the reference's ``config``: a ``labels_key`` the query
        lacks is dropped (query cells come unlabelled; labels only score)."""
        if config.get("labels_key") not in (None, *adata.obs.columns):
            config["labels_key"] = None
        return config

    def _category_parameters(self) -> dict[str, tuple[int, int]]:
        """Free parameter name -> ``(covariate position, dim)`` of the parameters with a slice
        per category: by default the "gene-batch" inverse dispersion, one row per batch."""
        if self.config.get("dispersion") == "gene-batch":
            return {"inverse_dispersion": (0, 0)}
        return {}

    def _grow_for_query(self, networks: nn.ModuleDict, reference_sizes: dict[str, int]) -> None:
        """Give per-category buffers of the extended ``networks`` their query categories (the
        latent library's prior of scVI); none by default."""

    def _reference_sizes(self, options: QueryOptions) -> list[int]:
        """``(n_covariates,)`` the reference's categories per covariate, in the covariates'
        order."""
        return [options.reference_sizes[key] for key in self.data.covariate_categories]

    @staticmethod
    def _trained_batchnorm(networks: nn.Module, options: QueryOptions) -> tuple[str, ...]:
        """The networks whose BatchNorm layers train: the encoders, when asked."""
        if not options.train_encoder_batchnorm:
            return ()
        return tuple(name for name, _ in networks.named_children() if name.endswith("encoder"))

    # -- a query's fit, save and load --------------------------------------------------------

    def _start_state(self) -> dict | None:
        """A query's fit starts from the reference's weights, extended (see the base)."""
        if self._query is None:
            return super()._start_state()
        network_state, params = self._query.start
        self._pair[2].load_state_dict(network_state)
        return _param_state(params, self.device)

    def _frozen(self) -> Frozen | None:
        """A query's fit freezes the reference's weights (see :meth:`load_query_data`)."""
        return None if self._query is None else self._query.frozen

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to the directory ``path`` (created if needed).

        Files: ``config.json`` (class, settings, genes, covariate categories and, for a
        query, its reference's category counts and options), ``model.pt`` (tensors only:
        network weights and Pyro parameters) and ``history.csv``.
        """
        extra = None if self._query is None else {"query": asdict(self._query.options)}
        return persistence.save(self, path, extra)

    @classmethod
    def load(cls, path: str | Path, adata: ad.AnnData, device: str = "cpu") -> PyroscModel:
        """Load a model written by :meth:`save`, set up on ``adata``: the same genes, or, for a
        query, the query cells with their genes matched as :meth:`load_query_data` does
        (results go to ``adata``). A loaded query's fits start from its loaded weights.

        Only tensors are read (``torch.load(weights_only=True)``): no arbitrary object is ever
        unpickled.
        """
        meta = persistence.read_meta(path)
        if "query" not in meta:
            return super().load(path, adata, device)
        aligned = align_genes(adata, meta["var_names"], meta["config"].get("layer"))
        with _zero_genes_expected():
            query = persistence.load(cls, path, aligned, device)
        query.adata = adata
        options = QueryOptions(**meta["query"])
        _, _, networks = query._pair
        free = surgery.free_parameters(query._params, networks)
        constraints = {name: query._params["constraints"][name] for name in free}
        params = {"params": free, "constraints": constraints}
        frozen = None
        if not options.unfrozen:
            frozen = surgery.frozen_reference(
                networks,
                params["params"],
                query._reference_sizes(options),
                query._category_parameters(),
                query._trained_batchnorm(networks, options),
            )
        query._query = QueryState(options, frozen, _start(networks, params))
        return query

    @property
    def is_query(self) -> bool:
        """Whether this model is a query mapped onto a reference (:meth:`load_query_data`)."""
        return self._query is not None


def _start(networks: nn.Module, params: dict) -> tuple[dict[str, Tensor], dict]:
    """CPU copies of the networks' state and of the free parameters' store state."""
    network_state = {
        name: value.detach().cpu().clone() for name, value in networks.state_dict().items()
    }
    return network_state, _param_state(params, torch.device("cpu"))


def _param_state(params: dict, device: torch.device) -> dict:
    """A fresh copy of a parameter-store state on ``device`` (leaves that require a gradient,
    as the store holds them), so that a fit never writes into the state it started from."""
    return {
        "params": {
            name: value.detach().to(device).clone().requires_grad_(True)
            for name, value in params["params"].items()
        },
        "constraints": dict(params["constraints"]),
    }


@contextmanager
def _zero_genes_expected() -> Iterator[None]:
    """Validate a query without the warning about genes without counts: its genes are the
    reference's, and those it lacks were filled with zeros (as said by its own warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*genes have zero counts in every cell")
        yield


def _check_reference(cls: type, reference: object) -> None:
    """A fitted reference of class ``cls``, with categorical covariates to extend."""
    name = cls.__name__
    if type(reference) is not cls:
        raise TypeError(
            f"{name}.load_query_data maps a query onto a fitted {name}; the reference is a "
            f"{type(reference).__name__}. Call load_query_data on the reference's own class."
        )
    if reference._pair is None or reference._params is None:
        raise RuntimeError(
            f"the reference {name} is not fitted yet: fit it (reference.fit()) or load a fitted "
            f"one ({name}.load(path, adata)) before mapping a query onto it"
        )
    if not reference.data.covariate_categories:
        raise ValueError(
            f"the reference {name} has no categorical covariates (it was set up without a "
            "batch_key), so a query adds nothing to it: embed the query with "
            "reference.latent(pyrosc.data.align_genes(query, reference.data.var_names)), or "
            "set up the reference with a batch_key"
        )


def _check_query_columns(adata: ad.AnnData, reference: PyroscModel) -> None:
    """The query has every covariate obs column of the reference."""
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"the query must be an anndata.AnnData, got {type(adata).__name__}")
    keys = [*reference.data.covariate_categories, *reference.data.continuous_covariate_keys]
    missing = [key for key in keys if key not in adata.obs.columns]
    if missing:
        example = ""
        if missing[0] in reference.data.covariate_categories:
            example = f" (a query that is one new category: query.obs[{missing[0]!r}] = 'query')"
        raise ValueError(
            f"the query lacks obs column(s) {quoted(missing)}, which the reference was set up "
            "with (batch_key, categorical_covariate_keys, continuous_covariate_keys); add them to "
            f"the query's obs{example}."
        )
