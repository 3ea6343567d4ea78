"""``PIFAModifier``: MPIFA (M reconstruction + pivoting factorization) for oneshot.

Lifecycle (llm-compressor 0.14, oneshot):
- ``on_initialize``: validate, plan ranks, swap each target ``nn.Linear`` for a
  ``PIFALinear`` skeleton of final shape (still computing densely) so that a
  later ``GPTQModifier`` attaches to ``pivot``/``coeff``; hook decoder layers.
- calibration pass of each decoder layer: the hook caches the layer's call
  arguments (the compressed stream's input).
- ``SEQUENTIAL_EPOCH_END``: per group (q/k/v -> o -> gate/up -> down), replay the
  layer on the dense and the compressed stream, fit whitened SVD + M, encode
  the factors as PIFA; then advance the dense stream through the dense layer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Literal

import torch
from compressed_tensors.offload import (
    disable_onloading,
    get_cache_init_kwargs,
    get_execution_device,
    offload_module,
    update_offload_parameter,
)
from compressed_tensors.offload.cache import OffloadCache
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.utils.pytorch.module import infer_sequential_targets
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn
from transformers import PreTrainedModel

from pifa_modifier.checkpoint import attach_pifa_save
from pifa_modifier.math import PivotFactors, pivot_factorize
from pifa_modifier.math.reconstruct import m_refit, relative_output_error, whitened_svd
from pifa_modifier.modifier.distributed import assign_owners, broadcast_factors, reduce_stats
from pifa_modifier.modifier.plan import TargetPlan, find_decoder_layers, plan_targets
from pifa_modifier.modifier.replay import (
    CachedCall,
    GroupStats,
    capture_inputs,
    dense_mode,
    discover_groups,
    layer_output,
)
from pifa_modifier.module import PIFALinear

__all__ = ["PIFAModifier"]

_QUANT_MODIFIERS = ("GPTQModifier", "QuantizationModifier", "AWQModifier", "AutoRoundModifier")


class PIFAModifier(Modifier):
    """Low-rank compress linears with MPIFA, calibrated layer by layer.

    :param density: kept fraction of each targeted linear's parameters, counting
        PIFA's r(m+n-r); ranks round down so the achieved density never exceeds it
    :param attn_density: density for attention linears (overrides ``density``)
    :param mlp_density: density for MLP linears (overrides ``density``)
    :param densities: per-module densities, ``{pattern: density}``; a pattern is a
        module-name suffix (``q_proj``) or ``re:<regex>``; first match wins
    :param rank_multiple: ranks are multiples of this (use the GPTQ group size
        when quantizing afterwards; 64/128 suit GPU kernels)
    :param old_output_factor: λ in ``y* = (1-λ) W x_new + λ W x_old``
    :param reconstruct_steps: alternating U/V least-squares steps of M (0 = none)
    :param whitening: ``svd-llm`` (data-whitened SVD init) or ``none`` (plain SVD)
    :param dampening: added to the statistics' diagonal, relative to its mean
    :param ridge: ridge of the V-step towards the dense weight, relative
    :param group_order: ``sequential`` (each group sees earlier groups compressed,
        as in the paper) or ``layer`` (one pass for the whole layer: cheaper)
    :param offload_device: device holding the cached activations between layers
    :param cpu_linalg_threads: torch threads for the per-linear decompositions when they
        run on CPU; multi-threaded LAPACK collapses on a shared CPU (an SVD of 1536x576
        took 12 s on 2 busy cores with 2 threads, 0.24 s with 1)
    """

    requires_calibration_data: bool = True

    density: float = 0.5
    attn_density: float | None = None
    mlp_density: float | None = None
    densities: dict[str, float] = Field(default_factory=dict)
    rank_multiple: int = 8
    old_output_factor: float = 0.25
    reconstruct_steps: int = 2
    whitening: Literal["svd-llm", "none"] = "svd-llm"
    dampening: float = 0.01
    ridge: float = 1e-4
    group_order: Literal["sequential", "layer"] = "sequential"
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    offload_device: str = "cpu"
    pivot_tol: float = 1e-3
    cpu_linalg_threads: int = 1

    _plans: dict[str, TargetPlan] = PrivateAttr(default_factory=dict)
    _layers: dict[str, nn.Module] = PrivateAttr(default_factory=dict)
    _layer_targets: dict[str, dict[str, PIFALinear]] = PrivateAttr(default_factory=dict)
    _calls: dict[str, list[CachedCall]] = PrivateAttr(default_factory=dict)
    _dense_stream: list[torch.Tensor] | None = PrivateAttr(default=None)
    _done: set[str] = PrivateAttr(default_factory=set)
    _replaying: bool = PrivateAttr(default=False)
    _warned_few_tokens: bool = PrivateAttr(default=False)
    _names: dict[PIFALinear, str] = PrivateAttr(default_factory=dict)
    # offloaded source linears whose dense weight is onloaded only when their layer runs
    _dense_sources: dict[PIFALinear, nn.Module] = PrivateAttr(default_factory=dict)

    # ------------------------------------------------------------- validation
    @field_validator("density", "attn_density", "mlp_density")
    @classmethod
    def _check_density(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"densities must lie in (0, 1) (PIFA saves nothing at 1), got {value}")
        return value

    @field_validator("densities")
    @classmethod
    def _check_densities(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, density in value.items():
            cls._check_density(density)
            if not pattern:
                raise ValueError("densities: empty module pattern")
        return value

    @field_validator("rank_multiple", "reconstruct_steps", "cpu_linalg_threads")
    @classmethod
    def _check_non_negative(cls, value: int, info) -> int:
        low = 0 if info.field_name == "reconstruct_steps" else 1
        if value < low:
            raise ValueError(f"{info.field_name} must be an integer >= {low}, got {value}")
        return value

    @field_validator("old_output_factor")
    @classmethod
    def _check_lambda(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"old_output_factor must lie in [0, 1], got {value}")
        return value

    @field_validator("dampening", "ridge", "pivot_tol")
    @classmethod
    def _check_positive(cls, value: float, info) -> float:
        if not value >= 0.0:
            raise ValueError(f"{info.field_name} must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _check_targets(self) -> PIFAModifier:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not self.targets:
            raise ValueError("targets must name at least one module class or pattern")
        return self

    # -------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        self._check_recipe_order()
        calib = kwargs.get("calib_data")
        calib = state.data.calib if calib is None else calib
        if calib is None:
            raise ValueError(
                "PIFAModifier needs calibration data: pass `dataset=` (and "
                "`num_calibration_samples=`) to oneshot"
            )
        if _is_empty(calib):  # else the pipeline dies on a bare StopIteration
            raise ValueError(
                "PIFAModifier got an empty calibration dataset (0 samples after "
                "preprocessing); pass a dataset with at least one sample"
            )
        self._check_not_quantized(model)
        sequential_targets = infer_sequential_targets(model, kwargs.get("sequential_targets"))
        layers = find_decoder_layers(model, sequential_targets)
        plans = plan_targets(
            model,
            self.targets,
            self.ignore,
            layers,
            density=self.density,
            attn_density=self.attn_density,
            mlp_density=self.mlp_density,
            densities=self.densities,
            rank_multiple=self.rank_multiple,
        )
        self._plans = {plan.name: plan for plan in plans}
        self._layers = layers
        self._layer_targets = {name: {} for name in layers}
        for plan in plans:
            skeleton, source = _swap_in_skeleton(model, plan)
            if source is not None:
                self._dense_sources[skeleton] = source
            self._layer_targets[plan.layer_name][plan.name] = skeleton
            self._names[skeleton] = plan.name
        for name, layer in layers.items():
            self.register_hook(layer, self._cache_call(name), "forward_pre", with_kwargs=True)
        if isinstance(model, PreTrainedModel):
            attach_pifa_save(model)  # pifa_config + atomic writes on every later save
        logger.info(
            f"PIFAModifier: {len(plans)} linears in {len(layers)} decoder layers, "
            f"target density {self.density}, planned {self._planned_density():.4f}"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs) -> None:
        others = [
            type(m).__name__ for m in active_session().lifecycle.recipe.modifiers if m is not self
        ]
        if others:
            raise ValueError(
                f"PIFAModifier must calibrate alone, but shares a pipeline with {others}; "
                "use oneshot's default pipeline='independent' (a shared 'sequential' "
                "pipeline leaves the quantization scales of the factors uninitialised)"
            )

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[nn.Module], **kwargs
    ) -> None:
        in_subgraph = {id(m) for m in modules}
        todo = [
            (name, layer)
            for name, layer in self._layers.items()
            if name not in self._done and id(layer) in in_subgraph and name in self._calls
        ]
        # Several layers in one epoch (pipeline="basic", or several targets per
        # subgraph): their cached inputs predate compressing the earlier ones, so
        # chain the compressed outputs ourselves.
        new_hidden: list[torch.Tensor] | None = None
        self._replaying = True
        try:
            for index, (name, layer) in enumerate(todo):
                if new_hidden is not None:
                    calls = self._calls[name]
                    self._calls[name] = [
                        c.with_hidden(h) for c, h in zip(calls, new_hidden, strict=True)
                    ]
                new_hidden = self._compress_layer(name, layer, propagate=index + 1 < len(todo))
        finally:
            self._replaying = False

    def on_calibration_end(self, state: State, event: Event, **kwargs) -> None:
        self.remove_hooks()
        pending = [n for n, t in self._layer_targets.items() if t and n not in self._done]
        if pending:
            raise RuntimeError(
                f"PIFAModifier finished calibration with {len(pending)} uncompressed "
                f"decoder layers ({pending[:3]}...): it needs the sequential pipeline "
                "(oneshot's default), and every layer must see calibration data"
            )
        self._calls.clear()
        self._dense_stream = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        # also the clean-up path after an interrupted oneshot: llm-compressor has no
        # exception hook, but its next session reset (or ``reset_session()``) finalizes
        self.remove_hooks()
        self._calls.clear()
        self._dense_stream = None
        return True

    # --------------------------------------------------------------- helpers
    def _cache_call(self, name: str):
        device = torch.device(self.offload_device)

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._replaying:  # our own replays at epoch end are not calibration data
                return
            self._onload_dense(name)
            self._calls.setdefault(name, []).append(CachedCall.record(args, kwargs, device))

        return hook

    def _onload_dense(self, name: str) -> None:
        """Give the skeletons of layer ``name`` the dense weights of their offloaded sources.

        Done when the layer first runs, not in ``on_initialize``: holding every dense
        weight onloaded from the start would defeat offloading. The source's offloaded
        copy is dropped (a disk-offloaded one is deleted from the offload folder).
        """
        for skeleton in self._layer_targets.get(name, {}).values():
            source = self._dense_sources.pop(skeleton, None)
            if source is None:
                continue
            device = get_execution_device(skeleton)
            skeleton.dense_weight = source.weight.detach().to(device)
            with disable_onloading():  # the offloaded values as stored, without reading them
                stored = [key for key, value in source._parameters.items() if value is not None]
            for key in stored:  # (DiskCache cannot delete a None entry such as bias=None)
                del source._parameters[key]

    def _compress_layer(
        self, name: str, layer: nn.Module, propagate: bool = False
    ) -> list[torch.Tensor] | None:
        """Compress one layer; advance the dense stream; return its compressed outputs
        when ``propagate`` (for a following layer in the same epoch)."""
        start = time.perf_counter()
        calls = self._calls.pop(name)
        device = get_execution_device(layer)
        offload = torch.device(self.offload_device)
        dense_hidden = self._dense_stream or [call.hidden for call in calls]
        if len(dense_hidden) != len(calls):
            raise RuntimeError(
                f"{name}: {len(calls)} calibration batches but {len(dense_hidden)} on the "
                "dense stream; the layer was called an unexpected number of times"
            )
        targets = self._layer_targets[name]
        stash: dict[PIFALinear, torch.Tensor] = {}
        errors: dict[str, float] = {}
        names = {module: target for target, module in targets.items()}
        register, remove = self._register_pre_hook, self.remove_hooks

        with torch.no_grad():
            next_dense: list[torch.Tensor] = []
            if targets:
                groups = discover_groups(
                    layer, calls[0], list(targets.values()), register, remove, device
                )
                if self.group_order == "layer":
                    groups = [[m for group in groups for m in group]]
                for index, group in enumerate(groups):
                    # the last group's dense replay runs to the end: its output is the
                    # next layer's dense stream (saves a full pass)
                    last = next_dense if index == len(groups) - 1 else None
                    stats = self._group_stats(
                        layer, calls, dense_hidden, group, stash, name, device, last
                    )
                    fitted = self._fit_group(group, stats, stash, device)
                    errors.update({names[m]: e for m, e in fitted.items()})
            next_new, out_err = [], [0.0, 0.0]
            for i, call in enumerate(calls):
                if not targets:
                    y_old = layer_output(call.with_hidden(dense_hidden[i]).run(layer, device))
                    next_dense.append(y_old.to(offload))
                if not (propagate or (targets and i < 4)):
                    continue
                y_old = next_dense[i].to(device)
                y_new = layer_output(call.run(layer, device))
                if propagate:
                    next_new.append(y_new.to(offload))
                out_err[0] += float((y_new.float() - y_old.float()).pow(2).sum())
                out_err[1] += float(y_old.float().pow(2).sum())
        self._dense_stream = next_dense
        self._done.add(name)
        if targets:
            density = _density([self._plans[t] for t in targets])
            rel = (out_err[0] / max(out_err[1], 1e-30)) ** 0.5
            worst = max(errors, key=errors.get)
            logger.info(
                f"PIFA {name}: density {density:.4f}, layer output rel. error {rel:.4f} "
                f"(worst linear {worst.rsplit('.', 1)[-1]} {errors[worst]:.4f}), "
                f"{time.perf_counter() - start:.1f}s"
            )
        return next_new if propagate else None

    def _register_pre_hook(self, module: nn.Module, hook) -> object:
        return self.register_hook(module, hook, "forward_pre")

    def _group_stats(
        self,
        layer: nn.Module,
        calls: list[CachedCall],
        dense_hidden: list[torch.Tensor],
        group: list[PIFALinear],
        stash: dict[PIFALinear, torch.Tensor],
        name: str,
        device: torch.device,
        dense_outputs: list[torch.Tensor] | None = None,
    ) -> dict[PIFALinear, GroupStats]:
        """Statistics per distinct input of ``group`` (members sharing an input share them).

        The compressed stream is replayed only when M needs it. With
        ``dense_outputs`` the dense replay runs to the end and its outputs are
        appended there (offloaded).
        """
        register, remove = self._register_pre_hook, self.remove_hooks
        paired = self.reconstruct_steps > 0
        offload = torch.device(self.offload_device)
        stats: dict[PIFALinear, GroupStats] = {}
        for i, call in enumerate(calls):
            with dense_mode(stash):
                x_old, out = capture_inputs(
                    layer,
                    call.with_hidden(dense_hidden[i]),
                    group,
                    register,
                    remove,
                    device,
                    stop_early=dense_outputs is None,
                )
            if dense_outputs is not None:
                dense_outputs.append(layer_output(out).to(offload))
            x_new = (
                capture_inputs(layer, call, group, register, remove, device)[0]
                if paired
                else [None] * len(group)
            )
            seen: dict[int, GroupStats] = {}
            for module, xo, xn in zip(group, x_old, x_new, strict=True):
                key = id(xo)
                if key not in seen:
                    seen[key] = stats.get(module) or GroupStats.zeros(
                        module.in_features, device, paired
                    )
                    seen[key].add(xo, xn, f"{name} (batch {i})")
                stats[module] = seen[key]
        return stats

    def _fit_group(
        self,
        group: list[PIFALinear],
        stats: dict[PIFALinear, GroupStats],
        stash: dict[PIFALinear, torch.Tensor],
        device: torch.device,
    ) -> dict[PIFALinear, float]:
        """Fit and write every linear of ``group``; returns each one's relative error.

        Under ``torchrun`` the statistics are first summed over ranks and each
        linear is factorized on one owner rank, then broadcast (see ``distributed``).
        """
        distinct = list({id(s): s for s in (stats[m] for m in group)}.values())
        reduce_stats(distinct)
        self._warn_few_tokens(distinct)
        owners = assign_owners(group)
        with _cpu_threads(device, self.cpu_linalg_threads):
            results = broadcast_factors(
                group, owners, lambda m: self._factorize(m, stats[m]), device
            )
        for module, (factors, _) in results.items():
            stash[module] = module.dense_weight
            _write_factors(module, factors)
        return {module: error for module, (_, error) in results.items()}

    def _warn_few_tokens(self, stats: list[GroupStats]) -> None:
        """Say once when the statistics are rank-deficient: the fit then leans on dampening."""
        short = [s for s in stats if s.tokens < s.h_old.shape[0]]
        if short and not self._warned_few_tokens:
            self._warned_few_tokens = True
            logger.warning(
                f"PIFAModifier: only {short[0].tokens} calibration tokens for a linear with "
                f"{short[0].h_old.shape[0]} inputs; its statistics are singular and the fit "
                "falls back on `dampening` (use more calibration samples or longer ones)"
            )

    def _factorize(self, module: PIFALinear, stats: GroupStats) -> tuple[PivotFactors, float]:
        """Whitened SVD + M for one linear, in PIFA form, and its relative output error."""
        weight = module.dense_weight
        rank = module.rank
        dead = stats.tokens > 0 and not bool(torch.diagonal(stats.h_old).abs().sum() > 0)
        if dead:  # any factors give zero output error; keep the weight's own best fit
            logger.warning(
                f"PIFA {self._names.get(module, 'linear')}: every calibration input is zero "
                "(a dead branch); factorizing by plain truncated SVD of the weight"
            )
        if self.whitening == "svd-llm" and not dead:
            a, b = whitened_svd(weight, stats.h_old, rank, self.dampening)
        else:
            u, s, vh = torch.linalg.svd(weight.to(stats.h_old.device, torch.float64), False)
            a, b = u[:, :rank] * s[:rank].sqrt(), s[:rank, None].sqrt() * vh[:rank]
        if self.reconstruct_steps and not dead:
            a, b = m_refit(
                weight,
                a,
                b,
                stats.h_new,
                stats.cross,
                self.old_output_factor,
                self.reconstruct_steps,
                self.ridge,
            )
        factors = pivot_factorize(a, b, tol=self.pivot_tol)
        hessian = stats.h_new if stats.h_new is not None else stats.h_old
        return factors, relative_output_error(weight, factors.reconstruct(), hessian)

    def _check_recipe_order(self) -> None:
        modifiers = active_session().lifecycle.recipe.modifiers
        for modifier in modifiers:
            if modifier is self:
                return
            if type(modifier).__name__ in _QUANT_MODIFIERS:
                raise ValueError(
                    f"{type(modifier).__name__} comes before PIFAModifier in the recipe; "
                    "put PIFAModifier first so quantization sees the final pivot/coeff "
                    "layers"
                )

    def _check_not_quantized(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            if getattr(module, "quantization_scheme", None) is not None and isinstance(
                module, nn.Linear
            ):
                raise ValueError(
                    f"{name} already carries a quantization scheme; PIFAModifier must run "
                    "before quantization (place it first in the recipe)"
                )

    def _planned_density(self) -> float:
        return _density(list(self._plans.values()))


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """Limit torch's intra-op threads while decompositions run on CPU."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _is_empty(calib: object) -> bool:
    """Whether a calibration loader (or dataset) is known to hold no sample."""
    try:
        return len(calib) == 0  # type: ignore[arg-type]
    except TypeError:  # iterable without a length: cannot tell before iterating
        return False


def _density(plans: list[TargetPlan]) -> float:
    kept = sum(p.density * p.out_features * p.in_features for p in plans)
    return kept / max(sum(p.out_features * p.in_features for p in plans), 1)


def _swap_in_skeleton(model: nn.Module, plan: TargetPlan) -> tuple[PIFALinear, nn.Linear | None]:
    """Replace the linear by a skeleton; for an offloaded linear also return the linear.

    An offloaded linear (compressed-tensors ``OffloadCache``: cpu, device or disk)
    gets a skeleton offloaded the same way, so that the factors are written to the
    offload storage; its dense weight stays offloaded until the layer runs
    (``PIFAModifier._onload_dense``) and is a meta placeholder until then.
    """
    parent_name, _, child = plan.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = getattr(parent, child)
    if not isinstance(linear, nn.Linear) or not isinstance(linear._parameters, OffloadCache):
        skeleton = PIFALinear.skeleton_of(linear, plan.rank)
        setattr(parent, child, skeleton)
        return skeleton, None
    with disable_onloading():
        offloaded = linear.weight  # meta for disk offload: shape and dtype only
    skeleton = PIFALinear(
        linear.in_features,
        linear.out_features,
        plan.rank,
        bias=linear.bias is not None,
        device="cpu",
        dtype=offloaded.dtype,
    )
    with torch.no_grad():
        if linear.bias is not None:
            skeleton.bias.copy_(linear.bias)
    kwargs = get_cache_init_kwargs(linear)
    for module in skeleton.modules():
        offload_module(module, **kwargs)
    skeleton.dense_weight = torch.empty(offloaded.shape, dtype=offloaded.dtype, device="meta")
    setattr(parent, child, skeleton)
    return skeleton, linear


@torch.no_grad()
def _write_factors(module: PIFALinear, factors: PivotFactors) -> None:
    """Write factors through the offload API (works for offloaded and plain modules)."""
    dtype = module.pivot.weight.dtype
    update_offload_parameter(module.pivot, "weight", factors.pivot_rows.to(dtype))
    update_offload_parameter(module.coeff, "weight", factors.coeff.to(dtype))
    # written through the offload API first: on an offloaded module ``set_pivot_idx``
    # only updates an onloaded copy, then derives the permutation from the stored one
    update_offload_parameter(module, "pivot_idx", factors.pivot_idx.to(torch.int32))
    module.set_pivot_idx(factors.pivot_idx)
    module.dense_weight = None
