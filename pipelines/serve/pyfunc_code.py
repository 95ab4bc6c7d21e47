"""The model code MLflow runs to load a registered version ("models from code": the model
object is built here on load, so no pickled Python object is stored in the registry)."""

import mlflow

from pipelines.serve.mlflow_model import AdapterModel

mlflow.models.set_model(AdapterModel())
