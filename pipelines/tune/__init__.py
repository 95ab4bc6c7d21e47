"""The search stage: Ray Tune over peft_core methods, ranks and learning rates.

Public API: :class:`TuneConfig`, :class:`SearchSpace`, :class:`Objective`,
:func:`pareto_front`, :func:`search` -> :class:`SearchResult`.
"""

from .config import TuneConfig
from .objective import Objective, pareto_front
from .result import SearchResult
from .space import Range, SearchSpace


def search(*args, **kwargs):
    """See :func:`pipelines.tune.stage.search` (imported lazily: it pulls in Ray Tune)."""
    from .stage import search as _search

    return _search(*args, **kwargs)


__all__ = [
    "Objective", "Range", "SearchResult", "SearchSpace", "TuneConfig", "pareto_front", "search",
]
