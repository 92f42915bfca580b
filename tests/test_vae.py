"""The VAE model and guide: the Pyro contract, and per-cell log weights against scipy."""

from __future__ import annotations

from functools import partial

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import stats

from pyrosc import evaluate, traces
from pyrosc.data import from_anndata
from pyrosc.guides import vae_guide
from pyrosc.likelihoods import LIKELIHOODS, uses_gate
from pyrosc.models import vae_model
from pyrosc.nets import CountDecoder, GaussianEncoder
from pyrosc.traces import bind_data


def make_pair(n_genes: int, likelihood: str, n_latent: int = 3):
    encoder = GaussianEncoder(n_genes, n_latent, n_hidden=16)
    decoder = CountDecoder(n_latent, n_genes, n_hidden=16, gate=uses_gate(likelihood))
    model = partial(vae_model, decoder=decoder, likelihood=likelihood)
    guide = partial(vae_guide, encoder=encoder)
    return model, guide, torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder})


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_guide_matches_model_and_sites_are_named_as_the_math(toy_adata, likelihood):
    data = from_anndata(toy_adata)
    model, guide, _ = make_pair(data.n_genes, likelihood)
    batch = data.minibatch(np.arange(16))
    # Pyro's validation (on in conftest) checks that the guide samples the model's latents.
    loss = Trace_ELBO().loss(bind_data(model), bind_data(guide), **batch, n_cells=240)
    assert np.isfinite(loss)
    guide_trace, model_trace = traces.trace_pair(model, guide, batch)
    assert model_trace.nodes["z"]["value"].shape == (16, 3)
    assert model_trace.nodes["counts"]["is_observed"]
    assert model_trace.nodes["counts"]["fn"].batch_shape == (16,)
    assert model_trace.nodes["counts"]["fn"].event_shape == (data.n_genes,)
    params = set(pyro.get_param_store().keys())
    assert ("inverse_dispersion" in params) == (likelihood in ("nb", "zinb"))


def test_minibatch_scaling_uses_the_dataset_size(toy_adata):
    data = from_anndata(toy_adata)
    model, guide, _ = make_pair(data.n_genes, "nb")
    batch = data.minibatch(np.arange(20))
    trace = poutine.trace(bind_data(model)).get_trace(**batch, n_cells=200)
    assert trace.nodes["counts"]["scale"] == pytest.approx(10.0)
    assert trace.nodes["z"]["scale"] == pytest.approx(10.0)


@pytest.mark.parametrize("likelihood", ["poisson", "nb", "zinb"])
def test_log_weights_equal_a_hand_computation_with_scipy(toy_adata, likelihood):
    """log p(x, z) - log q(z | x) written out with scipy for fixed z."""
    data = from_anndata(toy_adata)
    model, guide, networks = make_pair(data.n_genes, likelihood)
    networks.eval()
    batch = data.minibatch(np.arange(5))
    x, library = batch["counts"], batch["library"]
    draws = []

    def recording_guide(counts, cell_index, n_cells=None):
        """The VAE guide, keeping the z it draws (the inner trace passes the site on)."""
        trace = poutine.trace(guide).get_trace(
            counts=counts, cell_index=cell_index, n_cells=n_cells
        )
        draws.append(trace.nodes["z"]["value"])

    with torch.no_grad():
        log_w = evaluate.log_importance_weights(model, recording_guide, batch, n_samples=1)[0]
        z = draws[-1][0]
        loc, scale = networks["encoder"](torch.log1p(x))
        logits, gate_logits = networks["decoder"](z)
        proportions = logits.softmax(-1)
    mu = (library[:, None] * proportions).double().numpy()
    xs, zs = x.double().numpy(), z.double().numpy()
    expected = stats.norm(0, 1).logpdf(zs).sum(1) - stats.norm(
        loc.double().numpy(), scale.double().numpy()
    ).logpdf(zs).sum(1)
    if likelihood == "poisson":
        log_px = stats.poisson(mu).logpmf(xs)
    else:
        theta = pyro.param("inverse_dispersion").detach().double().numpy()
        log_px = stats.nbinom(theta, theta / (theta + mu)).logpmf(xs)
        if likelihood == "zinb":
            gate = torch.sigmoid(gate_logits).double().numpy()
            log_px = np.log(gate * (xs == 0) + (1 - gate) * np.exp(log_px))
    expected = expected + log_px.sum(1)
    np.testing.assert_allclose(log_w.double().numpy(), expected, rtol=1e-4)


def test_networks_accept_extra_leading_dimensions():
    decoder = CountDecoder(3, 7, n_hidden=8, gate=True)
    decoder.eval()
    z = torch.randn(4, 5, 3)
    logits, gate_logits = decoder(z)
    assert logits.shape == (4, 5, 7) and gate_logits.shape == (4, 5, 7)
    flat, _ = decoder(z.reshape(20, 3))
    torch.testing.assert_close(logits.reshape(20, 7), flat)
