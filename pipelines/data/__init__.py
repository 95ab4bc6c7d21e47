"""The data stage: corpora -> validated, templated, tokenized, split Parquet on Ray Data.

Public API (the contract with the training stage): :class:`DataConfig`, :func:`prepare`,
:func:`load_manifest`, :func:`read_manifest` and :class:`Manifest`
(:mod:`pipelines.data.manifest`); :class:`DataError` is every input problem (no rows, all
rejected, unreadable file, splits too small), naming the file, field or row. Real corpora
for demos and tests live in :mod:`pipelines.data.builtin`.

Importing the package imports no Ray: the manifest and the config are all a later stage
(or a recipe check) needs; :func:`prepare` and :func:`dataset_id_for` load the stage on
first use.
"""

from typing import Any

from .config import DataConfig, DataError, MissingSourceError, SplitFractions
from .manifest import TASKS, DatasetError, Manifest, read_manifest

_STAGE = {"prepare": "stage", "dataset_id_for": "stage", "load_manifest": "store"}


def __getattr__(name: str) -> Any:
    # PEP 562: the Ray Data stage (and pyarrow's writers) load when first asked for
    if name in _STAGE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_STAGE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "TASKS", "DataConfig", "DataError", "DatasetError", "Manifest", "MissingSourceError",
    "SplitFractions", "dataset_id_for", "load_manifest", "prepare", "read_manifest",
]
