"""Apply a batch of edits with a trained hypernetwork and export the edited model.

    python -m horse_dist.edit checkpoint=runs/<run> edits=FILE out=DIR [overwrite=true] [key=value ...]

FILE is a JSON list of {"prompt": ..., "answer": ...} objects, or any dataset file the data readers accept
(zsRE, CounterFact; its edit prompt and target answer are used). DIR receives a plain Hugging Face model with
the shifts merged into the weights, loadable with `AutoModelForCausalLM.from_pretrained(DIR)`. A non-empty DIR
is replaced only with overwrite=true and only if an earlier edit wrote it; DIR may never hold the checkpoint or
the working folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from horse_dist.cli import run_cli, setup_logging
from horse_dist.config import ConfigError, config_from_yaml, load_config_with_extras, print_config, split_cli
from horse_dist.data import DataFormatError, load_records, read_json
from horse_dist.lm.export import check_export_target, save_edited_model
from horse_dist.training.assembly import build_engine
from horse_dist.training.checkpoint import load_checkpoint, resolve_checkpoint_path
from horse_dist.training.edit_call import apply_edits

log = logging.getLogger("horse_dist.edit")

EXTRAS = ("checkpoint", "edits", "out", "overwrite")


def load_edit_requests(path: str | Path, target: str = "new") -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a {prompt, answer} list or a dataset file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edits file not found: {path}")
    data = read_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and set(data[0]) == {"prompt", "answer"}:
        requests = []
        for index, record in enumerate(data):
            for field in ("prompt", "answer"):
                value = record.get(field) if isinstance(record, dict) else None
                if not isinstance(value, str) or not value.strip():
                    raise DataFormatError(str(path), "expected a non-empty string", index, field)
            requests.append((record["prompt"], record["answer"].strip()))
        return requests
    requests = [(r.prompt, r.answer) for r in load_records(path, target=target)]
    if not requests:
        raise DataFormatError(str(path), "no edit requests")
    return requests


def main(argv: list[str] | None = None) -> dict[str, float]:

    setup_logging()
    cli = split_cli(sys.argv[1:] if argv is None else argv)
    overrides = cli.overrides
    _, extras = load_config_with_extras(cli.config_file, overrides, extras=EXTRAS)
    missing = [k for k in ("checkpoint", "edits", "out") if k not in extras]
    if missing:
        raise ConfigError(f"edit needs {', '.join(f'{k}=...' for k in missing)}")
    overwrite = extras.get("overwrite", "false").lower()
    if overwrite not in ("true", "false"):
        raise ConfigError(f"overwrite={extras['overwrite']}: expected true or false")
    checkpoint = resolve_checkpoint_path(extras["checkpoint"])
    # fail before the model loads: an out= that would replace the checkpoint, the working folder or a folder
    # we did not write is refused here
    check_export_target(Path(extras["out"]).expanduser().resolve(), overwrite == "true", [checkpoint.parent])
    state = load_checkpoint(checkpoint)
    rest = [o for o in overrides if o.split("=", 1)[0] not in EXTRAS]
    cfg = config_from_yaml(state["config"], rest)
    if cli.show_config:
        return print_config(cfg, "edit")
    engine, tokenizer = build_engine(cfg)
    engine.bank.load_state_dict(state["hypernet"])
    requests = load_edit_requests(extras["edits"], cfg.data.target)
    shifts, timings = apply_edits(engine, tokenizer, requests)
    metadata = {"checkpoint": str(extras["checkpoint"]), "n_edits": len(requests), "method": cfg.method.name}
    metadata.update(timings)
    out = save_edited_model(
        engine.model,
        tokenizer,
        dict(zip(engine.module_names, shifts)),
        extras["out"],
        metadata,
        overwrite=overwrite == "true",
        protect=[checkpoint.parent],
    )
    print(  # noqa: T201
        f"edited {len(requests)} facts in {timings['edit_seconds']:.2f}s "
        f"({timings['edits_per_s']:.1f} edits/s; edit success {timings['edit_success']:.3f}); saved to {out}"
    )
    return timings


if __name__ == "__main__":
    run_cli(main)
