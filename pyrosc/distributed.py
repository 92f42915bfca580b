"""Training on several processes: PyTorch Lightning's DDP around the SVI of :mod:`pyrosc.train`.

``model.fit(strategy="ddp", devices=N)`` on the classes, or :func:`train` here for any
(model, guide) pair, runs ``N`` processes per node on ``num_nodes`` nodes. Each process (a
*rank*, one per CPU process or GPU):

* holds the pair, its networks and the data, and reads its own share of each epoch's
  minibatches: one shuffled order, the same on every rank, dealt out in turn
  (:class:`pyrosc.lightning_svi.RankMinibatches`), the same number of steps on every rank;
* computes the loss of :func:`pyrosc.train.train` on its minibatch (``Trace_ELBO`` or
  ``TraceEnum_ELBO`` or free bits, KL warm-up, frozen tensors), per training cell;
* has DDP average the gradients over the ranks before each Adam step, for every parameter: the
  networks' weights and the free Pyro parameters (dispersion, mixture weights) alike;
* scores its share of the validation cells; the sums of the ELBOs and the numbers of cells are
  added over the ranks, so every rank holds the same validation ELBO, and early stopping stops
  them at the same epoch.

A step of ``W`` ranks of ``B`` cells each is therefore a step on the ``W B`` cells of ``W``
consecutive minibatches of the one order: the per-cell losses are means over equal numbers of
cells, and DDP's average of their gradients is the gradient of the mean over all ``W B``
cells. ``batch_size`` is per process, and the learning rate is not rescaled. This holds
exactly for networks without BatchNorm; BatchNorm normalises over each rank's own ``B`` cells
(on the CPU, PyTorch has no synchronised BatchNorm).

How processes start (``strategy``):

* ``"ddp"``, the default: new Python processes (``torch.multiprocessing``'s *spawn* method),
  which import pyrosc and receive the pair, the networks and the data by pickling. It works
  from a script (whose top level must sit under ``if __name__ == "__main__":``, as any spawn),
  from pytest, and on CPUs or GPUs. In an interactive session (IPython, Jupyter), where
  Lightning refuses spawn, ``"ddp"`` *forks* the session's process instead (Lightning's
  ``"ddp_notebook"``): no pickling and a fast start, but the session must not have used CUDA
  before (Lightning says so if it has), and fork is unavailable on Windows.
* ``"ddp_spawn"`` or ``"ddp_fork"`` (alias ``"ddp_notebook"``): that method, wherever.
* Under a launcher that starts the processes itself (``torchrun``; SLURM's ``srun`` with one
  task per device), which Lightning detects, nothing is started: each launched process runs the
  script, fits, and ends up with the fitted model. That is how to use several nodes.

Lightning's own ``"ddp"`` start, which runs the script's command line again in each new
process, is never used to start processes: under pytest it would run the test session again,
and a notebook has no command line. Its launcher serves only under an external launcher,
where it starts nothing.

Rank 0's fitted parameters come back to the calling process and are left where a fit on one
process leaves them: in the networks (in place) and in the current Pyro parameter store.
A process that fails stops the others; the error names it and carries its traceback
(:class:`DistributedTrainingError`).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer.util import is_validation_enabled
from pyro.params.param_store import module_from_param_with_module_name, user_param_name
from torch import nn
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

from pyrosc.data import CountData, MinibatchSampler
from pyrosc.freezing import Frozen, FrozenFit
from pyrosc.objective import Objective, read_objective
from pyrosc.traces import bind_data, eval_mode
from pyrosc.train import (
    TrainResult,
    check_options,
    fit_split,
    free_parameter_names,
    resolve_device,
    resolve_epochs,
)
from pyrosc.train import train as train_one_process

#: The values of ``strategy``: ``"ddp"`` (spawn; fork in an interactive session), or a start
#: method named explicitly.
STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
#: The values of ``accelerator``: ``"auto"`` is a GPU per process when there are GPUs.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
_INSTALL = "pip install 'pyrosc[distributed]'"
#: Lightning's features that a fit here does not use: its logger, checkpoints, progress bar,
#: model summary and validation loop (the validation ELBO is computed at each epoch's end).
_QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,  # each rank's minibatches: RankMinibatches
}
_MIN_LIGHTNING = (2, 6)


class DistributedTrainingError(RuntimeError):
    """A process of a fit on several processes failed, and the others were stopped. The
    message names the process and ends with its traceback."""


def import_lightning() -> Any:
    """``lightning.pytorch``, or an ``ImportError`` that says how to install it."""
    try:
        import lightning
        import lightning.pytorch as pl
    except ImportError as error:
        raise ImportError(
            "training on several processes (strategy='ddp') runs on PyTorch Lightning, an "
            f"optional dependency of pyrosc that is not installed here: {_INSTALL}"
        ) from error
    version = tuple(int(part) for part in lightning.__version__.split(".")[:2])
    if version < _MIN_LIGHTNING:
        raise ImportError(
            f"pyrosc needs lightning>=2.6 for strategy='ddp', found {lightning.__version__}: "
            f"{_INSTALL}"
        )
    return pl


def trainer_for(
    strategy: str | None,
    devices: int | None,
    accelerator: str | None,
    num_nodes: int | None,
    device: str,
) -> tuple[Callable[..., TrainResult], dict[str, Any]]:
    """The trainer a class's ``fit`` calls, and where it trains (its keyword arguments).

    Without a ``strategy``: :func:`pyrosc.train.train` on ``device``, one process (the
    default, untouched). With one: :func:`train` on ``devices`` processes per node.

    Raises:
        ValueError: ``devices``, ``accelerator`` or ``num_nodes`` without a ``strategy``; a
            ``device`` other than ``"auto"`` with one; a strategy without ``devices``.
    """
    if strategy is None:
        given = [
            name
            for name, value in (
                ("devices", devices),
                ("accelerator", accelerator),
                ("num_nodes", num_nodes),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} apply to training on several processes: pass "
                "strategy='ddp' too (one process takes device='cpu' or 'cuda')"
            )
        return train_one_process, {"device": resolve_device(device)}
    if device != "auto":
        raise ValueError(
            f"device={device!r} applies to one process; with strategy={strategy!r}, choose "
            "accelerator='cpu' or 'gpu' and devices=N (processes per node)"
        )
    if devices is None:
        raise ValueError(f"strategy={strategy!r} needs devices: the processes per node")
    placement = {"strategy": strategy, "devices": devices, "num_nodes": num_nodes or 1}
    return train, placement | {"accelerator": accelerator or "auto"}


def start_method(strategy: str) -> str:
    """How Lightning starts the processes of ``strategy``: ``"spawn"`` or ``"fork"``; or
    ``"popen"`` under a launcher that started them already (torchrun, SLURM, LSF, MPI, as
    Lightning detects them), where Lightning's launcher starts nothing and each process runs
    its own rank."""
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    launchers = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)
    if any(environment.detect() for environment in launchers):
        return "popen"
    if strategy in ("ddp_fork", "ddp_notebook"):
        return "fork"
    if strategy == "ddp_spawn":
        return "spawn"
    # Lightning's own test for an interactive session, where it refuses spawn.
    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    return "fork" if interactive else "spawn"


def train(
    model: Callable,
    guide: Callable,
    data: CountData,
    *,
    networks: nn.Module | None = None,
    devices: int,
    strategy: str = "ddp",
    accelerator: str = "auto",
    num_nodes: int = 1,
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
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Fit ``model`` and ``guide`` to ``data`` by SVI on several processes (Lightning DDP).

    The options, the loss and the result are those of :func:`pyrosc.train.train`; parameters
    are created in, and come back to, the current Pyro parameter store and ``networks``
    (moved to the CPU: each process moves its copy to its device). See the module notes for
    what each process does and how processes start.

    Args:
        model, guide, data, networks: as :func:`pyrosc.train.train`. The pair, the networks,
            the data and ``callbacks`` must pickle (functions and ``functools.partial`` s of
            importable functions do) for the spawn method.
        strategy: one of :data:`STRATEGIES`.
        devices: processes per node (one per GPU with a GPU accelerator).
        accelerator: ``"cpu"`` (gloo), ``"gpu"`` / ``"cuda"`` (NCCL), or ``"auto"``.
        num_nodes: nodes; more than one needs a launcher (see the module notes).
        batch_size: cells per minibatch per process; a step covers ``devices * num_nodes``
            minibatches.
        progress: rank 0 shows a bar of the epochs (on its own standard error).
        callbacks: Lightning callbacks added to the trainer (e.g. a logger of the history).
        max_epochs: as :func:`pyrosc.train.train`, and so are ``lr``,
            ``validation_fraction``, ``split``, ``early_stopping``, ``patience``,
            ``kl_warmup_epochs``, ``free_bits``, ``frozen``, ``check_every_step`` and ``seed``.

    Returns:
        a :class:`pyrosc.train.TrainResult`; ``train_elbo`` is the mean over every rank's
        minibatches, ``validation_elbo`` over all validation cells.

    Raises:
        ImportError: Lightning is not installed.
        ValueError: an option out of range or that does not apply (as
            :func:`pyrosc.train.train`), fewer minibatches per epoch than processes, or a
            module the pair registers with ``pyro.module`` that is not among ``networks``.
        DistributedTrainingError: a process failed (its error and traceback in the message).
    """
    pl = import_lightning()
    from pyrosc.lightning_svi import FitSettings, QuietDDPStrategy, SVIModule

    max_epochs, epochs_reason = resolve_epochs(max_epochs, data.n_cells)
    patience = check_options(early_stopping, patience, free_bits, kl_warmup_epochs)
    train_index, validation_index = fit_split(
        data.n_cells, validation_fraction, split, seed, early_stopping
    )
    _check_placement(strategy, devices, accelerator, num_nodes, len(train_index), batch_size)
    if networks is not None:
        networks.to("cpu")
    FrozenFit(frozen or Frozen({}), networks)  # frozen BatchNorm in eval mode, as train()
    pyro.set_rng_seed(seed)
    probe = data.minibatch(train_index[:batch_size]) | {"n_cells": None}
    objective = read_objective(model, guide, probe, free_bits, kl_warmup_epochs)
    free = _free_parameters(networks)
    registered = {id(value) for _, value in pyro.get_param_store().named_parameters()}
    weights = {}
    if networks is not None:
        weights = {n: p for n, p in networks.named_parameters() if id(p) in registered}
    trained = [*weights.values(), *(value for value, _ in free.values())]
    unused = _gets_no_gradient(objective, model, guide, probe, networks, trained)
    settings = FitSettings(
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        kl_warmup_epochs=kl_warmup_epochs,
        early_stopping=early_stopping,
        patience=patience,
        check_every_step=check_every_step,
        seed=seed,
        progress=progress,
        pyro_validation=is_validation_enabled(),
        frozen=frozen,
    )
    module = SVIModule(
        model, guide, data, train_index, validation_index, networks, set(weights), free,
        objective, settings,
    )  # fmt: skip
    with _quiet_lightning():
        trainer = pl.Trainer(
            strategy=QuietDDPStrategy(
                start_method=start_method(strategy),
                # DDP's search for weights without a gradient, each step, only where needed
                find_unused_parameters=unused,
                process_group_backend="gloo" if accelerator == "cpu" else None,
            ),
            accelerator="gpu" if accelerator == "cuda" else accelerator,
            devices=devices,
            num_nodes=num_nodes,
            max_epochs=max_epochs,
            callbacks=list(callbacks),
            **_QUIET,
        )
        try:
            trainer.fit(module)
        except ProcessException as error:
            raise _failure(error, devices * num_nodes) from None
    _write_back(module, free)
    if not module.history:
        raise DistributedTrainingError("the fit ended without results from rank 0")
    return TrainResult(
        history=pd.DataFrame(module.history),
        train_index=train_index,
        validation_index=validation_index,
        best_epoch=module.best_epoch,
        elbo_name=objective.name,
        max_epochs=max_epochs,
        max_epochs_reason=epochs_reason,
    )


def is_rank_zero() -> bool:
    """Whether this process is the one that writes results: True unless it belongs to a
    process group (as each process a launcher started does after a fit) with a rank other
    than 0."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    return torch.distributed.get_rank() == 0


def _check_placement(
    strategy: str, devices: int, accelerator: str, num_nodes: int, n_train: int, batch_size: int
) -> None:
    """Raise a ``ValueError`` for a placement that cannot train: an unknown strategy or
    accelerator, a count below 1, or fewer minibatches per epoch than processes."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    for name, value in (("devices", devices), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    n_minibatches = len(MinibatchSampler(n_train, batch_size))
    if n_minibatches < devices * num_nodes:
        raise ValueError(
            f"{n_train} training cells make {n_minibatches} minibatch(es) of "
            f"batch_size={batch_size}, fewer than the {devices * num_nodes} processes: use a "
            "smaller batch_size or fewer devices"
        )


def _free_parameters(networks: nn.Module | None) -> dict[str, tuple[torch.Tensor, Any]]:
    """name -> (unconstrained value, constraint) of the free parameters in the store (after
    the pair's first trace).

    Raises:
        ValueError: a module registered with ``pyro.module`` that is not among ``networks``:
            its weights would not be averaged over the processes (nor trained).
    """
    state = pyro.get_param_store().get_state()
    names = free_parameter_names(networks)
    modules = sorted(
        {
            module_from_param_with_module_name(name)
            for name in names
            if user_param_name(name) != name
        }
    )
    if modules:
        raise ValueError(
            f"the pair registers module(s) {modules} with pyro.module that are not among the "
            "networks passed to the trainer; pass them (e.g. in an nn.ModuleDict) so that "
            "their weights are trained and averaged over the processes"
        )
    return {name: (state["params"][name], state["constraints"][name]) for name in names}


def _gets_no_gradient(
    objective: Objective,
    model: Callable,
    guide: Callable,
    probe: dict,
    networks: nn.Module | None,
    tensors: list[torch.Tensor],
) -> bool:
    """Whether some of the trained ``tensors`` get no gradient from the loss of the first
    minibatch ``probe`` (networks in evaluation mode, so that BatchNorm's statistics stay).

    DDP waits for a gradient of every weight at each step; told that some may have none, it
    searches the graph for them at every step (a cost, and a warning when it finds none).
    """
    tensors = [tensor for tensor in tensors if tensor.requires_grad]
    if not tensors:
        return False
    with eval_mode(networks):
        loss = objective.loss()(bind_data(model), bind_data(guide), **probe)
    gradients = torch.autograd.grad(loss, tensors, allow_unused=True)
    return any(gradient is None for gradient in gradients)


def _write_back(module: Any, free: dict[str, tuple[torch.Tensor, Any]]) -> None:
    """Leave the fitted values where :func:`pyrosc.train.train` leaves them: the networks are
    the module's (rank 0's values, loaded in place); the free parameters go to the current
    parameter store as plain tensors, on the networks' device."""
    parameters = list(module.networks.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    fitted = {
        name: value.detach().to(device).clone().requires_grad_(True)
        for name, value in zip(module.free_names, module.free_parameters, strict=True)
    }
    constraints = {name: constraint for name, (_, constraint) in free.items()}
    pyro.get_param_store().set_state({"params": fitted, "constraints": constraints})


def _failure(error: ProcessException, world_size: int) -> DistributedTrainingError:
    """What a failed process raises in the calling process: which process, its last line."""
    detail = str(error).strip()
    if isinstance(error, ProcessExitedException):
        cause = f"it exited ({detail}; e.g. killed for lack of memory)"
    else:  # the traceback's last "SomeError: message" line (Pyro appends trace shapes after it)
        raised = re.findall(
            r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b.*$", detail, re.M
        )
        cause = raised[-1] if raised else detail.splitlines()[-1] if detail else "no message"
    return DistributedTrainingError(
        f"training on {world_size} processes failed in process {error.error_index} (its local "
        f"rank): {cause}. The other processes were stopped.\n\n{detail}"
    )


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO messages (devices found, ranks joining, hints) off while fitting."""
    from pyrosc.lightning_svi import ignore_lightning_warnings, quiet_lightning

    levels = quiet_lightning()
    try:
        with warnings.catch_warnings():
            ignore_lightning_warnings()
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
