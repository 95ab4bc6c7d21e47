"""The data stage: corpora -> validated, templated, tokenized, split Parquet on Ray Data.

Public API (the contract with the training stage): :class:`DataConfig`, :func:`prepare`,
:func:`load_manifest` and :class:`Manifest`; :class:`DataError` is every input problem
(no rows, all rejected, unreadable file, splits too small), naming the file, field or row. Real corpora for demos and tests live in
:mod:`pipelines.data.builtin`.
"""

from .config import DataConfig, DataError, MissingSourceError, SplitFractions
from .stage import dataset_id_for, prepare
from .store import Manifest, load_manifest

__all__ = ["DataConfig", "DataError", "Manifest", "MissingSourceError", "SplitFractions", "dataset_id_for", "load_manifest", "prepare"]
