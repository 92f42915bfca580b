"""Kernels built ahead of time (pyrosc._fast.ahead): built once into a cache on disk, loaded by
later processes without the compiler, rebuilt when damaged, and skipped by a short fit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from pyrosc._fast import ahead, compiled


def _add_one(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x + 1, (x * y).sum(0)


ADD_ONE = ahead.Kernel("test add one", _add_one, ("cells genes", "genes"))


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A cache with nothing built, and a process that has loaded nothing."""
    monkeypatch.setenv("PYROSC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "_KERNELS", {})
    monkeypatch.setattr(compiled, "_FAILED", [])


def test_a_short_fit_builds_nothing_a_long_one_builds_for_every_size(empty_cache) -> None:
    x, y = torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, -2.0])
    path = ahead.package_path(ADD_ONE)
    with compiled.planned_steps(compiled.COMPILE_MIN_STEPS - 1):
        assert compiled.run(ADD_ONE, x, y) is None  # not worth building
    assert not path.exists()
    with compiled.planned_steps(compiled.COMPILE_MIN_STEPS):
        plus_one, dot = compiled.run(ADD_ONE, x, y)
    assert path.exists()
    torch.testing.assert_close(plus_one, x + 1)
    torch.testing.assert_close(dot, (x * y).sum(0))
    compiled._KERNELS.clear()  # as a new process: a short fit loads what is built
    with compiled.planned_steps(1):
        for cells, genes in [(5, 7), (1, 1), (200, 3)]:  # any size, 1 included
            x, y = torch.randn(cells, genes), torch.randn(genes)
            plus_one, dot = compiled.run(ADD_ONE, x.t().contiguous().t(), y)  # column-major x
            torch.testing.assert_close(plus_one, x + 1)
            torch.testing.assert_close(dot, (x * y).sum(0))
    assert not compiled._SHORT_FIT[0]  # the setting ends with the fit
    compiled._KERNELS.clear()
    path.write_bytes(b"not a package")  # damaged on disk: rebuilt
    plus_one, _ = compiled.run(ADD_ONE, x, y)
    torch.testing.assert_close(plus_one, x + 1)
    assert compiled.enabled()


def test_a_built_kernel_loads_in_a_new_process_without_the_compiler() -> None:
    theta = torch.rand(30) * 5 + 0.1
    assert compiled.run(compiled.GENE_TERMS, theta) is not None  # built here if need be
    code = textwrap.dedent(
        """
        import sys, time, torch
        from pyrosc._fast import compiled, tables
        theta = torch.rand(30) * 5 + 0.1
        start = time.perf_counter()
        with compiled.planned_steps(1):  # a short fit: it would not build, it must load
            terms = compiled.run(compiled.GENE_TERMS, theta)
        seconds = time.perf_counter() - start
        assert terms is not None, "the built kernel was not found"
        for term, expected in zip(terms, tables.gene_terms(theta), strict=True):
            torch.testing.assert_close(term, expected)
        compiler = [name for name in ("torch._dynamo", "torch._inductor") if name in sys.modules]
        assert not compiler, f"loading imported {compiler}"
        print(seconds)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) < 2.0, f"loading took {done.stdout} s"


def test_the_package_name_changes_with_what_the_code_depends_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("PYROSC_CACHE_DIR", str(tmp_path))
    here = ahead.package_path(ADD_ONE)
    assert here.parent == tmp_path / "kernels"
    other_shapes = ahead.Kernel(ADD_ONE.name, _add_one, ("cells genes", "cells genes"))
    assert ahead.package_path(other_shapes) != here
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "another ISA")
    ahead._file_name.cache_clear()  # (read once per process)
    assert ahead.package_path(ADD_ONE) != here
    monkeypatch.undo()
    ahead._file_name.cache_clear()
    assert ahead.package_path(ADD_ONE).name == here.name
    monkeypatch.delenv("PYROSC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ahead.cache_dir() == tmp_path / "xdg" / "pyrosc"
    (tmp_path / "a file").write_text("")  # a cache that cannot be created: the temporary one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))
    assert ahead.cache_dir().parent == Path(tempfile.gettempdir())


def test_the_build_kernels_command_builds_once_and_reports_a_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys
) -> None:
    """``pyrosc build-kernels``: with nothing to build it loads and lists every kernel; a build
    that fails is an error message and exit status 1, not a traceback."""
    from pyrosc.cli import main

    assert main(["build-kernels"]) == 0  # builds what this machine lacks, then lists all
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [k.name for k in compiled.KERNELS]
    assert main(["build-kernels"]) == 0
    assert all("already built" in line for line in capsys.readouterr().out.splitlines())

    def broken_build(kernel, options, path):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv("PYROSC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ahead, "_export_and_build", broken_build)
    assert main(["build-kernels"]) == 1
    error = capsys.readouterr().err
    assert "could not build 'gene terms' (RuntimeError: no C++ compiler)" in error


def test_a_temporary_cache_of_another_user_is_not_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The fallback folder in the shared temporary directory: one that someone else made
    (whose libraries this process would load) is passed over for a fresh private one."""
    import os

    (tmp_path / "a file").write_text("")
    monkeypatch.delenv("PYROSC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file"))  # the default cannot be made
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ahead.getpass, "getuser", lambda: "someone")
    planted = tmp_path / "pyrosc-someone"
    planted.mkdir()
    try:
        os.chown(planted, 65534, 65534)
    except PermissionError:
        pytest.skip("changing a folder's owner needs root")
    ahead._writable_or_temporary.cache_clear()
    chosen = ahead.cache_dir()
    ahead._writable_or_temporary.cache_clear()
    assert chosen != planted and chosen.parent == tmp_path and chosen.stat().st_uid == os.getuid()
