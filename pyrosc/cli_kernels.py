"""``pyrosc build-kernels``: build the fused likelihood's kernels ahead of the first fit.

A fit builds them itself when it plans enough steps (:mod:`pyrosc._fast.compiled`), once per
machine; this command does it beforehand, for example in a container image or before starting
the processes of a distributed fit, so that no fit pays the ~30 s.
"""

from __future__ import annotations

import argparse
import sys
import time

from pyrosc._fast import ahead, compiled


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the ``build-kernels`` subcommand to the ``pyrosc`` parser's ``commands``."""
    build = commands.add_parser(
        "build-kernels",
        help="build the fused likelihood's kernels into the cache (once per machine)",
        description="Build the NB and ZINB training kernels ahead of time into pyrosc's cache "
        "($PYROSC_CACHE_DIR, else $XDG_CACHE_HOME/pyrosc, else ~/.cache/pyrosc), where every "
        "later process loads them in milliseconds. Needs a C++ compiler; without one, fits "
        "run the eager code.",
    )
    build.add_argument(
        "--rebuild", action="store_true", help="build again even where a package is there"
    )


def build_kernels_command(args: argparse.Namespace) -> int:
    """Build each kernel that is not built (all with ``--rebuild``) and check that it loads."""
    for kernel in compiled.KERNELS:
        path = ahead.package_path(kernel)
        start = time.perf_counter()
        try:
            if args.rebuild or not path.exists():
                ahead.failure_path(kernel).unlink(missing_ok=True)
                ahead.build(kernel, compiled.INDUCTOR_OPTIONS)
                what = f"built in {time.perf_counter() - start:.1f} s"
            else:
                what = "already built"
            ahead.load(path)
        except Exception as error:  # noqa: BLE001 - the compiler's errors are of many kinds
            print(
                f"pyrosc: error: could not build {kernel.name!r} ({type(error).__name__}: "
                f"{str(error)[:500]}); fits will run the eager code",
                file=sys.stderr,
            )
            return 1
        print(f"{kernel.name}: {what}: {path}")
    return 0
