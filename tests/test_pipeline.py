"""The whole caches -> shifts -> meta-gradient chain against float64 autograd through an explicit solve."""

import dataclasses

import pytest
import torch

from horse_dist.config import MethodConfig
from horse_dist.dist.world import LocalWorld
from horse_dist.editor.residual import residual
from horse_dist.training.hypernet_bank import (
    HyperNetBank,
    meta_backward,
    predict_shifts,
    set_step_units_from_keys,
    update_normalizers,
)

D_IN, D_OUT, N, LAYERS = 12, 5, 9, 3


def make_bank(spread: str, learn_lambda: bool = True) -> tuple[HyperNetBank, MethodConfig]:
    method = MethodConfig(
        spread=spread, rank=4, n_blocks=2, eta_init=0.3, learn_lambda=learn_lambda, chunk_rows=4
    )
    torch.manual_seed(0)
    bank = HyperNetBank([(D_IN, D_OUT)] * LAYERS, method).double()
    for p in bank.parameters():  # leave the identity init so every parameter matters
        p.data += 0.1 * torch.randn_like(p)
    return bank, method


def caches(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(N, D_IN, generator=gen, dtype=torch.float64) * (1 + i) for i in range(LAYERS)]
    grads = [torch.randn(N, D_OUT, generator=gen, dtype=torch.float64) for _ in range(LAYERS)]
    return keys, grads


def explicit_shifts(bank: HyperNetBank, keys, grads, spread: str):
    """Float64 forward with autograd everywhere except the previous layer in the spread (as DESIGN §1.7)."""
    deltas = []
    for layer, (k, g) in enumerate(zip(keys, grads)):
        net, index = bank.net(layer)
        pk, pg = net(k, g, index)
        deltas.append(residual(k, pk.double(), pg.double(), net.step_size(index)))
    spread_deltas = [deltas[0]]
    for layer in range(1, LAYERS):
        d = deltas[layer]
        if spread == "orthogonal":
            prev = spread_deltas[-1].detach()
            d = d - (d * prev).sum() / (prev * prev).sum() * prev
        elif spread == "reference":
            prev = deltas[layer - 1].detach()
            d = d - (d * prev).sum() / (prev * prev).sum() * grads[layer - 1]
        spread_deltas.append(d)
    shifts = []
    for layer, (k, d) in enumerate(zip(keys, spread_deltas)):
        net, index = bank.net(layer)
        a = k.T @ k + torch.exp(net.log_lambda[index]) * torch.eye(D_IN, dtype=torch.float64)
        shifts.append(torch.linalg.solve(a, k.T @ d))
    return shifts


@pytest.mark.parametrize("spread", ["orthogonal", "reference", "none"])
@pytest.mark.parametrize("form", ["primal", "dual"])
@pytest.mark.parametrize("keep_graph", [False, True], ids=["recompute", "kept-graph"])
def test_meta_backward_equals_autograd_through_the_whole_chain(spread, form, keep_graph):
    keys, grads = caches()
    bank, method = make_bank(spread)
    # keep_graph: all rows in one chunk, so the forward's graph is kept for the backward
    changes = {"solve_form": form, "solve_dtype": "float64"} | ({"chunk_rows": 1024} if keep_graph else {})
    method = dataclasses.replace(method, **changes)
    update_normalizers(bank, keys, grads, LocalWorld())
    targets = [torch.randn(D_IN, D_OUT, dtype=torch.float64) for _ in range(LAYERS)]

    reference = explicit_shifts(bank, keys, grads, spread)
    sum((s * c).sum() for s, c in zip(reference, targets)).backward()
    expected = {n: p.grad.clone() for n, p in bank.named_parameters()}
    bank.zero_grad()

    names = [f"layer{i}" for i in range(LAYERS)]
    prediction = predict_shifts(bank, keys, grads, method, LocalWorld(), names, keep_graph=keep_graph)
    assert prediction.forms == [form] * LAYERS
    assert all((g is not None) == keep_graph for g in prediction.delta_graphs)
    for got, want in zip(prediction.shifts, reference):
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-8)
    meta_backward(bank, keys, grads, prediction, targets, method, LocalWorld())
    for name, param in bank.named_parameters():
        # shifts and meta-directions come back in float32 (the hooks' dtype): float32-level agreement
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert scale > 0, name


def test_fixed_lambda_gets_no_gradient():
    keys, grads = caches()
    bank, method = make_bank("reference", learn_lambda=False)
    update_normalizers(bank, keys, grads, LocalWorld())
    prediction = predict_shifts(bank, keys, grads, method, LocalWorld(), ["a", "b", "c"])
    meta_backward(bank, keys, grads, prediction, [torch.ones(D_IN, D_OUT)] * LAYERS, method, LocalWorld())
    net = bank.nets[f"{D_IN}x{D_OUT}"]
    assert not net.log_lambda.requires_grad and net.log_lambda.grad is None
    assert net.eta.grad.abs().sum() > 0


def test_key_energy_units_make_eta_dimensionless():
    keys, _ = caches()
    bank, _ = make_bank("none")
    set_step_units_from_keys(bank, keys, LocalWorld())
    for layer, k in enumerate(keys):
        net, index = bank.net(layer)
        energy = float((k**2).sum(1).mean())
        assert float(net.step_size(index).detach()) * energy == pytest.approx(
            float(net.eta[index].detach()), rel=1e-5
        )


def test_layers_of_two_shapes_get_two_hypernetworks():
    method = MethodConfig(rank=2, n_blocks=1)
    bank = HyperNetBank([(8, 4), (8, 4), (6, 4)], method)
    assert sorted(bank.nets) == ["6x4", "8x4"]
    assert bank.slots == [("8x4", 0), ("8x4", 1), ("6x4", 0)]
    assert bank.nets["8x4"].eta.shape == (2,) and bank.nets["6x4"].eta.shape == (1,)
