"""Kernels compiled ahead of time, once per machine, into a cache that outlives the process.

``torch.compile`` costs every process ~3-6 s before its first step even when PyTorch's cache
holds the code (importing torch._dynamo and inductor, tracing each kernel again), which a fit
of 40 epochs on a few thousand cells cannot win back. Here each kernel is exported once
(``torch.export``, with the cells and the genes as dynamic sizes, so that one build serves every
minibatch and every dataset) and built by AOTInductor into a package on disk; a process loads the
package in ~10 ms without importing the compiler (``torch._C._aoti.AOTIModelPackageLoader``,
the loader behind ``torch._inductor.aoti_load_package``), and each call is a call into the
built library.

The cache is ``$PYROSC_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyrosc``, else ``~/.cache/pyrosc``
(or, where that cannot be written, a private folder in the temporary directory), under
``kernels/``. A package's file name holds a hash of everything its code depends on: the
kernel's name and argument shapes, the source of :mod:`pyrosc._fast` (and of the kernel
function), the PyTorch version, the Python version, and the machine's architecture and vector
instruction set (a library built for AVX-512 must not load on an AVX2 machine that shares the
home directory). Editing pyrosc's kernels or upgrading PyTorch therefore builds afresh; nothing
is ever loaded that was built from other code. A build writes to a temporary file and renames
it, so processes building at once (DDP) never read half a file.
"""

from __future__ import annotations

import functools
import getpass
import hashlib
import inspect
import math
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

#: The sizes of the example arguments a kernel is exported with (any size above 1 would do:
#: torch.export specialises a dynamic size that the example gives as 0 or 1).
EXAMPLE_SIZES = {"cells": 8, "genes": 16}


@dataclass(frozen=True)
class Kernel:
    """A function of tensors to compile ahead of time.

    Attributes:
        name: the kernel's name (in the cache's file names and in messages).
        function: ``function(*tensors) -> tuple of tensors``; plain arithmetic, no Python
            control flow that depends on values.
        shapes: one entry per argument: its sizes as names, ``"cells genes"`` for a
            ``(cells, genes)`` matrix, ``"genes"`` for a vector, ``"table genes"`` for a flat
            ``(table * genes,)`` vector (``table`` = ``table_size``). Every ``cells`` and
            ``genes`` may take any size at run time.
        table_size: the fixed size ``table``.
    """

    name: str
    function: Callable[..., tuple[Tensor, ...]]
    shapes: tuple[str, ...]
    table_size: int = 1

    def examples(self) -> tuple[Tensor, ...]:
        """Positive float32 example arguments of the shapes, for the export."""
        generator = torch.Generator().manual_seed(0)
        sizes = EXAMPLE_SIZES | {"table": self.table_size}
        examples = []
        for shape in self.shapes:
            dims = [sizes[part] for part in shape.split()]
            flat = shape.startswith("table")  # one flat (table * genes,) vector
            examples.append(torch.rand([math.prod(dims)] if flat else dims, generator=generator))
        return tuple(example + 0.5 for example in examples)

    def dynamic_shapes(self) -> tuple[dict[int, object], ...]:
        """The ``dynamic_shapes`` of :func:`torch.export.export`: cells and genes free."""
        dims = {
            "cells": torch.export.Dim("cells", min=1, max=1 << 30),
            "genes": torch.export.Dim("genes", min=1, max=1 << 24),
        }
        specs = []
        for shape in self.shapes:
            if shape.startswith("table"):
                specs.append({0: self.table_size * dims["genes"]})
            else:
                specs.append({axis: dims[part] for axis, part in enumerate(shape.split())})
        return tuple(specs)


def cache_dir() -> Path:
    """Where built kernels live: ``$PYROSC_CACHE_DIR``, else ``$XDG_CACHE_HOME/pyrosc``, else
    ``~/.cache/pyrosc``; the packages are in its ``kernels/`` folder. Where the default cannot
    be created or written (a read-only home directory, as on some clusters), a folder of the
    user's in the temporary directory."""
    if os.environ.get("PYROSC_CACHE_DIR"):
        return Path(os.environ["PYROSC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return _writable_or_temporary(Path(base) / "pyrosc")


@functools.cache
def _writable_or_temporary(path: Path) -> Path:
    """``path`` if its ``kernels`` folder can be created and written; else the user's own
    folder in the temporary directory (made private; if it exists and belongs to someone
    else, whose libraries this process would load, a fresh folder for this process)."""
    try:
        (path / "kernels").mkdir(parents=True, exist_ok=True)
        if os.access(path / "kernels", os.W_OK):
            return path
    except OSError:
        pass
    temporary = Path(tempfile.gettempdir()) / f"pyrosc-{getpass.getuser()}"
    try:
        temporary.mkdir(mode=0o700, exist_ok=True)
        if temporary.stat().st_uid == os.getuid():
            return temporary
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="pyrosc-"))


def package_path(kernel: Kernel) -> Path:
    """The file of ``kernel``'s built package in :func:`cache_dir` (see the module notes)."""
    return cache_dir() / "kernels" / _file_name(kernel)


@functools.cache
def _file_name(kernel: Kernel) -> str:
    """``<name>-<hash>.pt2``: the hash of everything the built code depends on (read once per
    process: a short fit asks at every step whether the package is there)."""
    digest = hashlib.sha256()
    for part in (
        kernel.name,
        repr(kernel.shapes),
        str(kernel.table_size),
        torch.__version__,
        sys.version.split()[0],
        platform.machine(),
        torch.backends.cpu.get_cpu_capability(),
        _source(kernel.function),
    ):
        digest.update(part.encode() + b"\0")
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    slug = "".join(c if c.isalnum() else "-" for c in kernel.name)
    return f"{slug}-{digest.hexdigest()[:20]}.pt2"


def failure_path(kernel: Kernel) -> Path:
    """The file in which a failed :func:`build` of ``kernel`` leaves its error, so that later
    processes do not try again (delete it to retry)."""
    return package_path(kernel).with_suffix(".failed")


def _source(function: Callable) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return getattr(function, "__qualname__", repr(function))


class _Module(torch.nn.Module):
    def __init__(self, function: Callable) -> None:
        super().__init__()
        self.function = function

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        return self.function(*args)


def build(kernel: Kernel, options: dict) -> Path:
    """Export ``kernel``, build it with AOTInductor (inductor ``options``) and store it at
    :func:`package_path`; ~10 s a kernel on 2 CPU cores, plus ~5 s of imports once. A failure
    leaves its error in :func:`failure_path`.

    Raises:
        Exception: whatever exporting or building raises (no C++ compiler, say).
    """
    path = package_path(kernel)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _export_and_build(kernel, options, path)
    except Exception as error:
        failure_path(kernel).write_text(f"{type(error).__name__}: {error}")
        raise
    return path


def _export_and_build(kernel: Kernel, options: dict, path: Path) -> None:
    from torch._inductor import aoti_compile_and_package  # the compiler: only to build

    with warnings.catch_warnings(), tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        warnings.simplefilter("ignore", FutureWarning)  # the compiler's, not the user's to mend
        warnings.simplefilter("ignore", DeprecationWarning)
        exported = torch.export.export(
            _Module(kernel.function), kernel.examples(), dynamic_shapes=(kernel.dynamic_shapes(),)
        )
        partial = Path(scratch) / path.name
        aoti_compile_and_package(exported, package_path=str(partial), inductor_configs=options)
        os.replace(partial, path)


def load(path: Path) -> Callable[..., list[Tensor]]:
    """The built package at ``path`` as a function of its tensors, returning a list of
    tensors. Takes ~10 ms and imports no compiler.

    Raises:
        Exception: what the loader raises for a missing or damaged file.
    """
    loader_class = getattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader", None)
    if loader_class is None:  # a PyTorch without the C++ loader: the Python one
        from torch._inductor import aoti_load_package

        package = aoti_load_package(str(path))
        return lambda *args: list(package(*args))
    loader = loader_class(str(path), "model", False, 1, -1)
    return lambda *args: loader.run(list(args))


def call(function: Callable[..., list[Tensor]], args: Sequence[Tensor]) -> list[Tensor]:
    """``function(*args)`` on contiguous, detached copies-if-needed of ``args``: the built code
    assumes the row-major layout it was exported with, and forms derivatives itself."""
    return function(*(arg.detach().contiguous() for arg in args))
