"""The model-from-code file MLflow runs to build the logged hypernetwork model (training/mlflow_model.py)."""

from mlflow.models import set_model

from horse_dist.training.mlflow_model import HyperNetEditorModel

set_model(HyperNetEditorModel())
