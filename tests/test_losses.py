"""Per-example losses/metrics vs straightforward per-position loops."""

import math

import pytest
import torch

from horse_dist.editor.losses import (
    per_example_accuracy,
    per_example_agreement,
    per_example_ce,
    per_example_kl,
)

E, V = 5, 11


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 0, 0, 2, 2, 3, 0, 3, 3, 3])  # example 1 and 4 have no positions
    p = ids.numel()
    logits = torch.randn(p, V, generator=g) * 2
    labels = torch.randint(0, V, (p,), generator=g)
    labels[:3] = logits[:3].argmax(-1)  # some hits
    ref_logits = logits + 0.5 * torch.randn(p, V, generator=g)
    ref_logprobs = torch.log_softmax(ref_logits, -1)
    return logits, labels, ids, ref_logprobs, ref_logits.argmax(-1)


def _loop_mean(values, ids):
    out = []
    for e in range(E):
        vals = [values[p] for p in range(len(ids)) if int(ids[p]) == e]
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return torch.tensor(out, dtype=torch.float32)


def test_ce():
    logits, labels, ids, _, _ = _inputs()
    ce = []
    for p in range(len(ids)):
        z = logits[p].double()
        ce.append(float(torch.logsumexp(z, 0) - z[labels[p]]))
    got32 = per_example_ce(logits, labels, ids, E)
    torch.testing.assert_close(got32, _loop_mean(ce, ids), rtol=1e-5, atol=1e-5)
    assert got32[1] == 0 and got32[4] == 0 and got32[0] > 0
    assert per_example_ce(logits.bfloat16(), labels, ids, E).dtype == torch.float32


def test_ce_is_differentiable():
    logits, labels, ids, _, _ = _inputs(1)
    logits = logits.requires_grad_(True)
    per_example_ce(logits, labels, ids, E).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_kl():
    logits, _, ids, ref_logprobs, _ = _inputs(2)
    kl = []
    for p in range(len(ids)):
        lq = torch.log_softmax(logits[p].double(), 0)
        lp = ref_logprobs[p].double()
        kl.append(sum(math.exp(float(lp[v])) * float(lp[v] - lq[v]) for v in range(V)))
    got = per_example_kl(logits, ref_logprobs, ids, E)
    torch.testing.assert_close(got, _loop_mean(kl, ids), rtol=1e-5, atol=1e-6)
    assert got[0] > 0 and got[1] == 0
    # KL of a distribution with itself is 0
    same = per_example_kl(ref_logprobs, ref_logprobs, ids, E)
    torch.testing.assert_close(same, torch.zeros(E), rtol=0, atol=1e-6)


def test_accuracy_and_agreement():
    logits, labels, ids, _, ref_pred = _inputs(3)
    pred = logits.argmax(-1)
    acc = per_example_accuracy(logits, labels, ids, E)
    torch.testing.assert_close(acc, _loop_mean([float(pred[p] == labels[p]) for p in range(len(ids))], ids))
    assert acc[0] >= 0.5  # 3 of its 4 positions were forced to be hits
    agr = per_example_agreement(pred, ref_pred, ids, E)
    torch.testing.assert_close(agr, _loop_mean([float(pred[p] == ref_pred[p]) for p in range(len(ids))], ids))
    assert torch.equal(per_example_agreement(pred, pred, ids, E), torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))


def test_bad_example_ids():
    logits, labels, ids, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        per_example_accuracy(logits, labels, ids, 3)
