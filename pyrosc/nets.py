"""Encoder and decoder building blocks shared by the models and guides.

Every network here accepts inputs with any number of leading dimensions, ``(..., features)``.
That matters under Pyro: vectorised particles and parallel enumeration add dimensions on the
left of a cell's tensor, while ``nn.BatchNorm1d`` only accepts a 2-D ``(batch, features)``
input. The networks therefore flatten the leading dimensions, run, and restore them.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pyrosc._fast import broadcast_shapes

# What each size counts, for the error message of check_sizes.
_SIZE_MEANINGS = {
    "n_input": "input features",
    "n_output": "output features",
    "n_latent": "latent dimensions",
    "n_hidden": "units per hidden layer",
    "n_layers": "hidden layers",
    "n_genes": "genes",
    "n_classes": "categories",
}


def check_sizes(**sizes: float) -> None:
    """Raise a ``ValueError`` naming the first network size that cannot build a network.

    Counts (``n_latent``, ``n_hidden``, ``n_layers``, ``n_input``, ...) must be integers of at
    least 1 (a bool is not a count); ``dropout`` must be a number in [0, 1).
    """
    for name, value in sizes.items():
        if name == "dropout":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"dropout must be a number in [0, 1), got {value!r}.")
            if not 0 <= value < 1:
                raise ValueError(
                    f"dropout must be in [0, 1) (the probability of zeroing a unit), got {value}."
                )
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            meaning = _SIZE_MEANINGS.get(name, "units")
            raise ValueError(
                f"{name} must be an integer of at least 1 (the number of {meaning}), got "
                f"{value!r}; a network needs at least one."
            )


#: What an MLP's categorical covariate inputs are (see :class:`MLP`).
COVARIATE_ROLES = ("data", "latent")


def one_hot_covariates(covariates: Tensor | None, sizes: Sequence[int]) -> list[Tensor]:
    """One-hot encode categorical covariates.

    Args:
        covariates: ``(..., n_covariates)`` integer codes, or None when ``sizes`` is empty.
        sizes: number of categories of each covariate.

    Returns:
        one ``(..., size)`` float tensor per covariate.
    """
    if not sizes:
        return []
    if covariates is None or covariates.shape[-1] != len(sizes):
        found = None if covariates is None else covariates.shape[-1]
        raise ValueError(f"expected codes of {len(sizes)} covariates, got {found}")
    return [_one_hot(covariates[..., i], size) for i, size in enumerate(sizes)]


def _one_hot(codes: Tensor, size: int) -> Tensor:
    """``F.one_hot(codes, size).float()`` without its check of the codes' range, which reads
    their minimum and maximum to the host (three times a step per network); a code outside
    ``[0, size)`` still raises, from ``scatter_``."""
    one_hot = codes.new_zeros((*codes.shape, size), dtype=torch.float32)
    return one_hot.scatter_(-1, codes.unsqueeze(-1), 1.0)


@dataclass(frozen=True)
class LayerStyle:
    """How the hidden layers of an :class:`MLP` are built, beyond their sizes.

    The default is scVI's layer: ``Linear -> BatchNorm -> ReLU -> Dropout``, covariates into
    every layer. The other settings are scvi-tools' options, so that its trained networks
    (the CELLxGENE Census scVI: layer norm, no BatchNorm) can be represented exactly.

    Attributes:
        batch_norm: BatchNorm after each linear map (scvi-tools' momentum 0.01 and eps 1e-3).
        layer_norm: LayerNorm without affine weights after it (after BatchNorm when both), as
            scvi-tools' ``use_layer_norm``.
        covariates_every_layer: the one-hot covariates enter every layer (scvi-tools'
            ``deeply_inject_covariates=True``, its default), or the first only.
    """

    batch_norm: bool = True
    layer_norm: bool = False
    covariates_every_layer: bool = True


#: scVI's layer, the default of every network here.
SCVI_LAYERS = LayerStyle()


class MLP(nn.Module):
    """Fully connected layers: ``Linear -> BatchNorm -> ReLU -> Dropout``, repeated (other
    normalisations: see :class:`LayerStyle`).

    As in scVI, categorical covariates (one-hot) are concatenated to the input of every layer
    (or of the first only, per ``style``), so that each layer can shift its output by batch.

    Args:
        n_input: input features.
        n_hidden: units per hidden layer.
        n_layers: number of hidden layers (at least 1).
        dropout: dropout probability after each layer.
        covariate_sizes: number of categories of each categorical covariate to inject.
        n_continuous: continuous covariates, appended to the input of the first layer (as
            scvi-tools does with ``continuous_covariate_keys``).
        covariate_role: what the categorical covariates are: ``"data"``, the data's covariates
            (batch first), which reference mapping extends with a query's new categories
            (:mod:`pyrosc.surgery`); or ``"latent"``, the values of a discrete latent of the
            model (scANVI's cell type ``y``), fixed by the model and never extended.
        style: the normalisation of each layer and where the covariates enter.

    Raises:
        ValueError: a size below 1 or not an integer, or dropout outside [0, 1).
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        covariate_sizes: Sequence[int] = (),
        n_continuous: int = 0,
        covariate_role: str = "data",
        style: LayerStyle = SCVI_LAYERS,
    ) -> None:
        super().__init__()
        check_sizes(n_input=n_input, n_hidden=n_hidden, n_layers=n_layers, dropout=dropout)
        if covariate_role not in COVARIATE_ROLES:
            raise ValueError(
                f"covariate_role must be one of {COVARIATE_ROLES}, got {covariate_role!r}"
            )
        self.covariate_sizes = tuple(int(s) for s in covariate_sizes)
        self.covariate_role = covariate_role
        self.n_continuous = int(n_continuous)
        self.style = style
        n_extra = sum(self.covariate_sizes)
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i in range(n_layers):
            n_in = n_input + self.n_continuous if i == 0 else n_hidden
            self.linears.append(nn.Linear(n_in + n_extra * self.takes_covariates(i), n_hidden))
            # scvi-tools' BatchNorm settings: slow running statistics, eps 1e-3.
            norm = nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3)
            self.norms.append(norm if style.batch_norm else nn.Identity())
        # No weights: one module serves every layer.
        self.layer_norm = (
            nn.LayerNorm(n_hidden, elementwise_affine=False) if style.layer_norm else None
        )
        self.dropout = nn.Dropout(dropout)
        self.n_output = n_hidden

    def takes_covariates(self, layer: int) -> bool:
        """Whether the one-hot covariates enter hidden layer ``layer`` (0: the first)."""
        return layer == 0 or self.style.covariates_every_layer

    def forward(
        self, x: Tensor, covariates: Tensor | None = None, continuous: Tensor | None = None
    ) -> Tensor:
        """``(..., n_input)`` [and ``(..., n_covariates)`` codes, ``(..., n_continuous)``
        values] -> ``(..., n_hidden)``."""
        if self.n_continuous:
            if continuous is None or continuous.shape[-1] != self.n_continuous:
                found = None if continuous is None else continuous.shape[-1]
                raise ValueError(f"expected {self.n_continuous} continuous covariates, got {found}")
            shape = broadcast_shapes(x.shape[:-1], continuous.shape[:-1])
            x = torch.cat(
                [x.expand(*shape, x.shape[-1]), continuous.expand(*shape, self.n_continuous)], -1
            )
        one_hots = one_hot_covariates(covariates, self.covariate_sizes)
        if one_hots:
            # Under enumeration either side may carry extra leading dimensions: broadcast.
            shape = broadcast_shapes(x.shape[:-1], *(h.shape[:-1] for h in one_hots))
            x = x.expand(*shape, x.shape[-1])
            one_hots = [h.expand(*shape, h.shape[-1]) for h in one_hots]
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms, strict=True)):
            if one_hots and self.takes_covariates(i):
                h = linear(torch.cat([x, *one_hots], dim=-1))
            else:
                h = linear(x)
            # BatchNorm1d needs (batch, features): fold every leading dimension into one.
            h = norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
            if self.layer_norm is not None:
                h = self.layer_norm(h)
            x = self.dropout(F.relu(h))
        return x


class GaussianEncoder(nn.Module):
    """Amortized Gaussian posterior: features -> (loc, scale) of a diagonal Normal.

    Args:
        n_input: input features (genes, usually).
        n_output: latent dimensions.
        n_hidden, n_layers, dropout, covariate_sizes, n_continuous, covariate_role, style: as
            :class:`MLP`.
        min_variance: floor added to the variance, as scVI's ``var_eps``.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
        covariate_sizes: Sequence[int] = (),
        min_variance: float = 1e-4,
        n_continuous: int = 0,
        covariate_role: str = "data",
        style: LayerStyle = SCVI_LAYERS,
    ) -> None:
        super().__init__()
        check_sizes(n_output=n_output)
        self.body = MLP(
            n_input,
            n_hidden,
            n_layers,
            dropout,
            covariate_sizes,
            n_continuous,
            covariate_role,
            style,
        )
        self.loc = nn.Linear(n_hidden, n_output)
        self.log_variance = nn.Linear(n_hidden, n_output)
        self.min_variance = min_variance

    def forward(
        self, x: Tensor, covariates: Tensor | None = None, continuous: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(..., n_input)`` [and covariates, as :class:`MLP`] -> loc and scale, each
        ``(..., n_output)``."""
        h = self.body(x, covariates, continuous)
        scale = (self.log_variance(h).exp() + self.min_variance).sqrt()
        return self.loc(h), scale


class CountDecoder(nn.Module):
    """Latent -> per-gene logits of the expression proportions, and zero-inflation logits.

    The proportions are ``softmax(logits)``; the decoder returns the logits, so that a model
    adds effects on the logit scale and the likelihood works from ``log_softmax`` (a proportion
    that would underflow to 0 as a softmax keeps a finite log).

    Args:
        n_input: latent dimensions.
        n_genes: genes.
        n_hidden, n_layers, covariate_sizes, n_continuous, style: as :class:`MLP`.
        dropout: dropout in the hidden layers (scVI's decoder uses none).
        gate: whether to output zero-inflation gate logits.
    """

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.0,
        covariate_sizes: Sequence[int] = (),
        gate: bool = False,
        n_continuous: int = 0,
        style: LayerStyle = SCVI_LAYERS,
    ) -> None:
        super().__init__()
        check_sizes(n_genes=n_genes)
        self.n_input = n_input
        self.body = MLP(
            n_input, n_hidden, n_layers, dropout, covariate_sizes, n_continuous, style=style
        )
        self.proportion_logits = nn.Linear(n_hidden, n_genes)
        self.gate_logits = nn.Linear(n_hidden, n_genes) if gate else None

    def forward(
        self, z: Tensor, covariates: Tensor | None = None, continuous: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(..., n_input)`` [and covariates, as :class:`MLP`] -> proportion logits
        ``(..., n_genes)`` (proportions: their softmax) and gate logits ``(..., n_genes)`` (None
        without a gate)."""
        return self.heads(self.body(z, covariates, continuous))

    def heads(self, hidden: Tensor) -> tuple[Tensor, Tensor | None]:
        """The output layers alone: ``(..., n_hidden)`` hidden units -> proportion logits and
        gate logits, as :meth:`forward`."""
        gate_logits = self.gate_logits(hidden) if self.gate_logits is not None else None
        return self.proportion_logits(hidden), gate_logits


class ScviDecoder(nn.Module):
    """scVI's decoder: a :class:`CountDecoder` and, optionally, a third head on the same hidden
    units for a per-cell inverse dispersion ``theta_ng`` (scVI's ``dispersion="gene-cell"``).

    ``n_input``, ``n_genes``, ``n_hidden``, ``n_layers``, ``dropout``, ``covariate_sizes``,
    ``gate``, ``n_continuous`` and ``style`` are as in :class:`CountDecoder`.

    Args:
        cell_dispersion: whether to output an inverse dispersion per cell and gene.
    """

    def __init__(
        self,
        n_input: int,
        n_genes: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.0,
        covariate_sizes: Sequence[int] = (),
        gate: bool = False,
        cell_dispersion: bool = False,
        n_continuous: int = 0,
        style: LayerStyle = SCVI_LAYERS,
    ) -> None:
        super().__init__()
        self.n_input = n_input
        self.expression = CountDecoder(
            n_input,
            n_genes,
            n_hidden,
            n_layers,
            dropout,
            covariate_sizes,
            gate,
            n_continuous,
            style,
        )
        self.log_inverse_dispersion = nn.Linear(n_hidden, n_genes) if cell_dispersion else None

    def forward(
        self, z: Tensor, covariates: Tensor | None = None, continuous: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(..., n_input)`` [and ``(..., n_covariates)`` codes, ``(..., n_continuous)``
        values] -> proportion logits, gate logits and inverse dispersion, each
        ``(..., n_genes)`` (the last two None without their head).
        """
        hidden = self.expression.body(z, covariates, continuous)
        proportion_logits, gate_logits = self.expression.heads(hidden)
        inverse_dispersion = None
        if self.log_inverse_dispersion is not None:
            # exp, as scvi-tools: the head is linear in log theta.
            inverse_dispersion = self.log_inverse_dispersion(hidden).exp()
        return proportion_logits, gate_logits, inverse_dispersion


class Classifier(nn.Module):
    """Amortized categorical posterior: features -> logits over ``n_classes``.

    Args:
        n_input: input features.
        n_classes: categories.
        n_hidden, n_layers, dropout: as :class:`MLP`.
    """

    def __init__(
        self,
        n_input: int,
        n_classes: int,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_sizes(n_classes=n_classes)
        self.body = MLP(n_input, n_hidden, n_layers, dropout)
        self.logits = nn.Linear(n_hidden, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., n_input)`` -> ``(..., n_classes)`` logits."""
        return self.logits(self.body(x))
