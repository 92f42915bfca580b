"""scvi-tools' settings of an SCVI as pyrosc's, and back.

scvi-tools saves an SCVI's settings in ``attr_dict``: ``init_params_`` (the arguments of
``SCVI(...)``, those passed on to its module ``VAE`` under ``kwargs``) and ``registry_`` (what
``setup_anndata`` recorded: its arguments under ``setup_args``, and per field the category
names in code order). :func:`read_settings` turns them into the arguments of
:class:`pyrosc.SCVI` and the covariate categories in scvi-tools' order, or refuses, naming the
setting, a variant that pyrosc's scVI cannot represent exactly. :func:`write_settings` does the
reverse for :func:`pyrosc.scvi_tools_io.write_scvi_tools`, as scvi-tools 1.4.2 writes them.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pyrosc.likelihoods import uses_dispersion

#: scvi-tools' field names in a registry (``REGISTRY_KEYS``).
BATCH_FIELD = "batch"
CATEGORICAL_FIELD = "extra_categorical_covs"
CONTINUOUS_FIELD = "extra_continuous_covs"

#: The module settings of scvi-tools 1.4.2's ``VAE`` that a saved SCVI may leave at their
#: defaults, with those defaults.
VAE_DEFAULTS: dict[str, Any] = {
    "n_hidden": 128,
    "n_latent": 10,
    "n_layers": 1,
    "dropout_rate": 0.1,
    "dispersion": "gene",
    "gene_likelihood": "zinb",
    "latent_distribution": "normal",
    "use_observed_lib_size": True,
    "log_variational": True,
    "encode_covariates": False,
    "deeply_inject_covariates": True,
    "batch_representation": "one-hot",
    "use_batch_norm": "both",
    "use_layer_norm": "none",
    "var_activation": None,
    "extra_encoder_kwargs": None,
    "extra_decoder_kwargs": None,
    "batch_embedding_kwargs": None,
    "extra_payload_autotune": False,
}

#: Settings pyrosc can only take at one value: setting -> (that value, why another cannot be).
_FIXED = {
    "latent_distribution": (
        "normal",
        "pyrosc's scVI has a Normal latent z; the logistic normal ('ln') decodes softmax(z)",
    ),
    "log_variational": (True, "pyrosc's encoders always read log1p(counts)"),
    "batch_representation": (
        "one-hot",
        "pyrosc's networks see categorical covariates one-hot, not as learned embeddings",
    ),
    "var_activation": (None, "pyrosc's encoders make the variance with exp"),
    "extra_encoder_kwargs": (None, "pyrosc cannot check what extra encoder arguments change"),
    "extra_decoder_kwargs": (None, "pyrosc cannot check what extra decoder arguments change"),
}
#: Settings that change nothing pyrosc computes.
_IGNORED = ("batch_embedding_kwargs", "extra_payload_autotune")
_LIKELIHOODS = ("zinb", "nb", "poisson")
_DISPERSIONS = ("gene", "gene-batch", "gene-cell")
_NORM_PLACES = ("both", "encoder", "decoder", "none")


@dataclass(frozen=True)
class ScviToolsSettings:
    """An scvi-tools SCVI's settings, read.

    Attributes:
        config: keyword arguments of :class:`pyrosc.SCVI` for the same architecture.
        categories: covariate key -> category names in scvi-tools' code order (batch first).
        version: the scvi-tools version that saved the model.
    """

    config: dict[str, Any]
    categories: dict[str, list[str]]
    version: str


def _refuse(setting: str, value: Any, why: str) -> ValueError:
    return ValueError(
        f"this scvi-tools model was saved with {setting}={value!r}, which pyrosc cannot open: "
        f"{why}."
    )


def module_settings(attr_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The SCVI's module settings: ``init_params_``, keyword arguments included, over
    :data:`VAE_DEFAULTS`."""
    init = attr_dict.get("init_params_")
    if not isinstance(init, Mapping):
        raise ValueError("the saved attr_dict has no init_params_: not a model saved by SCVI.save")
    given = {k: v for k, v in init.get("non_kwargs", init).items() if not isinstance(v, Mapping)}
    for extra in (init.get("kwargs") or {}).values():
        if isinstance(extra, Mapping):
            given.update(extra)
    return {**VAE_DEFAULTS, **given}


def read_settings(attr_dict: Mapping[str, Any]) -> ScviToolsSettings:
    """pyrosc's settings for the scvi-tools SCVI whose ``attr_dict`` was saved.

    Raises:
        ValueError: another model class than SCVI, a setup other than ``setup_anndata``, or a
            setting pyrosc's scVI does not have (the message names it): a logistic-normal
            latent, inputs not log1p-transformed, batch embeddings, a size factor, the
            "normal" likelihood, the "gene-label" dispersion, another variance activation,
            extra encoder or decoder arguments, categorical covariates without a batch_key.
    """
    registry = attr_dict.get("registry_")
    if not isinstance(registry, Mapping):
        raise ValueError("the saved attr_dict has no registry_: not a model saved by SCVI.save")
    name = registry.get("model_name", "SCVI")
    if name != "SCVI":
        raise ValueError(
            f"this is an scvi-tools {name}; pyrosc opens scvi-tools' SCVI only (an scANVI: "
            "open the SCVI it started from, then pyrosc.SCANVI.from_scvi)"
        )
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata":
        raise _refuse("setup_method_name", method, "pyrosc reads models set up on an AnnData")
    settings = module_settings(attr_dict)
    unknown = sorted(set(settings) - set(VAE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"this scvi-tools model was saved with setting(s) {unknown} that pyrosc does not "
            f"know (scvi-tools {registry.get('scvi_version', '?')}); it opens SCVI models of "
            "scvi-tools 1.x with the settings of its VAE module"
        )
    for setting, (value, why) in _FIXED.items():
        if settings[setting] != value and not (value is None and not settings[setting]):
            raise _refuse(setting, settings[setting], why)
    setup = dict(registry.get("setup_args") or {})
    if setup.get("size_factor_key") is not None:
        raise _refuse(
            "size_factor_key", setup["size_factor_key"], "pyrosc's library is the total count"
        )
    likelihood, dispersion = settings["gene_likelihood"], settings["dispersion"]
    if likelihood not in _LIKELIHOODS:
        raise _refuse("gene_likelihood", likelihood, f"pyrosc's scVI has {_LIKELIHOODS}")
    if uses_dispersion(likelihood) and dispersion not in _DISPERSIONS:
        raise _refuse("dispersion", dispersion, f"pyrosc's scVI has {_DISPERSIONS}")
    batch_key = setup.get("batch_key")
    categorical = list(setup.get("categorical_covariate_keys") or [])
    if categorical and batch_key is None:
        raise _refuse(
            "categorical_covariate_keys",
            categorical,
            "without a batch_key; pyrosc's scVI takes the batch as its first covariate",
        )
    config = {
        "batch_key": batch_key,
        "likelihood": likelihood,
        "dispersion": dispersion if uses_dispersion(likelihood) else None,
        "library": "observed" if settings["use_observed_lib_size"] else "latent",
        "layer": setup.get("layer"),
        "categorical_covariate_keys": categorical or None,
        "continuous_covariate_keys": _continuous_keys(registry, setup) or None,
        # With nothing to encode, scvi-tools' encode_covariates changes nothing; pyrosc
        # refuses the setting there, so it is left off.
        "encode_covariates": bool(settings["encode_covariates"])
        and (batch_key is not None or bool(setup.get("continuous_covariate_keys"))),
        "n_latent": int(settings["n_latent"]),
        "n_hidden": int(settings["n_hidden"]),
        "n_layers": int(settings["n_layers"]),
        "dropout": float(settings["dropout_rate"]),
        "batch_norm": _norm_places("use_batch_norm", settings["use_batch_norm"]),
        "layer_norm": _norm_places("use_layer_norm", settings["use_layer_norm"]),
        "deeply_inject_covariates": bool(settings["deeply_inject_covariates"]),
    }
    return ScviToolsSettings(
        config, _categories(registry, batch_key, categorical), str(registry.get("scvi_version"))
    )


def _norm_places(setting: str, value: Any) -> str:
    """``use_batch_norm`` / ``use_layer_norm`` as one of "both", "encoder", "decoder", "none"
    (older scvi-tools saved a bool: True for both)."""
    if isinstance(value, bool):
        return "both" if value else "none"
    if value not in _NORM_PLACES:
        raise _refuse(setting, value, f"pyrosc knows {_NORM_PLACES}")
    return value


def _state(registry: Mapping[str, Any], field: str) -> Mapping[str, Any]:
    """The state registry of ``field`` (empty when the field is absent)."""
    fields = registry.get("field_registries") or {}
    return (fields.get(field) or {}).get("state_registry") or {}


def _names(values: Any) -> list[str]:
    """Category or column names saved as a numpy array or a list, as strings."""
    return [str(value) for value in np.asarray(values, dtype=object).ravel()]


def _continuous_keys(registry: Mapping[str, Any], setup: Mapping[str, Any]) -> list[str]:
    """The continuous covariate columns in scvi-tools' order (its registry's ``columns``)."""
    given = list(setup.get("continuous_covariate_keys") or [])
    saved = _state(registry, CONTINUOUS_FIELD).get("columns")
    keys = given if saved is None else _names(saved)
    if sorted(keys) != sorted(given):
        raise ValueError(
            f"the saved registry lists continuous covariates {keys}, its setup_args {given}"
        )
    return keys


def _categories(
    registry: Mapping[str, Any], batch_key: str | None, categorical: Sequence[str]
) -> dict[str, list[str]]:
    """Covariate key -> category names in scvi-tools' code order: the batch, then each
    categorical covariate."""
    categories = {}
    if batch_key is not None:
        categories[batch_key] = _names(_state(registry, BATCH_FIELD)["categorical_mapping"])
    mappings = _state(registry, CATEGORICAL_FIELD).get("mappings") or {}
    for key in categorical:
        if key not in mappings:
            raise ValueError(f"the saved registry has no categories of covariate {key!r}")
        categories[key] = _names(mappings[key])
    return categories


# -- pyrosc -> scvi-tools ------------------------------------------------------------------------


def write_settings(
    config: Mapping[str, Any],
    categories: Mapping[str, Sequence[str]],
    var_names: Sequence[str],
    n_cells: int,
    scvi_version: str = "1.4.2",
) -> dict[str, Any]:
    """The ``attr_dict`` scvi-tools 1.4.2 saves for an SCVI with pyrosc's ``config`` (the
    arguments of :class:`pyrosc.SCVI`) and covariate ``categories`` (key -> names in code
    order, batch first).

    Raises:
        ValueError: a pyrosc setting scvi-tools' SCVI lacks (the "zip" likelihood).
    """
    likelihood = config["likelihood"]
    if likelihood not in _LIKELIHOODS:
        raise ValueError(
            f"scvi-tools' SCVI has no likelihood {likelihood!r} (it has {_LIKELIHOODS}); this "
            "model cannot be written for scvi-tools"
        )
    batch_key, layer = config.get("batch_key"), config.get("layer")
    categorical = list(config.get("categorical_covariate_keys") or [])
    continuous = list(config.get("continuous_covariate_keys") or [])
    setup_args = {
        "layer": layer,
        "batch_key": batch_key,
        "labels_key": None,
        "size_factor_key": None,
        "categorical_covariate_keys": categorical or None,
        "continuous_covariate_keys": continuous or None,
    }
    # Without a batch_key, scvi-tools codes every cell 0 in a column of its own.
    batch_names = list(categories[batch_key]) if batch_key is not None else [0]
    fields = {
        "X": _field(
            {"attr_name": "X" if layer is None else "layers", "attr_key": layer},
            {"n_obs": n_cells, "n_vars": len(var_names), "column_names": np.asarray(var_names)},
            {"n_vars": len(var_names), "n_cells": n_cells},
        ),
        BATCH_FIELD: _field(
            {"attr_name": "obs", "attr_key": "_scvi_batch"},
            {
                "categorical_mapping": np.asarray(batch_names, dtype=object),
                "original_key": batch_key if batch_key is not None else "_scvi_batch",
            },
            {"n_batch": len(batch_names)},
        ),
        "labels": _field(
            {"attr_name": "obs", "attr_key": "_scvi_labels"},
            {"categorical_mapping": np.asarray([0]), "original_key": "_scvi_labels"},
            {"n_labels": 1},
        ),
        "size_factor": _field({}, {}, {}),
        CATEGORICAL_FIELD: _field(
            {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"}
            if categorical
            else {},
            {
                "mappings": {key: np.asarray(categories[key], dtype=object) for key in categorical},
                "field_keys": categorical,
                "n_cats_per_key": [len(categories[key]) for key in categorical],
            }
            if categorical
            else {},
            {"n_extra_categorical_covs": len(categorical)},
        ),
        CONTINUOUS_FIELD: _field(
            {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"} if continuous else {},
            {"columns": np.asarray(continuous, dtype=object)} if continuous else {},
            {"n_extra_continuous_covs": len(continuous)},
        ),
    }
    registry = {
        "_scvi_uuid": str(uuid.uuid4()),
        "scvi_version": scvi_version,
        "model_name": "SCVI",
        "setup_args": setup_args,
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
    }
    non_kwargs = {
        "n_hidden": config["n_hidden"],
        "n_latent": config["n_latent"],
        "n_layers": config["n_layers"],
        "dropout_rate": config["dropout"],
        "dispersion": config.get("dispersion") or "gene",
        "gene_likelihood": likelihood,
        "use_observed_lib_size": config["library"] == "observed",
        "latent_distribution": "normal",
    }
    kwargs = {
        "encode_covariates": config["encode_covariates"],
        "deeply_inject_covariates": config["deeply_inject_covariates"],
        "use_batch_norm": config["batch_norm"],
        "use_layer_norm": config["layer_norm"],
    }
    return {
        "registry_": registry,
        "init_params_": {"kwargs": {"kwargs": kwargs}, "non_kwargs": non_kwargs},
        "is_trained_": True,
        "get_normalized_function_name_": "get_normalized_expression",
        "history_": None,
        "train_indices_": None,
        "validation_indices_": None,
        "test_indices_": None,
    }


def _field(data: dict, state: dict, summary: dict) -> dict[str, dict]:
    """One entry of a registry's ``field_registries``."""
    return {"data_registry": data, "state_registry": state, "summary_stats": summary}
