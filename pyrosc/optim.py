"""The optimiser of a fit: Adam over the parameters of Pyro's parameter store.

Pyro's own ``pyro.optim.Adam`` keeps one optimiser per parameter tensor; one fused Adam over all
of them does the same arithmetic in one kernel (on a CPU ~4x faster than the multi-tensor
``foreach`` form, which was ~10 % of a training step). ``eps=0.01`` and ``weight_decay=1e-6``
are scvi-tools' settings; with the loss taken per cell (as :func:`pyrosc.train.train` does) they
act as they do there.
"""

from __future__ import annotations

import pyro
import torch
from torch import Tensor
from torch.optim.adam import adam as adam_step

#: Adam's settings besides the learning rate (scvi-tools').
EPS, WEIGHT_DECAY, BETAS = 0.01, 1e-6, (0.9, 0.999)


def _fusable(params: list[Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)


def adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """A ``torch.optim.Adam`` over ``params`` with pyrosc's settings, fused where it can be (the
    optimiser PyTorch Lightning needs, :mod:`pyrosc.lightning_svi`)."""
    options = {"lr": lr, "eps": EPS, "weight_decay": WEIGHT_DECAY, "betas": BETAS}
    if _fusable(params):
        return torch.optim.Adam(params, fused=True, **options)
    return torch.optim.Adam(params, foreach=True, **options)


class StoreAdam:
    """Adam over every parameter of the Pyro parameter store that requires a gradient,
    including parameters that first appear after the first step (a site reached only by some
    minibatches, a parameter created lazily): they join at the step that creates them.

    Each step is ``torch.optim.adam.adam``, the function ``torch.optim.Adam`` steps with, so the
    arithmetic, the state and the results are those of ``torch.optim.Adam(fused=True, ...)``,
    to the bit (tested). Without the class around it: ``torch.optim.Optimizer`` imports
    ``torch._dynamo`` when its first parameters join (~1.3 s in a fresh process on a 2-core CPU,
    more than a short fit's whole training) and wraps every step in hooks and checks. As there,
    a parameter without a gradient at a step is not stepped.

    Args:
        lr: the learning rate.
    """

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self.params: list[Tensor] = []
        self.state: list[tuple[Tensor, Tensor, Tensor]] = []  # exp_avg, exp_avg_sq, step
        self.known: set[int] = set()

    def _join_new(self) -> None:
        store = pyro.get_param_store()
        if len(self.known) == len(store):
            return
        new = [p for _, p in store.named_parameters() if id(p) not in self.known]
        self.known |= {id(p) for p in new}
        # Fully frozen tensors (pyrosc.freezing) never join: no step, no weight decay.
        trained = [p for p in new if p.requires_grad]
        if not self.params and not trained:
            raise ValueError(
                "every parameter is frozen: there is nothing to train (a query with no "
                "category new to its reference needs no fit: ask it directly)"
            )
        for p in trained:
            fused = _fusable([p])
            step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state.append((zeros, zeros.clone(), step))
            self.params.append(p)

    def step(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` (a 0-d tensor) and take one Adam step."""
        self._join_new()
        for p in self.params:
            p.grad = None
        loss.backward()
        stepped = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in stepped]
        if not params:
            return
        exp_avgs, exp_avg_sqs, steps = zip(*(self.state[i] for i in stepped), strict=True)
        fused = _fusable(params)
        with torch.no_grad():
            adam_step(
                params,
                [p.grad for p in params],
                list(exp_avgs),
                list(exp_avg_sqs),
                [],
                list(steps),
                foreach=None if fused else True,
                fused=fused or None,
                amsgrad=False,
                beta1=BETAS[0],
                beta2=BETAS[1],
                lr=self.lr,
                weight_decay=WEIGHT_DECAY,
                eps=EPS,
                maximize=False,
            )
