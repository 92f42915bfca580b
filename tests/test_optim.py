"""StoreAdam: torch.optim.Adam's arithmetic to the bit, over the Pyro parameter store."""

from __future__ import annotations

import subprocess
import sys

import pyro
import pytest
import torch

from pyrosc.optim import BETAS, EPS, WEIGHT_DECAY, StoreAdam


def _loss(a: torch.Tensor, b: torch.Tensor, step: int) -> torch.Tensor:
    loss = ((a - 3.0) ** 2).sum() + (a.sin() * 0.1).sum()
    if step != 2:  # at step 2, b gets no gradient: Adam must leave it and its state alone
        loss = loss + (b.exp() - 2.0).pow(2).sum()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_store_adam_is_torch_adam_to_the_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    a0, b0, c0 = torch.randn(7, 3, dtype=dtype), torch.randn(5, dtype=dtype), torch.randn(4)
    with pyro.get_param_store().scope():
        a, b = pyro.param("a", a0.clone()), pyro.param("b", b0.clone())
        pyro.param("frozen", torch.ones(2)).requires_grad_(False)  # never joins
        ours = StoreAdam(lr=0.05)
        for step in range(6):
            loss = _loss(a, b, step)
            if step >= 3:  # a parameter created at step 3 joins then
                loss = loss + (pyro.param("c", c0.clone()) ** 2).sum()
            ours.step(loss)
        c = pyro.param("c")
        assert len(ours.params) == 3
        ours_values = [p.detach().clone() for p in (a, b, c)]

    a, b, c = (t.clone().requires_grad_() for t in (a0, b0, c0))
    options = {"lr": 0.05, "eps": EPS, "weight_decay": WEIGHT_DECAY, "betas": BETAS}
    reference = torch.optim.Adam([a, b], fused=True, **options)
    for step in range(6):
        reference.zero_grad(set_to_none=True)
        loss = _loss(a, b, step)
        if step == 3:
            reference.add_param_group({"params": [c]})
        if step >= 3:
            loss = loss + (c**2).sum()
        loss.backward()
        reference.step()
    for mine, theirs in zip(ours_values, (a, b, c), strict=True):
        assert torch.equal(mine, theirs.detach())


def test_everything_frozen_is_an_error() -> None:
    with pyro.get_param_store().scope():
        frozen = pyro.param("w", torch.ones(3)).requires_grad_(False)
        with pytest.raises(ValueError, match="every parameter is frozen"):
            StoreAdam(lr=0.1).step((frozen * 2).sum())


def test_a_step_imports_no_compiler() -> None:
    """The point of StoreAdam: torch.optim.Optimizer imports torch._dynamo (~1.3 s)."""
    code = (
        "import sys, pyro, torch\n"
        "from pyrosc.optim import StoreAdam\n"
        "w = pyro.param('w', torch.ones(3))\n"
        "StoreAdam(0.1).step((w * w).sum())\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
