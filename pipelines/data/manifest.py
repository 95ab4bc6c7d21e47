"""The tokenized dataset's manifest: the one model of ``manifest.json``, the contract between
the data stage and every stage after it (train, tune, promote and the registry, report).

Imports no Ray: a driver that only trains, promotes or reports reads it without the data
stage's machinery.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError
from .config import SPLITS, Task

#: bump when the output of the same inputs changes (templates, columns, split rule)
FORMAT_VERSION = 2  # 2: strict CSV, oversized and label-type rejects, duplicates counted
#: the tasks a dataset can be tokenized for (``data.task``)
TASKS: tuple[str, ...] = get_args(Task)
#: the splits a stage after data cannot do without
NEEDED_SPLITS = ("train", "eval")


class DatasetError(InputError):
    """The manifest or its splits are missing or do not fit the stage reading them."""


class Manifest(BaseModel):
    """``manifest.json``: what the dataset is, how it was made, and how big each split is.

    The fields a later stage reads are required; the data stage's bookkeeping (sources,
    config, counts) has defaults, so a dataset written by other tools needs only the
    contract: task, tokenizer, padding, labels, rows and the Parquet splits."""

    model_config = ConfigDict(extra="ignore")

    dataset_id: str
    format_version: int = FORMAT_VERSION
    task: Task
    tokenizer: dict[str, Any]  # name (as given), identity (hash), class
    max_length: int | None = None
    pad_token_id: int | None
    padding_side: Literal["left", "right"] = "right"
    template: dict[str, Any] = Field(default_factory=dict)
    label_names: list[str] | None = None
    num_labels: int | None = 0
    rows: dict[str, int] = Field(default_factory=dict)
    tokens: dict[str, int] = Field(default_factory=dict)
    documents: dict[str, int] = Field(default_factory=dict)
    # the tokens the loss is taken on per split (a language model's labelled positions,
    # a classifier's rows)
    trained_tokens: dict[str, int] = Field(default_factory=dict)
    rejected: int = 0
    rejected_by_kind: dict[str, int] = Field(default_factory=dict)
    # exact duplicate rows found (every task field equal), counted whether or not ``dedup``
    # dropped them; ``duplicates_dropped`` is how many were dropped
    duplicates: int = 0
    duplicates_dropped: int = 0
    # kept rows whose tokens fill max_length: longer inputs were truncated there (the rule
    # for over-long rows below max_chars), counted so the cut is never silent
    rows_at_max_length: int = 0
    # the label values of the data in class order (``label_names`` are their display names)
    label_values: list[str] | None = None
    # rows per class in each split, by class name (classification)
    label_counts: dict[str, dict[str, int]] = Field(default_factory=dict)
    # the first valid input of each split (shown to the user, e.g. as the serve hint)
    examples: dict[str, str] = Field(default_factory=dict)
    read_rows: int = 0
    columns: dict[str, str] = Field(default_factory=dict)
    sources: list[dict[str, Any]] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    path: str = ""
    cache_hit: bool = Field(False, exclude=True)  # set by prepare(), never stored

    @model_validator(mode="after")
    def _count_classes(self) -> Manifest:
        # a manifest written by other tools may name its classes without counting them
        if not self.num_labels and self.label_names:
            self.num_labels = len(self.label_names)
        return self

    @property
    def folder(self) -> Path:
        return Path(self.path)

    @property
    def is_lm(self) -> bool:
        return self.task != "classification"

    @property
    def tokenizer_name(self) -> str | None:
        """The tokenizer as the recipe named it (what serving loads again)."""
        return self.tokenizer.get("name")

    def split_path(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return str(Path(self.path) / split)


def manifest_dir(manifest: Manifest | str | Path) -> Path:
    """The dataset folder of ``manifest``: a Manifest (its ``path``), a folder, or the path
    of a ``manifest.json``; absolute (Ray Train workers run in their own directory)."""
    path = manifest.path if isinstance(manifest, Manifest) else manifest
    if not isinstance(path, (str, Path)) or not str(path):
        raise DatasetError("manifest: expected a Manifest, a dataset folder or a "
                           f"manifest.json path, got {manifest!r}")
    path = Path(path).expanduser().resolve()
    if path.name == "manifest.json":
        path = path.parent
    if not (path / "manifest.json").is_file():
        raise DatasetError(f"manifest: no manifest.json in {str(path)!r}; run the data stage first")
    return path


def read_manifest(manifest: Manifest | str | Path) -> Manifest:
    """The manifest of a dataset folder (or of a Manifest's folder, read again), checked for
    what the stages after data rely on: each bad field named with the file."""
    folder = manifest_dir(manifest)
    file = folder / "manifest.json"
    try:
        raw = json.loads(file.read_text())
    except ValueError as e:
        raise DatasetError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DatasetError(f"{file}: expected a JSON object")
    raw.setdefault("dataset_id", folder.name)
    try:
        m = Manifest.model_validate({**raw, "path": str(folder)})
    except ValidationError as e:
        errors = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                           for err in e.errors())
        raise DatasetError(f"{file}: {errors}") from None
    if m.task == "classification" and not m.num_labels:
        raise DatasetError(f"{file}: a classification dataset needs num_labels")
    for split in NEEDED_SPLITS:
        if not (folder / split).is_dir():
            raise DatasetError(f"{folder}: split folder {split!r} is missing")
    if isinstance(manifest, Manifest):
        m.cache_hit = manifest.cache_hit
    return m
