"""The trained hypernetwork as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/<name>/<version>")`.

A model from code (MLflow's recommended form, nothing pickled): `mlflow_model_code.py` names the model class
below. The model folder holds the hypernetwork's weights only, `hypernetwork.safetensors` (the resolved run
config and the edited modules in its metadata; no optimizer state), an input example, pinned requirements and
this package itself (`code/horse_dist`), so it loads where horse_dist is not installed. Loading it loads the
frozen LM named in the config (model.source: a local folder, the bundled alias or a hub id) and the
hypernetwork; `predict` takes a table of facts (`prompt`, `answer`), edits them into the LM in one batch and
returns, per fact, the unedited and the edited model's teacher-forced token accuracy on the answer.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from horse_dist.config import config_from_yaml
from horse_dist.data import tokenize_example
from horse_dist.lm.passes import score_pass
from horse_dist.training.assembly import build_engine
from horse_dist.training.checkpoint import load_checkpoint
from horse_dist.training.edit_call import apply_edits

REQUIRED_COLUMNS = ("prompt", "answer")
WEIGHTS = "hypernetwork.safetensors"
CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# what importing the package and loading a model needs (the LM's own extras, e.g. gguf, come with the source)
REQUIREMENTS = ("torch", "transformers", "safetensors", "omegaconf", "pyyaml", "pandas", "mlflow")


class HyperNetEditorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        path = context.artifacts["weights"]
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        cfg = config_from_yaml(metadata["config"], ["tracking.enabled=false"])
        self.engine, self.tokenizer = build_engine(cfg)
        trained_on = json.loads(metadata["edit_modules"])
        if trained_on and trained_on != list(self.engine.module_names):
            raise ValueError(
                f"{path}: trained on modules {trained_on}, the config resolves to {self.engine.module_names}"
            )
        self.engine.bank.load_state_dict(load_file(path))

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


def save_weights(checkpoint: str | Path, path: Path) -> Path:
    """The checkpoint's hypernetwork as safetensors, its config and edited modules as metadata."""
    state = load_checkpoint(checkpoint)
    tensors = {k: v.contiguous() for k, v in state["hypernet"].items()}
    metadata = {"config": state["config"], "edit_modules": json.dumps(list(state.get("edit_modules") or []))}
    save_file(tensors, str(path), metadata=metadata)
    return path


def pinned_requirements() -> list[str]:
    """This environment's versions of what the model needs (horse_dist itself ships in the model)."""
    # without a local label (2.13.0+cpu -> 2.13.0): the server picks its own build of that version
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def save_pyfunc_model(checkpoint: str | Path, folder: str | Path) -> Path:
    """Write the pyfunc model folder to `folder`/hypernetwork."""
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
    weights = save_weights(checkpoint, Path(folder) / WEIGHTS)
    path = Path(folder) / "hypernetwork"
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(CODE_FILE),
        artifacts={"weights": str(weights)},
        code_paths=[str(PACKAGE_DIR)],
        signature=signature,
        input_example=pd.DataFrame({"prompt": ["Which city is the capital of France?"], "answer": ["Paris"]}),
        # Listed, not inferred: inference imports and runs the model, which would load the LM here.
        pip_requirements=pinned_requirements(),
    )
    return path
