"""The tensors of an scvi-tools SCVI as the networks and parameters of a :class:`pyrosc.SCVI`
of the same architecture, and back.

Name by name (scvi-tools' module ``VAE`` -> pyrosc's networks, built by ``SCVI._networks``)::

    z_encoder.encoder.fc_layers.Layer i.0     encoder.body.linears.i          Linear
    z_encoder.encoder.fc_layers.Layer i.1     encoder.body.norms.i            BatchNorm
    z_encoder.mean_encoder, .var_encoder      encoder.loc, .log_variance
    l_encoder.*                               library_encoder.* (latent library)
    decoder.px_decoder.fc_layers.Layer i.*    decoder.expression.body.*
    decoder.px_scale_decoder.0                decoder.expression.proportion_logits
    decoder.px_dropout_decoder                decoder.expression.gate_logits (ZINB)
    decoder.px_r_decoder                      decoder.log_inverse_dispersion ("gene-cell")
    px_r (genes,) / (genes, batches)          inverse_dispersion = exp(px_r) / exp(px_r).T
    library_log_means, library_log_vars       library_prior.loc, library_prior.scale ** 2

(LayerNorm has no weights in either.) The only change of values is in the linear layers that
read one-hot covariates: scvi-tools gives a covariate with a single category no input column
(its one-hot is constant), pyrosc gives it one. Reading, that column is zero; writing, its
weights (a constant input of one) are added to the bias. Both are exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pyrosc.nets import MLP

#: Tensors of an scvi-tools SCVI that no pyrosc network reads, by prefix, with the condition
#: under which they are unused: the library encoder with an observed library, the gate with no
#: zero inflation, the dispersion head without a per-cell dispersion, px_r without a dispersion.
_UNUSED_WHEN = {
    "l_encoder.": lambda c: c["library"] == "observed",
    "decoder.px_dropout_decoder.": lambda c: c["likelihood"] != "zinb",
    "decoder.px_r_decoder.": lambda c: c.get("dispersion") != "gene-cell",
    "px_r": lambda c: c.get("dispersion") not in ("gene", "gene-batch"),
    "pyro_param_store": lambda c: True,
}


def _mlps(config: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(pyrosc MLP, scvi-tools FCLayers) module names of scVI's networks under ``config``."""
    yield "encoder.body", "z_encoder.encoder"
    yield "decoder.expression.body", "decoder.px_decoder"
    if config["library"] == "latent":
        yield "library_encoder.body", "l_encoder.encoder"


def _heads(config: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(pyrosc Linear, scvi-tools Linear) module names of the output layers under ``config``."""
    yield "encoder.loc", "z_encoder.mean_encoder"
    yield "encoder.log_variance", "z_encoder.var_encoder"
    yield "decoder.expression.proportion_logits", "decoder.px_scale_decoder.0"
    if config["likelihood"] == "zinb":
        yield "decoder.expression.gate_logits", "decoder.px_dropout_decoder"
    if config.get("dispersion") == "gene-cell":
        yield "decoder.log_inverse_dispersion", "decoder.px_r_decoder"
    if config["library"] == "latent":
        yield "library_encoder.loc", "l_encoder.mean_encoder"
        yield "library_encoder.log_variance", "l_encoder.var_encoder"


def _layer_pairs(networks: nn.Module, config: Mapping[str, Any]) -> Iterator[tuple]:
    """(pyrosc name, scvi-tools name, covariate sizes or None, kind) of every layer with
    tensors: kind "linear" or "norm"; the sizes of the one-hot blocks a linear layer reads."""
    modules = dict(networks.named_modules())
    for ours, theirs in _mlps(config):
        mlp = modules[ours]
        assert isinstance(mlp, MLP)
        for i in range(len(mlp.linears)):
            sizes = mlp.covariate_sizes if mlp.takes_covariates(i) else ()
            yield f"{ours}.linears.{i}", f"{theirs}.fc_layers.Layer {i}.0", sizes, "linear"
            if mlp.style.batch_norm:
                yield f"{ours}.norms.{i}", f"{theirs}.fc_layers.Layer {i}.1", None, "norm"
    for ours, theirs in _heads(config):
        yield ours, theirs, (), "linear"


def _columns_from_scvi(weight: Tensor, sizes: Sequence[int]) -> Tensor:
    """``(out, features + sum of sizes above 1)`` scvi-tools weight -> ``(out, features +
    sum(sizes))``: a zero column for each single-category covariate."""
    kept = [size for size in sizes if size > 1]
    blocks = list(weight.split([weight.shape[1] - sum(kept), *kept], dim=1))
    columns = [blocks.pop(0)]
    for size in sizes:
        columns.append(blocks.pop(0) if size > 1 else weight.new_zeros(weight.shape[0], 1))
    return torch.cat(columns, dim=1)


def _columns_to_scvi(weight: Tensor, bias: Tensor, sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The reverse of :func:`_columns_from_scvi`: a single-category covariate's column (a
    constant input of one) moves into the bias."""
    blocks = weight.split([weight.shape[1] - sum(sizes), *sizes], dim=1)
    columns, bias = [blocks[0]], bias.clone()
    for block, size in zip(blocks[1:], sizes, strict=True):
        if size > 1:
            columns.append(block)
        else:
            bias += block[:, 0]
    return torch.cat(columns, dim=1), bias


def _take(state: Mapping[str, Tensor], name: str, used: set[str]) -> Tensor:
    """``state[name]``, marked used; a clear error when it is missing."""
    if name not in state:
        raise ValueError(
            f"the scvi-tools model has no tensor {name!r}, which its saved settings imply: the "
            "file's tensors and settings disagree (a model from another scvi-tools version?)"
        )
    used.add(name)
    return state[name]


def from_scvi(
    state: Mapping[str, Tensor], networks: nn.Module, config: Mapping[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """pyrosc's networks state and free parameters from an scvi-tools SCVI's ``state``.

    Args:
        state: scvi-tools' ``model_state_dict``.
        networks: pyrosc's networks for the same settings (built, any weights): the names and
            shapes to fill.
        config: the :class:`pyrosc.SCVI` settings (``read_settings(...).config``).

    Returns:
        the networks' ``state_dict`` and the free parameters (name -> constrained value:
        ``inverse_dispersion``).

    Raises:
        ValueError: a tensor missing, of another shape than pyrosc's network has, or left over
            (an architecture the settings do not describe).
    """
    template = networks.state_dict()
    ours: dict[str, Tensor] = {}
    used: set[str] = set()
    for mine, theirs, sizes, kind in _layer_pairs(networks, config):
        if kind == "norm":
            for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                ours[f"{mine}.{part}"] = _take(state, f"{theirs}.{part}", used)
            continue
        weight = _take(state, f"{theirs}.weight", used)
        ours[f"{mine}.weight"] = _columns_from_scvi(weight, sizes) if sizes else weight
        ours[f"{mine}.bias"] = _take(state, f"{theirs}.bias", used)
    if config["library"] == "latent":
        ours["library_prior.loc"] = _take(state, "library_log_means", used).reshape(-1)
        ours["library_prior.scale"] = _take(state, "library_log_vars", used).reshape(-1).sqrt()
    params = {}
    if config.get("dispersion") in ("gene", "gene-batch"):
        log_theta = _take(state, "px_r", used)
        params["inverse_dispersion"] = (
            log_theta.exp().T if log_theta.dim() == 2 else log_theta.exp()
        )
    _check_shapes(ours, template)
    if "inverse_dispersion" in params:
        _check_dispersion(params["inverse_dispersion"], networks, config)
    left = [
        name
        for name in state
        if name not in used
        and not any(name.startswith(p) and unused(config) for p, unused in _UNUSED_WHEN.items())
    ]
    if left:
        raise ValueError(
            f"the scvi-tools model has tensors pyrosc's scVI has no place for: {left[:5]}"
            f"{' ...' if len(left) > 5 else ''} (an architecture its saved settings do not "
            "describe)"
        )
    return ours, params


def _check_shapes(ours: Mapping[str, Tensor], template: Mapping[str, Tensor]) -> None:
    """Every tensor of ``template`` (pyrosc's networks) is in ``ours`` with its shape."""
    for name, value in template.items():
        if name not in ours:
            raise ValueError(f"no scvi-tools tensor maps onto pyrosc's {name!r}")
        if ours[name].shape != value.shape:
            raise ValueError(
                f"the scvi-tools tensor for pyrosc's {name!r} has shape "
                f"{tuple(ours[name].shape)}, pyrosc's network {tuple(value.shape)}: the file's "
                "tensors and settings disagree"
            )


def _check_dispersion(theta: Tensor, networks: nn.Module, config: Mapping[str, Any]) -> None:
    """``theta`` is ``(genes,)`` ("gene") or ``(batches, genes)`` ("gene-batch")."""
    decoder = networks.get_submodule("decoder.expression")
    n_genes = decoder.proportion_logits.out_features
    shape: tuple[int, ...] = (n_genes,)
    if config["dispersion"] == "gene-batch":
        sizes = decoder.body.covariate_sizes
        shape = (sizes[0] if config.get("batch_key") is not None else 1, n_genes)
    if tuple(theta.shape) != shape:
        raise ValueError(
            f"the scvi-tools px_r gives an inverse dispersion of shape {tuple(theta.shape)}; "
            f"pyrosc's {config['dispersion']!r} dispersion has {shape}: the file's tensors and "
            "settings disagree"
        )


def to_scvi(
    networks: nn.Module, params: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """The ``model_state_dict`` of scvi-tools 1.4.2's SCVI for pyrosc's ``networks`` and free
    ``params`` (name -> constrained value), the reverse of :func:`from_scvi`.

    scvi-tools' module has tensors pyrosc's has not (the library encoder of an observed
    library, the gate of NB, the dispersion of Poisson): they are written with the shapes
    scvi-tools builds and values that change nothing it computes (zeros; BatchNorm's identity).
    """
    state = networks.state_dict()
    out: dict[str, Tensor] = {}
    for mine, theirs, sizes, kind in _layer_pairs(networks, config):
        if kind == "norm":
            for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                out[f"{theirs}.{part}"] = state[f"{mine}.{part}"]
            continue
        weight, bias = state[f"{mine}.weight"], state[f"{mine}.bias"]
        if sizes:
            weight, bias = _columns_to_scvi(weight, bias, sizes)
        out[f"{theirs}.weight"], out[f"{theirs}.bias"] = weight, bias
    n_genes, n_hidden = state["decoder.expression.proportion_logits.weight"].shape
    first = out["z_encoder.encoder.fc_layers.Layer 0.0.weight"]
    if config["library"] == "observed":
        # scvi-tools builds the library encoder anyway: one layer, as wide as the z encoder's.
        out["l_encoder.encoder.fc_layers.Layer 0.0.weight"] = first.new_zeros(first.shape)
        out["l_encoder.encoder.fc_layers.Layer 0.0.bias"] = first.new_zeros(n_hidden)
        if config["batch_norm"] in ("encoder", "both"):
            out.update(_identity_norm("l_encoder.encoder.fc_layers.Layer 0.1", n_hidden))
        for head in ("mean_encoder", "var_encoder"):
            out[f"l_encoder.{head}.weight"] = first.new_zeros(1, n_hidden)
            out[f"l_encoder.{head}.bias"] = first.new_zeros(1)
    else:
        prior = state["library_prior.loc"], state["library_prior.scale"]
        out["library_log_means"] = prior[0].reshape(1, -1).clone()
        out["library_log_vars"] = prior[1].square().reshape(1, -1)
    for head in ("px_dropout_decoder", "px_r_decoder"):
        if f"decoder.{head}.weight" not in out:
            out[f"decoder.{head}.weight"] = first.new_zeros(n_genes, n_hidden)
            out[f"decoder.{head}.bias"] = first.new_zeros(n_genes)
    dispersion = config.get("dispersion") or "gene"
    if dispersion != "gene-cell":
        theta = params.get("inverse_dispersion")
        if theta is None:  # Poisson: scvi-tools keeps a px_r it never reads
            out["px_r"] = first.new_zeros(n_genes)
        else:  # (genes,), or (batches, genes) -> scvi-tools' (genes, batches)
            out["px_r"] = (theta.log().T if theta.dim() == 2 else theta.log()).contiguous()
    out["pyro_param_store"] = {"params": {}, "constraints": {}}
    return {k: v.detach().cpu().clone() if isinstance(v, Tensor) else v for k, v in out.items()}


def _identity_norm(prefix: str, n: int) -> dict[str, Tensor]:
    """A BatchNorm's tensors that leave its input as it is (up to its eps)."""
    return {
        f"{prefix}.weight": torch.ones(n),
        f"{prefix}.bias": torch.zeros(n),
        f"{prefix}.running_mean": torch.zeros(n),
        f"{prefix}.running_var": torch.ones(n),
        f"{prefix}.num_batches_tracked": torch.tensor(0),
    }
