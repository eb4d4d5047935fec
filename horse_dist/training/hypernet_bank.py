"""From cached keys/gradients to weight shifts and back (DESIGN §1 steps 2-5 and 7), over a `World`.

Tokens are sharded, layers are owned: each worker holds only its own rows of K, G and D; global sums (the
normaliser's moments, the spread's inner products, KᵀK, KᵀD̂, g_S) go through the world; layer l's solve runs
on worker l mod W, which broadcasts S_l and later M_l. In one process every collective is the identity.
Legend: N token rows (this worker's), I = d_in, O = d_out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter

import torch
from torch import nn

from horse_dist.config import MethodConfig
from horse_dist.dist.world import LocalWorld
from horse_dist.editor.hypernet import HyperNet, batch_moments
from horse_dist.editor.metagrad import hypernet_vjp, log_lambda_grad, residual_grad, ridge_meta_direction
from horse_dist.editor.residual import residual
from horse_dist.editor.solve import DualRidge, PrimalRidge, choose_form
from horse_dist.editor.spread import SpreadState, spread_backward, spread_forward


def synced_clock() -> float:
    """perf_counter once the queued CUDA kernels have run (they are asynchronous); plain on CPU."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return perf_counter()


class PhaseTimer:
    """Accumulates wall seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = synced_clock()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + synced_clock() - start


def shape_key(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


class HyperNetBank(nn.Module):
    """One HyperNet per distinct (d_in, d_out), shared by the edited layers of that shape."""

    def __init__(self, shapes: list[tuple[int, int]], method: MethodConfig) -> None:
        super().__init__()
        self.shapes = list(shapes)
        counts: dict[str, int] = {}
        self.slots: list[tuple[str, int]] = []  # per edited layer: (net key, layer index inside that net)
        for shape in self.shapes:
            key = shape_key(shape)
            self.slots.append((key, counts.get(key, 0)))
            counts[key] = counts.get(key, 0) + 1
        self.nets = nn.ModuleDict(
            {
                key: HyperNet(
                    int(key.split("x")[0]),
                    int(key.split("x")[1]),
                    n_layers=count,
                    rank=method.rank,
                    n_blocks=method.n_blocks,
                    eta_init=method.eta_init,
                    log_lambda_init=method.log_lambda_init,
                )
                for key, count in counts.items()
            }
        )
        if not method.learn_lambda:
            for net in self.nets.values():
                net.log_lambda.requires_grad_(False)
        self.has_prior = method.key_prior != "none"
        if self.has_prior:  # W_l of editor/prior.py, set from data before training, saved with the weights
            for layer, (d_in, _) in enumerate(self.shapes):
                self.register_buffer(f"whitening_{layer}", torch.eye(d_in))

    def whitening(self, layer: int) -> torch.Tensor | None:
        """W_l (I, I) of the key prior, or None without one."""
        return getattr(self, f"whitening_{layer}") if self.has_prior else None

    def net(self, layer: int) -> tuple[HyperNet, int]:
        key, index = self.slots[layer]
        return self.nets[key], index

    def eta(self, layer: int) -> float:
        """The step size η_l as the residual formula uses it."""
        net, index = self.net(layer)
        return float(net.step_size(index).detach())

    def log_lambda(self, layer: int) -> torch.Tensor:
        net, index = self.net(layer)
        return net.log_lambda[index].detach()

    def normalizers_ready(self) -> bool:
        return all(float(net.normalizer.count) >= 2 for net in self.nets.values())


def update_normalizers(
    bank: HyperNetBank, keys: list[torch.Tensor], grads: list[torch.Tensor], world: LocalWorld
) -> None:
    """Merge this step's global moments of [K, G] into each shape's running normaliser."""
    for key, net in bank.nets.items():
        moments = None
        for layer, (slot_key, _) in enumerate(bank.slots):
            if slot_key != key:
                continue
            count, total, total_sq = batch_moments(torch.cat([keys[layer], grads[layer]], dim=1))
            stacked = torch.cat([count.reshape(1), total, total_sq])
            moments = stacked if moments is None else moments + stacked
        world.all_reduce_sum(moments)
        width = (moments.numel() - 1) // 2
        net.normalizer.update(moments[0], moments[1 : 1 + width], moments[1 + width :])


def set_step_units_from_keys(bank: HyperNetBank, keys: list[torch.Tensor], world: LocalWorld) -> None:
    """η_l's unit := 1 / mean_i ‖K_l,i‖² over this meta-batch (all workers), so that c_i = −η (K_i·K̃_i) is
    a dimensionless multiple of the key energy and one η init suits every layer (key energies of adjacent
    layers of one LM differ by up to ~30x). Called once, before the first meta-step of a fresh run."""
    energy_L = torch.stack([(k.double() ** 2).sum() for k in keys])
    rows_L = torch.tensor([float(k.shape[0]) for k in keys], dtype=torch.float64, device=energy_L.device)
    totals = world.all_reduce_sum(torch.cat([energy_L, rows_L]))
    mean_energy_L = totals[: len(keys)] / totals[len(keys) :].clamp_min(1.0)
    for key, net in bank.nets.items():
        layers = [i for i, (slot_key, _) in enumerate(bank.slots) if slot_key == key]
        net.set_step_units((1.0 / mean_energy_L[layers].clamp_min(1e-12)).float())


@dataclass
class Prediction:
    shifts: list[torch.Tensor]  # per layer S_l (I, O), identical on every worker
    ridges: list[PrimalRidge | DualRidge | None]  # factor of A_l on its owner (None elsewhere)
    spread_state: SpreadState
    forms: list[str]  # per layer: primal | dual
    # per layer the hypernetwork's output D_l with its graph, kept when asked and N <= chunk_rows (then the
    # backward needs no second forward); None: hypernet_vjp recomputes it chunk by chunk
    delta_graphs: list[torch.Tensor | None] = field(default_factory=list)
    # with a key prior: the solve's own shifts S'_l in whitened key space (`shifts` are then W_l S'_l, what the
    # layers apply); the λ gradient is taken on these
    solved: list[torch.Tensor] | None = None


def _solve_form(method: MethodConfig, n_rows: int, d_in: int, world: LocalWorld) -> str:
    if world.size > 1:
        # The dual form needs every worker's keys in one place, which the sharding forbids.
        if method.solve_form == "dual":
            raise ValueError(
                "method.solve_form=dual needs all keys on one worker; use primal or auto with W>1"
            )
        return "primal"
    return choose_form(n_rows, d_in, method.solve_form)


@torch.no_grad()
def predict_shifts(
    bank: HyperNetBank,
    keys: list[torch.Tensor],
    grads: list[torch.Tensor],
    method: MethodConfig,
    world: LocalWorld,
    names: list[str],
    timer: PhaseTimer | None = None,
    keep_graph: bool = False,
) -> Prediction:
    timer = timer or PhaseTimer()
    solve_dtype = torch.float64 if method.solve_dtype == "float64" else torch.float32
    with timer("hypernet_forward"):
        deltas: list[torch.Tensor] = []
        graphs: list[torch.Tensor | None] = []
        for layer, (keys_NI, grads_NO) in enumerate(zip(keys, grads)):
            net, index = bank.net(layer)
            # One chunk's graph is cheap to keep; larger caches are recomputed chunk by chunk in the backward.
            keep = keep_graph and 0 < keys_NI.shape[0] <= method.chunk_rows
            chunks = []
            with torch.set_grad_enabled(keep):
                for start in range(0, keys_NI.shape[0], method.chunk_rows):
                    rows = slice(start, start + method.chunk_rows)
                    pseudo_keys, pseudo_grads = net(keys_NI[rows], grads_NO[rows], index)
                    chunks.append(residual(keys_NI[rows], pseudo_keys, pseudo_grads, net.step_size(index)))
                delta = torch.cat(chunks) if chunks else grads_NO.new_zeros(grads_NO.shape)
            graphs.append(delta if keep else None)
            deltas.append(delta.detach())
    with timer("spread"):
        spread, state = spread_forward(
            deltas, method.spread, raw_grads=grads, reduce=world.all_reduce_sum, names=names
        )
    with timer("solve"):
        forms = [_solve_form(method, k.shape[0], k.shape[1], world) for k in keys]
        shifts, ridges = [], []
        for layer, (keys_NI, delta_NO) in enumerate(zip(keys, spread)):
            log_lambda = bank.log_lambda(layer)
            if forms[layer] == "dual":
                ridge = DualRidge.factor(keys_NI, log_lambda, dtype=solve_dtype, name=names[layer])
                shifts.append(ridge.shift(delta_NO))
                ridges.append(ridge)
                continue
            owner = world.owner(layer)
            gram_II = world.reduce_sum_to(keys_NI.T @ keys_NI, owner)
            rhs_IO = world.reduce_sum_to(keys_NI.T @ delta_NO, owner)
            if world.rank == owner:
                ridge = PrimalRidge.factor(gram_II, log_lambda, dtype=solve_dtype, name=names[layer])
                shift_IO = ridge.shift(rhs_IO)
            else:
                ridge, shift_IO = None, rhs_IO.new_empty(rhs_IO.shape)
            shifts.append(world.broadcast(shift_IO.contiguous(), owner))
            ridges.append(ridge)
    return Prediction(shifts, ridges, state, forms, graphs)


def meta_backward(
    bank: HyperNetBank,
    keys: list[torch.Tensor],
    grads: list[torch.Tensor],
    prediction: Prediction,
    grad_shifts: list[torch.Tensor],
    method: MethodConfig,
    world: LocalWorld,
    timer: PhaseTimer | None = None,
) -> None:
    """Accumulate the hypernetwork's gradient of the meta-loss, given g_S = ∂L/∂S_l (this worker's part)."""
    timer = timer or PhaseTimer()
    with timer("meta_gradient"):
        grad_spread = []
        for layer, keys_NI in enumerate(keys):
            ridge = prediction.ridges[layer]
            if prediction.forms[layer] == "dual":
                direction_IO = ridge_meta_direction(ridge, grad_shifts[layer])
                owner = world.rank
            else:
                owner = world.owner(layer)
                grad_shift_IO = world.reduce_sum_to(grad_shifts[layer].clone(), owner)
                if world.rank == owner:
                    direction_IO = ridge_meta_direction(ridge, grad_shift_IO)
                else:
                    direction_IO = grad_shift_IO.new_empty(grad_shift_IO.shape)
                direction_IO = world.broadcast(direction_IO.contiguous(), owner)
            if method.learn_lambda and world.rank == owner:
                net, index = bank.net(layer)
                solved_IO = (prediction.solved or prediction.shifts)[layer]
                grad = log_lambda_grad(bank.log_lambda(layer), direction_IO, solved_IO)
                _ensure_grad(net.log_lambda)
                net.log_lambda.grad[index] += grad
            grad_spread.append(residual_grad(keys_NI, direction_IO))
        grad_deltas = spread_backward(grad_spread, prediction.spread_state, reduce=world.all_reduce_sum)
    with timer("hypernet_backward"):
        for layer, (keys_NI, grads_NO) in enumerate(zip(keys, grads)):
            graph = prediction.delta_graphs[layer] if prediction.delta_graphs else None
            if graph is not None:
                graph.backward(grad_deltas[layer].to(graph.dtype))
                continue
            net, index = bank.net(layer)
            hypernet_vjp(net, keys_NI, grads_NO, index, grad_deltas[layer], chunk_rows=method.chunk_rows)
    with timer("communication"):
        trainable = [p for p in bank.parameters() if p.requires_grad]
        for p in trainable:
            _ensure_grad(p)
        world.all_reduce_grads(trainable)


def _ensure_grad(param: torch.Tensor) -> None:
    # Every worker must all-reduce the same set of gradient buffers, even where it had no rows.
    if param.grad is None:
        param.grad = torch.zeros_like(param)


def untrained_bank(bank: HyperNetBank, method: MethodConfig) -> HyperNetBank:
    """The editor before meta-training, the baseline a trained one must beat: every block at its identity
    init, η and λ at their initial values, with `bank`'s input statistics and η units (statistics of the
    data, not learned)."""
    device = next(bank.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the blocks' random A must not move the run's RNG stream
        fresh = HyperNetBank(bank.shapes, method).to(device)
    for key, net in fresh.nets.items():
        net.normalizer.load_state_dict(bank.nets[key].normalizer.state_dict())
        net.eta_unit.copy_(bank.nets[key].eta_unit)
    if bank.has_prior:  # the prior is a statistic of the data, like the normalisers
        for layer in range(len(bank.shapes)):
            fresh.whitening(layer).copy_(bank.whitening(layer))
    return fresh.requires_grad_(False)
