"""Fused runtime layout of PIFA layers for vLLM -- pure torch, never imports vllm.

Why this module exists: vLLM fuses ``q_proj``/``k_proj``/``v_proj`` into one
``qkv_proj`` layer and ``gate_proj``/``up_proj`` into ``gate_up_proj``, and loads
each checkpoint tensor into the fused layer with a *shard id*. A PIFA layer is
not a weight matrix, so the fused layer must hold, for shards ``i = 0..S-1``
(each a PIFA layer ``W_i`` of ``m_i x n``, rank ``r_i``):

* the pivot rows of all shards **row-stacked**, ``P = [P_0; P_1; ...]``
  (``sum r_i x n``): one GEMM ``y_p = x P^T`` serves every shard;
* one coefficient block ``C_i`` (``(m_i - r_i) x r_i``) per shard, applied to
  that shard's slice of ``y_p`` (they differ in both dimensions, so they cannot
  be stacked without zero padding);
* a gather index mapping ``z = [y_p | y_np_0 | y_np_1 | ...]`` onto the fused
  output columns ``[W_0 rows | W_1 rows | ...]`` (shard offsets plus each
  shard's ``pivot_idx`` / non-pivot rows): ``y = z[..., gather]``.

Everything here -- names, shapes, offsets, the checkpoint-name mapping, the
reference forward, the checkpoint claim predicate -- is vLLM-independent so
that CI tests it without vLLM; ``config.py`` and ``method.py`` only glue it to
vLLM's ``QuantizationConfig`` / ``LinearMethodBase`` interfaces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.metadata import CONFIG_KEY, ModuleSpec, parse_pifa_config
from pifa_modifier.kernels.packed import SUPPORTED_BITS
from pifa_modifier.math import non_pivot_index
from pifa_modifier.module import validate_pivot_idx

__all__ = [
    "COEFF_ROLES",
    "DEFAULT_PACKED_MODULES",
    "PIVOT_ROLES",
    "ROLES",
    "FactorQuant",
    "FusedLayout",
    "FusedTensors",
    "ShardLayout",
    "TensorTarget",
    "build_fused_layout",
    "check_tensor_parallel",
    "claim_checkpoint",
    "delegate_quant_config",
    "dequantize_factor",
    "factor_quant",
    "fused_pifa_forward",
    "fused_tensors_from_state_dict",
    "map_checkpoint_name",
    "output_gather_index",
    "pifa_specs_of",
]

# Fused vLLM layers -> their checkpoint members, as vLLM's Llama-family models
# declare in ``packed_modules_mapping`` (vLLM passes the model's own mapping at
# run time; this default serves tests and models that declare none).
DEFAULT_PACKED_MODULES: dict[str, list[str]] = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}
# QKVParallelLinear names its shards "q"/"k"/"v"; MergedColumnParallelLinear uses 0, 1, ...
_QKV_SHARD_IDS = ("q", "k", "v")

# Tensor roles: the tensor-name suffix after the PIFA module path.
PIVOT_WEIGHT, COEFF_WEIGHT = "pivot.weight", "coeff.weight"
PIVOT_IDX, BIAS = "pivot_idx", "bias"
PIVOT_ROLES = ("pivot.weight", "pivot.weight_packed", "pivot.weight_scale", "pivot.weight_shape")
COEFF_ROLES = ("coeff.weight", "coeff.weight_packed", "coeff.weight_scale", "coeff.weight_shape")
ROLES = (*PIVOT_ROLES, *COEFF_ROLES, PIVOT_IDX, BIAS)


class FactorQuant(NamedTuple):
    """Weight-only int quantization of both factors (compressed-tensors ``pack-quantized``).

    ``group_size`` None means one scale per output row (``channel`` strategy).
    """

    num_bits: int
    group_size: int | None

    def words(self, cols: int) -> int:
        """int32 words per packed row of ``cols`` values."""
        return -(-cols * self.num_bits // 32)

    def groups(self, cols: int) -> int:
        """Scales per row of ``cols`` values."""
        if self.group_size is None:
            return 1
        if cols % self.group_size:
            raise PIFACheckpointError(
                f"group_size {self.group_size} does not divide the factor width {cols}"
            )
        return cols // self.group_size


@dataclass(frozen=True)
class ShardLayout:
    """One checkpoint PIFA layer inside a (possibly fused) vLLM layer."""

    module: str  # checkpoint module path, e.g. model.layers.0.self_attn.k_proj
    shard_id: str | int | None  # vLLM's shard id (None: the layer is not fused)
    spec: ModuleSpec
    out_offset: int  # first fused output column of this shard
    pivot_offset: int  # first row of this shard in the stacked pivot rows

    @property
    def n_coeff_rows(self) -> int:
        return self.spec.out_features - self.spec.rank


@dataclass(frozen=True)
class FusedLayout:
    """Static structure of one vLLM linear layer whose shards are all PIFA layers.

    Depends only on ``pifa_config`` (shapes), not on tensor values; the gather
    index, which depends on the loaded ``pivot_idx``, is ``output_gather_index``.
    """

    prefix: str  # the vLLM layer prefix, e.g. model.layers.0.self_attn.qkv_proj
    shards: tuple[ShardLayout, ...]

    @property
    def in_features(self) -> int:
        return self.shards[0].spec.in_features

    @property
    def out_features(self) -> int:
        return sum(s.spec.out_features for s in self.shards)

    @property
    def total_rank(self) -> int:
        return sum(s.spec.rank for s in self.shards)

    @property
    def output_sizes(self) -> list[int]:
        return [s.spec.out_features for s in self.shards]

    @property
    def fused(self) -> bool:
        return self.shards[0].shard_id is not None

    def shard_index(self, shard_id: str | int | None) -> int:
        """Position of the shard vLLM calls ``shard_id`` (None only for unfused layers)."""
        for index, shard in enumerate(self.shards):
            if shard.shard_id == shard_id:
                return index
        ids = [s.shard_id for s in self.shards]
        raise PIFACheckpointError(
            f"{self.prefix}: shard id {shard_id!r} is not one of {ids} (a fused checkpoint "
            "tensor without a shard id cannot be split into PIFA shards)"
        )

    # ------------------------------------------------------------- storage
    def coeff_shapes(self, role: str, quant: FactorQuant | None) -> list[tuple[int, ...]]:
        """Per-shard shape of a ``coeff.*`` tensor (the factor is ``(m_i - r_i) x r_i``)."""
        return [_factor_shape(role, s.n_coeff_rows, s.spec.rank, quant) for s in self.shards]

    def coeff_offsets(self, role: str, quant: FactorQuant | None) -> list[int]:
        """Element offset of each shard's block in the flat storage of a ``coeff.*`` role.

        The coefficient blocks differ in both dimensions, so the fused layer keeps
        each role as one flat tensor and views the blocks out of it.
        """
        offsets, total = [], 0
        for shape in self.coeff_shapes(role, quant):
            offsets.append(total)
            total += _numel(shape)
        return [*offsets, total]

    def storage_shape(self, role: str, quant: FactorQuant | None) -> tuple[int, ...]:
        """Shape of the fused layer's tensor for ``role`` (what ``create_weights`` allocates)."""
        n = self.in_features
        if role in PIVOT_ROLES:
            if role == "pivot.weight_shape":
                return (len(self.shards), 2)
            return _factor_shape(role, self.total_rank, n, quant)  # rows stacked
        if role in COEFF_ROLES:
            if role == "coeff.weight_shape":
                return (len(self.shards), 2)
            return (self.coeff_offsets(role, quant)[-1],)
        if role == PIVOT_IDX:
            return (self.total_rank,)
        if role == BIAS:
            return (self.out_features,)
        raise PIFACheckpointError(f"{self.prefix}: unknown tensor role {role!r}")

    def shard_slice(
        self, storage: torch.Tensor, role: str, index: int, quant: FactorQuant | None
    ) -> torch.Tensor:
        """The view of ``storage`` (shaped ``storage_shape(role)``) holding shard ``index``."""
        shard = self.shards[index]
        if role in ("pivot.weight_shape", "coeff.weight_shape"):
            return storage[index]
        if role in PIVOT_ROLES or role == PIVOT_IDX:
            return storage[shard.pivot_offset : shard.pivot_offset + shard.spec.rank]
        if role in COEFF_ROLES:
            start, stop = self.coeff_offsets(role, quant)[index : index + 2]
            return storage[start:stop].view(self.coeff_shapes(role, quant)[index])
        if role == BIAS:
            return storage[shard.out_offset : shard.out_offset + shard.spec.out_features]
        raise PIFACheckpointError(f"{self.prefix}: unknown tensor role {role!r}")

    def expected_shape(self, role: str, index: int, quant: FactorQuant | None) -> tuple[int, ...]:
        """The checkpoint shape of shard ``index``'s ``role`` tensor (for load-time checks)."""
        spec = self.shards[index].spec
        if role in PIVOT_ROLES:
            return _factor_shape(role, spec.rank, spec.in_features, quant)
        if role in COEFF_ROLES:
            return _factor_shape(role, spec.out_features - spec.rank, spec.rank, quant)
        if role == PIVOT_IDX:
            return (spec.rank,)
        if role == BIAS:
            return (spec.out_features,)
        raise PIFACheckpointError(f"{self.prefix}: unknown tensor role {role!r}")

    def roles(self, quant: FactorQuant | None) -> tuple[str, ...]:
        """The factor roles a checkpoint of this layout must provide (bias is the layer's)."""
        if quant is None:
            return (PIVOT_WEIGHT, COEFF_WEIGHT, PIVOT_IDX)
        return (*PIVOT_ROLES[1:], *COEFF_ROLES[1:], PIVOT_IDX)


class TensorTarget(NamedTuple):
    """Where a checkpoint tensor of a PIFA layer goes in the vLLM model."""

    layer: str  # vLLM layer prefix (fused name for q/k/v, gate/up)
    shard_id: str | int | None  # vLLM shard id; None for unfused layers
    shard_index: int  # position of the shard in the layer (0 for unfused layers)
    module: str  # checkpoint PIFA module path
    role: str  # one of ROLES


class FusedTensors(NamedTuple):
    """The run-time tensors of one fused PIFA layer (float factors)."""

    pivot: torch.Tensor  # (sum r_i, n) stacked pivot rows
    coeffs: tuple[torch.Tensor, ...]  # per shard (m_i - r_i, r_i)
    gather: torch.Tensor  # int64 (sum m_i,): fused column j = z[..., gather[j]]
    bias: torch.Tensor | None = None  # (sum m_i,)


# ------------------------------------------------------------------ layout
def _fusion_of(
    prefix: str, packed_modules: Mapping[str, Sequence[str]]
) -> tuple[str, list[tuple[str, str | int | None]]]:
    """The checkpoint members of the vLLM layer ``prefix`` with their shard ids."""
    parent, _, leaf = prefix.rpartition(".")
    members = packed_modules.get(leaf)
    if not members:
        return leaf, [(prefix, None)]
    join = (parent + ".") if parent else ""
    ids: Sequence[str | int] = (
        _QKV_SHARD_IDS if len(members) == 3 and leaf.startswith("qkv") else range(len(members))
    )
    return leaf, [(join + member, sid) for member, sid in zip(members, ids, strict=True)]


def build_fused_layout(
    prefix: str,
    specs: Mapping[str, ModuleSpec],
    packed_modules: Mapping[str, Sequence[str]] | None = None,
    output_sizes: Sequence[int] | None = None,
    input_size: int | None = None,
) -> FusedLayout | None:
    """The PIFA layout of vLLM layer ``prefix``, or None if none of its shards is PIFA.

    ``packed_modules`` is the model's ``packed_modules_mapping`` (fused leaf name
    -> member leaf names). A fused layer must be PIFA in all shards or in none:
    mixing a dense shard into a PIFA fused layer is not supported (yet).
    ``output_sizes`` / ``input_size`` (vLLM's, at TP=1) are checked when given.
    """
    packed_modules = DEFAULT_PACKED_MODULES if packed_modules is None else packed_modules
    _, members = _fusion_of(prefix, packed_modules)
    present = [name for name, _ in members if name in specs]
    if not present:
        return None
    if len(present) != len(members):
        missing = [name for name, _ in members if name not in specs]
        raise PIFACheckpointError(
            f"{prefix}: vLLM fuses {[n for n, _ in members]} into one layer, but only "
            f"{present} are PIFA layers ({missing} are dense); a fused layer must be PIFA in "
            "all shards or none (export those layers dense, or compress all of them)"
        )
    shards, out_offset, pivot_offset = [], 0, 0
    for name, shard_id in members:
        spec = specs[name]
        shards.append(ShardLayout(name, shard_id, spec, out_offset, pivot_offset))
        out_offset += spec.out_features
        pivot_offset += spec.rank
    layout = FusedLayout(prefix, tuple(shards))
    widths = {s.spec.in_features for s in shards}
    if len(widths) != 1:
        raise PIFACheckpointError(f"{prefix}: fused shards have different in_features {widths}")
    if output_sizes is not None and list(output_sizes) != layout.output_sizes:
        raise PIFACheckpointError(
            f"{prefix}: vLLM's output sizes {list(output_sizes)} differ from pifa_config's "
            f"out_features {layout.output_sizes} (tensor parallelism > 1, or a wrong config)"
        )
    if input_size is not None and input_size != layout.in_features:
        raise PIFACheckpointError(
            f"{prefix}: vLLM's input size {input_size} differs from pifa_config's in_features "
            f"{layout.in_features}"
        )
    return layout


def check_tensor_parallel(prefix: str, tp_size: int) -> None:
    """Refuse tensor parallelism > 1: designed in docs/vllm.md, not implemented."""
    if tp_size != 1:
        raise NotImplementedError(
            f"PIFA layer {prefix}: tensor_parallel_size={tp_size} is not supported yet; the "
            "PIFA vLLM plugin implements tensor_parallel_size=1 only (the sharding design is "
            "in docs/vllm.md). Serve with --tensor-parallel-size 1, or export a dense "
            "checkpoint with `pifa export-dense`."
        )


# ------------------------------------------------------------ name mapping
_ROLE_RE = re.compile(
    r"^(?P<module>.+)\.(?P<role>pivot\.weight(?:_packed|_scale|_shape)?|"
    r"coeff\.weight(?:_packed|_scale|_shape)?|pivot_idx|bias)$"
)
_FACTOR_RE = re.compile(r"^(?P<module>.+)\.(?:pivot|coeff)\.(?P<rest>[^.]+)$")


def map_checkpoint_name(
    name: str,
    specs: Mapping[str, ModuleSpec],
    packed_modules: Mapping[str, Sequence[str]] | None = None,
) -> TensorTarget | None:
    """Where checkpoint tensor ``name`` goes: (fused layer, shard, role), or None if not PIFA.

    Tensors of PIFA modules that this runtime does not read (``N.weight``,
    ``weight_zero_point``, ``weight_g_idx``) are errors, named, rather than
    silently ignored: they would mean a different model.
    """
    packed_modules = DEFAULT_PACKED_MODULES if packed_modules is None else packed_modules
    match = _ROLE_RE.match(name)
    module = match["module"] if match else None
    if module is None or module not in specs:
        factor = _FACTOR_RE.match(name)
        owner = factor["module"] if factor else name.rpartition(".")[0]
        if owner in specs:
            raise PIFACheckpointError(
                f"{name}: PIFA layer {owner} has a tensor this runtime does not read (asymmetric "
                "zero points, g_idx activation order and dense weights are not supported)"
            )
        return None
    parent, _, leaf = module.rpartition(".")
    for fused, members in packed_modules.items():
        if leaf in members:
            layer = f"{parent}.{fused}" if parent else fused
            _, shards = _fusion_of(layer, packed_modules)
            index = list(members).index(leaf)
            return TensorTarget(layer, shards[index][1], index, module, match["role"])
    return TensorTarget(module, None, 0, module, match["role"])


# ---------------------------------------------------------- checkpoint claim
def claim_checkpoint(hf_config: Mapping[str, Any]) -> str | None:
    """``"pifa"`` if the HF config dict describes a PIFA checkpoint, else None.

    Raises ``PIFACheckpointError`` for a malformed ``pifa_config`` (a typo must
    fail the load, not serve a wrong model) and for a ``quantization_config``
    that is not compressed-tensors (docs/checkpoint-format.md section 4.2).
    """
    raw = hf_config.get(CONFIG_KEY)
    if raw is None:
        text = hf_config.get("text_config")
        raw = text.get(CONFIG_KEY) if isinstance(text, Mapping) else None
    if raw is None:
        return None
    parse_pifa_config(raw)
    quant = hf_config.get("quantization_config")
    if quant is not None and (
        not isinstance(quant, Mapping) or quant.get("quant_method") != "compressed-tensors"
    ):
        method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
        raise PIFACheckpointError(
            f"PIFA checkpoint with quantization_config quant_method {method!r}: only "
            "compressed-tensors quantization of the factors is supported"
        )
    return "pifa"


def pifa_specs_of(hf_config: Mapping[str, Any]) -> dict[str, ModuleSpec]:
    """The parsed ``pifa_config`` modules of an HF config dict (top level or text_config)."""
    raw = hf_config.get(CONFIG_KEY)
    if raw is None and isinstance(hf_config.get("text_config"), Mapping):
        raw = hf_config["text_config"].get(CONFIG_KEY)
    if raw is None:
        raise PIFACheckpointError("the model config has no pifa_config: not a PIFA checkpoint")
    return parse_pifa_config(raw)


def _target_matches(target: str, name: str) -> bool:
    if target == "Linear":  # the factors are nn.Linear children
        return True
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def factor_quant(quant_cfg: Mapping[str, Any] | None, module: str) -> FactorQuant | None:
    """The quantization of PIFA layer ``module``'s factors under ``quant_cfg``, or None (float).

    Both factors must share one supported scheme: weight-only, symmetric int4/int8,
    group or channel strategy, ``pack-quantized``, no group/dynamic activation order.
    Anything else is refused by name (the first version dequantizes at load).
    """
    if not quant_cfg:
        return None
    found: list[FactorQuant | None] = []
    for factor in ("pivot", "coeff"):
        name = f"{module}.{factor}"
        if any(_target_matches(t, name) for t in quant_cfg.get("ignore") or ()):
            found.append(None)
            continue
        group = next(
            (
                g
                for g in (quant_cfg.get("config_groups") or {}).values()
                if any(_target_matches(t, name) for t in g.get("targets") or ())
            ),
            None,
        )
        found.append(_parse_weight_args(name, group, quant_cfg.get("format")))
    if found[0] != found[1]:
        raise PIFACheckpointError(
            f"{module}: pivot and coeff are quantized differently ({found[0]} vs {found[1]}); "
            "the PIFA vLLM plugin needs one scheme for both factors"
        )
    return found[0]


def _parse_weight_args(
    name: str, group: Mapping[str, Any] | None, top_format: str | None
) -> FactorQuant | None:
    weights = None if group is None else group.get("weights")
    if not weights:
        return None
    if group.get("input_activations") or group.get("output_activations"):
        raise PIFACheckpointError(f"{name}: activation quantization is not supported (W*A16 only)")
    fmt = group.get("format") or top_format
    bits, strategy = weights.get("num_bits"), weights.get("strategy")
    problems = [
        f"format {fmt!r}" if fmt not in ("pack-quantized", None) else "",
        f"type {weights.get('type')!r}" if weights.get("type", "int") != "int" else "",
        "asymmetric" if not weights.get("symmetric", True) else "",
        f"num_bits {bits!r}" if bits not in SUPPORTED_BITS else "",
        f"strategy {strategy!r}" if strategy not in ("group", "channel") else "",
        f"actorder {weights.get('actorder')!r}"
        if weights.get("actorder") in ("group", "dynamic")
        else "",
        "dynamic" if weights.get("dynamic") else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise PIFACheckpointError(
            f"{name}: quantization scheme not supported by the PIFA vLLM plugin "
            f"({', '.join(problems)}); supported: pack-quantized symmetric int4/int8, group or "
            "channel strategy"
        )
    if strategy == "channel":
        return FactorQuant(bits, None)
    size = weights.get("group_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise PIFACheckpointError(f"{name}: group strategy needs a positive group_size, got {size}")
    return FactorQuant(bits, size)


def delegate_quant_config(quant_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The part of ``quant_cfg`` that vLLM's CompressedTensorsConfig should handle, or None.

    PIFA checkpoints with float factors carry a compressed-tensors config whose
    only group has ``weights: null``, which vLLM's parser rejects; such groups
    are dropped, and with no group left nothing is delegated (other layers are
    then unquantized).
    """
    if not quant_cfg:
        return None
    groups = {
        key: group
        for key, group in (quant_cfg.get("config_groups") or {}).items()
        if group.get("weights") or group.get("input_activations")
    }
    if not groups:
        return None
    return {**quant_cfg, "config_groups": groups}


# -------------------------------------------------------------- the forward
def output_gather_index(layout: FusedLayout, pivot_idx: Sequence[torch.Tensor]) -> torch.Tensor:
    """int64 ``gather`` with ``fused_out = z[..., gather]``, ``z = [y_p | y_np_0 | y_np_1 ...]``.

    ``dest`` (the scatter map: column ``k`` of ``z`` goes to fused column
    ``dest[k]``) is the pivot rows of each shard, offset by the shard, followed by
    each shard's non-pivot rows, offset likewise; ``gather`` is its inverse
    permutation, so the forward is one ``index_select`` with a fixed index (no
    host sync, CUDA-graph safe). Validates each ``pivot_idx`` (host sync: call at
    load time only).
    """
    if len(pivot_idx) != len(layout.shards):
        raise ValueError(f"{layout.prefix}: {len(pivot_idx)} pivot_idx for {len(layout.shards)}")
    pivots, others = [], []
    for shard, idx in zip(layout.shards, pivot_idx, strict=True):
        validate_pivot_idx(idx, shard.spec.out_features, shard.spec.rank)
        idx = idx.detach().to("cpu", torch.int64)
        pivots.append(idx + shard.out_offset)
        others.append(
            non_pivot_index(idx, shard.spec.out_features).to(torch.int64) + shard.out_offset
        )
    dest = torch.cat([*pivots, *others])
    gather = torch.empty_like(dest)
    gather[dest] = torch.arange(dest.numel())
    return gather


def fused_pifa_forward(
    x: torch.Tensor, layout: FusedLayout, tensors: FusedTensors, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Fused PIFA output ``[W_0 x | W_1 x | ...] (+ bias)``: one pivot GEMM, one GEMM per C_i.

    Fixed shapes and a fixed gather index, no data-dependent control flow: safe
    for torch.compile and CUDA graphs. ``bias`` overrides ``tensors.bias``.
    """
    y_p = F.linear(x, tensors.pivot)
    parts = [y_p]
    for shard, coeff in zip(layout.shards, tensors.coeffs, strict=True):
        start = shard.pivot_offset
        parts.append(F.linear(y_p[..., start : start + shard.spec.rank], coeff))
    y = torch.cat(parts, dim=-1).index_select(-1, tensors.gather)
    bias = tensors.bias if bias is None else bias
    return y if bias is None else y + bias


def fused_tensors_from_state_dict(
    layout: FusedLayout,
    state_dict: Mapping[str, torch.Tensor],
    quant: FactorQuant | None = None,
    dtype: torch.dtype | None = None,
) -> FusedTensors:
    """Stack a checkpoint's tensors (names as saved) into the fused run-time tensors.

    What the vLLM weight loaders do tensor by tensor, in one call: for tests and
    for other runtimes. Packed factors are dequantized to ``dtype`` (default:
    the scale's dtype), exactly as ``pifa_modifier.kernels.packed`` does.
    """
    pivots, coeffs, idxs, biases = [], [], [], []
    for shard in layout.shards:
        get = _getter(state_dict, shard.module)
        if quant is None:
            pivot, coeff = get(PIVOT_WEIGHT), get(COEFF_WEIGHT)
        else:
            pivot = dequantize_factor(get, "pivot", shard.spec.rank, shard.spec.in_features, quant)
            coeff = dequantize_factor(get, "coeff", shard.n_coeff_rows, shard.spec.rank, quant)
        pivots.append(pivot if dtype is None else pivot.to(dtype))
        coeffs.append(coeff if dtype is None else coeff.to(dtype))
        idxs.append(get(PIVOT_IDX))
        biases.append(state_dict.get(f"{shard.module}.{BIAS}"))
    if any(b is None for b in biases) and not all(b is None for b in biases):
        raise PIFACheckpointError(f"{layout.prefix}: some fused shards have a bias, some do not")
    bias = None if biases[0] is None else torch.cat(biases)
    gather = output_gather_index(layout, idxs).to(pivots[0].device)
    return FusedTensors(torch.cat(pivots), tuple(coeffs), gather, bias)


def dequantize_factor(get, factor: str, rows: int, cols: int, quant: FactorQuant) -> torch.Tensor:
    """Dequantize one packed factor (``get(role)`` returns its tensors), checking shapes."""
    from pifa_modifier.kernels.packed import PackedWeight, dequantize_packed

    packed, scale = get(f"{factor}.weight_packed"), get(f"{factor}.weight_scale")
    shape = get(f"{factor}.weight_shape")
    if [int(v) for v in shape.reshape(-1)] != [rows, cols]:
        raise PIFACheckpointError(
            f"{factor}.weight_shape is {shape.tolist()}, expected {[rows, cols]}"
        )
    if tuple(packed.shape) != (rows, quant.words(cols)) or packed.dtype != torch.int32:
        raise PIFACheckpointError(
            f"{factor}.weight_packed: int32 {(rows, quant.words(cols))} expected"
        )
    if tuple(scale.shape) != (rows, quant.groups(cols)):
        raise PIFACheckpointError(
            f"{factor}.weight_scale: shape {(rows, quant.groups(cols))} expected"
        )
    group = cols if quant.group_size is None else quant.group_size
    return dequantize_packed(PackedWeight(packed, scale, quant.num_bits, group, cols, rows))


def _getter(state_dict: Mapping[str, torch.Tensor], module: str):
    def get(role: str) -> torch.Tensor:
        key = f"{module}.{role}"
        if key not in state_dict:
            raise PIFACheckpointError(f"{key}: missing from the checkpoint")
        return state_dict[key]

    return get


def _factor_shape(role: str, rows: int, cols: int, quant: FactorQuant | None) -> tuple[int, ...]:
    suffix = role.rpartition(".")[2]
    if suffix == "weight":
        return (rows, cols)
    if quant is None:
        raise PIFACheckpointError(f"{role}: packed tensor in a checkpoint with float factors")
    if suffix == "weight_packed":
        return (rows, quant.words(cols))
    if suffix == "weight_scale":
        return (rows, quant.groups(cols))
    if suffix == "weight_shape":
        return (2,)
    raise PIFACheckpointError(f"unknown factor tensor role {role!r}")


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
