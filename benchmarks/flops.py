"""Matrix-multiply FLOPs of one scVI training step, and the machine's measured matmul throughput.

Counting. A linear layer with ``n_in`` inputs and ``n_out`` outputs applied to a minibatch of
``B`` cells is one ``(B, n_in) @ (n_in, n_out)`` product: ``2 B n_in n_out`` FLOPs forward.
Backward costs the same again for the weight gradient (``(n_in, B) @ (B, n_out)``) and once
more for the input gradient (``(B, n_out) @ (n_out, n_in)``), except for the encoder's first
layer, whose input is the data and needs no gradient. So one step costs

    FLOPs / step = 2 B [ 3 sum_layers n_in n_out - n_genes' n_hidden ]

(``n_genes'`` = genes plus the encoder's covariate one-hots, if any), that is 3x the forward
FLOPs less the data gradient that is never computed. For scVI with ``G`` genes, hidden width
``H``, latent ``d``, ``C`` covariate categories and one hidden layer, the layers are

    encoder   G -> H,  H -> d (mean),  H -> d (log variance)
    decoder   d + C -> H,  H -> G (proportions),  H -> G (zero-inflation gate, ZINB and ZIP)

With G = 2000, H = 128, d = 10, C = 1 this is 4.12 MFLOP per cell for ZINB and 2.58 MFLOP for
NB. Only matrix products are counted: biases, BatchNorm, activations, the softmax and the
likelihood's elementwise terms are O(G) per cell against O(G H) for the products, and Adam's
update is O(parameters) per step. Both tools run the same layers (scvi-tools injects no batch
one-hot when there is one batch, a difference of ``2 B H`` FLOPs), so one count serves both.

Throughput. :func:`gemm_gflops` times ``torch.mm`` on float32 operands after a warm-up and
keeps the best of several repeats (the machine's attainable rate, least disturbed by other
processes); :func:`step_gemm_gflops` does the same for the very products of a training step,
at its minibatch size, which is the ceiling a step's matrix work could reach.

    python benchmarks/flops.py --threads 2 --batch-sizes 128 512
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Linear:
    """One linear layer of the step: ``n_in -> n_out``; ``input_gradient`` says whether
    backpropagation computes the gradient with respect to its input."""

    name: str
    n_in: int
    n_out: int
    input_gradient: bool = True


def scvi_linears(
    n_genes: int = 2000,
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    n_covariate_categories: int = 1,
    likelihood: str = "zinb",
    encode_covariates: bool = False,
) -> list[Linear]:
    """The linear layers of pyrosc's scVI with an observed library (and of scvi-tools' SCVI).

    Args:
        n_genes, n_latent, n_hidden, n_layers: network sizes.
        n_covariate_categories: width of the covariate one-hots injected into every decoder
            layer (the number of batches, for a batch alone).
        likelihood: ``"zinb"`` and ``"zip"`` add the gate head.
        encode_covariates: whether the encoder sees the one-hots too.

    Returns:
        the layers in order, encoder first.
    """
    encoder_extra = n_covariate_categories if encode_covariates else 0
    layers = [Linear("encoder.0", n_genes + encoder_extra, n_hidden, input_gradient=False)]
    layers += [
        Linear(f"encoder.{i}", n_hidden + encoder_extra, n_hidden) for i in range(1, n_layers)
    ]
    layers += [
        Linear("encoder.loc", n_hidden, n_latent),
        Linear("encoder.scale", n_hidden, n_latent),
    ]
    layers += [
        Linear(
            f"decoder.{i}", (n_latent if i == 0 else n_hidden) + n_covariate_categories, n_hidden
        )
        for i in range(n_layers)
    ]
    layers.append(Linear("decoder.proportions", n_hidden, n_genes))
    if likelihood in ("zinb", "zip"):
        layers.append(Linear("decoder.gate", n_hidden, n_genes))
    return layers


def step_flops(layers: list[Linear], n_cells: int = 1) -> dict[str, int]:
    """Matrix-multiply FLOPs of one training step on ``n_cells`` cells.

    Returns:
        ``forward``, ``backward`` and ``total`` FLOPs.
    """
    forward = sum(2 * n_cells * layer.n_in * layer.n_out for layer in layers)
    backward = forward + sum(
        2 * n_cells * layer.n_in * layer.n_out for layer in layers if layer.input_gradient
    )
    return {"forward": forward, "backward": backward, "total": forward + backward}


def _best_rate(run: Callable[[], None], flops: int, seconds: float, repeats: int) -> float:
    """Best GFLOP/s of ``run`` (``flops`` FLOPs a call) over ``repeats`` timed rounds of about
    ``seconds`` each, after one warm-up round."""
    run()
    started = time.perf_counter()
    calls = 1
    while time.perf_counter() - started < 0.1:
        run()
        calls += 1
    per_call = (time.perf_counter() - started) / calls
    calls = max(1, round(seconds / per_call))
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = max(best, flops * calls / (time.perf_counter() - started) / 1e9)
    return best


def gemm_gflops(m: int, k: int, n: int, seconds: float = 1.0, repeats: int = 5) -> float:
    """Measured float32 GFLOP/s of ``(m, k) @ (k, n)`` with ``torch.mm`` (current threads)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    return _best_rate(lambda: torch.mm(a, b, out=out), 2 * m * k * n, seconds, repeats)


def step_gemm_gflops(
    layers: list[Linear], batch_size: int, seconds: float = 1.0, repeats: int = 5
) -> float:
    """Measured float32 GFLOP/s of the matrix products of one training step at ``batch_size``:
    per layer the forward product, the weight gradient and (where needed) the input gradient,
    run back to back with ``torch.mm``."""
    products = []
    for layer in layers:
        shapes = [(batch_size, layer.n_in, layer.n_out), (layer.n_in, batch_size, layer.n_out)]
        if layer.input_gradient:
            shapes.append((batch_size, layer.n_out, layer.n_in))
        for m, k, n in shapes:
            products.append((torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)))

    def run() -> None:
        for a, b, out in products:
            torch.mm(a, b, out=out)

    return _best_rate(run, step_flops(layers, batch_size)["total"], seconds, repeats)


def probe(
    threads: int,
    batch_sizes: tuple[int, ...] = (128,),
    square: int = 2048,
    seconds: float = 1.0,
    likelihood: str = "zinb",
) -> dict:
    """The machine's dense float32 matmul throughput on ``threads`` threads.

    Returns:
        ``threads``, ``square`` (the size n), ``square_gflops`` (n x n @ n x n) and
        ``step_gflops``: batch size -> GFLOP/s of the step's own products (scVI, 2000 genes,
        128/10/1, one batch, ``likelihood``).
    """
    torch.set_num_threads(threads)
    layers = scvi_linears(likelihood=likelihood)
    return {
        "threads": threads,
        "square": square,
        "square_gflops": gemm_gflops(square, square, square, seconds),
        "step_likelihood": likelihood,
        "step_gflops": {str(size): step_gemm_gflops(layers, size, seconds) for size in batch_sizes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--square", type=int, default=2048)
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed round")
    args = parser.parse_args()
    result = probe(args.threads, tuple(args.batch_sizes), args.square, args.seconds)
    for likelihood in ("zinb", "nb"):
        per_cell = step_flops(scvi_linears(likelihood=likelihood))["total"]
        result[f"{likelihood}_flops_per_cell"] = per_cell
    print(json.dumps(result))


if __name__ == "__main__":
    main()
