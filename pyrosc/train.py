"""Stochastic variational inference for any (model, guide) pair that follows the pyrosc contract.

The trainer never asks which model it was given. What it needs to know it reads off the pair:
the data arguments it takes (its signature, see :func:`pyrosc.traces.bind_data`), and the loss
(:mod:`pyrosc.objective`: ``TraceEnum_ELBO`` when a site is marked for enumeration, so discrete
latents are summed out exactly instead of sampled; KL warm-up and free bits as effect handlers).
"""

from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer.util import is_validation_enabled
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyrosc._fast import compiled
from pyrosc.data import CountData, MinibatchSampler, split_cells
from pyrosc.evaluate import elbo
from pyrosc.freezing import Frozen, FrozenFit
from pyrosc.objective import ScaleLatents, read_objective, warmup_weight
from pyrosc.optim import StoreAdam
from pyrosc.traces import bind_data


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"`` / ``"cuda"`` as given.

    Raises:
        ValueError: ``"cuda"`` was asked for on a machine without a usable GPU.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but PyTorch sees no CUDA GPU here "
            f"(torch {torch.__version__}); use device='cpu' or device='auto'"
        )
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        history: one row per epoch: ``epoch``, ``kl_weight``, ``train_elbo`` (per cell, of the
            objective optimised, warm-up weight included), ``validation_elbo`` (per cell, full
            ELBO, networks in evaluation mode; NaN without validation cells) and ``seconds``.
        train_index, validation_index: positions of the cells in each set.
        best_epoch: the epoch whose parameters were kept (the last, or the best validation
            ELBO with early stopping).
        elbo_name: the loss used (``Trace_ELBO``, ``TraceEnum_ELBO`` or ``free_bits``).
        max_epochs: the number of epochs the fit was to run (early stopping may stop sooner).
        max_epochs_reason: how that number was chosen, e.g. ``"8 epochs chosen for 1,000,000
            cells: min(400, round(20000 / cells * 400)), scvi-tools' rule (max_epochs=None)"``
            (also in ``history.attrs["max_epochs_reason"]`` and the progress bar).
    """

    history: pd.DataFrame
    train_index: np.ndarray
    validation_index: np.ndarray
    best_epoch: int
    elbo_name: str = "Trace_ELBO"
    max_epochs: int | None = None
    max_epochs_reason: str = ""


def free_parameter_names(networks: nn.Module | None) -> list[str]:
    """The names of the parameters in Pyro's parameter store that are not weights of
    ``networks`` (dispersion, mixture weights, component means, ...): what a snapshot or a saved
    model holds besides the networks' ``state_dict``."""
    module_parameters = set() if networks is None else {id(p) for p in networks.parameters()}
    return [
        name
        for name, value in pyro.get_param_store().named_parameters()
        if id(value) not in module_parameters
    ]


def _snapshot(networks: nn.Module | None) -> tuple[dict[str, Tensor], dict | None]:
    """Copies of the free parameters' unconstrained values and of the networks' state."""
    unconstrained = dict(pyro.get_param_store().named_parameters())
    free = {name: unconstrained[name].detach().clone() for name in free_parameter_names(networks)}
    modules = copy.deepcopy(networks.state_dict()) if networks is not None else None
    return free, modules


def _restore(snapshot: tuple[dict[str, Tensor], dict | None], networks: nn.Module | None) -> None:
    """Write a :func:`_snapshot` back, in place (the tensors the optimiser holds)."""
    free, modules = snapshot
    unconstrained = dict(pyro.get_param_store().named_parameters())
    with torch.no_grad():
        for name, value in free.items():
            unconstrained[name].copy_(value)
    if networks is not None and modules is not None:
        networks.load_state_dict(modules)


def default_epochs(n_cells: int) -> int:
    """scvi-tools' number of epochs for ``n_cells`` cells: ``min(400, round(20000 / n_cells *
    400))``, at least 1. Small datasets get 400 epochs; above 20,000 cells, as many epochs as
    make about 8 million cell-steps (e.g. 8 epochs for a million cells)."""
    return max(1, min(400, round(20000 / n_cells * 400)))


def resolve_epochs(max_epochs: int | None, n_cells: int) -> tuple[int, str]:
    """The number of epochs to run and why (``max_epochs=None``: :func:`default_epochs`).

    Raises:
        ValueError: ``max_epochs`` not a whole number of at least 1, nor None.
    """
    if max_epochs is None:
        chosen = default_epochs(n_cells)
        return chosen, (
            f"{_epochs_text(chosen)} chosen for {n_cells:,} cells: min(400, round(20000 / cells "
            "* 400)), scvi-tools' rule (max_epochs=None)"
        )
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, numbers.Integral):
        raise ValueError(f"max_epochs must be a whole number or None, got {max_epochs!r}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    return int(max_epochs), f"{_epochs_text(max_epochs)} as asked (max_epochs={max_epochs})"


def _epochs_text(n: int) -> str:
    return "1 epoch" if n == 1 else f"{n} epochs"


class EarlyStopping:
    """Stop once the validation ELBO has not improved for ``patience`` epochs, and keep the
    parameters of the best epoch: a copy of the free parameters in Pyro's parameter store and
    of the networks' state, taken at each improvement.

    Args:
        patience: epochs without improvement before stopping.
        networks: the modules of the fit (None: free parameters only).
    """

    def __init__(self, patience: int, networks: nn.Module | None) -> None:
        self.patience, self.networks = patience, networks
        self.best_value, self.since_best = -np.inf, 0
        self.best: tuple[int, tuple[dict[str, Tensor], dict | None]] | None = None

    def stop(self, epoch: int, validation_elbo: float) -> bool:
        """Record the validation ELBO of ``epoch``; True once it is time to stop."""
        if validation_elbo > self.best_value:
            self.best = (epoch, _snapshot(self.networks))
            self.best_value, self.since_best = validation_elbo, 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def restore_best(self) -> int | None:
        """Write the best epoch's parameters back, in place, and return its number; None (the
        parameters stay the last epoch's) when no epoch had a finite validation ELBO."""
        if self.best is None:
            return None
        _restore(self.best[1], self.networks)
        return self.best[0]


def check_options(
    early_stopping: bool,
    patience: int | None,
    free_bits: float,
    kl_warmup_epochs: int,
) -> int:
    """Raise a ``ValueError`` for an option of :func:`train` out of range or that does not
    apply; return the patience of early stopping (45 unless given)."""
    if patience is not None and not early_stopping:
        raise ValueError("patience applies to early stopping only: pass early_stopping=True")
    if free_bits < 0 or kl_warmup_epochs < 0:
        raise ValueError("free_bits and kl_warmup_epochs must be non-negative")
    return 45 if patience is None else patience


def fit_split(
    n_cells: int,
    validation_fraction: float,
    split: tuple[np.ndarray, np.ndarray] | None,
    seed: int,
    early_stopping: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_index, validation_index)``, positions of the cells of each set: ``split`` as
    given, or drawn from ``validation_fraction`` and ``seed``."""
    if split is None:
        train_index, validation_index = split_cells(n_cells, validation_fraction, seed)
    else:
        train_index, validation_index = (np.asarray(part, dtype=np.int64) for part in split)
    if early_stopping and len(validation_index) == 0:
        raise ValueError("early_stopping needs validation cells: set validation_fraction > 0")
    return train_index, validation_index


def check_finite(train_elbo: float, epoch: int, lr: float) -> None:
    """Raise ``FloatingPointError`` when the training ELBO of ``epoch`` is not finite."""
    if not np.isfinite(train_elbo):
        raise FloatingPointError(
            f"training diverged at epoch {epoch}: the ELBO is {train_elbo}; "
            f"try a smaller learning rate than lr={lr}"
        )


def train(
    model: Callable,
    guide: Callable,
    data: CountData,
    *,
    networks: nn.Module | None = None,
    max_epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    validation_fraction: float = 0.1,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    early_stopping: bool = False,
    patience: int | None = None,
    kl_warmup_epochs: int = 0,
    free_bits: float = 0.0,
    frozen: Frozen | None = None,
    check_every_step: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    shuffle: str | None = None,
) -> TrainResult:
    """Fit ``model`` and ``guide`` to ``data`` by stochastic variational inference.

    Parameters are created in (and trained in) the current Pyro parameter store: call it inside
    ``pyro.get_param_store().scope(...)`` to keep fits apart, as the classes of
    :mod:`pyrosc.api` do. Each step hands the model and the guide the one minibatch dictionary
    of :meth:`CountData.minibatch` (plus ``n_cells``, the number of training cells); each
    receives the entries its own signature names.

    Speed: the NB and ZINB log-probabilities run as compiled loops (:mod:`pyrosc._fast`), built
    once per machine into a cache on disk and loaded by each process in milliseconds; a fit of
    at least 500 steps (``max_epochs`` x minibatches) builds them if they are not built yet, a
    shorter one runs the eager code then (``pyrosc build-kernels`` builds them ahead). After
    the first step (run with Pyro's validation, if on) a guide that reparameterises every latent
    trains on the same ELBO without Pyro's bookkeeping
    (:func:`pyrosc.objective.reparameterized_loss`).

    Args:
        model, guide: a pair following the pyrosc contract (see the design notes).
        data: validated counts from :func:`pyrosc.data.from_anndata`.
        networks: the ``nn.Module`` s the pair uses (e.g. an ``nn.ModuleDict``); the trainer moves
            them to ``device`` and switches training / evaluation mode.
        max_epochs: passes over the training cells; None chooses from the number of cells of
            ``data`` (:func:`default_epochs`, scvi-tools' rule), and the progress bar and
            :attr:`TrainResult.max_epochs_reason` say how many and why.
        batch_size: cells per minibatch (a last minibatch of one cell is folded into the
            previous one, so BatchNorm never sees a single cell).
        lr: Adam learning rate.
        validation_fraction: share of cells held out to monitor the ELBO; 0 trains on all.
        split: ``(train_index, validation_index)``, positions in ``data``, instead of a split
            drawn from ``validation_fraction`` and ``seed`` (the classes draw it once and pass
            it, so that whatever else they fit sees the same training cells).
        early_stopping: stop once the validation ELBO has not improved for ``patience`` epochs,
            and keep the best parameters.
        patience: epochs without improvement before stopping (early stopping only; default 45).
        kl_warmup_epochs: the KL weight of the sites the model marks with
            ``infer={"kl_warmup": True}`` rises linearly from 0 to 1 over this many epochs.
        free_bits: nats per latent dimension exempt from the KL penalty (0 turns it off).
        frozen: parameters (or some of their entries) to leave exactly as they are, and
            modules to keep in evaluation mode (reference mapping; see
            :class:`pyrosc.freezing.Frozen`). Fully frozen tensors compute no gradient.
        check_every_step: keep Pyro's validation (if the caller enabled it) on every step. By
            default it runs on the first step only: its support, shape and NaN checks catch a
            broken model at once, and cost ~10 % of each later step.
        seed: seeds Pyro, PyTorch and NumPy, the split and the minibatch order.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        progress: show a progress bar with the epoch and the ELBO.
        shuffle: the order of the cells in an epoch (``data.sampler``): for counts in memory
            ``"cells"`` only (a fresh permutation each epoch); for counts on disk
            (:class:`pyrosc.streaming.StreamedCountData`) ``"blocks"`` (the default there:
            shuffled blocks of consecutive cells) or ``"cells"`` (the in-memory order, so the
            fit equals one in memory; slow on large files). None: the data's default.

    Returns:
        a :class:`TrainResult` with the history DataFrame.

    Raises:
        ValueError: an option out of range, or one that does not apply (``patience`` without
            early stopping, ``kl_warmup_epochs`` for a model that marks no site, free bits with
            enumerated sites), a frozen mask naming no parameter, or everything frozen.
    """
    max_epochs, epochs_reason = resolve_epochs(max_epochs, data.n_cells)
    patience = check_options(early_stopping, patience, free_bits, kl_warmup_epochs)
    device = resolve_device(device)
    pyro.set_rng_seed(seed)
    if networks is not None:
        networks.to(device)
    train_index, validation_index = fit_split(
        data.n_cells, validation_fraction, split, seed, early_stopping
    )
    train_data = data.subset(train_index)
    validation_data = data.subset(validation_index) if len(validation_index) else None
    sampler = train_data.sampler(batch_size, seed=seed, shuffle=shuffle)

    freezing = FrozenFit(frozen or Frozen({}), networks)  # frozen BatchNorm in eval mode
    first = train_data.minibatch(next(iter(MinibatchSampler(train_data.n_cells, batch_size))))
    probe = {key: value.to(device) for key, value in first.items()} | {"n_cells": None}
    objective = read_objective(model, guide, probe, free_bits, kl_warmup_epochs)

    pyro_validation = is_validation_enabled()
    kl_weight = ScaleLatents(1.0, objective.annealed)
    warm_model, warm_guide = kl_weight(bind_data(model)), kl_weight(bind_data(guide))
    loss_fn = objective.loss(frozen=frozen is not None)
    optimizer = StoreAdam(lr)
    stopper = EarlyStopping(patience, networks) if early_stopping else None
    rows, steps = [], 0
    bar = tqdm(
        range(1, max_epochs + 1),
        disable=not progress,
        desc=f"training, {epochs_reason}",
        unit="epoch",
    )
    # A short fit runs the likelihood's eager code rather than build its kernels (pyrosc._fast).
    with freezing, compiled.planned_steps(max_epochs * len(sampler)):  # freezing: after the probe
        for epoch in bar:
            start = time.perf_counter()
            kl_weight.weight = warmup_weight(epoch, kl_warmup_epochs)
            if networks is not None:
                networks.train()
                freezing.keep_eval()
            total_loss = torch.zeros((), device=device)
            # closing: a step that fails stops the read-ahead thread of counts on disk at once.
            with closing(train_data.minibatches(sampler, device)) as minibatches:
                for minibatch in minibatches:
                    minibatch = minibatch | {"n_cells": train_data.n_cells}
                    # The counts were validated on the way in; see check_every_step.
                    check = pyro_validation and (steps == 0 or check_every_step)
                    with pyro.validation_enabled(check):
                        loss = loss_fn(warm_model, warm_guide, **minibatch)
                    # The minibatch estimates the loss of all training cells; per cell it has
                    # the scale scvi-tools optimises, which Adam's eps is relative to.
                    optimizer.step(loss / train_data.n_cells)
                    freezing.after_step()
                    total_loss += loss.detach()
                    steps += 1
            total_loss = float(total_loss)
            train_elbo = -total_loss / (len(sampler) * train_data.n_cells)
            check_finite(train_elbo, epoch, lr)
            validation_elbo = np.nan
            if validation_data is not None:
                validation_elbo = float(
                    elbo(model, guide, validation_data, networks=networks, device=device).mean()
                )
            rows.append(
                {
                    "epoch": epoch,
                    "kl_weight": kl_weight.weight,
                    "train_elbo": train_elbo,
                    "validation_elbo": validation_elbo,
                    "seconds": time.perf_counter() - start,
                }
            )
            bar.set_postfix(elbo=f"{train_elbo:.1f}", validation=f"{validation_elbo:.1f}")
            if stopper is not None and stopper.stop(epoch, validation_elbo):
                break
    bar.close()
    best_epoch = rows[-1]["epoch"]
    if stopper is not None:
        best_epoch = stopper.restore_best() or best_epoch
    if networks is not None:
        networks.eval()
    history = pd.DataFrame(rows)
    history.attrs["max_epochs_reason"] = epochs_reason
    return TrainResult(
        history=history,
        train_index=train_index,
        validation_index=validation_index,
        best_epoch=best_epoch,
        elbo_name=objective.name,
        max_epochs=max_epochs,
        max_epochs_reason=epochs_reason,
    )
