"""The trainer: isolation of fits, seeding, warm-up and free bits as effect handlers, stopping."""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyrosc import VAE, traces
from pyrosc.data import from_anndata
from pyrosc.freezing import Frozen
from pyrosc.guides import vae_guide
from pyrosc.models import vae_model
from pyrosc.nets import CountDecoder, GaussianEncoder
from pyrosc.objective import ScaleLatents, free_bits_loss, read_objective, reparameterized_loss
from pyrosc.traces import bind_data
from pyrosc.train import default_epochs, resolve_device, train


def snapshot(model: VAE) -> dict[str, torch.Tensor]:
    with model._scope() as (_, _, networks):
        store = pyro.get_param_store()
        params = {name: store[name].detach().clone() for name in store.keys()}
    params.update({k: v.clone() for k, v in networks.state_dict().items()})
    return params


def test_two_fits_never_share_parameters(toy_adata):
    first = VAE(toy_adata, n_latent=3, n_hidden=16).fit(max_epochs=3, progress=False)
    before = snapshot(first)
    latent_before = first.latent()
    second = VAE(toy_adata.copy(), likelihood="zinb", n_latent=3, n_hidden=16)
    second.fit(max_epochs=3, progress=False, seed=1)
    after = snapshot(first)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(before[name], after[name], rtol=0, atol=0)
    np.testing.assert_array_equal(first.latent(), latent_before)
    assert len(pyro.get_param_store().keys()) == 0  # nothing leaks into the global store
    assert "inverse_dispersion" in snapshot(second)


def test_same_seed_same_history_and_latent(toy_adata):
    a = VAE(toy_adata, n_latent=3, n_hidden=16).fit(max_epochs=2, progress=False, seed=5)
    b = VAE(toy_adata.copy(), n_latent=3, n_hidden=16).fit(max_epochs=2, progress=False, seed=5)
    np.testing.assert_allclose(a.history["train_elbo"], b.history["train_elbo"])
    np.testing.assert_array_equal(a.latent(), b.latent())


def test_a_last_minibatch_of_one_cell_does_not_crash(toy_adata):
    # 129 training cells with batch 128 would leave one cell for BatchNorm.
    adata = toy_adata[:129].copy()
    model = VAE(adata, n_latent=3, n_hidden=16)
    model.fit(max_epochs=2, batch_size=128, validation_fraction=0, progress=False)
    assert len(model.history) == 2


def test_history_columns_and_elbo_improves(toy_adata):
    model = VAE(toy_adata, n_latent=3, n_hidden=16).fit(max_epochs=15, progress=False, lr=1e-2)
    history = model.history
    assert list(history.columns) == [
        "epoch",
        "kl_weight",
        "train_elbo",
        "validation_elbo",
        "seconds",
    ]
    assert history["validation_elbo"].iloc[-1] > history["validation_elbo"].iloc[0]
    assert history["train_elbo"].iloc[-1] > history["train_elbo"].iloc[0]


def test_early_stopping_keeps_the_best_validation_parameters(toy_adata):
    model = VAE(toy_adata, n_latent=3, n_hidden=16)
    # A large lr on 216 cells: the validation ELBO soon stops improving.
    model.fit(max_epochs=100, lr=0.03, early_stopping=True, patience=3, progress=False)
    history = model.history
    assert len(history) < 100
    assert history["validation_elbo"].notna().all()
    best = model.train_result.best_epoch
    assert history.loc[history["epoch"] == best, "validation_elbo"].item() == pytest.approx(
        history["validation_elbo"].max()
    )
    validation = toy_adata[model.train_result.validation_index]
    np.testing.assert_allclose(
        model.elbo(validation, n_samples=300).mean(), history["validation_elbo"].max(), atol=3.0
    )


def test_kl_warmup_scales_latent_sites_in_model_and_guide(toy_adata):
    data = from_anndata(toy_adata)
    decoder, encoder = CountDecoder(3, data.n_genes, 8), GaussianEncoder(data.n_genes, 3, 8)
    model = partial(vae_model, decoder=decoder)
    guide = partial(vae_guide, encoder=encoder)
    kwargs = data.minibatch(np.arange(10))
    scale = ScaleLatents(0.25, {"z"})
    guide_trace = poutine.trace(scale(bind_data(guide))).get_trace(**kwargs)
    model_trace = poutine.trace(poutine.replay(scale(bind_data(model)), guide_trace)).get_trace(
        **kwargs
    )
    assert guide_trace.nodes["z"]["scale"] == 0.25
    assert model_trace.nodes["z"]["scale"] == 0.25
    assert model_trace.nodes["counts"]["scale"] == 1.0


def test_warmup_weight_rises_linearly(toy_adata):
    model = VAE(toy_adata, n_latent=3, n_hidden=16)
    model.fit(max_epochs=6, kl_warmup_epochs=4, progress=False)
    np.testing.assert_allclose(model.history["kl_weight"], [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def _loss_pair(toy_adata):
    data = from_anndata(toy_adata)
    encoder = GaussianEncoder(data.n_genes, 3, 8, dropout=0.0)
    decoder = CountDecoder(3, data.n_genes, 8)
    encoder.eval(), decoder.eval()
    model = bind_data(partial(vae_model, decoder=decoder))
    guide = bind_data(partial(vae_guide, encoder=encoder))
    return model, guide, encoder, data.minibatch(np.arange(32))


def test_free_bits_zero_is_the_plain_elbo(toy_adata):
    model, guide, _, kwargs = _loss_pair(toy_adata)
    pyro.set_rng_seed(0)
    plain = Trace_ELBO().loss(model, guide, **kwargs)
    pyro.set_rng_seed(0)
    free = free_bits_loss(0.0)(model, guide, **kwargs).item()
    assert free == pytest.approx(plain, rel=1e-6)


def test_free_bits_adds_the_shortfall_and_silences_the_kl_gradient(toy_adata):
    model, guide, encoder, kwargs = _loss_pair(toy_adata)
    budget = 1e4  # far above any dimension's KL: every dimension is under budget
    pyro.set_rng_seed(0)
    plain = free_bits_loss(0.0)(model, guide, **kwargs)
    pyro.set_rng_seed(0)
    free = free_bits_loss(budget)(model, guide, **kwargs)
    # loss = reconstruction + sum_d max(KL_d, budget) per cell -> reconstruction + 3 * budget.
    pyro.set_rng_seed(0)
    guide_trace, model_trace = traces.trace_pair(model, guide, kwargs)
    kl = (guide_trace.nodes["z"]["fn"].log_prob(guide_trace.nodes["z"]["value"]).sum()) - (
        model_trace.nodes["z"]["fn"].log_prob(guide_trace.nodes["z"]["value"]).sum()
    )
    expected = plain.item() - kl.item() + 32 * 3 * budget
    assert free.item() == pytest.approx(expected, rel=1e-5)
    # Under budget, the KL term has no gradient: only the reconstruction pulls on the encoder's
    # scale head, so the scale gradient equals that of the reconstruction alone.
    encoder.zero_grad()
    free.backward()
    grad_free = encoder.log_variance.weight.grad.clone()
    encoder.zero_grad()
    pyro.set_rng_seed(0)  # the same draws as `free`
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(**kwargs)
        model_trace = poutine.trace(poutine.replay(model, guide_trace)).get_trace(**kwargs)
    reconstruction = model_trace.nodes["counts"]["fn"].log_prob(kwargs["counts"]).sum()
    (-reconstruction).backward()
    torch.testing.assert_close(encoder.log_variance.weight.grad, grad_free, rtol=1e-4, atol=1e-5)


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'cuda'"):
        resolve_device("tpu")


def test_divergence_is_reported(toy_adata):
    model = VAE(toy_adata, n_latent=3, n_hidden=16)
    with pytest.raises((FloatingPointError, ValueError), match="diverged|Expected parameter"):
        model.fit(max_epochs=30, lr=50.0, progress=False)


def test_bad_training_options(toy_adata):
    data = from_anndata(toy_adata)
    model = partial(vae_model, decoder=CountDecoder(3, data.n_genes, 8))
    guide = partial(vae_guide, encoder=GaussianEncoder(data.n_genes, 3, 8))
    with pytest.raises(ValueError, match="early_stopping needs validation cells"):
        train(model, guide, data, early_stopping=True, validation_fraction=0, progress=False)
    with pytest.raises(ValueError, match="max_epochs must be at least 1"):
        train(model, guide, data, max_epochs=0, progress=False)


def test_frozen_entries_stay_to_the_bit_and_fully_frozen_tensors_get_no_gradient(toy_adata):
    data = from_anndata(toy_adata)
    encoder, decoder = GaussianEncoder(data.n_genes, 3, 8), CountDecoder(3, data.n_genes, 8)
    networks = torch.nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    model = partial(vae_model, decoder=decoder, likelihood="nb")
    guide = partial(vae_guide, encoder=encoder)
    rows = torch.zeros(data.n_genes, 8, dtype=torch.bool)
    rows[:5] = True  # the first 5 genes' rows of the output layer
    frozen = Frozen(
        masks={
            "encoder.body.linears.0.weight": torch.ones(8, data.n_genes, dtype=torch.bool),
            "decoder.proportion_logits.weight": rows,
            "inverse_dispersion": torch.ones(data.n_genes, dtype=torch.bool),
        },
        eval_modules=("encoder.body.norms.0",),
    )
    before = {k: v.clone() for k, v in networks.state_dict().items()}
    options = {"max_epochs": 3, "lr": 1e-2, "validation_fraction": 0, "progress": False}
    with pyro.get_param_store().scope(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, guide, data, networks=networks, frozen=frozen, **options)
        theta = pyro.param("inverse_dispersion").detach()
    assert not [w for w in caught if "requires_grad=False" in str(w.message)]  # silenced
    after = networks.state_dict()
    weight = "decoder.proportion_logits.weight"
    assert torch.equal(after[weight][:5], before[weight][:5])  # despite Adam's weight decay
    assert not torch.equal(after[weight][5:], before[weight][5:])
    assert torch.equal(theta, torch.ones(data.n_genes))  # its initial value
    for name in ("encoder.body.linears.0.weight", "encoder.body.norms.0.running_mean"):
        assert torch.equal(after[name], before[name]), name
    moving = "decoder.body.norms.0.running_mean"  # not frozen: its statistics move
    assert not torch.equal(after[moving], before[moving])
    first_layer = encoder.body.linears[0].weight
    assert first_layer.grad is None and first_layer.requires_grad  # no gradient; given back
    wrong = Frozen(masks={"encoder.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="frozen names 'encoder.weight'"):
        train(model, guide, data, networks=networks, frozen=wrong, **options)


def test_default_epochs_follow_scvi_tools_rule():
    sizes = (1, 100, 20_000, 20_001, 40_000, 1_000_000, 10**9)
    assert [default_epochs(n) for n in sizes] == [400, 400, 400, 400, 200, 8, 1]


def test_max_epochs_none_says_how_many_and_why(toy_adata, monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["pyrosc.train"], "default_epochs", lambda n_cells: 2)
    fitted = VAE(toy_adata, n_latent=2, n_hidden=8).fit(progress=False, batch_size=64)
    result = fitted.train_result
    assert len(fitted.history) == result.max_epochs == 2
    assert result.max_epochs_reason.startswith("2 epochs chosen for 240 cells: min(400, round(")
    assert fitted.history.attrs["max_epochs_reason"] == result.max_epochs_reason
    asked = VAE(toy_adata, n_latent=2, n_hidden=8).fit(max_epochs=1, progress=False).train_result
    assert (asked.max_epochs, asked.max_epochs_reason) == (1, "1 epoch as asked (max_epochs=1)")
    with pytest.raises(ValueError, match="max_epochs must be a whole number or None, got 2.5"):
        VAE(toy_adata, n_latent=2, n_hidden=8).fit(max_epochs=2.5, progress=False)


def test_the_lean_loss_is_trace_elbo_value_and_gradient(toy_adata):
    """reparameterized_loss against Pyro's Trace_ELBO on the same draws: the scVI pair with a
    latent library (two latent sites), minibatch scaling on, dropout on. In float64, so that
    the two, which add the same terms in different orders, agree to ~1e-12 (in float32 the
    order alone moves gradients of ~1e3 by ~1e-3)."""
    from pyrosc import SCVI

    scvi = SCVI(toy_adata, likelihood="zinb", library="latent").fit(max_epochs=1, progress=False)
    kwargs = scvi.data.minibatch(np.arange(16)) | {"n_cells": 500}
    kwargs = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }
    with scvi._scope() as (model, guide, networks):
        networks.double().train()
        for value in pyro.get_param_store().values():
            value.unconstrained().data = value.unconstrained().data.double()
        model, guide = bind_data(model), bind_data(guide)
        losses, grads = [], []
        for loss_fn in (Trace_ELBO().differentiable_loss, reparameterized_loss):
            pyro.set_rng_seed(3)
            networks.zero_grad()
            loss = loss_fn(model, guide, **kwargs)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in networks.parameters() if p.grad is not None])
    assert losses[0].dtype == torch.float64
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    assert len(grads[0]) == len(grads[1]) > 0
    for lean, pyro_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(lean, pyro_grad, rtol=1e-9, atol=1e-9)


def test_the_lean_loss_only_for_fully_reparameterized_guides(toy_adata):
    import pyro.distributions as dist

    from pyrosc.plates import cells_plate

    model, guide, _, kwargs = _loss_pair(toy_adata)
    objective = read_objective(model, guide, kwargs, free_bits=0.0, kl_warmup_epochs=0)
    assert objective.reparameterized and objective.name == "Trace_ELBO"

    def discrete_model(counts, cell_index):
        with cells_plate(cell_index, None):
            pyro.sample("on", dist.Bernoulli(0.3))

    def discrete_guide(counts, cell_index):
        with cells_plate(cell_index, None):
            pyro.sample("on", dist.Bernoulli(0.6))

    sampled = read_objective(discrete_model, discrete_guide, kwargs, 0.0, 0)
    assert not sampled.reparameterized  # its score-function terms need Trace_ELBO


def test_the_lean_loss_keeps_the_score_function_of_a_discrete_latent():
    """A non-reparameterised latent in a draw: reparameterized_loss hands the step to
    Trace_ELBO, whose score-function term makes the gradient of KL(q || p) unbiased. Without it
    the gradient in q's probability would average to 0; with it, to dKL/dp."""
    import pyro.distributions as dist

    from pyrosc.plates import cells_plate

    n = 20000

    def model(cell_index):
        with cells_plate(cell_index, None):
            pyro.sample("on", dist.Bernoulli(0.3))

    def guide(cell_index):
        p = pyro.param("p", torch.tensor(0.6))
        with cells_plate(cell_index, None):
            pyro.sample("on", dist.Bernoulli(p))

    with pyro.get_param_store().scope():
        pyro.set_rng_seed(0)
        reparameterized_loss(model, guide, cell_index=torch.arange(n)).backward()
        gradient = pyro.param("p").grad.item() / n
    expected = np.log(0.6 / 0.3) - np.log(0.4 / 0.7)  # d/dp KL(Bernoulli(p) || Bernoulli(0.3))
    assert gradient == pytest.approx(expected, abs=0.05)


def test_the_lean_loss_is_trace_elbo_on_scaled_masked_and_unguided_sites():
    """What the lean loss must add up as Trace_ELBO does: a latent scaled by KL warm-up, a
    masked observation, a latent of the model that the guide does not draw (sampled from the
    prior, its log-density in the model's sum), a guide-only latent, a deterministic site, a
    subsampled plate nested in another."""
    import pyro.distributions as dist
    from pyro import poutine

    def model(x, index):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("unguided", dist.Normal(0.0, 1.0))
        with pyro.plate("genes", 3, dim=-1):
            with pyro.plate("cells", 50, subsample=index, dim=-2):
                z = pyro.sample("z", dist.Normal(0.0, 1.0), infer={"kl_warmup": True})
                pyro.deterministic("double", 2 * z)
                with poutine.mask(mask=x > 0):
                    pyro.sample("x", dist.Normal(z, scale), obs=x)

    def guide(x, index):
        loc = pyro.param("loc", torch.zeros(50, 3))
        pyro.sample("scale", dist.LogNormal(pyro.param("s", torch.tensor(0.2)), 0.5))
        pyro.sample("extra", dist.Normal(pyro.param("e", torch.tensor(0.3)), 1.0))
        with pyro.plate("genes", 3, dim=-1):
            with pyro.plate("cells", 50, subsample=index, dim=-2):
                pyro.sample("z", dist.Normal(loc[index], 0.7))

    x, index = torch.randn(10, 3), torch.arange(5, 15)
    warm = ScaleLatents(0.3, {"z"})
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        results = []
        for loss_fn in (Trace_ELBO().differentiable_loss, reparameterized_loss):
            pyro.set_rng_seed(7)
            loss = loss_fn(warm(model), warm(guide), x, index)
            params = [pyro.param(name).unconstrained() for name in ("loc", "s", "e")]
            results.append((loss.detach(), torch.autograd.grad(loss, params)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=0)
    for lean, pyro_grad in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(lean, pyro_grad, rtol=1e-6, atol=1e-7)
