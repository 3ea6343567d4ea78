"""The vLLM plugin's vLLM-independent part (``pifa_modifier.vllm.layout``), without vLLM.

A tiny decoder layer of ``PIFALinear`` modules (differing ranks, with and without
q/k/v biases, float and packed int4/int8 factors) is loaded the way the vLLM
weight loaders load it -- tensor by tensor, through ``map_checkpoint_name`` and
the fused storage slots -- and the fused forward is compared with the
concatenated outputs of the individual layers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.metadata import build_pifa_config, parse_pifa_config
from pifa_modifier.module import PIFALinear
from pifa_modifier.vllm.layout import (
    COEFF_ROLES,
    PIVOT_IDX,
    PIVOT_ROLES,
    FactorQuant,
    FusedTensors,
    build_fused_layout,
    check_tensor_parallel,
    claim_checkpoint,
    delegate_quant_config,
    dequantize_factor,
    factor_quant,
    fused_pifa_forward,
    fused_tensors_from_state_dict,
    map_checkpoint_name,
    output_gather_index,
)

HIDDEN, INTER = 64, 128
ATTN = "model.layers.0.self_attn"
MLP = "model.layers.0.mlp"
# (out_features, in_features, rank): GQA (k/v narrower than q), every fused shard's rank
# differs; all ranks are multiples of the quantization group size 8 used below
SHAPES = {
    f"{ATTN}.q_proj": (64, HIDDEN, 32),
    f"{ATTN}.k_proj": (32, HIDDEN, 16),
    f"{ATTN}.v_proj": (32, HIDDEN, 24),
    f"{ATTN}.o_proj": (64, 64, 16),
    f"{MLP}.gate_proj": (INTER, HIDDEN, 48),
    f"{MLP}.up_proj": (INTER, HIDDEN, 40),
    f"{MLP}.down_proj": (HIDDEN, INTER, 32),
}
FUSED = {
    f"{ATTN}.qkv_proj": ["q_proj", "k_proj", "v_proj"],
    f"{MLP}.gate_up_proj": ["gate_proj", "up_proj"],
}
SHARD_IDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": 0, "up_proj": 1}


def _dyadic(shape: tuple[int, ...], scale: int, gen: torch.Generator) -> torch.Tensor:
    """Small multiples of 1/scale: every fp32 product and sum below is exact in any order."""
    return torch.randint(-scale, scale + 1, shape, generator=gen).float() / scale


def make_model(
    qkv_bias: bool, exact: bool = True, seed: int = 0, ranks: dict[str, int] | None = None
) -> nn.Module:
    """A module tree with checkpoint names, every Linear a PIFALinear with random pivots."""
    gen = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for name, (out, inp, rank) in SHAPES.items():
        rank = (ranks or {}).get(name, rank)
        bias = qkv_bias and name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")
        layer = PIFALinear(inp, out, rank, bias=bias)
        with torch.no_grad():
            if exact:
                layer.pivot.weight.copy_(_dyadic((rank, inp), 8, gen))
                layer.coeff.weight.copy_(_dyadic((out - rank, rank), 8, gen))
                if bias:
                    layer.bias.copy_(_dyadic((out,), 8, gen))
            else:
                layer.pivot.weight.normal_(generator=gen)
                layer.coeff.weight.normal_(std=rank**-0.5, generator=gen)
                if bias:
                    layer.bias.normal_(generator=gen)
        layer.set_pivot_idx(torch.randperm(out, generator=gen)[:rank].sort().values)
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def specs_of(model: nn.Module):
    return parse_pifa_config(build_pifa_config(model))


def reference(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat`` of the member PIFALinear outputs: what vLLM's fused layer must return."""
    parent, _, leaf = layer.rpartition(".")
    members = FUSED.get(layer, [leaf])
    return torch.cat([model.get_submodule(f"{parent}.{m}")(x) for m in members], dim=-1)


def vllm_style_load(model: nn.Module, layer: str, quant: FactorQuant | None):
    """Load ``model``'s state dict tensor by tensor as PIFALinearMethod does; the fused tensors.

    Mirrors method.py: one storage tensor per role (``storage_shape``), every
    checkpoint tensor routed by ``map_checkpoint_name`` into ``shard_slice`` of
    its shard, then (quantized) dequantized from the slots, then the gather index
    built from the loaded ``pivot_idx``.
    """
    specs = specs_of(model)
    layout = build_fused_layout(layer, specs)
    roles = (
        ("pivot.weight", "coeff.weight") if quant is None else (*PIVOT_ROLES[1:], *COEFF_ROLES[1:])
    )
    dtypes = {"weight_packed": torch.int32, "weight_shape": torch.int64, PIVOT_IDX: torch.int32}
    storage = {
        role: torch.full(
            layout.storage_shape(role, quant),
            -7,
            dtype=dtypes.get(role.split(".")[-1], torch.float32),
        )
        for role in (*roles, PIVOT_IDX, "bias")
    }
    loaded = set()
    for name, tensor in model.state_dict().items():
        target = map_checkpoint_name(
            name, specs, {k.rsplit(".", 1)[1]: v for k, v in FUSED.items()}
        )
        if target is None or target.layer != layer:
            continue
        index = layout.shard_index(target.shard_id)
        assert index == target.shard_index
        assert tuple(tensor.shape) == layout.expected_shape(target.role, index, quant), name
        slot = layout.shard_slice(storage[target.role], target.role, index, quant)
        slot.copy_(tensor.reshape(slot.shape))
        loaded.add((target.role, index))
    n = len(layout.shards)
    assert {(r, i) for r in (*roles, PIVOT_IDX) for i in range(n)} <= loaded
    idxs = [layout.shard_slice(storage[PIVOT_IDX], PIVOT_IDX, i, None) for i in range(n)]
    gather = output_gather_index(layout, idxs)
    if quant is None:
        pivot = storage["pivot.weight"]
        coeffs = tuple(
            layout.shard_slice(storage["coeff.weight"], "coeff.weight", i, None) for i in range(n)
        )
    else:
        pivots, coeff_list = [], []
        for i, shard in enumerate(layout.shards):

            def get(role, i=i):
                return layout.shard_slice(storage[role], role, i, quant)

            spec = shard.spec
            pivots.append(dequantize_factor(get, "pivot", spec.rank, spec.in_features, quant))
            coeff_list.append(dequantize_factor(get, "coeff", shard.n_coeff_rows, spec.rank, quant))
        pivot, coeffs = torch.cat(pivots), tuple(coeff_list)
    has_bias = ("bias", 0) in loaded
    bias = storage["bias"] if has_bias else None
    return layout, FusedTensors(pivot, coeffs, gather, bias)


LAYERS = [
    f"{ATTN}.qkv_proj",
    f"{MLP}.gate_up_proj",
    f"{ATTN}.o_proj",
    f"{MLP}.down_proj",
]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_fused_forward_is_exact_fp32(layer: str, qkv_bias: bool) -> None:
    """Dyadic values: every sum is exact, so any GEMM blocking must give identical bits."""
    model = make_model(qkv_bias)
    x = _dyadic(
        (3, 5, SHAPES[f"{MLP}.down_proj"][1] if "down" in layer else HIDDEN),
        4,
        torch.Generator().manual_seed(1),
    )
    expected = reference(model, layer, x)
    layout, tensors = vllm_style_load(model, layer, None)
    assert torch.equal(fused_pifa_forward(x, layout, tensors), expected)
    # and the one-call stacking helper agrees
    one_call = fused_tensors_from_state_dict(layout, model.state_dict())
    assert torch.equal(fused_pifa_forward(x, layout, one_call), expected)


@pytest.mark.parametrize("layer", LAYERS)
def test_fused_forward_random_values(layer: str) -> None:
    """Gaussian factors: same function up to fp32 GEMM rounding (stacked vs separate GEMMs)."""
    model = make_model(qkv_bias=True, exact=False, seed=3)
    width = INTER if "down" in layer else HIDDEN
    x = torch.randn(7, width, generator=torch.Generator().manual_seed(2))
    layout, tensors = vllm_style_load(model, layer, None)
    torch.testing.assert_close(
        fused_pifa_forward(x, layout, tensors), reference(model, layer, x), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(("bits", "group"), [(4, 8), (8, None)])
@pytest.mark.parametrize("layer", LAYERS)
def test_fused_forward_packed_factors(layer: str, bits: int, group: int | None) -> None:
    """Packed int4/int8 factors, dequantized at load as the vLLM method does (first version)."""
    from pifa_modifier.checkpoint.packed import quantize_factors_rtn

    model = make_model(qkv_bias=True, exact=False, seed=4)
    for module in model.modules():
        if isinstance(module, PIFALinear):
            quantize_factors_rtn(module, num_bits=bits, group_size=group)
    names = model.state_dict().keys()
    assert any(k.endswith("pivot.weight_packed") for k in names)
    assert not any(k.endswith("pivot.weight") for k in names)
    quant = FactorQuant(bits, group)
    width = INTER if "down" in layer else HIDDEN
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(5))
    layout, tensors = vllm_style_load(model, layer, quant)
    # the dequantized factors are those the reference layers compute with, bit for bit
    parent = layer.rpartition(".")[0]
    for shard, coeff in zip(layout.shards, tensors.coeffs, strict=True):
        ref = model.get_submodule(shard.module).to_dense()
        got = torch.zeros_like(ref)
        pivots = tensors.pivot[shard.pivot_offset : shard.pivot_offset + shard.spec.rank]
        idx = model.get_submodule(shard.module).pivot_idx.long()
        got[idx] = pivots
        assert shard.module.startswith(parent)
        torch.testing.assert_close(coeff @ pivots, ref[got.abs().sum(1) == 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        fused_pifa_forward(x, layout, tensors), reference(model, layer, x), rtol=1e-5, atol=1e-5
    )
    one_call = fused_tensors_from_state_dict(layout, model.state_dict(), quant)
    assert torch.equal(one_call.pivot, tensors.pivot)


def test_layout_offsets_and_gather() -> None:
    model = make_model(qkv_bias=False)
    specs = specs_of(model)
    layout = build_fused_layout(f"{ATTN}.qkv_proj", specs, output_sizes=[64, 32, 32], input_size=64)
    assert [s.shard_id for s in layout.shards] == ["q", "k", "v"]
    assert [s.out_offset for s in layout.shards] == [0, 64, 96]
    assert [s.pivot_offset for s in layout.shards] == [0, 32, 48]
    assert layout.total_rank == 72 and layout.out_features == 128
    assert layout.storage_shape("pivot.weight", None) == (72, 64)
    assert layout.storage_shape("coeff.weight", None) == (32 * 32 + 16 * 16 + 8 * 24,)
    q4 = FactorQuant(4, 8)
    assert layout.storage_shape("pivot.weight_packed", q4) == (72, 8)
    assert layout.storage_shape("pivot.weight_scale", q4) == (72, 8)
    assert layout.storage_shape("pivot.weight_shape", q4) == (3, 2)
    assert layout.coeff_shapes("coeff.weight_packed", q4) == [(32, 4), (16, 2), (8, 3)]
    gate_up = build_fused_layout(f"{MLP}.gate_up_proj", specs)
    assert [s.shard_id for s in gate_up.shards] == [0, 1]
    assert build_fused_layout(f"{ATTN}.o_proj", specs).shards[0].shard_id is None
    assert build_fused_layout("lm_head", specs) is None
    # the gather index is a permutation placing each shard's pivots at their rows
    idxs = [model.get_submodule(s.module).pivot_idx for s in layout.shards]
    gather = output_gather_index(layout, idxs)
    assert sorted(gather.tolist()) == list(range(128))
    for shard, idx in zip(layout.shards, idxs, strict=True):
        cols = idx.long() + shard.out_offset
        assert gather[cols].tolist() == list(
            range(shard.pivot_offset, shard.pivot_offset + len(idx))
        )


def test_layout_errors() -> None:
    specs = specs_of(make_model(qkv_bias=False))
    partial = {k: v for k, v in specs.items() if not k.endswith("v_proj")}
    with pytest.raises(PIFACheckpointError, match="PIFA in all shards or none"):
        build_fused_layout(f"{ATTN}.qkv_proj", partial)
    with pytest.raises(PIFACheckpointError, match="output sizes"):
        build_fused_layout(f"{ATTN}.qkv_proj", specs, output_sizes=[32, 16, 16])
    with pytest.raises(PIFACheckpointError, match="input size"):
        build_fused_layout(f"{ATTN}.o_proj", specs, input_size=32)
    layout = build_fused_layout(f"{ATTN}.qkv_proj", specs)
    with pytest.raises(PIFACheckpointError, match="shard id None"):
        layout.shard_index(None)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_is_refused_by_size(tp: int) -> None:
    check_tensor_parallel("model.layers.0.self_attn.qkv_proj", 1)
    with pytest.raises(NotImplementedError, match=f"tensor_parallel_size={tp}.*docs/vllm.md"):
        check_tensor_parallel("model.layers.0.self_attn.qkv_proj", tp)


def test_name_mapping_float_and_packed() -> None:
    specs = specs_of(make_model(qkv_bias=True))
    suffixes = [
        "pivot.weight", "coeff.weight", "pivot_idx", "bias",
        "pivot.weight_packed", "pivot.weight_scale", "pivot.weight_shape",
        "coeff.weight_packed", "coeff.weight_scale", "coeff.weight_shape",
    ]  # fmt: skip
    cases = {
        "q_proj": (f"{ATTN}.qkv_proj", "q", 0),
        "k_proj": (f"{ATTN}.qkv_proj", "k", 1),
        "v_proj": (f"{ATTN}.qkv_proj", "v", 2),
        "o_proj": (f"{ATTN}.o_proj", None, 0),
        "gate_proj": (f"{MLP}.gate_up_proj", 0, 0),
        "up_proj": (f"{MLP}.gate_up_proj", 1, 1),
        "down_proj": (f"{MLP}.down_proj", None, 0),
    }
    for leaf, (layer, shard_id, index) in cases.items():
        module = f"{ATTN if leaf in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else MLP}.{leaf}"
        for suffix in suffixes:
            target = map_checkpoint_name(f"{module}.{suffix}", specs)
            assert target == (layer, shard_id, index, module, suffix), (module, suffix)
    for other in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.self_attn.q_proj.weight",  # a layer not in pifa_config
        "model.layers.1.self_attn.q_proj.pivot.weight",
    ]:
        assert map_checkpoint_name(other, specs) is None
    for stray in [
        f"{ATTN}.q_proj.weight",
        f"{ATTN}.q_proj.pivot.weight_zero_point",
        f"{MLP}.up_proj.coeff.weight_g_idx",
    ]:
        with pytest.raises(PIFACheckpointError, match="does not read"):
            map_checkpoint_name(stray, specs)


# ------------------------------------------------------------- checkpoint claim
def pifa_hf_config(quant: dict | None = None) -> dict:
    model = make_model(qkv_bias=False)
    return {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "pifa_config": build_pifa_config(model),
        "quantization_config": quant or DENSE_QUANT,
    }


DENSE_QUANT = {
    "quant_method": "compressed-tensors",
    "format": "dense",
    "quantization_status": "frozen",
    "ignore": [],
    "config_groups": {
        "group_0": {"targets": ["re:.*\\.(pivot|coeff)$"], "weights": None,
                    "input_activations": None, "output_activations": None, "format": None}
    },
}  # fmt: skip


def w4_quant(**weights) -> dict:
    args = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": 8, "actorder": "static", "dynamic": False, **weights}  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
                                      "format": "pack-quantized"}},
    }  # fmt: skip


def test_claim_pifa_checkpoint() -> None:
    assert claim_checkpoint(pifa_hf_config()) == "pifa"
    assert claim_checkpoint(pifa_hf_config(w4_quant())) == "pifa"
    nested = {"model_type": "x", "text_config": pifa_hf_config()}
    assert claim_checkpoint(nested) == "pifa"


def test_claim_plain_checkpoint() -> None:
    assert claim_checkpoint({"model_type": "llama", "hidden_size": 64}) is None
    assert claim_checkpoint({"model_type": "llama", "quantization_config": w4_quant()}) is None


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["pifa_config"].update(format_version=2), "format_version 2"),
        (lambda c: c["pifa_config"].pop("modules"), "modules must be a non-empty"),
        (lambda c: c["pifa_config"].update(format="lora"), "format must be 'pifa'"),
        (
            lambda c: c["pifa_config"]["modules"][f"{ATTN}.q_proj"].update(rank=64),
            "rank 64 is invalid",
        ),
        (
            lambda c: c["pifa_config"]["modules"][f"{ATTN}.q_proj"].update(rnak=3),
            "unknown keys",
        ),
        (lambda c: c.update(pifa_config=[1, 2]), "must be a JSON object"),
        (lambda c: c.update(quantization_config={"quant_method": "gptq"}), "'gptq'"),
    ],
)
def test_claim_malformed_pifa_config(edit, match: str) -> None:
    config = pifa_hf_config()
    edit(config)
    with pytest.raises(PIFACheckpointError, match=match):
        claim_checkpoint(config)


def test_factor_quant_and_delegation() -> None:
    module = f"{ATTN}.q_proj"
    assert factor_quant(None, module) is None
    assert factor_quant(DENSE_QUANT, module) is None
    assert factor_quant(w4_quant(), module) == FactorQuant(4, 8)
    assert factor_quant(w4_quant(num_bits=8, strategy="channel", group_size=None), module) == (
        FactorQuant(8, None)
    )
    ignored = {**w4_quant(), "ignore": ["lm_head", f"re:{ATTN}\\.q_proj\\..*"]}
    assert factor_quant(ignored, module) is None
    assert factor_quant(ignored, f"{ATTN}.k_proj") == FactorQuant(4, 8)
    half = {**w4_quant(), "ignore": [f"{module}.coeff"]}
    with pytest.raises(PIFACheckpointError, match="quantized differently"):
        factor_quant(half, module)
    with pytest.raises(PIFACheckpointError, match="asymmetric"):
        factor_quant(w4_quant(symmetric=False), module)
    with pytest.raises(PIFACheckpointError, match="num_bits 3"):
        factor_quant(w4_quant(num_bits=3), module)
    with pytest.raises(PIFACheckpointError, match="actorder 'group'"):
        factor_quant(w4_quant(actorder="group"), module)
    # delegation to vLLM's compressed-tensors: float-factor groups (weights null) dropped
    assert delegate_quant_config(None) is None
    assert delegate_quant_config(DENSE_QUANT) is None
    assert delegate_quant_config(w4_quant()) == w4_quant()
