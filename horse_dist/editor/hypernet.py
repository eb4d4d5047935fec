"""Hypernetwork h_φ of DESIGN §1 step 2: running input normalisation + low-rank residual MLP blocks.

Shape legend: N = token rows, I = d_in (key size), O = d_out, F = I + O (hypernet width), L = edited layers
sharing this net, R = rank of a block.

(K̃, G̃) = h_φ([K, G], l): the concatenated row [K, G] is standardised with running statistics, passed
through `n_blocks` residual blocks (per-layer scale/shift embeddings) and split back. Outputs stay in
normalised units (nothing is de-normalised, as in MALMEN/HORSE). B = 0 at init, so the net is exactly
the identity on the normalised input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_EPS_F32 = torch.finfo(torch.float32).eps


def batch_moments(x_NF: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics of a batch: (count, Σ_n x_nf, Σ_n x_nf²), all float64.

    They are plain sums, so the moments of several shards/workers add up to the moments of the union
    (all-reduce them, then call `RunningNormalizer.update` once).
    """
    x64_NF = x_NF.detach().to(torch.float64)
    count = torch.tensor(float(x64_NF.shape[0]), dtype=torch.float64, device=x_NF.device)
    return count, x64_NF.sum(0), (x64_NF * x64_NF).sum(0)


class RunningNormalizer(nn.Module):
    """Running mean / std of every feature over all rows ever seen; forward standardises.

    Buffers (float64): count (scalar), mean (F,), m2 (F,) = Σ (x − mean)². std = sqrt(m2 / (count − 1)).
    forward(x) = (x − mean) / (std + eps), eps = float32 machine epsilon (as the reference code).
    Before two rows were seen the variance is undefined; std is taken as 1 then (only the mean is removed).
    Keep the module's float64 buffers: don't call `.float()`/`.half()` on a module that holds it.
    """

    count: Tensor
    mean: Tensor
    m2: Tensor

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, count: Tensor | float, total_F: Tensor, total_sq_F: Tensor) -> None:
        """Merge a batch given by its moments (see `batch_moments`) — Chan et al.'s parallel update.

        With batch b: mean_b = Σx / n_b, m2_b = Σx² − n_b mean_b², δ = mean_b − mean, n = n_a + n_b:
        mean ← mean + δ n_b / n;  m2 ← m2 + m2_b + δ² n_a n_b / n.  Exact: equals the statistics of all rows.
        """
        dev = self.mean.device
        n_b = torch.as_tensor(count, dtype=torch.float64, device=dev)
        if float(n_b) <= 0:
            return
        total_F = total_F.to(device=dev, dtype=torch.float64)
        total_sq_F = total_sq_F.to(device=dev, dtype=torch.float64)
        mean_b_F = total_F / n_b
        # Σx² − n mean² can dip below 0 by rounding when the variance is ~0.
        m2_b_F = (total_sq_F - n_b * mean_b_F * mean_b_F).clamp_min(0.0)
        n_a = self.count.to(torch.float64)
        n = n_a + n_b
        delta_F = mean_b_F - self.mean.to(torch.float64)
        new_mean_F = self.mean.to(torch.float64) + delta_F * (n_b / n)
        new_m2_F = self.m2.to(torch.float64) + m2_b_F + delta_F * delta_F * (n_a * n_b / n)
        self.mean.copy_(new_mean_F)
        self.m2.copy_(new_m2_F)
        self.count.copy_(n)

    def std(self) -> Tensor:
        """(F,) float64 sample standard deviation sqrt(m2 / (count − 1)); ones while count < 2."""
        if float(self.count) < 2:
            return torch.ones_like(self.m2, dtype=torch.float64)
        return torch.sqrt(self.m2.to(torch.float64) / (self.count.to(torch.float64) - 1.0))

    def forward(self, x_NF: Tensor) -> Tensor:
        # float64 input keeps float64 math; anything else is standardised in float32 (bf16 would lose it).
        work = torch.float64 if x_NF.dtype == torch.float64 else torch.float32
        mean_F = self.mean.to(work)
        std_F = self.std().to(work)
        return ((x_NF.to(work) - mean_F) / (std_F + _EPS_F32)).to(x_NF.dtype)


class LowRankBlock(nn.Module):
    """Residual block y ↦ y + scale_l ⊙ relu(y A B + bias) + shift_l.

    A (F, R) ~ N(0, 1) (MALMEN init, unscaled), B (R, F) = 0, bias = 0, scale_l = 1, shift_l = 0
    -> the block is the identity at init; the A/B factorisation keeps it at 2·F·R parameters.
    """

    def __init__(self, size: int, rank: int, n_layers: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Embedding(n_layers, size)
        self.shift = nn.Embedding(n_layers, size)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)
        self._product: tuple[tuple, Tensor] | None = None  # (state of A and B, A B): see `project`

    def project(self, y_NF: Tensor) -> Tensor:
        """y A B. Without a graph, where A B (F, F) costs less per row than the two thin products (F < 2R),
        through A B itself, kept while A and B are unchanged: edit calls of a trained editor reuse it."""
        needs_graph = torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)
        if needs_graph or self.A.shape[0] >= 2 * self.A.shape[1]:
            return y_NF @ self.A @ self.B
        # An in-place update (optimizer step, load_state_dict) bumps a version; .to() moves the storage.
        state = (self.A._version, self.B._version, self.A.data_ptr(), self.B.data_ptr())
        if self._product is None or self._product[0] != state:
            self._product = (state, self.A.detach() @ self.B.detach())
        return y_NF @ self._product[1]

    def forward(self, y_NF: Tensor, layer: int) -> Tensor:
        x_NF = torch.relu(self.project(y_NF) + self.bias)
        x_NF = self.scale.weight[layer] * x_NF + self.shift.weight[layer]
        return x_NF + y_NF


class HyperNet(nn.Module):
    """h_φ for one (d_in, d_out) shape, shared by the L edited layers of that shape.

    forward(K_NI, G_NO, l) = split(blocks(normalise([K, G]), l), [I, O]) = (K̃_NI, G̃_NO), in normalised
    units, float32. Per-layer learnables: the blocks' scale/shift rows, step size η_l (`eta` × fixed `eta_unit`) and the ridge
    log-strength λ_l (`log_lambda`, the ridge is e^{λ_l}). The normaliser is updated by the caller
    (`normalizer.update(*batch_moments(...))`, summed over workers), never inside forward.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_layers: int,
        rank: int,
        n_blocks: int,
        eta_init: float,
        log_lambda_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out, self.n_layers = d_in, d_out, n_layers
        size = d_in + d_out
        self.normalizer = RunningNormalizer(size)
        self.blocks = nn.ModuleList(LowRankBlock(size, rank, n_layers) for _ in range(n_blocks))
        self.eta = nn.Parameter(torch.full((n_layers,), float(eta_init)))
        # Fixed per-layer unit of η (1 = the raw step size of the reference code); see set_step_units.
        self.register_buffer("eta_unit", torch.ones(n_layers))
        self.log_lambda = nn.Parameter(torch.full((n_layers,), float(log_lambda_init)))

    def step_size(self, layer: int) -> Tensor:
        """η_l in the units of the residual formula: the learnable η times its fixed per-layer unit."""
        return self.eta[layer] * self.eta_unit[layer]

    @torch.no_grad()
    def set_step_units(self, units_L: Tensor) -> None:
        """Measure η per layer in `units_L` (e.g. 1 / mean ‖K_l‖², which makes η dimensionless and one init
        right for layers whose key energies differ by orders of magnitude)."""
        self.eta_unit.copy_(units_L.to(self.eta_unit))

    def forward(self, keys_NI: Tensor, grads_NO: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer index {layer} out of range for a HyperNet of {self.n_layers} layers")
        # In the parameters' dtype (float32; float64 in reference tests), never in bf16 cache precision.
        work = self.eta.dtype
        x_NF = torch.cat([keys_NI.to(work), grads_NO.to(work)], dim=-1)
        h_NF = self.normalizer(x_NF)
        for block in self.blocks:
            h_NF = block(h_NF, layer)
        pseudo_keys_NI, pseudo_grads_NO = h_NF.split([self.d_in, self.d_out], dim=-1)
        return pseudo_keys_NI, pseudo_grads_NO
