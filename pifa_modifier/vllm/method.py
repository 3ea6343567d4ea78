"""``PIFALinearMethod``: a vLLM ``LinearMethodBase`` computing a (fused) PIFA layer.

Imports vLLM: import this module only through ``pifa_modifier.vllm``'s config.

Parameters it creates on the vLLM layer (TP = 1), named so that vLLM's loaders
resolve the checkpoint names unchanged (``q_proj.pivot.weight`` is renamed to
``qkv_proj.pivot.weight`` with shard id ``"q"``, and ``QKVParallelLinear`` /
``MergedColumnParallelLinear.load_weights`` look ``pivot.weight`` up as
submodule ``pivot``, attribute ``weight``):

* ``pivot.weight`` (``sum r_i x n``): the shards' pivot rows, row-stacked;
* ``coeff.weight`` (flat): each shard's ``C_i`` block, viewed out at run time;
* ``pivot_idx`` (int32, ``sum r_i``): each shard's pivots, stacked;
* quantized checkpoints: ``pivot.weight_packed`` / ``weight_scale`` (row-stacked),
  ``pivot.weight_shape`` (one row per shard), and the flat ``coeff.*`` likewise.

The layer's own ``bias`` (vLLM creates and loads it, shard-aware) is used as is.

First version: packed W4A16/W8A16 factors are **dequantized to the activation
dtype once, in ``process_weights_after_loading``** (run time then equals float
factors; memory is that of float factors). The designed Marlin path (keep the
factors packed, one Marlin GEMM for the stacked pivot rows and one per C_i) is
described in docs/vllm.md and not built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearMethodBase

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.module import validate_pivot_idx
from pifa_modifier.vllm.layout import (
    COEFF_ROLES,
    PIVOT_IDX,
    PIVOT_ROLES,
    FactorQuant,
    FusedLayout,
    FusedTensors,
    check_tensor_parallel,
    dequantize_factor,
    fused_pifa_forward,
    output_gather_index,
)

__all__ = ["PIFALinearMethod"]


class PIFALinearMethod(LinearMethodBase):
    """Creates, loads and runs the fused PIFA tensors of one vLLM linear layer."""

    def __init__(self, layout: FusedLayout, quant: FactorQuant | None) -> None:
        self.layout = layout
        self.quant = quant

    # ------------------------------------------------------------- create
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        layout = self.layout
        # LinearBase sets tp_size before its subclasses call create_weights
        check_tensor_parallel(layout.prefix, int(getattr(layer, "tp_size", 1)))
        if list(output_partition_sizes) != layout.output_sizes or input_size != layout.in_features:
            raise PIFACheckpointError(
                f"{layout.prefix}: vLLM builds this layer as {input_size} -> "
                f"{list(output_partition_sizes)}, pifa_config says {layout.in_features} -> "
                f"{layout.output_sizes}"
            )
        layer.pivot = nn.Module()
        layer.coeff = nn.Module()
        for role in self._factor_roles():
            owner = layer.pivot if role in PIVOT_ROLES else layer.coeff
            dtype = _role_dtype(role, params_dtype)
            data = torch.empty(layout.storage_shape(role, self.quant), dtype=dtype)
            owner.register_parameter(role.partition(".")[2], self._param(data, role, layer))
        data = torch.empty(layout.storage_shape(PIVOT_IDX, None), dtype=torch.int32)
        layer.register_parameter(PIVOT_IDX, self._param(data, PIVOT_IDX, layer))
        layer.pifa_loaded = set()  # (role, shard index) pairs, checked after loading
        layer.pifa_params_dtype = params_dtype

    def _factor_roles(self) -> tuple[str, ...]:
        if self.quant is None:
            return ("pivot.weight", "coeff.weight")
        return (*PIVOT_ROLES[1:], *COEFF_ROLES[1:])

    def _param(self, data: torch.Tensor, role: str, layer: nn.Module) -> nn.Parameter:
        param = nn.Parameter(data, requires_grad=False)

        def weight_loader(
            param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None
        ) -> None:
            self._load(layer, param, role, loaded, shard_id)

        param.weight_loader = weight_loader
        return param

    def _load(
        self,
        layer: nn.Module,
        param: nn.Parameter,
        role: str,
        loaded: torch.Tensor,
        shard_id: str | int | None,
    ) -> None:
        """Copy one checkpoint tensor into its shard's slot (runs on host tensors at load)."""
        if shard_id is None:
            shard_id = getattr(loaded, "shard_id", None)
        index = self.layout.shard_index(shard_id)
        where = f"{self.layout.shards[index].module}.{role}"
        expected = self.layout.expected_shape(role, index, self.quant)
        if tuple(loaded.shape) != expected:
            raise PIFACheckpointError(f"{where}: shape {tuple(loaded.shape)}, expected {expected}")
        if role == PIVOT_IDX:
            spec = self.layout.shards[index].spec
            validate_pivot_idx(loaded, spec.out_features, spec.rank)
        elif role.endswith("weight_shape"):
            rows, cols = self.layout.expected_shape(role.replace("_shape", ""), index, None)
            if [int(v) for v in loaded.reshape(-1)] != [rows, cols]:
                raise PIFACheckpointError(f"{where} is {loaded.tolist()}, expected {[rows, cols]}")
        elif role.endswith("weight_packed") and loaded.dtype != torch.int32:
            raise PIFACheckpointError(f"{where}: dtype {loaded.dtype}, expected int32")
        dest = self.layout.shard_slice(param.data, role, index, self.quant)
        dest.copy_(loaded.reshape(dest.shape))
        layer.pifa_loaded.add((role, index))

    # ------------------------------------------------------------ process
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Check completeness, dequantize packed factors, build the gather index (once)."""
        layout, quant = self.layout, self.quant
        roles = (*self._factor_roles(), PIVOT_IDX)
        missing = [
            f"{shard.module}.{role}"
            for index, shard in enumerate(layout.shards)
            for role in roles
            if (role, index) not in layer.pifa_loaded
        ]
        if missing:
            raise PIFACheckpointError(f"{layout.prefix}: checkpoint tensors missing: {missing}")
        dtype = layer.pifa_params_dtype
        idxs = [
            layout.shard_slice(layer.pivot_idx.data, PIVOT_IDX, i, None)
            for i in range(len(layout.shards))
        ]
        gather = output_gather_index(layout, idxs).to(layer.pivot_idx.device)
        if quant is not None:
            pivots, coeffs = [], []
            for i, shard in enumerate(layout.shards):

                def get(role: str, i: int = i) -> torch.Tensor:
                    owner = layer.pivot if role.startswith("pivot.") else layer.coeff
                    storage = getattr(owner, role.partition(".")[2]).data
                    return layout.shard_slice(storage, role, i, quant)

                spec = shard.spec
                pivots.append(dequantize_factor(get, "pivot", spec.rank, spec.in_features, quant))
                coeffs.append(dequantize_factor(get, "coeff", shard.n_coeff_rows, spec.rank, quant))
            pivot = torch.cat(pivots).to(dtype)
            flat = torch.cat([c.to(dtype).reshape(-1) for c in coeffs])
            layer.pivot = nn.Module()
            layer.coeff = nn.Module()
            layer.pivot.weight = nn.Parameter(pivot, requires_grad=False)
            layer.coeff.weight = nn.Parameter(flat, requires_grad=False)
        layer.register_buffer("pifa_gather", gather, persistent=False)
        del layer.pifa_loaded

    # -------------------------------------------------------------- apply
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The fused PIFA forward: no host sync, fixed shapes (CUDA-graph safe)."""
        layout = self.layout
        flat = layer.coeff.weight
        coeffs = tuple(
            layout.shard_slice(flat, "coeff.weight", i, None) for i in range(len(layout.shards))
        )
        tensors = FusedTensors(layer.pivot.weight, coeffs, layer.pifa_gather)
        return fused_pifa_forward(x, layout, tensors, bias)


def _role_dtype(role: str, params_dtype: torch.dtype) -> torch.dtype:
    if role.endswith("weight_packed"):
        return torch.int32
    if role.endswith("weight_shape"):
        return torch.int64
    return params_dtype
