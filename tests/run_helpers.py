"""Small helpers the test modules share (fixtures stay in conftest.py)."""

from pathlib import Path


def tmp_tracking(tmp_path: Path) -> list[str]:
    """Overrides that send a job's MLflow run to the test's folder: an evaluation tracks by default, and its
    default store (./mlflow.db) would land in the checkout the suite runs from."""
    return [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
