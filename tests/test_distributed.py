"""Training on several processes (pyrosc.distributed): two CPU processes (gloo) against one.

The core check: a step of two processes with B cells each is a step of one process on the 2B
cells of both minibatches. With a deterministic loss (latents at the guide's mean, no dropout,
no BatchNorm, which normalises per process) the parameters after the fit, and the validation
ELBO, equal those of the plain trainer with batch_size 2B on the same cells in the same order,
to float tolerance. Spawned processes import this file: what they run is defined at its top
level.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from conftest import simulate_counts
from pyro.poutine.messenger import Messenger
from torch import nn

import pyrosc
from pyrosc import distributed
from pyrosc.data import MinibatchSampler, from_anndata
from pyrosc.guides import vae_guide
from pyrosc.models import vae_model
from pyrosc.nets import MLP, CountDecoder, GaussianEncoder
from pyrosc.traces import bind_data
from pyrosc.train import train

with warnings.catch_warnings():  # torchmetrics, imported by Lightning, uses a deprecated API
    warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated")
    callbacks = pytest.importorskip(
        "lightning.pytorch.callbacks", reason="several processes need pyrosc[distributed]"
    )
from pyrosc.lightning_svi import RankMinibatches  # noqa: E402  (imports Lightning)

#: 320 cells: 256 train (8 minibatches of 32, 4 steps per process; 4 of 64 for one process).
N_CELLS, N_GENES, BATCH = 320, 48, 32


class AtMean(Messenger):
    """Each reparameterised latent of the guide at its mean instead of a draw: a deterministic
    loss, so that fits on one and on two processes can be compared to float tolerance."""

    def _pyro_sample(self, msg: dict) -> None:
        if not msg["is_observed"] and getattr(msg["fn"], "has_rsample", False):
            msg["value"] = msg["fn"].mean
            msg["done"] = True


class MeanGuide:
    """``guide`` under :class:`AtMean` (a class, so that it pickles)."""

    def __init__(self, guide):
        self.guide = guide

    def __call__(self, **data):
        with AtMean():
            return bind_data(self.guide)(**data)


class FailOnRank:
    """``model``, raising on rank ``rank`` of a fit on several processes (never in this one)."""

    def __init__(self, model, rank: int):
        self.model, self.rank = model, rank

    def __call__(self, **data):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == self.rank:
            raise RuntimeError(f"the model broke on rank {self.rank}")
        return bind_data(self.model)(**data)


class RecordRanks(callbacks.Callback):
    """Writes what each rank holds at the end of the fit to ``folder/rank<r>.json``."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def on_fit_end(self, trainer, pl_module) -> None:
        record = {
            "validation_elbo": [row["validation_elbo"] for row in pl_module.history],
            "free": [p.detach().cpu().tolist() for p in pl_module.free_parameters],
            "networks": [
                p.detach().cpu().flatten().tolist() for p in pl_module.networks.parameters()
            ],
        }
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def vae_pair(n_genes: int) -> tuple[partial, MeanGuide, nn.ModuleDict]:
    """An NB VAE without dropout nor BatchNorm, its guide at the mean."""
    encoder = GaussianEncoder(n_genes, 2, 16, dropout=0.0)
    decoder = CountDecoder(2, n_genes, 16)
    for module in (*encoder.modules(), *decoder.modules()):
        if isinstance(module, MLP):
            module.norms = nn.ModuleList(nn.Identity() for _ in module.norms)
    networks = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    model = partial(vae_model, decoder=decoder, likelihood="nb")
    return model, MeanGuide(partial(vae_guide, encoder=encoder)), networks


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` if the block runs longer than ``seconds``, having killed the
    processes this one started (which would otherwise hang on)."""

    def expire(signum, frame):
        for child in multiprocessing.active_children():
            child.kill()
        raise TimeoutError(f"no answer within {seconds} s: the processes hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def data():
    return from_anndata(simulate_counts(n_cells=N_CELLS, n_genes=N_GENES, seed=1))


def test_two_processes_step_as_one_on_both_minibatches(data, tmp_path, monkeypatch):
    # The NB's compiled kernel would be compiled anew in each process: the eager one is the
    # same arithmetic (tests/test_fast.py), and the processes inherit the setting.
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    order = np.random.default_rng(5).permutation(N_CELLS)
    split = (np.sort(order[64:]), np.sort(order[:64]))
    options = {"max_epochs": 2, "lr": 1e-2, "kl_warmup_epochs": 2, "split": split, "seed": 3}
    pyro.set_rng_seed(0)
    model, guide, networks = vae_pair(N_GENES)
    reference_networks = copy.deepcopy(networks)
    initial = copy.deepcopy(networks.state_dict())
    store = pyro.get_param_store()
    with store.scope() as ddp_params, deadline(300):
        ddp = distributed.train(
            model, guide, data, networks=networks, devices=2, accelerator="cpu",
            batch_size=BATCH, progress=False, callbacks=[RecordRanks(tmp_path)], **options,
        )  # fmt: skip
    model, guide = (
        partial(vae_model, decoder=reference_networks["decoder"], likelihood="nb"),
        MeanGuide(partial(vae_guide, encoder=reference_networks["encoder"])),
    )
    with store.scope() as reference_params:
        reference = train(
            model, guide, data, networks=reference_networks, batch_size=2 * BATCH,
            device="cpu", progress=False, **options,
        )  # fmt: skip

    # The same steps: the weights and the free parameter (averaged over the processes too).
    for (name, value), expected in zip(
        networks.state_dict().items(), reference_networks.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)
    assert all(
        not torch.equal(value, initial[name]) for name, value in networks.state_dict().items()
    )
    torch.testing.assert_close(
        ddp_params["params"]["inverse_dispersion"],
        reference_params["params"]["inverse_dispersion"],
        rtol=1e-4,
        atol=1e-5,
    )
    # Left in the store as one process leaves it: a plain leaf tensor, not a Parameter.
    fitted = ddp_params["params"]["inverse_dispersion"]
    assert type(fitted) is torch.Tensor and fitted.requires_grad and fitted.is_leaf
    assert set(ddp_params["params"]) == set(reference_params["params"])
    for column in ("epoch", "kl_weight", "train_elbo", "validation_elbo"):
        np.testing.assert_allclose(ddp.history[column], reference.history[column], rtol=1e-5)
    assert list(ddp.history.columns) == list(reference.history.columns)
    assert ddp.best_epoch == reference.best_epoch == 2

    # Every rank holds the same validation ELBO (the one early stopping reads), and the same
    # parameters.
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    np.testing.assert_allclose(ranks[0]["validation_elbo"], ddp.history["validation_elbo"])


def test_a_failing_rank_stops_the_others(data, monkeypatch):
    monkeypatch.setenv("PYROSC_COMPILE", "0")  # the probe's loss would compile the NB here
    model, guide, networks = vae_pair(N_GENES)
    start = time.perf_counter()
    with (
        deadline(240),
        pytest.raises(distributed.DistributedTrainingError) as failure,
    ):
        # Forked, the fit starts in a second; the spawned start is the test above's.
        distributed.train(
            FailOnRank(model, rank=1), guide, data, networks=networks, devices=2,
            strategy="ddp_fork", accelerator="cpu", max_epochs=1, batch_size=BATCH,
            validation_fraction=0, progress=False,
        )  # fmt: skip
    summary, _, traceback = str(failure.value).partition("\n")
    assert summary == (
        "training on 2 processes failed in process 1 (its local rank): RuntimeError: the model "
        "broke on rank 1. The other processes were stopped."
    )
    assert "Traceback" in traceback and "test_distributed.py" in traceback
    assert time.perf_counter() - start < 120


def test_a_weight_no_step_reaches_neither_hangs_nor_moves(data, monkeypatch):
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    model, guide, networks = vae_pair(N_GENES)
    networks["decoder"].unused = nn.Linear(2, 2)  # registered by pyro.module, never in a loss
    before = copy.deepcopy(networks.state_dict())
    with deadline(240):
        result = distributed.train(
            model, guide, data, networks=networks, devices=2, strategy="ddp_fork",
            accelerator="cpu", max_epochs=1, batch_size=BATCH, validation_fraction=0,
            progress=False,
        )  # fmt: skip
    assert len(result.history) == 1
    after = networks.state_dict()
    assert all(torch.equal(after[n], before[n]) for n in before if ".unused." in n)
    assert not all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.slow
def test_a_class_fitted_on_two_processes_answers_as_one(tmp_path):
    adata = simulate_counts(n_cells=200, n_genes=30)
    model = pyrosc.SCVI(adata, batch_key="batch", dispersion="gene-batch", n_latent=2, n_hidden=8)
    model.fit(
        strategy="ddp", devices=2, accelerator="cpu", max_epochs=3, batch_size=32,
        early_stopping=True, patience=1, progress=False,
    )  # fmt: skip
    assert model.device == torch.device("cpu")
    assert model.train_result.elbo_name == "Trace_ELBO"
    assert model.history["validation_elbo"].notna().all()
    assert model.latent().shape == (200, 2)
    assert adata.obsm["X_pyrosc"].shape == (200, 2)
    single = pyrosc.SCVI(adata, batch_key="batch", dispersion="gene-batch", n_latent=2, n_hidden=8)
    single.fit(max_epochs=1, batch_size=32, progress=False)
    assert set(model._params["params"]) == set(single._params["params"])
    loaded = pyrosc.SCVI.load(model.save(tmp_path / "scvi"), adata)
    np.testing.assert_allclose(loaded.latent(), model.latent(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_enumeration_and_frozen_weights_on_two_processes(monkeypatch):
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    adata = simulate_counts(n_cells=200, n_genes=30)
    gmvae = pyrosc.GMVAE(adata, n_clusters=3, n_latent=2, n_hidden=8)
    gmvae.fit(
        strategy="ddp_fork", devices=2, accelerator="cpu", max_epochs=2, init_epochs=2,
        batch_size=32, progress=False,
    )  # fmt: skip
    assert gmvae.train_result.elbo_name == "TraceEnum_ELBO"
    assert gmvae.cluster_probabilities().shape == (200, 3)

    reference = pyrosc.SCVI(adata, batch_key="batch", dispersion="gene-batch", n_latent=2,
                            n_hidden=8).fit(max_epochs=1, progress=False)  # fmt: skip
    query_adata = simulate_counts(n_cells=120, n_genes=30, seed=3)
    query_adata.obs["batch"] = query_adata.obs["batch"].cat.rename_categories(["c", "d"])
    query = pyrosc.SCVI.load_query_data(query_adata, reference)
    query.fit(strategy="ddp_fork", devices=2, accelerator="cpu", max_epochs=2, batch_size=16,
              progress=False)  # fmt: skip
    fitted, original = query._pair[2].state_dict(), reference._pair[2].state_dict()
    for name, value in original.items():  # the reference's weights, bit for bit
        torch.testing.assert_close(fitted[name][tuple(map(slice, value.shape))], value,
                                   rtol=0, atol=0)  # fmt: skip
    theta, reference_theta = (m._params["params"]["inverse_dispersion"] for m in (query, reference))
    torch.testing.assert_close(theta[:2], reference_theta, rtol=0, atol=0)
    start = query._query.start[0]  # the extended weights the fit started from
    assert any(not torch.equal(fitted[name], start[name]) for name in start)


#: A script that torchrun runs in each of its processes: each fits, and prints its history.
TORCHRUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import pyrosc
from conftest import simulate_counts
model = pyrosc.SCVI(simulate_counts(n_cells=200, n_genes=30), n_latent=2, n_hidden=8)
model.fit(strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, batch_size=32,
          progress=False)
rank = int(os.environ["RANK"])
model.save(os.path.join({out!r}, f"rank{{rank}}"))  # rank 0 writes, the other does not
print(json.dumps({{"rank": rank, "history": model.history.to_dict("list")}}))
"""


@pytest.mark.slow
def test_under_torchrun_each_launched_process_fits(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    environment = os.environ | {"PYROSC_COMPILE": "0"}
    done = subprocess.run(
        [*command, str(script)], capture_output=True, text=True, timeout=300, env=environment
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(record["rank"] for record in records) == [0, 1]
    histories = [record["history"] for record in records]
    assert histories[0]["validation_elbo"] == histories[1]["validation_elbo"]
    assert histories[0]["train_elbo"] == histories[1]["train_elbo"]
    assert (tmp_path / "rank0" / "model.pt").exists() and not (tmp_path / "rank1").exists()


def test_processes_start_by_spawn_fork_or_not_at_all(monkeypatch):
    assert distributed.start_method("ddp") == "spawn"  # pytest is no interactive session
    assert distributed.start_method("ddp_notebook") == distributed.start_method("ddp_fork")
    assert distributed.start_method("ddp_fork") == "fork"
    monkeypatch.setattr(sys, "ps1", "In : ", raising=False)  # as IPython sets it
    assert distributed.start_method("ddp") == "fork"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "pyrosc-test")  # torchrun started the processes
    assert distributed.start_method("ddp") == "popen"


def test_ranks_take_turns_and_the_same_number_of_steps(data):
    sampler = MinibatchSampler(data.n_cells, 32, seed=0)  # 10 minibatches
    order = np.concatenate(list(MinibatchSampler(data.n_cells, 32, seed=0)))
    shares = [
        RankMinibatches(data, MinibatchSampler(data.n_cells, 32, seed=0), r, 3) for r in (0, 1, 2)
    ]
    assert [len(share) for share in shares] == [3, 3, 3] and len(sampler) == 10
    read = [[batch["cell_index"].numpy() for batch in share] for share in shares]
    steps = [np.concatenate([read[r][step] for r in range(3)]) for step in range(3)]
    np.testing.assert_array_equal(np.concatenate(steps), order[: 9 * 32])


def test_options_that_do_not_apply_are_errors():
    adata = simulate_counts(n_cells=60, n_genes=10)
    model = pyrosc.VAE(adata, n_latent=2, n_hidden=8)
    with pytest.raises(ValueError, match="devices apply to training on several processes"):
        model.fit(devices=2)
    with pytest.raises(ValueError, match="device='cpu' applies to one process"):
        model.fit(strategy="ddp", devices=2, device="cpu")
    with pytest.raises(ValueError, match="needs devices"):
        model.fit(strategy="ddp")
    with pytest.raises(ValueError, match="strategy must be one of"):
        model.fit(strategy="fsdp", devices=2)
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        model.fit(strategy="ddp", devices=4, accelerator="cpu", batch_size=32)


def test_two_processes_fit_counts_on_disk_each_reading_its_own_windows(tmp_path, monkeypatch):
    """A backed file under DDP: each process opens the file afresh (spawn), the ranks end with
    the same parameters, and the file is not written."""
    import anndata as ad

    monkeypatch.setenv("PYROSC_COMPILE", "0")
    path = tmp_path / "counts.h5ad"
    simulate_counts(n_cells=300, n_genes=12, seed=2).write_h5ad(path)
    before = path.read_bytes()
    model = pyrosc.VAE(ad.read_h5ad(path, backed="r"), n_latent=2, n_hidden=8)
    with deadline(300):
        model.fit(
            strategy="ddp", devices=2, accelerator="cpu", max_epochs=2, batch_size=32,
            progress=False, callbacks=[RecordRanks(tmp_path)], seed=0,
        )  # fmt: skip
    ranks = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert np.isfinite(model.history["train_elbo"]).all() and len(model.history) == 2
    assert path.read_bytes() == before


def test_ranks_on_disk_read_consecutive_runs_of_the_block_order(tmp_path):
    """Counts on disk: rank r takes the r-th of W consecutive runs of the epoch's minibatches
    (together the first steps * W of the order), so the ranks' cells come from different
    windows of blocks: only a window at the boundary between two runs is shared."""
    path = tmp_path / "counts.h5ad"
    simulate_counts(n_cells=600, n_genes=8, seed=3).write_h5ad(path)
    streamed = from_anndata(pyrosc.read_backed(path))
    streamed = dataclasses.replace(
        streamed, options=dataclasses.replace(streamed.options, block_size=20, blocks_per_window=2)
    )
    order = list(streamed.sampler(16, seed=0))
    shares = [RankMinibatches(streamed, streamed.sampler(16, seed=0), r, 2) for r in (0, 1)]
    steps = len(order) // 2
    assert [len(share) for share in shares] == [steps, steps]
    read = [[batch["cell_index"].numpy() for batch in share] for share in shares]
    np.testing.assert_array_equal(
        np.concatenate(read[0] + read[1]), np.concatenate(order[: 2 * steps])
    )
    blocks = [set(streamed.reader.block_of(np.concatenate(r)).tolist()) for r in read]
    assert len(blocks[0] & blocks[1]) <= 2 * streamed.options.blocks_per_window


def test_counts_on_disk_cross_to_another_process_by_file_name(tmp_path):
    """Pickled (what spawn does), a reader holds the file's name, not its open handle; the copy
    opens the file again and reads the same counts; reopen() does it in place (fork)."""
    path = tmp_path / "counts.h5ad"
    simulate_counts(n_cells=50, n_genes=6, seed=4).write_h5ad(path)
    streamed = from_anndata(pyrosc.read_backed(path))
    index = np.array([3, 7, 41])
    copied = pickle.loads(pickle.dumps(streamed))
    assert copied.reader is not streamed.reader
    for name, value in streamed.minibatch(index).items():
        torch.testing.assert_close(copied.minibatch(index)[name], value)
    streamed.reader.reopen()
    torch.testing.assert_close(
        streamed.minibatch(index)["counts"], copied.minibatch(index)["counts"]
    )


def test_a_module_outside_the_networks_is_refused(data):
    model, guide, networks = vae_pair(N_GENES)
    with pytest.raises(ValueError, match=r"registers module\(s\) \['decoder'\]"):
        distributed.train(model, guide, data, networks=networks["encoder"], devices=2,
                          accelerator="cpu")  # fmt: skip


def test_without_lightning_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)
    with pytest.raises(ImportError, match=r"pip install 'pyrosc\[distributed\]'"):
        distributed.import_lightning()
