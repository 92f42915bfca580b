"""Measuring tools shared by compare.py and scaling.py: memory of this process, a background
sampler of it, fresh child processes, and a description of the machine."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
_KIB_PER_MIB = 1024.0  # /proc and ru_maxrss count KiB on Linux


def rss_mib() -> float:
    """The current resident set size of this process, in MiB (NaN where /proc is missing)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / _KIB_PER_MIB
    return float("nan")


def peak_rss_mib() -> float:
    """The maximum resident set size this process has reached so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KIB_PER_MIB


class RssSampler:
    """Samples :func:`rss_mib` every ``interval`` seconds on a background thread, while used as
    a context manager; ``samples`` holds ``(time.perf_counter(), MiB)`` pairs."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), rss_mib()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), rss_mib()))

    def peak_between(self, start: float, end: float) -> float:
        """Highest sample taken in ``(start, end]`` (NaN if none fell there)."""
        inside = [mib for moment, mib in self.samples if start < moment <= end]
        return max(inside) if inside else float("nan")


def run_python(args: list[str], log: Path) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in a fresh process (same interpreter, working folder and
    environment), its stdout and stderr to ``log``."""
    with log.open("w") as handle:
        return subprocess.run(
            [sys.executable, *args], stdout=handle, stderr=subprocess.STDOUT, check=False
        )


def machine() -> dict:
    """CPU model, logical CPUs, Python, the pyrosc commit and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("torch", "pyro-ppl", "scvi-tools", "scib-metrics", "anndata"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyrosc_commit": commit or "unknown",
        **versions,
    }


#: scvi-tools' ``train`` settings the benchmarks match: minibatch 128, every cell training, no
#: early stopping, on the CPU, no progress bar.
SCVI_TOOLS_TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "train_size": 1.0,
    "batch_size": 128,
    "early_stopping": False,
    "enable_progress_bar": False,
}


def scvi_tools_model(
    adata, architecture: dict, seed: int, likelihood: str = "nb", batch_key: str | None = None
):
    """scvi-tools' SCVI set up on ``adata`` itself (no copy): gene dispersion, dropout 0.1."""
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    return scvi.model.SCVI(
        adata, gene_likelihood=likelihood, dispersion="gene", dropout_rate=0.1, **architecture
    )


def train_scvi_tools(adata, architecture: dict, epochs: int, seed: int, likelihood: str = "nb"):
    """scvi-tools' SCVI on a copy of ``adata`` (:func:`scvi_tools_model`), trained with
    :data:`SCVI_TOOLS_TRAINER` for ``epochs``. Returns the model, the AnnData it holds and the
    fit's wall seconds."""
    adata = adata.copy()
    model = scvi_tools_model(adata, architecture, seed, likelihood)
    started = time.perf_counter()
    model.train(max_epochs=epochs, **SCVI_TOOLS_TRAINER)
    return model, adata, time.perf_counter() - started
