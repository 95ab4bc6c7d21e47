"""Training objectives (the objective seam, :mod:`.base`): one module each, registered by
name. ``train.objective`` picks one; the default follows the dataset's task."""

from . import causal_lm, classification  # noqa: F401  (register the built-in objectives)
from .base import EvalSums, Objective, available, get, objective_for, register

__all__ = ["EvalSums", "Objective", "available", "get", "objective_for", "register"]
