"""Sphinx configuration of pyrosc's documentation (``make docs``; warnings are errors).

The tutorials are rendered with the outputs committed in the notebooks: nothing is executed
at build time. The pages of the README's tour include its sections between ``<!-- docs:... -->``
markers, so the text lives in one place.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import pyrosc  # noqa: E402

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

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Notebooks: render the committed outputs, never execute.
nb_execution_mode = "off"
nb_merge_streams = True  # one block per stream, as in Jupyter
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 4  # GitHub-style slugs, so the README's #links resolve

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
