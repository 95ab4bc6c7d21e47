"""The registered version as an MLflow Model: a ``pyfunc`` over our loader.

The folder holds ``MLmodel`` (flavour ``python_function``, signature, input example,
metadata naming the base model and its fingerprint), the model code
(:mod:`pipelines.serve.pyfunc_code`, run by MLflow on load, so nothing is pickled) and the
adapter folder as the artifact ``adapter``. The base model is never copied into a version:
``MLmodel``'s metadata and the adapter's ``pipeline`` block name it (built-in name, folder
or hub id) with the fingerprint ``peft_core.load_adapter`` checks on load.

Why ``pyfunc`` and not MLflow's transformers flavour: every method here (prompts, CoDA,
selective, Laplace-LoRA) loads through peft_core, which the transformers flavour cannot
call; a peft-format copy for other servers is what ``peftpipe export`` writes.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from peft_core.files import atomic_folder

from .local import ServeError, pipeline_info

ADAPTER_ARTIFACT = "adapter"
CODE = Path(__file__).with_name("pyfunc_code.py")


def base_fingerprint_id(fingerprint: dict[str, Any]) -> str:
    """A short, stable id of a base-model fingerprint (for tags and ``/health``)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def facts(adapter_dir: str | Path) -> dict[str, str]:
    """What a serving platform needs to know about an adapter, as flat strings (the version's
    tags and ``MLmodel`` metadata): base model reference and fingerprint, task, method."""
    import peft_core

    cfg = peft_core.read_adapter_config(adapter_dir)
    info = pipeline_info(adapter_dir)
    method = cfg["method"]
    return {
        "base_model": str(info["model"]),
        "base_fingerprint": base_fingerprint_id(cfg["base_model"]),
        "base_weights_sha256": str(cfg["base_model"].get("weights_sha256", "")),
        "task": str(info["task"]),
        "method": str(method.get("name", "")),
        "label_names": json.dumps(info.get("label_names")),
    }


def _signature(task: str):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, ParamSchema, ParamSpec, Schema

    if task == "classification":
        return ModelSignature(
            inputs=Schema([ColSpec(DataType.string, "text")]),
            outputs=Schema([ColSpec(DataType.string, "label"),
                            ColSpec(Map(DataType.double), "probabilities")]))
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string, "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, 64)]))


def _requirements() -> list[str]:
    """Pinned to this environment (MLflow would otherwise infer them by loading the model in
    a subprocess). peft-pipelines itself must be installed where the model is served."""
    reqs = []
    for dist in ("mlflow", "torch", "transformers", "safetensors", "peft-pipelines"):
        try:
            reqs.append(f"{dist}=={importlib_metadata.version(dist)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def save(adapter_dir: str | Path, dst: str | Path) -> Path:
    """Write the MLflow Model of ``adapter_dir`` at ``dst`` (atomically: a temp folder
    renamed into place)."""
    info = pipeline_info(adapter_dir)
    task = info["task"]
    example = ({"text": ["a wonderful, moving film"]} if task == "classification"
               else {"prompt": ["What is the capital of France?"]})
    import pandas as pd

    def write(tmp: Path) -> None:
        # MLflow (3.17) saves into an existing folder as long as it is empty
        mlflow.pyfunc.save_model(
            str(tmp), python_model=str(CODE), artifacts={ADAPTER_ARTIFACT: str(adapter_dir)},
            signature=_signature(task), input_example=pd.DataFrame(example),
            pip_requirements=_requirements(), metadata={"peftpipe": facts(adapter_dir)},
        )

    return atomic_folder(dst, write)


def _column(model_input: Any, name: str) -> list[str]:
    """Strings from a DataFrame column, a dict, a list or one string."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if name not in model_input.columns:
            raise ServeError(f"input: expected a column {name!r}, got {list(model_input.columns)}")
        values: list[str] = []
        for v in model_input[name]:  # a dict input may arrive as one row holding a list
            values += [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
        return values
    if isinstance(model_input, dict):
        v = model_input.get(name)
        if v is None:
            raise ServeError(f"input: expected the field {name!r}, got {sorted(model_input)}")
        return [str(x) for x in (v if isinstance(v, list) else [v])]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


class AdapterModel(mlflow.pyfunc.PythonModel):
    """``predict`` of a registered adapter: a DataFrame of ``label`` + ``probabilities``
    (classifiers) or ``text`` (causal LMs, ``params={"max_new_tokens": N}``)."""

    def load_context(self, context) -> None:
        from .local import load_folder

        self.adapter = load_folder(context.artifacts[ADAPTER_ARTIFACT])

    # The DataFrame hint is one MLflow infers no schema from: the logged signature stays the
    # one contract, and MLflow stops warning on every import that predict has no hints.
    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        from .local import generate_batch, predict

        if self.adapter.task == "classification":
            rows = predict(self.adapter, _column(model_input, "text"))
            return pd.DataFrame([{"label": r["label"], "probabilities": r["probabilities"]}
                                 for r in rows])
        n = int((params or {}).get("max_new_tokens", 64))
        rows = generate_batch(self.adapter, _column(model_input, "prompt"), max_new_tokens=n)
        return pd.DataFrame({"text": [r["text"] for r in rows]})
