"""The key prior (method.key_prior=c0): whitening identities in float64, gradients, and a training run."""

import json
from pathlib import Path

import pytest
import torch
from run_helpers import tmp_tracking
from tiny_models import TINY_RUN_OVERRIDES

from horse_dist import evaluate, train
from horse_dist.config import ConfigError, load_config
from horse_dist.data import IGNORE_INDEX
from horse_dist.editor.prior import layer_shift, prior_whitening, whiten_keys, whitened_shift_grad
from horse_dist.training.assembly import build_engine, load_data
from horse_dist.training.checkpoint import load_checkpoint

N, D_IN, D_OUT = 7, 5, 3
HEAD_FILE = Path(__file__).resolve().parent.parent / "data/zsre/zsre_mend_eval_head.json"


def correlated_keys(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix_II = torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64)
    return torch.randn(n, D_IN, generator=g, dtype=torch.float64) @ mix_II + 2.0  # uncentred, like FFN keys


def test_whitened_identity_ridge_equals_the_c0_ridge_in_float64():
    keys0_MI = correlated_keys(200, 0)
    damping, lam = 1e-3, 3.7
    w_II = prior_whitening(keys0_MI.T @ keys0_MI, keys0_MI.shape[0], damping).double()
    c0_II = keys0_MI.T @ keys0_MI / keys0_MI.shape[0]
    c0_II = c0_II + damping * c0_II.trace() / D_IN * torch.eye(D_IN, dtype=torch.float64)
    torch.testing.assert_close(w_II.T @ c0_II @ w_II, torch.eye(D_IN, dtype=torch.float64), atol=1e-5, rtol=0)

    keys_NI, delta_NO = correlated_keys(N, 1), torch.randn(N, D_OUT, dtype=torch.float64)
    expected_IO = torch.linalg.solve(keys_NI.T @ keys_NI + lam * c0_II, keys_NI.T @ delta_NO)
    white_NI = whiten_keys(keys_NI, w_II)
    solved_IO = torch.linalg.solve(
        white_NI.T @ white_NI + lam * torch.eye(D_IN, dtype=torch.float64), white_NI.T @ delta_NO
    )
    torch.testing.assert_close(layer_shift(solved_IO, w_II), expected_IO, atol=1e-5, rtol=1e-5)
    # a raw key sees through the layer shift what its whitened key sees through the solve's shift
    torch.testing.assert_close(keys_NI @ layer_shift(solved_IO, w_II), white_NI @ solved_IO)


def test_whitened_shift_grad_is_the_chain_rule():
    w_II = torch.randn(D_IN, D_IN, dtype=torch.float64)
    solved_IO = torch.randn(D_IN, D_OUT, dtype=torch.float64, requires_grad=True)
    target_IO = torch.randn(D_IN, D_OUT, dtype=torch.float64)
    loss = ((layer_shift(solved_IO, w_II) - target_IO) ** 2).sum()
    (autograd,) = torch.autograd.grad(loss, solved_IO)
    grad_layer_IO = 2 * (w_II @ solved_IO.detach() - target_IO)
    torch.testing.assert_close(whitened_shift_grad(grad_layer_IO, w_II), autograd)


def test_prior_whitening_rejects_no_keys():
    with pytest.raises(ValueError, match="at least one key"):
        prior_whitening(torch.eye(D_IN), 0, 1e-3)


def test_unrelated_answer_moments_are_the_keys_at_their_answer_positions():
    cfg = load_config(
        None, [*TINY_RUN_OVERRIDES, "method.key_prior=c0", "method.prior_keys=unrelated_answers"]
    )
    torch.manual_seed(0)
    engine, tokenizer = build_engine(cfg)
    examples = load_data(cfg, tokenizer).train.unrel[:6]
    stats = engine.answer_key_stats(examples)  # the engine's micro-batches (packed rows where enabled)

    # by hand: one unpadded sequence at a time, the modules' inputs where the label is an answer token
    expected = {name: torch.zeros_like(stats[name].second_moment) for name in engine.module_names}
    seen: dict[str, torch.Tensor] = {}
    handles = [
        engine.model.get_submodule(name).register_forward_pre_hook(
            lambda _m, inputs, name=name: seen.__setitem__(name, inputs[0][0].double())
        )
        for name in engine.module_names
    ]
    n_answers = 0
    with torch.no_grad():
        for example in examples:
            engine.model(input_ids=torch.tensor([example.input_ids]))
            answer_T = torch.tensor(example.labels) != IGNORE_INDEX
            n_answers += int(answer_T.sum())
            for name in engine.module_names:
                keys_NI = seen[name][answer_T]
                expected[name] += keys_NI.T @ keys_NI
    for handle in handles:
        handle.remove()
    for name in engine.module_names:
        assert stats[name].count == n_answers
        torch.testing.assert_close(stats[name].second_moment, expected[name], rtol=1e-4, atol=1e-4)


def test_prior_keys_names_its_choices():
    with pytest.raises(ConfigError, match=r"method.prior_keys='answers' is not one of \['prompt_tokens', "):
        load_config(None, ["method.prior_keys=answers"])


@pytest.mark.parametrize("prior_keys", ["prompt_tokens", "unrelated_answers"])
def test_a_key_prior_run_trains_saves_and_evaluates_the_same(tiny_dir, tmp_path, prior_keys):
    data = tmp_path / "zsre32.json"
    data.write_text(json.dumps(json.loads(HEAD_FILE.read_text())[:32]))
    args = [
        f"model.source={tiny_dir}",
        "model.n_edit_layers=2",
        "method.rank=16",
        "method.chunk_rows=16",
        "method.key_prior=c0",
        "method.prior_records=16",
        f"method.prior_keys={prior_keys}",
        "data.n_edits=8",
        "data.batch_size=4",
        f"data.train_path={data}",
        f"data.eval_path={data}",
        "train.steps=3",
        "train.eval_n_edits=8",
        "train.eval_batches=1",
        "train.eval_live=false",
        f"train.out_dir={tmp_path}",
        "train.run_name=prior",
        "tracking.enabled=false",
    ]
    trained = train.main(args)
    whitening = load_checkpoint(tmp_path / "prior")["hypernet"]["whitening_0"]
    assert whitening.shape == (128, 128) and not torch.allclose(
        whitening, torch.eye(128)
    )  # d_in of down_proj
    assert trained["untrained/ES"] > trained["unedited/ES"]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in trained.items() if "/" in k)
    again = evaluate.main(
        [f"checkpoint={tmp_path / 'prior'}", "train.eval_live=false", *tmp_tracking(tmp_path)]
    )
    assert again["edited/ES"] == pytest.approx(trained["edited/ES"], abs=1e-6)
    assert again["edited/loc_agreement"] == pytest.approx(trained["edited/loc_agreement"], abs=1e-6)
