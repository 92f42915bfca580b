"""Sphinx configuration of pyrosc's documentation (``make docs``; warnings are errors).

The tutorials are rendered with the outputs committed in the notebooks: nothing is executed
at build time. The pages of the README's tour include its sections between ``<!-- docs:... -->``
markers, so the text lives in one place.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import pyrosc  # noqa: E402

# The tutorials and the benchmark result files are rendered from their own folders: copied in
# (fresh at every build, not committed; a symlink would resolve outside the source folder and
# break the links between pages), so the README's links (tutorials/..., benchmarks/...) and the
# notebooks' links to each other resolve as they do on GitHub.
DOCS = Path(__file__).resolve().parent
# The pages include the README's sections from a copy beside them, so that its relative links
# (tutorials/..., benchmarks/...) resolve from docs/, where the copies above are.
shutil.copy2(ROOT / "README.md", DOCS / "_readme.md")
# autosummary never deletes a page it no longer generates: start from none at every build.
shutil.rmtree(DOCS / "generated", ignore_errors=True)
for folder, patterns in [("tutorials", ["*.ipynb"]), ("benchmarks", ["*.md", "*.png"])]:
    shutil.rmtree(DOCS / folder, ignore_errors=True)
    (DOCS / folder).mkdir()
    for pattern in patterns:
        for source in sorted((ROOT / folder).glob(pattern)):
            shutil.copy2(source, DOCS / folder / source.name)

project = "pyrosc"
author = "the pyrosc authors"
copyright = "2026, the pyrosc authors"
release = version = pyrosc.__version__

extensions = [
    "myst_nb",  # Markdown pages (MyST) and notebooks; includes myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # the docstrings' Google style: Args, Returns, Raises
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# .rst first: autosummary writes its generated pages with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_readme.md", "_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Notebooks: render the committed outputs, never execute.
nb_execution_mode = "off"
nb_merge_streams = True  # one block per stream, as in Jupyter
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 4  # GitHub-style slugs, so the README's #links resolve
# A page's own title stands where the README has a level-2 heading, so the README's level-3
# headings below it skip a level; that is how the README is written, not an error.
suppress_warnings = ["myst.header"]

# API reference: one generated page per public name.
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each attribute
napoleon_use_rtype = False

html_theme = "furo"
html_title = f"pyrosc {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
