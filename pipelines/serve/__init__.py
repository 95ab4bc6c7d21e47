"""Serving trained and registered adapters.

In-process (what ``peftpipe predict``/``generate`` and the evaluation use):

- :func:`load` an adapter folder or a ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` URI
  onto its base model; :func:`predict` (classifiers: label and probabilities; a fitted
  ``laplace_lora`` answers with its posterior predictive) and :func:`generate` /
  :func:`generate_batch` (causal LMs, greedy); :func:`pipeline_info` reads the adapter's
  ``pipeline`` block (base model, task, tokenizer, labels).
- :mod:`pipelines.serve.adapters`: :class:`~pipelines.serve.adapters.SharedBase`, one base
  model that many adapters attach to (the base's frozen tensors are shared, not copied).
- :mod:`pipelines.serve.mlflow_model`: the registered version as an MLflow Model (a
  ``pyfunc`` over this loader, with signature and input example), so
  ``mlflow.pyfunc.load_model("models:/NAME@champion")`` predicts.

Over HTTP: :mod:`pipelines.serve.app` (imported on demand; needs ``ray[serve]``), the Ray
Serve application behind ``peftpipe serve``: ``POST /predict``, ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /health``; it follows a registry alias (every replica
loads the new version), multiplexes an LRU of adapters over one base per replica and batches
requests. Its deployments: :mod:`pipelines.serve.replica` (``AdapterReplica``) and
:mod:`pipelines.serve.ingress` (``Api``), bound with one
:class:`~pipelines.serve.settings.AppSettings`; requests and answers:
:mod:`pipelines.serve.protocol`.
"""

from .local import (
    LoadedAdapter,
    ServeError,
    class_probs,
    generate,
    generate_batch,
    load,
    load_base,
    load_folder,
    pipeline_info,
    predict,
    uses_posterior,
)

__all__ = [
    "LoadedAdapter",
    "ServeError",
    "class_probs",
    "generate",
    "generate_batch",
    "load",
    "load_base",
    "load_folder",
    "pipeline_info",
    "predict",
    "uses_posterior",
]
