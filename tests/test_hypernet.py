"""HyperNet: identity at init, exact running statistics, shard-summable moments, residual."""

import torch

from horse_dist.editor.hypernet import HyperNet, LowRankBlock, RunningNormalizer, batch_moments
from horse_dist.editor.residual import residual

F64 = torch.float64


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(37, 9, generator=g) * 3 + 5
    b = torch.randn(21, 9, generator=g) * 0.5 - 2
    return a, b


def test_moments_of_shards_sum_to_moments_of_whole():
    a, b = _batches()
    whole = batch_moments(torch.cat([a, b]))
    parts = [x + y for x, y in zip(batch_moments(a), batch_moments(b))]
    assert float(whole[0]) == 58.0
    for w, p in zip(whole, parts):
        assert w.dtype == F64
        torch.testing.assert_close(p, w, rtol=1e-12, atol=1e-10)


def test_normalizer_update_equals_stats_of_concatenation():
    a, b = _batches()
    norm = RunningNormalizer(9)
    norm.update(*batch_moments(a))
    norm.update(*batch_moments(b))
    both = torch.cat([a, b]).double()
    assert float(norm.count) == 58.0
    torch.testing.assert_close(norm.mean, both.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.std(), both.std(0), rtol=1e-10, atol=1e-12)
    out = norm(a)
    assert out.dtype == torch.float32
    expected = (a.double() - both.mean(0)) / (both.std(0) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # bf16 in -> bf16 out; float64 in -> float64 math
    assert norm(a.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(norm(a.double()), expected, rtol=1e-12, atol=1e-12)


def test_normalizer_update_is_order_independent_and_ignores_empty():
    a, b = _batches(1)
    n1, n2 = RunningNormalizer(9), RunningNormalizer(9)
    n1.update(*batch_moments(a))
    n1.update(*batch_moments(b))
    n2.update(*batch_moments(b))
    n2.update(*batch_moments(a[:0]))
    n2.update(*batch_moments(a))
    torch.testing.assert_close(n1.mean, n2.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(n1.m2, n2.m2, rtol=1e-11, atol=1e-10)
    assert {k for k, _ in n1.named_buffers()} == {"count", "mean", "m2"}
    assert all(v.dtype == F64 for v in n1.state_dict().values())


def test_identity_at_init_exact():
    torch.manual_seed(0)
    net = HyperNet(d_in=7, d_out=5, n_layers=4, rank=3, n_blocks=2, eta_init=1e-3)
    a, b = _batches()
    x = torch.cat([a, b])[:, :9]
    x = torch.cat([x, x[:, :3]], dim=1)  # 12 = 7 + 5 features
    net.normalizer.update(*batch_moments(x))
    normalised = net.normalizer(x)
    for layer in range(4):
        pk, pg = net(x[:, :7].bfloat16() if layer == 3 else x[:, :7], x[:, 7:], layer)
        assert pk.dtype == pg.dtype == torch.float32
        assert pk.shape == (58, 7) and pg.shape == (58, 5)
        if layer != 3:
            assert torch.equal(torch.cat([pk, pg], 1), normalised)
    assert net.eta.shape == (4,) and torch.all(net.eta == 1e-3)
    assert net.log_lambda.shape == (4,) and torch.all(net.log_lambda == 0)
    assert net.blocks[0].A.shape == (12, 3) and net.blocks[0].B.shape == (3, 12)
    assert torch.all(net.blocks[1].B == 0) and net.blocks[0].A.std() > 0.3


def test_init_is_deterministic_given_seed():
    torch.manual_seed(3)
    a = HyperNet(5, 3, 2, 4, 2, 1e-4)
    torch.manual_seed(3)
    b = HyperNet(5, 3, 2, 4, 2, 1e-4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_trained_block_uses_layer_embeddings():
    torch.manual_seed(0)
    net = HyperNet(3, 2, n_layers=2, rank=2, n_blocks=1, eta_init=1.0)
    blk = net.blocks[0]
    with torch.no_grad():
        blk.B.normal_()
        blk.bias.normal_()
        blk.scale.weight[1].fill_(2.0)
        blk.shift.weight[1].fill_(0.5)
    k, g = torch.randn(4, 3), torch.randn(4, 2)
    y = torch.cat([k, g], 1)  # normaliser at count 0: mean 0, std taken as 1
    y = y / (1 + torch.finfo(torch.float32).eps)
    x = torch.relu(y @ blk.A @ blk.B + blk.bias)
    for layer, (s, t) in enumerate([(1.0, 0.0), (2.0, 0.5)]):
        pk, pg = net(k, g, layer)
        torch.testing.assert_close(torch.cat([pk, pg], 1), s * x + t + y)


def test_residual_formula():
    g = torch.Generator().manual_seed(2)
    k, pk, pg = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)
    eta = torch.tensor(0.7, requires_grad=True)
    d = residual(k, pk, pg, eta)
    for i in range(6):
        c = -0.7 * sum(float(k[i, j] * pk[i, j]) for j in range(4))
        torch.testing.assert_close(d[i], c * pg[i], rtol=1e-5, atol=1e-6)
    d.sum().backward()
    torch.testing.assert_close(eta.grad, (d.sum() / 0.7).detach(), rtol=1e-5, atol=1e-6)


def test_inference_through_the_kept_product_equals_the_thin_products():
    """Without a graph and with F < 2R a block multiplies by A B, kept until A or B changes."""
    torch.manual_seed(0)
    block = LowRankBlock(size=6, rank=4, n_layers=2).double()
    torch.nn.init.normal_(block.B)
    y = torch.randn(5, 6, dtype=torch.float64)
    with torch.enable_grad():
        want = block(y, 1)
    assert block._product is None  # the graph needs the thin products
    with torch.no_grad():
        got = block(y, 1)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
        kept = block._product[1]
        torch.testing.assert_close(kept, block.A @ block.B, rtol=0, atol=0)
        block(y, 0)
        assert block._product[1] is kept  # reused while A and B are unchanged
        block.A.add_(1.0)  # an optimizer step: in place
        torch.testing.assert_close(block(y, 1), y + torch.relu(y @ block.A @ block.B + block.bias) * 1.0)
    wide = LowRankBlock(size=6, rank=3, n_layers=1)  # F >= 2R: the thin products cost less
    with torch.no_grad():
        wide(torch.randn(2, 6), 0)
    assert wide._product is None
