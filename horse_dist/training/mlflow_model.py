"""The trained hypernetwork as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/<name>/<version>")`.

The model folder holds the training checkpoint (hypernetwork weights + resolved config) as an artifact. Loading
it loads the frozen LM named in that config (model.source: a local folder, the bundled alias or a hub id) and
the hypernetwork; `predict` takes a table of facts (`prompt`, `answer`), edits them into the LM in one batch and
returns, per fact, whether the edited model now predicts the answer (teacher-forced token accuracy) and the
unedited model's accuracy. The package must be installed where the model is loaded (`pip install horse_dist`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from horse_dist.config import config_from_yaml
from horse_dist.data import tokenize_example
from horse_dist.lm.passes import score_pass
from horse_dist.training.assembly import build_engine
from horse_dist.training.checkpoint import load_checkpoint
from horse_dist.training.edit_call import apply_edits

REQUIRED_COLUMNS = ("prompt", "answer")


class HyperNetEditorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:

        state = load_checkpoint(context.artifacts["checkpoint"])
        cfg = config_from_yaml(state["config"], ["tracking.enabled=false"])
        self.engine, self.tokenizer = build_engine(cfg)
        self.engine.bank.load_state_dict(state["hypernet"])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:

        missing = [c for c in REQUIRED_COLUMNS if c not in model_input.columns]
        if missing:
            raise ValueError(f"input table lacks column(s) {missing}; expected {list(REQUIRED_COLUMNS)}")
        requests = [(str(p), str(a).strip()) for p, a in zip(model_input["prompt"], model_input["answer"])]
        shifts, _ = apply_edits(self.engine, self.tokenizer, requests)
        stop = self.engine.stop_id
        examples = [tokenize_example(self.tokenizer, prompt, answer, stop) for prompt, answer in requests]
        batches = self.engine.micro_batches(examples)
        engine, n = self.engine, len(requests)
        # both passes share the blocks below the edited ones
        logits = engine.resumed_logits(engine.shared_hidden())
        before = score_pass(
            engine.model, engine.hooks, batches, n, logits_fn=logits, unscored_label=stop
        ).accuracy
        after = score_pass(engine.model, engine.hooks, batches, n, shifts, None, logits, stop).accuracy
        return pd.DataFrame(
            {
                "prompt": model_input["prompt"],
                "answer": model_input["answer"],
                "unedited": before,
                "edited": after,
            }
        )


def save_pyfunc_model(checkpoint: str | Path, folder: str | Path) -> Path:
    """Write the pyfunc model folder (MLmodel + checkpoint artifact) to `folder`/hypernetwork."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "answer")]),
        outputs=Schema(
            [
                ColSpec("string", "prompt"),
                ColSpec("string", "answer"),
                ColSpec("double", "unedited"),
                ColSpec("double", "edited"),
            ]
        ),
    )
    path = Path(folder) / "hypernetwork"
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=HyperNetEditorModel(),
        artifacts={"checkpoint": str(checkpoint)},
        signature=signature,
        # Listed, not inferred: inference imports and runs the model, which would load the LM here.
        pip_requirements=["horse_dist", "torch", "transformers", "pandas"],
    )
    return path
