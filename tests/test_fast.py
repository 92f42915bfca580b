"""The compiled NB / ZINB kernels of the training step against float64 truth and the eager code.

The truth is written plainly with lgamma in float64 (independent of both pyrosc paths); its
gradients are autograd's. The fused kernels run in float32, so they are held to float32
accuracy: relative 1e-5 with an absolute floor where a quantity is near zero.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from pyro import validation_enabled as pyro_validation

from pyrosc import _fast
from pyrosc._fast import ahead, compiled
from pyrosc.likelihoods import count_distribution


def _truth(
    likelihood: str, value: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor, gate=None
) -> torch.Tensor:
    """log NB / ZINB elementwise, plainly, in the dtype given (float64 here)."""
    log_nb = (
        torch.lgamma(value + theta)
        - torch.lgamma(theta)
        - torch.lgamma(value + 1)
        + theta * (torch.log(theta) - torch.log(theta + mean))
        + value * (torch.log(mean) - torch.log(theta + mean))
    )
    if likelihood == "nb":
        return log_nb
    at_zero = torch.logaddexp(gate, log_nb) - F.softplus(gate)  # log(pi + (1 - pi) p(0))
    return torch.where(value == 0, at_zero, log_nb - F.softplus(gate))


def _batch(seed: int = 0, cells: int = 96, genes: int = 40) -> dict[str, torch.Tensor]:
    """Counts with many zeros, small counts (the tables) and large ones (the Stirling branch,
    up to 1e5); means 1e-3..1e4; theta 1e-3..1e6 per gene; gate logits -4..4."""
    generator = torch.Generator().manual_seed(seed)
    log_mean = torch.empty(cells, genes).uniform_(
        math.log(1e-3), math.log(1e4), generator=generator
    )
    theta = torch.logspace(-3, 6, genes, dtype=torch.float64)[
        torch.randperm(genes, generator=generator)
    ]
    mean = log_mean.exp().double()
    value = torch.poisson(mean.clamp(max=1e5), generator=generator)
    value[0, :8] = torch.tensor([32.0, 33.0, 1e5, 31.0, 40.0, 0.0, 1.0, 200.0])
    gate = torch.empty(cells, genes).uniform_(-4, 4, generator=generator).double()
    return {"value": value, "mean": mean, "theta": theta, "gate": gate}


def _fused_and_grads(likelihood: str, batch: dict[str, torch.Tensor], weights: torch.Tensor):
    """pyrosc's log_prob in float32 (the fused path when it applies) and its gradients."""
    mean = batch["mean"].float().requires_grad_()
    theta = batch["theta"].float().requires_grad_()
    gate = batch["gate"].float().requires_grad_() if likelihood == "zinb" else None
    observation = count_distribution(likelihood, mean.log(), theta, gate)
    log_prob = observation.log_prob(batch["value"].float())
    (log_prob * weights.float()).sum().backward()
    grads = [mean.grad, theta.grad] + ([gate.grad] if gate is not None else [])
    return log_prob.detach().double(), [g.double() for g in grads]


def _truth_and_grads(likelihood: str, batch: dict[str, torch.Tensor], weights: torch.Tensor):
    mean = batch["mean"].clone().requires_grad_()
    theta = batch["theta"].clone().requires_grad_()
    gate = batch["gate"].clone().requires_grad_() if likelihood == "zinb" else None
    log_prob = _truth(likelihood, batch["value"], mean, theta, gate)
    (log_prob * weights).sum().backward()
    grads = [mean.grad, theta.grad] + ([gate.grad] if gate is not None else [])
    return log_prob.detach(), grads


def _counting_kernels(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of each compiled kernel (to know which path ran)."""
    calls: dict[str, int] = {}
    run = compiled.run

    def counted(kernel, *args):
        calls[kernel.name] = calls.get(kernel.name, 0) + 1
        return run(kernel, *args)

    monkeypatch.setattr(compiled, "run", counted)
    return calls


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_fused_log_prob_and_gradients_match_float64_truth(
    likelihood: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _batch()
    weights = torch.rand(batch["value"].shape, generator=torch.Generator().manual_seed(1)).double()
    calls = _counting_kernels(monkeypatch)
    log_prob, grads = _fused_and_grads(likelihood, batch, weights)
    assert calls.get(likelihood) == 1, "the fused kernel did not run"
    expected, expected_grads = _truth_and_grads(likelihood, batch, weights)
    # float32 rounding of terms of size ~|log p| (and of t q, x w at theta = 1e6, x = 1e5).
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=2e-4)
    for grad, truth in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, truth, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["nb", "zinb"])
def test_fused_equals_eager(likelihood: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same float32 inputs through both paths agree to float32 rounding."""
    batch = _batch(seed=2)
    weights = torch.rand(batch["value"].shape, generator=torch.Generator().manual_seed(3)).double()
    fused_result = _fused_and_grads(likelihood, batch, weights)
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    calls = _counting_kernels(monkeypatch)
    eager_result = _fused_and_grads(likelihood, batch, weights)
    assert calls == {}, "PYROSC_COMPILE=0 must keep the compiled kernels out"
    torch.testing.assert_close(fused_result[0], eager_result[0], rtol=1e-5, atol=1e-5)
    for grad, eager in zip(fused_result[1], eager_result[1], strict=True):
        torch.testing.assert_close(grad, eager, rtol=1e-4, atol=1e-5)


def test_non_integer_counts_fall_back_to_the_eager_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """With validation off, non-integer counts are not in the tables: the kernel flags them and
    the eager code (which extends the NB to non-integers) gives the result."""
    batch = _batch(seed=4)
    batch["value"][3, 5] = 2.5
    weights = torch.ones_like(batch["value"])
    with pyro_validation(False):
        fused_path = _fused_and_grads("zinb", batch, weights)
        monkeypatch.setenv("PYROSC_COMPILE", "0")
        eager_path = _fused_and_grads("zinb", batch, weights)
    torch.testing.assert_close(fused_path[0], eager_path[0], rtol=0, atol=0)
    expected = _truth_and_grads("zinb", batch, weights)[0]
    torch.testing.assert_close(fused_path[0][3, 5], expected[3, 5], rtol=1e-5, atol=1e-5)


def test_a_failed_compilation_warns_once_and_uses_the_eager_code(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    attempts = []

    def broken_build(kernel, options, path):
        attempts.append(kernel.name)
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv("PYROSC_CACHE_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setattr(compiled, "_KERNELS", {})
    monkeypatch.setattr(compiled, "_FAILED", [])
    monkeypatch.setattr(ahead, "_export_and_build", broken_build)
    batch = _batch(seed=5)
    weights = torch.ones_like(batch["value"])
    with pytest.warns(RuntimeWarning, match="could not compile .*no C\\+\\+ compiler"):
        result = _fused_and_grads("nb", batch, weights)
    assert not compiled.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        _fused_and_grads("nb", batch, weights)
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    eager = _fused_and_grads("nb", batch, weights)
    torch.testing.assert_close(result[0], eager[0], rtol=0, atol=0)
    # A later process does not try again: the failure is on disk, with how to retry.
    monkeypatch.delenv("PYROSC_COMPILE")
    monkeypatch.setattr(compiled, "_FAILED", [])
    with pytest.warns(RuntimeWarning, match="failed before .*no C\\+\\+ compiler.*delete"):
        _fused_and_grads("nb", batch, weights)
    assert attempts == ["gene terms"]


def test_applies_only_to_the_training_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_FAILED", [])  # as if compiling works, wherever this runs
    mean = torch.rand(8, 5, requires_grad=True)
    theta, value, gate = torch.rand(5), torch.ones(8, 5), torch.zeros(8, 5)
    assert compiled.applies(mean, theta, value, gate)
    with torch.no_grad():
        assert not compiled.applies(mean, theta, value, gate)  # evaluation
    assert not compiled.applies(mean.detach(), theta, value)  # nothing to differentiate
    assert not compiled.applies(mean.double(), theta.double(), value.double())  # float64
    assert not compiled.applies(mean.expand(3, 8, 5), theta, value)  # particles / enumeration
    assert not compiled.applies(mean, torch.rand(8, 5), value)  # theta per cell
    assert not compiled.applies(mean, theta, value, gate[:1])  # a broadcast gate


def test_trace_graph_elbo_gradients_are_unchanged_by_the_fused_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TraceGraph_ELBO tracks provenance with a tensor subclass that must see every operation:
    those arguments take the eager path, and the score-function gradients are the eager ones."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import TraceGraph_ELBO

    value = torch.poisson(torch.full((40, 6), 2.0), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(3, requires_grad=True)
    centres = torch.tensor([0.5, 2.0, 6.0])

    def model():
        theta = torch.full((6,), 2.0)
        with pyro.plate("cells", 40):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
            mean = centres[y].unsqueeze(-1).expand(40, 6) * (1 + 0 * logits.sum())
            observation = count_distribution("nb", mean=mean, inverse_dispersion=theta)
            pyro.sample("counts", observation.to_event(1), obs=value)

    def guide():
        with pyro.plate("cells", 40):
            pyro.sample("y", dist.Categorical(logits=logits.expand(40, 3)))

    def gradient() -> torch.Tensor:
        pyro.set_rng_seed(0)
        logits.grad = None
        TraceGraph_ELBO().loss_and_grads(model, guide)
        return logits.grad.clone()

    fused_path = gradient()
    monkeypatch.setenv("PYROSC_COMPILE", "0")
    eager = gradient()
    assert torch.isfinite(fused_path).all()
    torch.testing.assert_close(fused_path, eager)


def test_the_speed_path_steps_aside_off_the_cpu_and_for_counts_needing_a_gradient() -> None:
    """Where the dispatch returns None the distributions run the reference form: on other
    devices (its tables and rare cases would read values to the host; "meta" stands in for
    CUDA here) and for counts that need a gradient."""
    meta = [torch.empty(8, 5, device="meta") for _ in range(4)]
    assert _fast.negative_binomial_log_prob(*meta[:3]) is None
    assert _fast.negative_binomial_log_prob(*meta[:3], meta[3]) is None
    value = torch.ones(8, 5, requires_grad=True)
    assert _fast.negative_binomial_log_prob(torch.zeros(8, 5), torch.ones(5), value) is None
    counts = value.detach()
    assert _fast.negative_binomial_log_prob(torch.zeros(8, 5), torch.ones(5), counts) is not None
    with pyro_validation(False):  # (validation reads values, which meta tensors do not have)
        log_prob = count_distribution("zinb", *meta[:2], meta[3]).log_prob(meta[2])
    assert log_prob.shape == (8, 5)
