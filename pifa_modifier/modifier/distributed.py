"""Data-parallel calibration (``torchrun``), the way llm-compressor's GPTQModifier does it.

Under ``torchrun`` llm-compressor gives every rank a full model and a disjoint
shard of the calibration set (``_make_sampler`` partitions an identical dataset
by rank), and every rank runs the sequential pipeline on its shard. Anything
that mixes samples must therefore be summed across ranks before it is used:
for PIFA these are the per-input second moments (``h_old``, ``h_new``,
``cross``) and their token counts. The per-sample activations of the dense and
compressed streams stay rank-local, which is correct because every later
statistic is again a sum over samples.

GPTQ reduces each Hessian to one owner rank (greedy bin packing), quantizes
there and broadcasts the result. PIFA does the same with the factors; the
statistics are all-reduced rather than reduced, because linears that share an
input (q/k/v, gate/up) share one statistics object but may have different
owners. Every rank then holds bitwise the owner's factors, so all ranks stay in
lockstep and the checkpoint that the source rank writes is the one each rank
uses for its later layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from compressed_tensors.distributed import greedy_bin_packing, is_distributed

from pifa_modifier.math import PivotFactors
from pifa_modifier.modifier.replay import GroupStats
from pifa_modifier.module import PIFALinear

__all__ = ["world_size", "reduce_stats", "assign_owners", "broadcast_factors"]

Fit = Callable[[PIFALinear], tuple[PivotFactors, float]]


def world_size() -> int:
    """Number of ranks calibrating together (1 outside ``torchrun``)."""
    return dist.get_world_size() if is_distributed() else 1


def reduce_stats(stats: Sequence[GroupStats]) -> None:
    """Sum every statistics object (in the given, rank-independent order) over all ranks."""
    if world_size() == 1:
        return
    pending = []
    for stat in stats:
        for tensor in (stat.h_old, stat.h_new, stat.cross):
            if tensor is not None:
                pending.append(dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True))
    for work in pending:
        work.wait()
    if stats:
        device = stats[0].h_old.device
        tokens = torch.tensor([s.tokens for s in stats], dtype=torch.int64, device=device)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        for stat, count in zip(stats, tokens.tolist(), strict=True):
            stat.tokens = int(count)


def assign_owners(modules: Sequence[PIFALinear]) -> dict[PIFALinear, int]:
    """Rank that factorizes each module: greedy bin packing by weight size, as GPTQ does.

    Deterministic across ranks: the input order is the model's call order and
    the sort is stable, so every rank computes the same assignment.
    """
    if world_size() == 1:
        return {module: 0 for module in modules}
    _, _, owners = greedy_bin_packing(
        list(modules), world_size(), item_weight_fn=lambda m: m.in_features * m.out_features
    )
    return owners


def broadcast_factors(
    modules: Sequence[PIFALinear],
    owners: dict[PIFALinear, int],
    fit: Fit,
    device: torch.device,
) -> dict[PIFALinear, tuple[PivotFactors, float]]:
    """Factorize each module on its owner rank and send the factors to every rank."""
    if world_size() == 1:
        return {module: fit(module) for module in modules}
    rank = dist.get_rank()
    results: dict[PIFALinear, tuple[PivotFactors, float]] = {}
    for module in modules:  # own work first, so ranks compute in parallel
        if owners[module] == rank:
            results[module] = fit(module)
    pending = []
    received: dict[PIFALinear, list[torch.Tensor]] = {}
    for module in modules:
        if owners[module] == rank:
            factors, error = results[module]
            tensors = [
                factors.pivot_idx.to(device, torch.int32).contiguous(),
                factors.pivot_rows.to(device, torch.float64).contiguous(),
                factors.coeff.to(device, torch.float64).contiguous(),
                torch.tensor([error], dtype=torch.float64, device=device),
            ]
        else:
            r, m, n = module.rank, module.out_features, module.in_features
            tensors = [
                torch.empty(r, dtype=torch.int32, device=device),
                torch.empty(r, n, dtype=torch.float64, device=device),
                torch.empty(m - r, r, dtype=torch.float64, device=device),
                torch.empty(1, dtype=torch.float64, device=device),
            ]
            received[module] = tensors
        for tensor in tensors:
            pending.append(dist.broadcast(tensor, src=owners[module], async_op=True))
    for work in pending:
        work.wait()
    for module, (idx, rows, coeff, error) in received.items():
        results[module] = (PivotFactors(idx, rows, coeff), float(error))
    return {module: results[module] for module in modules}
