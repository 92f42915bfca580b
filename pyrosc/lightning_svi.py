"""The SVI of :mod:`pyrosc.train` as a PyTorch Lightning module, run by :mod:`pyrosc.distributed`
on several processes under DDP.

Lightning calls :meth:`SVIModule.training_step`, which returns the loss of one minibatch per
cell, exactly as :func:`pyrosc.train.train` computes it (``Trace_ELBO`` / ``TraceEnum_ELBO`` /
free bits, KL warm-up, frozen tensors); Lightning runs the backward pass and Adam's step, and
DDP averages the gradients over the processes in between. DDP averages the gradients of the
parameters of the module it wraps, so every trained tensor must be one:

* the networks' weights are (the module holds the networks; ``pyro.module`` registers those
  same tensors in Pyro's parameter store);
* the free Pyro parameters (``pyro.param`` sites: dispersion, mixture weights, component
  means) live in Pyro's parameter store, not in a module. The module holds them as an
  ``nn.ParameterList`` of their unconstrained values, and on each process puts those very
  tensors in the store (:meth:`SVIModule.setup`), so that ``pyro.param`` reads them and their
  gradients are averaged like the networks'.

This file imports Lightning: :mod:`pyrosc.distributed` imports it only when a fit asks for
several processes.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyro
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributions.constraints import Constraint
from tqdm.auto import tqdm

from pyrosc.data import CountData, MinibatchSampler
from pyrosc.evaluate import elbo
from pyrosc.freezing import Frozen, FrozenFit
from pyrosc.objective import Objective, ScaleLatents, warmup_weight
from pyrosc.optim import adam
from pyrosc.streaming import StreamedCountData
from pyrosc.traces import bind_data
from pyrosc.train import EarlyStopping, check_finite, free_parameter_names

#: Lightning's loggers; at INFO they print the devices, the ranks joining and hints on every fit.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def quiet_lightning() -> dict[str, int]:
    """Set Lightning's loggers to WARNING; return their previous levels."""
    levels = {}
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.WARNING)
    return levels


def ignore_lightning_warnings() -> None:
    """Ignore the warnings Lightning 2.6 gives that concern no user: a PyTorch deprecation
    inside Lightning's own code, and modules in evaluation mode at the start of training (the
    frozen BatchNorm layers of a query, on purpose)."""
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start")


class QuietDDPStrategy(DDPStrategy):
    """Lightning's DDP, with Lightning's INFO messages and warnings about itself off in each
    process it starts too (a started process imports Lightning afresh, at its default level,
    before any hook of ours runs)."""

    def setup_environment(self) -> None:
        quiet_lightning()
        ignore_lightning_warnings()
        super().setup_environment()


class RankMinibatches:
    """One process's share of each epoch's minibatches.

    Every process draws the same shuffled order (the sampler is seeded alike everywhere), and
    every rank takes ``len(sampler) // W`` steps, the same number (DDP needs one backward pass
    per rank per step); the last ``len(sampler) % W`` minibatches of an epoch (fewer than
    ``W``; other cells each epoch) are left out. Which minibatches a rank takes:

    * counts in memory: numbers ``r, r + W, r + 2W, ...`` of that order, so that one step of
      all ranks covers ``W`` consecutive minibatches;
    * counts on disk (``data.minibatches`` reads ahead): the ``r``-th of ``W`` consecutive
      runs of the order, so that each rank reads its own windows of blocks, about ``1 / W``
      of the file per epoch, instead of every rank reading every block.

    Args:
        data: the training cells; ``minibatch(index)`` reads them.
        sampler: yields ``(B,)`` int64 positions in ``data`` per minibatch, an epoch per
            iteration (:meth:`pyrosc.data.CountData.sampler`).
        rank, world_size: this process's number and how many there are.
    """

    def __init__(self, data: CountData, sampler: MinibatchSampler, rank: int, world_size: int):
        self.data, self.sampler = data, sampler
        self.rank, self.world_size = rank, world_size
        self.on_disk = isinstance(data, StreamedCountData)

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.sampler) // self.world_size

    def __iter__(self):
        """The minibatch dictionaries of this rank (:meth:`CountData.minibatch`), on the CPU."""
        steps = len(self)
        if self.on_disk:
            own = itertools.islice(self.sampler, self.rank * steps, (self.rank + 1) * steps)
            yield from self.data.minibatches(own)
            return
        for number, index in enumerate(self.sampler):
            if number >= steps * self.world_size:
                break
            if number % self.world_size == self.rank:
                yield self.data.minibatch(index)


@dataclass(frozen=True)
class FitSettings:
    """The options of a fit that every process needs (see :func:`pyrosc.train.train`)."""

    max_epochs: int
    batch_size: int
    lr: float
    kl_warmup_epochs: int
    early_stopping: bool
    patience: int
    check_every_step: bool
    seed: int
    progress: bool
    pyro_validation: bool
    frozen: Frozen | None


class SVIModule(pl.LightningModule):
    """A (model, guide) pair, its networks and free parameters, and the data, fitted by SVI.

    Made in the calling process; Lightning sends it to each process it starts (by pickling,
    with the ``spawn`` method), so it holds only what pickles: the pair (functions and
    ``functools.partial`` s), the networks, the data and plain settings. What does not (the
    loss, the KL warm-up handler, the minibatches) is made in :meth:`setup`, on each process.

    After the fit, rank 0's state comes back to the calling process's module (Lightning loads
    rank 0's ``state_dict``): the networks' and free parameters' values, and the history and
    best epoch as the module's extra state.

    Args:
        model, guide: the pair.
        data: all cells; ``train_index`` and ``validation_index`` are positions in it.
        networks: the modules the pair registers with ``pyro.module`` (None: none).
        trained: names in ``networks.named_parameters()`` of the weights to train (those the
            pair registered in the parameter store on its first trace).
        free: name -> (unconstrained value, constraint) of each free Pyro parameter.
        objective: the loss (:func:`pyrosc.objective.read_objective`).
        settings: the fit's options.
    """

    def __init__(
        self,
        model: Any,
        guide: Any,
        data: CountData,
        train_index: np.ndarray,
        validation_index: np.ndarray,
        networks: nn.Module | None,
        trained: set[str],
        free: dict[str, tuple[Tensor, Constraint]],
        objective: Objective,
        settings: FitSettings,
    ) -> None:
        super().__init__()
        self.pair = (model, guide)
        self.has_networks = networks is not None
        self.networks = networks if networks is not None else nn.ModuleDict()
        self.trained = frozenset(trained)
        self.free_names = tuple(free)
        self.free_constraints = {name: constraint for name, (_, constraint) in free.items()}
        self.free_parameters = nn.ParameterList(
            [nn.Parameter(value.detach().clone()) for value, _ in free.values()]
        )
        self.data, self.train_index, self.validation_index = data, train_index, validation_index
        self.objective, self.settings = objective, settings
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None

    @property
    def fitted_networks(self) -> nn.Module | None:
        """The networks, or None when the pair has none."""
        return self.networks if self.has_networks else None

    # -- on each process, before DDP wraps the module ---------------------------------------

    def setup(self, stage: str) -> None:
        """Put the free parameters in this process's parameter store, freeze what the fit
        freezes (before DDP reads which tensors require a gradient), and make the loss and this
        rank's minibatches."""
        s = self.settings
        pyro.set_rng_seed(s.seed + self.global_rank)  # the ranks draw different noise
        pyro.enable_validation(s.pyro_validation)
        pyro.get_param_store().set_state(
            {
                "params": dict(zip(self.free_names, self.free_parameters, strict=True)),
                "constraints": dict(self.free_constraints),
            }
        )
        self.freezing = FrozenFit(s.frozen or Frozen({}), self.fitted_networks)
        self.freezing.__enter__()
        self.kl_weight = ScaleLatents(1.0, self.objective.annealed)
        model, guide = self.pair
        self.warm_model = self.kl_weight(bind_data(model))
        self.warm_guide = self.kl_weight(bind_data(guide))
        self.loss_fn = self.objective.loss(frozen=s.frozen is not None)
        rank, world_size = self.global_rank, self.trainer.world_size
        if isinstance(self.data, StreamedCountData):
            self.data.reader.reopen()  # a forked process must not share the parent's handles
        self.train_data = self.data.subset(self.train_index)
        sampler = self.train_data.sampler(s.batch_size, s.seed)
        self.minibatches = RankMinibatches(self.train_data, sampler, rank, world_size)
        shard = self.validation_index[rank::world_size]
        self.validation_data = self.data.subset(shard) if len(shard) else None
        self.stopper = EarlyStopping(s.patience, self.fitted_networks) if s.early_stopping else None
        self.steps, self.store_size = 0, len(pyro.get_param_store())
        self.bar = None

    def on_fit_start(self) -> None:
        """After Lightning moved the module to this process's device."""
        self.freezing.to(self.device)

    def configure_optimizers(self) -> torch.optim.Adam:
        """Adam over the trained weights and the free parameters, as :func:`pyrosc.train.train`
        (fully frozen tensors excluded)."""
        weights = [p for n, p in self.networks.named_parameters() if n in self.trained]
        parameters = [p for p in [*weights, *self.free_parameters] if p.requires_grad]
        if not parameters:
            raise ValueError("every parameter is frozen: there is nothing to train")
        return adam(parameters, self.settings.lr)

    def train_dataloader(self) -> RankMinibatches:
        return self.minibatches

    # -- an epoch --------------------------------------------------------------------------

    def on_train_start(self) -> None:
        s = self.settings
        if s.progress and self.global_rank == 0:
            processes = self.trainer.world_size
            self.bar = tqdm(total=s.max_epochs, desc=f"training ({processes} processes)")

    def on_train_epoch_start(self) -> None:
        self.epoch_start = time.perf_counter()
        self.kl_weight.weight = warmup_weight(
            self.current_epoch + 1, self.settings.kl_warmup_epochs
        )
        if self.has_networks:
            self.networks.train()
            self.freezing.keep_eval()
        self.epoch_loss = torch.zeros((), device=self.device)

    def training_step(self, batch: dict[str, Tensor], batch_index: int) -> Tensor:
        """The loss of this rank's minibatch ``batch`` (:meth:`CountData.minibatch`), per
        training cell (a scalar)."""
        s, n_cells = self.settings, self.train_data.n_cells
        with pyro.validation_enabled(s.pyro_validation and (self.steps == 0 or s.check_every_step)):
            loss = self.loss_fn(self.warm_model, self.warm_guide, **batch, n_cells=n_cells)
        self._check_no_new_parameters()
        self.epoch_loss += loss.detach()
        self.steps += 1
        return loss / n_cells

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self.freezing.after_step()  # after Adam's step

    def on_train_epoch_end(self) -> None:
        """The epoch's ELBOs, the same on every rank (sums over the ranks), and early
        stopping, which therefore stops every rank at the same epoch."""
        epoch = self.current_epoch + 1
        loss = self.trainer.strategy.reduce(self.epoch_loss, reduce_op="sum")
        steps = self.trainer.world_size * len(self.minibatches)
        train_elbo = -float(loss) / (steps * self.train_data.n_cells)
        check_finite(train_elbo, epoch, self.settings.lr)
        validation_elbo = self._validation_elbo()
        self.history.append(
            {
                "epoch": epoch,
                "kl_weight": self.kl_weight.weight,
                "train_elbo": train_elbo,
                "validation_elbo": validation_elbo,
                "seconds": time.perf_counter() - self.epoch_start,
            }
        )
        # For Lightning callbacks and loggers; the values are the same on every rank already.
        elbos = {"train_elbo": train_elbo, "validation_elbo": validation_elbo}
        self.log_dict(elbos, sync_dist=True)
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(elbo=f"{train_elbo:.1f}", validation=f"{validation_elbo:.1f}")
        if self.stopper is not None and self.stopper.stop(epoch, validation_elbo):
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        """Keep the best epoch's parameters (early stopping); unfreeze."""
        best = self.stopper.restore_best() if self.stopper is not None else None
        self.best_epoch = best or self.history[-1]["epoch"]
        self.freezing.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()
        self.networks.eval()

    def _validation_elbo(self) -> float:
        """Mean ELBO of all validation cells: each rank scores its share, and the sums of the
        ELBOs and the numbers of cells are added over the ranks. NaN without validation cells."""
        if len(self.validation_index) == 0:
            return np.nan
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.validation_data is not None:
            model, guide = self.pair
            values = elbo(
                model,
                guide,
                self.validation_data,
                networks=self.fitted_networks,
                device=self.device,
            )
            totals[0], totals[1] = float(values.sum()), len(values)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return float(totals[0] / totals[1])

    def _check_no_new_parameters(self) -> None:
        """Raise when the pair created a free parameter after its first trace: DDP averages
        the gradients of the tensors it was given at the start, and would leave it untrained."""
        store = pyro.get_param_store()
        if len(store) == self.store_size:
            return
        new = set(free_parameter_names(self.fitted_networks)) - set(self.free_names)
        if new:
            raise RuntimeError(
                f"the pair created the Pyro parameter(s) {sorted(new)} after its first trace; "
                "on several processes every parameter must exist after the first minibatch "
                "(create it whatever the minibatch, pass every module it registers as networks, "
                "or train on one process)"
            )
        self.store_size = len(store)

    # -- what comes back to the calling process --------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """The history (plain numbers, so that Lightning's weights-only loading accepts them)
        and the best epoch, carried with the ``state_dict`` from rank 0 to the caller."""
        columns = list(self.history[0]) if self.history else []
        rows = [[float(row[column]) for column in columns] for row in self.history]
        return {"columns": columns, "rows": rows, "best_epoch": self.best_epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history = [dict(zip(state["columns"], row, strict=True)) for row in state["rows"]]
        for row in self.history:
            row["epoch"] = int(row["epoch"])
        self.best_epoch = state["best_epoch"]
