"""The documentation builds with no warning, and every public name has a page.

Runs ``sphinx-build -W --keep-going`` (what ``make docs`` runs) into a temporary folder. The
tutorials are rendered from their committed outputs, not executed, so the build takes well
under a minute. Skipped where the docs tools (the ``docs`` extra) are not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyrosc

for _tool in ("sphinx", "myst_nb", "furo"):
    pytest.importorskip(_tool, reason="the docs extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(ROOT / "docs"), str(out / "html")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-6000:]}"
    return out / "html"


def test_every_public_name_has_a_page(site):
    pages = site / "generated"
    missing = [name for name in pyrosc.__all__ if not (pages / f"pyrosc.{name}.html").exists()]
    assert missing == []
    for module in (pyrosc.models, pyrosc.guides):
        for name in module.__all__:
            function = getattr(module, name)  # gmvae_marginal_guide is vae_guide: its page
            assert (pages / f"{function.__module__}.{function.__name__}.html").exists(), name


def test_tutorials_render_with_their_figures(site):
    """Every figure among a notebook's committed outputs is an image on its page."""
    for path in TUTORIALS:
        notebook = json.loads(path.read_text())
        figures = sum(
            any(kind.startswith("image/") for kind in output.get("data", {}))
            for cell in notebook["cells"]
            for output in cell.get("outputs", [])
        )
        html = (site / "tutorials" / f"{path.stem}.html").read_text()
        images = re.findall(r"<img [^>]*src=\"[^\"]*_images/", html)
        assert len(images) >= figures, f"{path.name}: {len(images)} images of {figures} figures"


def test_readme_sections_are_on_the_site(site):
    """The README's tour is included between markers; a moved marker would empty a page."""
    for page, text in [
        ("getting_started", "Quick start"),
        ("guide", "Ask the model"),
        ("contract", "Your own model"),
        ("tutorials", "A VAE for counts"),
        ("benchmarks", "Reference mapping against scvi-tools"),
    ]:
        assert text in (site / f"{page}.html").read_text(), page
