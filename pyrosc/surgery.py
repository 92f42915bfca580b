"""Architecture surgery for reference mapping (scArches, Lotfollahi et al. 2022).

A fitted reference model is extended to a query's new categories (batches, donors, ...) of its
categorical covariates, without refitting the reference:

* every :class:`pyrosc.nets.MLP` gets one more input column per new category, in each layer
  that sees the one-hot covariates (its weight is widened; the reference's columns keep their
  values, so every reference category keeps its code and its meaning);
* every free parameter with one slice per category (scVI's "gene-batch" inverse dispersion)
  gets one more slice per new category;
* a :class:`pyrosc.freezing.Frozen` names every reference entry, so that a query fit trains
  the new entries only (and BatchNorm keeps the reference's statistics).

It works on any networks built from :mod:`pyrosc.nets` (an MLP knows its ``covariate_sizes``)
and on free parameters the caller names, so a model written outside the package gets it too.
An MLP with ``k`` covariate blocks is taken to read the first ``k`` covariates, in the order of
the ``covariates`` data argument (the batch first), as the package's networks do.

New entries start at the mean of the reference's entries of the same covariate (the mean of
the reference batches' columns, or rows): a new batch starts as an average reference batch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from pyrosc.freezing import Frozen
from pyrosc.nets import MLP

#: A Pyro parameter-store state, as ``ParamStoreDict.get_state()`` returns and ``scope()``
#: takes: ``{"params": {name: unconstrained tensor}, "constraints": {name: constraint}}``.
ParamState = dict


def map_query(
    networks: nn.Module,
    params: ParamState,
    reference_sizes: Sequence[int],
    sizes: Sequence[int],
    indexed_by: Mapping[str, tuple[int, int]] | None = None,
    trained_batchnorm: Sequence[str] = (),
    unfrozen: bool = False,
) -> tuple[nn.Module, ParamState, Frozen | None]:
    """The networks and free parameters of a fitted reference, extended to a query's categories,
    and what a query fit leaves frozen. The reference's own objects are not touched (deep
    copies are extended).

    Args:
        networks: the reference's networks (modules built from :mod:`pyrosc.nets`).
        params: the reference's Pyro parameter-store state (the scope it was fitted in); the
            networks' own weights in it are skipped (the networks carry them).
        reference_sizes: ``(n_covariates,)`` categories of each categorical covariate in the
            reference.
        sizes: ``(n_covariates,)`` categories of each in the query: the reference's first, then
            the query's new ones (``sizes[i] >= reference_sizes[i]``).
        indexed_by: free parameter name -> ``(covariate, dim)``: the covariate (its position)
            whose categories index the parameter along ``dim`` (scVI's "gene-batch" inverse
            dispersion: ``{"inverse_dispersion": (0, 0)}``). Such a parameter's constraint must
            act entry by entry (real, positive); its new slices start at the mean of the
            reference's, on the unconstrained scale (for a positive one, their geometric mean).
        trained_batchnorm: names of modules (``"encoder"``) whose BatchNorm layers keep
            training (weights and running statistics); every other BatchNorm is frozen.
        unfrozen: train every weight (no :class:`Frozen`), as scvi-tools' ``unfrozen=True``.

    Returns:
        the extended networks, the extended free parameters (a parameter-store state, for
        ``pyro.get_param_store().scope(state)``) and the :class:`Frozen` to pass to
        :func:`pyrosc.train.train` (None when ``unfrozen``).

    Raises:
        ValueError: sizes of another length than ``reference_sizes`` or smaller than them, an
            MLP whose covariate sizes are not the reference's, an unknown name in ``indexed_by``.
    """
    added = _added(reference_sizes, sizes)
    indexed_by = dict(indexed_by or {})
    free = free_parameters(params, networks)
    networks = copy.deepcopy(networks)
    add_categories(networks, reference_sizes, added)
    unknown = sorted(set(indexed_by) - set(free))
    if unknown:
        raise ValueError(f"indexed_by names {unknown}, which are not free parameters: {list(free)}")
    for name, (covariate, dim) in indexed_by.items():
        if free[name].shape[dim] != reference_sizes[covariate]:
            raise ValueError(
                f"{name!r} has {free[name].shape[dim]} slices along dim {dim}, but covariate "
                f"{covariate} has {reference_sizes[covariate]} reference categories"
            )
    extended = {
        "params": add_parameter_categories(free, indexed_by, added),
        "constraints": {name: params["constraints"][name] for name in free},
    }
    if unfrozen:
        return networks, extended, None
    frozen = frozen_reference(
        networks, extended["params"], reference_sizes, indexed_by, trained_batchnorm
    )
    return networks, extended, frozen


def frozen_reference(
    networks: nn.Module,
    params: Mapping[str, Tensor],
    reference_sizes: Sequence[int],
    indexed_by: Mapping[str, tuple[int, int]] | None = None,
    trained_batchnorm: Sequence[str] = (),
) -> Frozen:
    """What a query fit of extended ``networks`` and free ``params`` (name -> value) leaves
    frozen: every reference entry (all but the new categories' columns and slices; see
    :func:`map_query` for the arguments), and every BatchNorm layer outside the modules named
    in ``trained_batchnorm``, kept in evaluation mode."""
    masks = reference_masks(networks, reference_sizes)
    masks |= parameter_masks(params, indexed_by or {}, reference_sizes)
    return _with_batchnorm(networks, masks, trained_batchnorm)


def _added(reference_sizes: Sequence[int], sizes: Sequence[int]) -> list[int]:
    """``(n_covariates,)`` new categories per covariate."""
    if len(sizes) != len(reference_sizes):
        raise ValueError(
            f"sizes has {len(sizes)} covariates, reference_sizes {len(reference_sizes)}"
        )
    added = [int(size) - int(ref) for size, ref in zip(sizes, reference_sizes, strict=True)]
    if any(n < 0 for n in added):
        raise ValueError(
            f"a query keeps every reference category: sizes {list(sizes)} must be at least "
            f"reference_sizes {list(reference_sizes)}"
        )
    return added


# -- networks ------------------------------------------------------------------------------------


def _named_mlps(networks: nn.Module) -> Iterator[tuple[str, MLP]]:
    """The MLPs among ``networks``' modules that see the data's categorical covariates, by
    name (not those whose covariates are a discrete latent of the model, such as scANVI's y)."""
    for name, module in networks.named_modules():
        if isinstance(module, MLP) and module.covariate_sizes and module.covariate_role == "data":
            yield name, module


def add_categories(
    networks: nn.Module, reference_sizes: Sequence[int], added: Sequence[int]
) -> None:
    """Widen, in place, every covariate-seeing :class:`pyrosc.nets.MLP` of ``networks`` by
    ``added[i]`` input columns for covariate ``i``, after that covariate's reference columns,
    in each of its layers that sees the covariates (:meth:`pyrosc.nets.MLP.takes_covariates`).

    Args:
        networks: modules built from :mod:`pyrosc.nets`, as fitted on the reference.
        reference_sizes: ``(n_covariates,)`` categories per covariate in the reference.
        added: ``(n_covariates,)`` new categories per covariate.

    Raises:
        ValueError: an MLP reads more covariates than given, or its sizes differ from the
            reference's (networks already extended, or not the reference's).
    """
    for name, mlp in _named_mlps(networks):
        k = len(mlp.covariate_sizes)
        if mlp.covariate_sizes != tuple(reference_sizes[:k]):
            raise ValueError(
                f"network {name or 'MLP'!r} has covariate sizes {mlp.covariate_sizes}, not the "
                f"reference's {tuple(reference_sizes[:k])}"
            )
        for j, linear in enumerate(mlp.linears):
            if mlp.takes_covariates(j):
                mlp.linears[j] = _widened(linear, mlp.covariate_sizes, added[:k])
        mlp.covariate_sizes = tuple(s + n for s, n in zip(mlp.covariate_sizes, added, strict=False))


def _widened(linear: nn.Linear, sizes: Sequence[int], added: Sequence[int]) -> nn.Linear:
    """``linear``, whose inputs end with one-hot blocks of ``sizes``, with ``added[i]`` more
    columns after block ``i``, each the mean of that block's columns. ``(out, in)`` weight ->
    ``(out, in + sum(added))``; the bias is kept."""
    n_features = linear.in_features - sum(sizes)
    blocks = linear.weight.detach().split([n_features, *sizes], dim=1)
    columns = [blocks[0]]
    for block, n_new in zip(blocks[1:], added, strict=True):
        columns += [block, block.mean(dim=1, keepdim=True).expand(-1, n_new)]
    weight = torch.cat(columns, dim=1)
    wider = nn.Linear(weight.shape[1], linear.out_features, linear.bias is not None)
    wider = wider.to(weight.device, weight.dtype)
    with torch.no_grad():
        wider.weight.copy_(weight)
        if linear.bias is not None:
            wider.bias.copy_(linear.bias)
    return wider


def reference_masks(networks: nn.Module, reference_sizes: Sequence[int]) -> dict[str, Tensor]:
    """Boolean masks of the reference's entries in extended ``networks``: every entry of every
    parameter, except the columns of categories beyond ``reference_sizes`` in the MLPs' layers.

    Returns:
        ``networks.named_parameters()`` name -> mask of the parameter's shape (True: a
        reference entry).
    """
    masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in networks.named_parameters()}
    for name, mlp in _named_mlps(networks):
        prefix = f"{name}." if name else ""
        sizes = mlp.covariate_sizes
        for j, linear in enumerate(mlp.linears):
            if not mlp.takes_covariates(j):
                continue
            mask = masks[f"{prefix}linears.{j}.weight"]
            start = linear.in_features - sum(sizes)
            for size, n_reference in zip(sizes, reference_sizes, strict=False):
                mask[:, start + n_reference : start + size] = False
                start += size
    return masks


# -- free parameters -----------------------------------------------------------------------------


def free_parameters(params: ParamState, networks: nn.Module) -> dict[str, Tensor]:
    """The parameters of ``params`` that are not weights of ``networks`` (``pyro.module``
    stores the modules' own tensors), detached."""
    weights = {id(p) for p in networks.parameters()}
    return {
        name: value.detach() for name, value in params["params"].items() if id(value) not in weights
    }


def add_parameter_categories(
    values: Mapping[str, Tensor], indexed_by: Mapping[str, tuple[int, int]], added: Sequence[int]
) -> dict[str, Tensor]:
    """``values`` with ``added[covariate]`` more slices along ``dim`` for each parameter named
    in ``indexed_by`` (name -> ``(covariate, dim)``), each the mean of the reference's slices.
    Every tensor is a new leaf that requires a gradient (as the parameter store holds them)."""
    extended = {}
    for name, value in values.items():
        if name in indexed_by:
            covariate, dim = indexed_by[name]
            shape = list(value.shape)
            shape[dim] = added[covariate]
            mean = value.mean(dim=dim, keepdim=True).expand(shape)
            value = torch.cat([value, mean], dim=dim)
        extended[name] = value.detach().clone().requires_grad_(True)
    return extended


def parameter_masks(
    values: Mapping[str, Tensor],
    indexed_by: Mapping[str, tuple[int, int]],
    reference_sizes: Sequence[int],
) -> dict[str, Tensor]:
    """Boolean masks of the reference's entries of extended free parameters: all of each, but
    the slices beyond the reference's categories of the parameters in ``indexed_by``."""
    masks = {}
    for name, value in values.items():
        mask = torch.ones_like(value, dtype=torch.bool)
        if name in indexed_by:
            covariate, dim = indexed_by[name]
            n_reference = reference_sizes[covariate]
            mask.narrow(dim, n_reference, value.shape[dim] - n_reference).fill_(False)
        masks[name] = mask
    return masks


# -- BatchNorm -----------------------------------------------------------------------------------


def _with_batchnorm(
    networks: nn.Module, masks: dict[str, Tensor], trained_batchnorm: Sequence[str]
) -> Frozen:
    """``masks`` as a :class:`Frozen` whose BatchNorm layers stay in evaluation mode, except
    those inside the modules named in ``trained_batchnorm``, which train (their weights are
    taken out of ``masks``)."""
    frozen_norms = []
    masks = dict(masks)
    for name, module in networks.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if any(name == top or name.startswith(f"{top}.") for top in trained_batchnorm):
            for parameter_name, _ in module.named_parameters():
                masks.pop(f"{name}.{parameter_name}", None)
        else:
            frozen_norms.append(name)
    return Frozen(masks, tuple(frozen_norms))
