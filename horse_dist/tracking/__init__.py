"""Experiment tracking: one MLflow run per job (rank 0 only), its metrics queue, tags and plots. It imports
only the config; the hypernetwork as an MLflow model lives with training (training/mlflow_model.py)."""
