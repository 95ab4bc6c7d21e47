"""A search's outcome, in one form: :class:`SearchResult`, saved as ``run_dir/trials.json``.

No Ray here: ``peftpipe promote`` and ``report`` read a finished search back in another
process (:meth:`SearchResult.load`) without starting anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from peft_core.files import atomic_write_text

from .objective import Objective


@dataclasses.dataclass
class SearchResult:
    """Every trial's outcome (method, lr, metrics, history, status, adapter folder, MLflow
    run), the best under the objective and budget (None when no trial qualifies), and the
    Pareto front. ``objective``, ``reference`` (the score a trial must beat, see
    :func:`pipelines.report.reference`), ``label_names`` and ``dataset_id`` are filled in by
    the pipeline once the dataset is known."""

    search_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    pareto: list[dict[str, Any]]
    parent_run_id: str
    tracking_uri: str
    path: str | None = None  # the Tune experiment folder (absent in files of older runs)
    objective: Objective | None = None
    reference: dict[str, Any] | None = None
    label_names: list[str] | None = None
    dataset_id: str | None = None

    def to_json(self) -> str:
        """The ``trials.json`` text: the front is stored as trial ids (its trials are in
        ``trials`` already)."""
        data = dataclasses.asdict(self)
        data["pareto"] = [p["trial_id"] for p in self.pareto]
        data["objective"] = self.objective.model_dump() if self.objective else None
        return json.dumps(data, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str, where: str = "trials.json") -> SearchResult:
        """Read :meth:`to_json`'s text back; a missing field is named with ``where``."""
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        by_id = {t["trial_id"]: t for t in data["trials"]}
        data["pareto"] = [by_id[p] if isinstance(p, str) else p for p in data["pareto"]]
        if data.get("objective") is not None:
            data["objective"] = Objective.model_validate(data["objective"])
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (a reader never sees half a file)."""
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        path = Path(path)
        return cls.from_json(path.read_text(), where=str(path))


class SearchInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the search (its Tune state is saved: the same command
    resumes it). A KeyboardInterrupt, so no ``except Exception`` takes it for a failure."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name
