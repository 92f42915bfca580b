"""A user's own model trains as fast as the built-in ones: tutorial 5's models, timed.

Tutorial 5 (tutorials/05_write_your_own_model.ipynb) writes its models as plain Pyro functions
and trains them with ``pyrosc.train``; nothing in pyrosc knows them. This fits two of them (the
Student-t prior, and the gene-specific depth effect with its own guide) on the tutorial's data
(the embedded PBMC 3k, 2,000 genes, 90 % of the cells training) for each number of epochs of
``--epochs``, each fit in a fresh process, and records the wall time of the ``train`` call
(start-up included) and the training cells per second. Run it from two checkouts to compare
code versions (``PYTHONPATH=<checkout> python benchmarks/own_model.py``: the checkout's pyrosc
is imported first); the header names the pyrosc commit.

    python benchmarks/own_model.py                       # both models, 40 and 400 epochs
    python benchmarks/own_model.py --epochs 2 --out /tmp/own_model_smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from measure import HERE, machine, run_python

MODELS = ("student_t", "depth")


def _fit(model_name: str, epochs: int, threads: int) -> dict:
    """Tutorial 5's fit of ``model_name``, timed; runs in a child process."""
    import numpy as np
    import pyro
    import pyro.distributions as dist
    import torch
    from torch.distributions import constraints

    import pyrosc
    from pyrosc.data import split_cells
    from pyrosc.guides import vae_guide
    from pyrosc.likelihoods import count_distribution, gene_inverse_dispersion
    from pyrosc.nets import CountDecoder, GaussianEncoder
    from pyrosc.plates import cells_plate

    torch.set_num_threads(threads)
    adata = pyrosc.select_genes(pyrosc.datasets.pbmc3k(), n_top_genes=2000)
    train_index, _ = split_cells(adata.n_obs, validation_fraction=0.1, seed=0)
    train = pyrosc.from_anndata(adata).subset(train_index)
    log_depth = np.log(train.library)
    centre, spread = float(log_depth.mean()), float(log_depth.std())

    def standardised_depth(library):
        return (library.log() - centre) / spread

    def student_t_vae(counts, library, cell_index, n_cells=None, *, decoder):
        pyro.module("decoder", decoder)
        theta = gene_inverse_dispersion(counts, "nb")
        nu = pyro.param("prior_df", counts.new_tensor(5.0), constraint=constraints.positive)
        with cells_plate(cell_index, n_cells):
            prior = dist.StudentT(nu, counts.new_zeros(decoder.n_input), 1.0)
            z = pyro.sample("z", prior.to_event(1))
            logits, _ = decoder(z)
            log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
            observation = count_distribution("nb", log_mean, theta).to_event(1)
            pyro.sample("counts", observation, obs=counts)

    def depth_vae(counts, library, cell_index, n_cells=None, *, decoder):
        pyro.module("decoder", decoder)
        theta = gene_inverse_dispersion(counts, "nb")
        beta = pyro.param("depth_effect", counts.new_zeros(counts.shape[-1]))
        with cells_plate(cell_index, n_cells):
            prior = dist.Normal(counts.new_zeros(decoder.n_input), 1.0)
            z = pyro.sample("z", prior.to_event(1))
            logits, _ = decoder(z)
            logits = logits + beta * standardised_depth(library).unsqueeze(-1)
            log_mean = library.log().unsqueeze(-1) + logits.log_softmax(-1)
            observation = count_distribution("nb", log_mean, theta).to_event(1)
            pyro.sample("counts", observation, obs=counts)

    def depth_guide(counts, library, cell_index, n_cells=None, *, encoder):
        pyro.module("encoder", encoder)
        with cells_plate(cell_index, n_cells):
            depth = standardised_depth(library).unsqueeze(-1)
            features = torch.cat([torch.log1p(counts), depth], dim=-1)
            loc, scale = encoder(features)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    model_fn, guide_fn, extra = {
        "student_t": (student_t_vae, vae_guide, 0),
        "depth": (depth_vae, depth_guide, 1),
    }[model_name]
    pyro.set_rng_seed(0)
    encoder = GaussianEncoder(train.n_genes + extra, 10)
    decoder = CountDecoder(10, train.n_genes)
    networks = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    with pyro.get_param_store().scope():
        started = time.perf_counter()
        result = pyrosc.train(
            partial(model_fn, decoder=decoder),
            partial(guide_fn, encoder=encoder),
            train,
            networks=networks,
            max_epochs=epochs,
            validation_fraction=0,
            seed=0,
            device="cpu",
            progress=False,
        )
        seconds = time.perf_counter() - started
    return {
        "model": model_name,
        "epochs": epochs,
        "train_cells": train.n_cells,
        "train_seconds": seconds,
        "cells_per_second": train.n_cells * epochs / seconds,
        "first_epoch_seconds": float(result.history["seconds"].iloc[0]),
        "final_train_elbo": float(result.history["train_elbo"].iloc[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, nargs="+", default=[40, 400])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results_own_model.md")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "EPOCHS", "OUT"))
    args = parser.parse_args()
    if args.child:
        model, epochs, out = args.child
        Path(out).write_text(json.dumps(_fit(model, int(epochs), args.threads)))
        return
    info = machine()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyrosc_own_model_") as tmp:
        for model in args.models:
            for epochs in args.epochs:
                out, log = Path(tmp) / f"{model}_{epochs}.json", Path(tmp) / "child.log"
                child = [str(HERE / "own_model.py"), "--threads", str(args.threads)]
                done = run_python([*child, "--child", model, str(epochs), str(out)], log)
                if done.returncode != 0:
                    sys.exit(f"{model}, {epochs} epochs failed:\n{log.read_text()[-3000:]}")
                rows.append(json.loads(out.read_text()))
                print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Tutorial 5's models, trained with pyrosc.train",
        "",
        f"Measured {started} on {info['cpu']} ({info['logical_cpus']} logical CPUs), "
        f"{args.threads} torch threads; torch {info['torch']}, pyro-ppl {info['pyro-ppl']}, "
        f"pyrosc {info['pyrosc_commit']}. Command: `{shlex.join(['python', *sys.argv])}`",
        "",
        "| model | epochs | train cells/s | train s | first epoch s | final train ELBO |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['epochs']} | {row['cells_per_second']:,.0f} "
            f"| {row['train_seconds']:.1f} | {row['first_epoch_seconds']:.2f} "
            f"| {row['final_train_elbo']:.1f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
