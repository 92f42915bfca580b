"""Reading the ``model.pt`` that scvi-tools' ``save`` writes, without running code from it.

A ``model.pt`` is a pickle (``torch.save``) of three entries: ``model_state_dict`` (tensors),
``var_names`` (a numpy array of gene names) and ``attr_dict`` (the model's settings and
registry: plain Python values and numpy arrays, and its training history as pandas
DataFrames). Unpickling an arbitrary file can run any code it names, so it is read here with
``torch.load(weights_only=True)``, whose unpickler builds only tensors, plain containers and
the types allowed explicitly:

* plain Python types scvi-tools uses: ``dict``, ``bytes`` and ``slice``, and its registry's
  ``collections.defaultdict``, read as a plain ``dict`` (its default factory is never kept);
* numpy arrays, dtypes and scalars (the gene names, category names and cell indices), built by
  numpy's own reconstruction functions, which create arrays and nothing else;
* anything from pandas (the training history, which pyrosc does not read) is *not* built: each
  pandas name stands for an inert :class:`Omitted` object that ignores its arguments and state,
  so no pandas code runs either.

Any other type in the file (a class of the model's author, ``os.system``, ...) is refused before
unpickling starts, with an error naming it: nothing in the file is ever called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

#: The file scvi-tools' ``save`` writes into a model directory.
MODEL_FILE = "model.pt"
#: What scvi-tools before 0.15 wrote instead (a separate pickle of its settings).
LEGACY_FILE = "model_params.pt"
#: The package whose objects are replaced by :class:`Omitted` stand-ins.
_OMITTED_PACKAGE = "pandas"


def _allowed_globals() -> dict[str, object]:
    """Name in a pickle -> the object it means, for the plain Python types scvi-tools stores and
    for numpy arrays, dtypes and scalars, as written by numpy 1 (``numpy.core``) and numpy 2
    (``numpy._core``). Building any of them runs no code of the file's choosing."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    names: dict[str, object] = {
        "builtins.dict": dict,
        "builtins.bytes": bytes,
        "builtins.slice": slice,
        "collections.defaultdict": _plain_dict,
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        names[f"{core}.multiarray._reconstruct"] = multiarray._reconstruct
        names[f"{core}.multiarray.scalar"] = multiarray.scalar
    # A dtype is rebuilt as an instance of its class (numpy.dtypes.Float64DType, ...): the
    # unpickler sets its state only if that class is allowed too.
    for name in getattr(np.dtypes, "__all__", ()):
        names[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return names


def _plain_dict(default_factory: Any = None) -> dict:
    """A ``collections.defaultdict`` of the file, as an empty plain ``dict`` (its items follow;
    the unpickler fills only plain dictionaries)."""
    return {}


class Omitted:
    """An object of the file that pyrosc does not read (a pandas DataFrame of the training
    history): built from nothing the file says, it ignores its arguments and its state.

    Attributes:
        name: the global the file named for it (``pandas.core.frame.DataFrame``), on the class.
    """

    name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Omitted:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<omitted {self.name}>"


def _stand_in(name: str) -> type[Omitted]:
    """A subclass of :class:`Omitted` for the global ``name``, which it records."""
    return type("Omitted", (Omitted,), {"name": name})


def read_model_file(directory: str | Path) -> dict[str, Any]:
    """The entries of ``directory/model.pt`` written by scvi-tools' ``save``, read without
    running code from the file.

    Returns:
        the saved dictionary: ``model_state_dict`` (name -> tensor, on the CPU), ``var_names``
        (numpy array) and ``attr_dict`` (settings and registry; pandas objects in it are
        :class:`Omitted`).

    Raises:
        FileNotFoundError: no directory or no ``model.pt`` in it (with a word on the legacy
            format).
        ValueError: the file names a type outside the allowed ones (named in the message), or
            is not a dictionary of scvi-tools' three entries.
    """
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        legacy = ""
        if (directory / LEGACY_FILE).is_file():
            legacy = (
                f" It holds {LEGACY_FILE}, scvi-tools' format before 0.15: convert it with "
                "scvi-tools' SCVI.convert_legacy_save first."
            )
        raise FileNotFoundError(
            f"no {MODEL_FILE} in {directory}: pass the directory that scvi-tools' "
            f"model.save(...) wrote.{legacy}"
        )
    allowed_names = _allowed_globals()
    found = get_unsafe_globals_in_checkpoint(path)
    omitted = [name for name in found if name.split(".")[0] == _OMITTED_PACKAGE]
    refused = sorted(set(found) - set(allowed_names) - set(omitted))
    if refused:
        raise ValueError(
            f"{path} names {', '.join(refused)}: a model.pt of scvi-tools holds tensors, numpy "
            "arrays and plain Python values only (and pandas tables, which are skipped). "
            "pyrosc will not unpickle other objects: building them could run code from the "
            "file. Nothing was loaded."
        )
    allowed = [(obj, name) for name, obj in allowed_names.items()]
    allowed += [(_stand_in(name), name) for name in omitted]
    with safe_globals(allowed):
        saved = torch.load(path, map_location="cpu", weights_only=True)
    expected = ("model_state_dict", "var_names", "attr_dict")
    if not isinstance(saved, dict) or any(key not in saved for key in expected):
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(
            f"{path} is not a model saved by scvi-tools' save(): expected a dictionary of "
            f"{', '.join(expected)}, found {keys}"
        )
    names = saved["var_names"]
    if not isinstance(names, (np.ndarray, list, tuple)):
        raise ValueError(
            f"{path} holds its gene names as a {type(names).__name__} ({names!r}), not as the "
            "numpy array scvi-tools' SCVI saves (a MuData model or another format)"
        )
    return saved
