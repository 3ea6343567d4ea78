"""Quantized PIFA factors kept packed at run time: layout, torch fallback, dispatch, kernels.

Same interpreter scheme as ``test_kernels.py``: ``test_interpreter_run`` re-runs
this file in a child with ``TRITON_INTERPRET=1``, where the ``interpreted``
tests run the fused kernels on CPU tensors. The tiny W4A16 checkpoint for the
end-to-end tests is built once, here, and handed to the child by path
(``PIFA_TEST_QUANT_CKPT``), so the child never runs GPTQ.

Tolerances: the kernels dequantize each tile to exactly the weight the torch
path builds (``q * s`` is exact in fp32, then rounded once to the activation
dtype, as torch's multiply in that dtype rounds it), so kernel and torch path
differ only in summation order, as for the float kernels: ``test_kernels.REL_TOL``
applies (measured here: fp32 <= 4e-7, fp16 <= 5e-4, bf16 <= 9e-3).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.base import decompress_module
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from conftest import calibration_dataset, make_model, make_tokenizer
from test_kernels import REL_TOL, _compile_for, _layer, _rel_err, run_interpreted
from torch import nn

import pifa_modifier.module as pifa_module
from pifa_modifier.checkpoint.packed import keep_factors_packed, quantize_factors_rtn
from pifa_modifier.kernels import (
    dequantize_packed,
    packed_factors,
    supports_module,
    supports_quantized_module,
    triton_available,
    unpack_int32,
    use_triton_quant_kernels,
)
from pifa_modifier.module import PIFALinear

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process (test_interpreter_run)"
)
REPO = Path(__file__).resolve().parents[1]
CKPT_ENV = "PIFA_TEST_QUANT_CKPT"
GROUP = 16  # GPTQ group size of the checkpoint: divides every rank (16) and width (64, 128)
Q = "model.layers.0.self_attn.q_proj"  # PIFA, rank 16
K_PROJ = "model.layers.0.self_attn.k_proj"  # 32 x 64: ignored by PIFA, quantized by GPTQ


def _quant_layer(
    m: int,
    n: int,
    r: int,
    bits: int,
    group: int | None,
    bias: bool,
    dtype: torch.dtype,
    seed: int = 0,
) -> PIFALinear:
    layer = _layer(m, n, r, dtype, bias, seed)
    quantize_factors_rtn(layer, bits, group)
    return layer


def _decompressed(layer: PIFALinear) -> PIFALinear:
    """The reference: a copy whose factors compressed-tensors decompressed to float weights."""
    ref = copy.deepcopy(layer)
    for child in (ref.pivot, ref.coeff):
        decompress_module(child)
    assert packed_factors(ref) is None
    return ref


def _fused(layer: PIFALinear, x: torch.Tensor) -> torch.Tensor:
    from pifa_modifier.kernels.triton_pifa_quant import pifa_quant_forward

    factors = packed_factors(layer)
    return pifa_quant_forward(
        x, factors.pivot, factors.coeff, layer.pivot_idx, layer.nonpivot_index(), layer.bias
    )


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [16, 20, 33, 96])
def test_unpack_matches_compressed_tensors(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, k), generator=g, dtype=torch.int8)
    packed = pack_to_int32(q, bits)
    assert packed.shape == (6, -(-k * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, k), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size((6, k))), q)


def test_layout_is_lsb_first_unsigned():
    """Element j of a row: word j // (32/b), bits (j % (32/b)) * b, stored as q + 2**(b-1)."""
    q = torch.tensor([[-8, -1, 0, 7, 1, 2, 3, 4]], dtype=torch.int8)
    assert pack_to_int32(q, 4).item() == 0xC_B_A_9_F_8_7_0 - 2**32
    q8 = torch.tensor([[-128, 127, 0, 1]], dtype=torch.int8)
    assert pack_to_int32(q8, 8).item() == 0x81_80_FF_00 - 2**32


@pytest.mark.parametrize(
    ("bits", "group", "dtype"),
    [
        (4, 16, torch.float32),
        (8, 32, torch.float32),
        (4, None, torch.bfloat16),
        (8, 16, torch.float16),
    ],
)
def test_packed_torch_path_is_bit_identical_to_decompressed(bits, group, dtype):
    layer = _quant_layer(80, 64, 32, bits, group, True, dtype)
    ref = _decompressed(layer)
    factors = packed_factors(layer)
    assert factors.pivot.num_bits == bits and factors.pivot.packed.dtype == torch.int32
    assert torch.equal(dequantize_packed(factors.pivot), ref.pivot.weight)
    assert torch.equal(dequantize_packed(factors.coeff), ref.coeff.weight)
    x = torch.randn(2, 5, 64).to(dtype)
    with torch.no_grad():
        assert torch.equal(layer(x), ref(x))
    # still packed: no float weight left behind on the children
    for child in (layer.pivot, layer.coeff):
        assert "weight" not in vars(child) and not hasattr(child, "weight")
        assert child.quantization_status == "compressed"
    assert torch.equal(layer.to_dense(), ref.to_dense())


def test_packed_torch_path_runs_child_hooks():
    layer = _quant_layer(24, 32, 16, 4, 16, False, torch.float32)
    seen = []
    layer.pivot.register_forward_hook(lambda mod, args, out: seen.append(tuple(mod.weight.shape)))
    layer(torch.randn(3, 32))
    assert seen == [(16, 32)]


# ----------------------------------------------------------------------------- dispatch
def test_cpu_input_takes_torch_path(monkeypatch):
    layer = _quant_layer(24, 32, 16, 4, 16, True, torch.float16)
    x = torch.randn(3, 32).half()

    def fail(*args, **kwargs):
        raise AssertionError("kernels called for a CPU tensor")

    monkeypatch.setattr(pifa_module, "pifa_quant_forward", fail)
    with torch.no_grad():
        assert supports_quantized_module(layer, x)  # device-independent rules hold
        assert not use_triton_quant_kernels(layer, x)
        assert not supports_module(layer, x)  # the float kernels say no, without raising
        torch.testing.assert_close(layer(x), _decompressed(layer)(x), rtol=0, atol=0)


def _break(layer: PIFALinear, kind: str) -> None:
    child = layer.coeff
    weights = child.quantization_scheme.weights
    if kind == "forward_hook":
        child.register_forward_hook(lambda *_: None)
    elif kind == "forward_pre_hook":
        layer.pivot.register_forward_pre_hook(lambda *_: None)
    elif kind == "foreign_forward":
        child.forward = lambda x: nn.Linear.forward(child, x)
    elif kind == "scale_dtype":
        child.weight_scale.data = child.weight_scale.data.float()
    elif kind == "asymmetric":
        child.quantization_scheme = child.quantization_scheme.model_copy(
            update={"weights": weights.model_copy(update={"symmetric": False})}
        )
    elif kind == "g_idx":
        child.register_parameter(
            "weight_g_idx", nn.Parameter(torch.zeros(16, dtype=torch.int32), requires_grad=False)
        )
    elif kind == "activations":
        child.quantization_scheme = child.quantization_scheme.model_copy(
            update={"input_activations": weights}
        )
    elif kind == "three_bits":
        child.quantization_scheme = child.quantization_scheme.model_copy(
            update={"weights": weights.model_copy(update={"num_bits": 3})}
        )
    elif kind == "status":
        child.quantization_status = "frozen"


@pytest.mark.parametrize(
    "kind",
    [
        "forward_hook",
        "forward_pre_hook",
        "foreign_forward",
        "scale_dtype",
        "asymmetric",
        "g_idx",
        "activations",
        "three_bits",
        "status",
    ],
)
def test_dispatch_falls_back_for_hooks_and_unsupported_packing(kind):
    layer = _quant_layer(24, 32, 16, 4, 16, True, torch.float16)
    x = torch.randn(3, 32).half()
    with torch.no_grad():
        assert supports_quantized_module(layer, x)
        _break(layer, kind)
        assert not supports_quantized_module(layer, x)


def test_dispatch_needs_matching_dtype_device_no_grad_and_no_global_hooks():
    layer = _quant_layer(24, 32, 16, 8, 16, True, torch.float16)
    x = torch.randn(3, 32).half()
    with torch.no_grad():
        assert supports_quantized_module(layer, x)
        assert not supports_quantized_module(layer, x.float())
        assert not supports_quantized_module(layer, x.to("meta"))
    assert not supports_quantized_module(layer, x)  # autograd: the bias requires grad
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *_: None)
    try:
        with torch.no_grad():
            assert not supports_quantized_module(layer, x)
    finally:
        handle.remove()
    assert packed_factors(_layer(24, 32, 16, torch.float16, True, 0)) is None  # float: no


# ------------------------------------------------------------------ checkpoint (PIFA + GPTQ)
@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory) -> Path:
    """Tiny Llama, PIFA (k/v ignored) then GPTQ W4A16 g16 on every Linear but lm_head."""
    if os.environ.get(CKPT_ENV):
        return Path(os.environ[CKPT_ENV])
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from pifa_modifier import PIFAModifier

    root = tmp_path_factory.mktemp("quant")
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": GROUP,
        "actorder": "weight",
    }
    oneshot(
        model=make_model("llama", root / "base"),
        processor=make_tokenizer(),
        recipe=[
            PIFAModifier(density=0.5, rank_multiple=16, ignore=["lm_head", "re:.*\\.[kv]_proj$"]),
            GPTQModifier(
                config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                ignore=["lm_head"],
            ),
        ],
        dataset=calibration_dataset(num=4, seq_len=16),
        num_calibration_samples=4,
        max_seq_length=16,
        output_dir=str(root / "ckpt"),
    )
    return root / "ckpt"


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(3))


def _load(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def test_loader_keeps_factors_packed_through_forward_and_save(w4_checkpoint, tmp_path):
    from transformers import CompressedTensorsConfig

    packed = _load(w4_checkpoint)
    floats = _load(w4_checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        got, ref = packed(_ids()).logits, floats(_ids()).logits
    assert torch.equal(got, ref)
    layer = packed.get_submodule(Q)
    assert packed_factors(layer) is not None  # after the first forward: still packed
    with torch.no_grad():  # compressed-tensors' offload wrapper (added then) is accepted
        assert supports_quantized_module(layer, torch.randn(2, 64))
    assert packed_factors(floats.get_submodule(Q)) is None
    assert packed.get_submodule(K_PROJ).quantization_status == "decompressed"  # others as before
    packed_bytes = sum(
        p.numel() * p.element_size()
        for n, p in packed.named_parameters()
        if "pivot" in n or "coeff" in n
    )
    float_bytes = sum(
        p.numel() * p.element_size()
        for n, p in floats.named_parameters()
        if "pivot" in n or "coeff" in n
    )
    assert packed_bytes < 0.3 * float_bytes  # int4 + one fp32 scale per 16 vs fp32

    packed.save_pretrained(tmp_path / "again")  # re-registers compressed-tensors' hook...
    with torch.no_grad():
        assert torch.equal(packed(_ids()).logits, ref)
    assert packed_factors(layer) is not None  # ...which must leave the factors packed
    with torch.no_grad():
        assert torch.equal(_load(tmp_path / "again")(_ids()).logits, ref)

    assert keep_factors_packed(floats) == len(packed.config.pifa_config["modules"])
    with torch.no_grad():
        assert torch.equal(floats(_ids()).logits, ref)  # packed in place, exactly


# ----------------------------------------------------------------- interpreted kernels
_CASES = [
    (bits, group, tokens, dtype, (bits + group + tokens) % 2 == 0)
    for bits in (4, 8)
    for group in (16, 32)
    for tokens in (1, 7)
    for dtype in (torch.float32, torch.float16)
]


@interpreted
@pytest.mark.parametrize(("bits", "group", "tokens", "dtype", "bias"), _CASES)
def test_kernels_match_decompressed_torch_path(bits, group, tokens, dtype, bias):
    m, n, r = (96, 64, 32) if tokens == 1 else (70, 96, 32)
    layer = _quant_layer(m, n, r, bits, group, bias, dtype, seed=bits + group + tokens)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.no_grad():
        out = _fused(layer, x)
        ref = _decompressed(layer)(x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel_err(out, ref) <= REL_TOL[dtype]


@interpreted
@pytest.mark.parametrize(
    ("bits", "group", "dtype", "tokens"),
    [
        (4, 16, torch.float16, 20),  # prefill GEMM, per-element scales
        (8, 32, torch.float32, 33),  # prefill GEMM, one scale per tile
        (4, None, torch.float16, 7),  # one scale per row
        (8, 16, torch.bfloat16, 7),
    ],
)
def test_kernels_prefill_channel_and_bf16(bits, group, dtype, tokens):
    layer = _quant_layer(48, 96, 32, bits, group, True, dtype, seed=5)
    x = torch.randn(tokens, 96).to(dtype)
    with torch.no_grad():
        assert _rel_err(_fused(layer, x), _decompressed(layer)(x)) <= REL_TOL[dtype]


@interpreted
def test_decode_split_k():
    from pifa_modifier.kernels.triton_pifa import _target_programs, decode_split
    from pifa_modifier.kernels.triton_pifa_quant import _DECODE_K_ALIGN

    x = torch.randn(5, 96)
    assert decode_split(1, 96, _target_programs(x.device), _DECODE_K_ALIGN)[0] > 1
    layer = _quant_layer(40, 96, 16, 4, 16, True, torch.float32, seed=2)
    with torch.no_grad():
        assert _rel_err(_fused(layer, x), _decompressed(layer)(x)) <= REL_TOL[torch.float32]


@interpreted
def test_input_validation():
    layer = _quant_layer(24, 32, 16, 4, 16, True, torch.float32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="x"):
            _fused(layer, torch.randn(2, 31))
        with pytest.raises(TypeError, match="dtype"):
            _fused(layer, torch.randn(2, 32).half())
    with pytest.raises(RuntimeError, match="backward"):
        _fused(layer, torch.randn(2, 32))


@interpreted
def test_loaded_checkpoint_logits_through_kernels(w4_checkpoint, monkeypatch):
    """Real loaded modules pass the dispatch rules; the kernels reproduce the torch path."""
    calls = []

    def interpreter_dispatch(layer, x, factors=None):  # the real rules, minus "x is CUDA"
        ok = triton_available(x, interpreter=True) and supports_quantized_module(layer, x, factors)
        calls.append(ok)
        return ok

    model = _load(w4_checkpoint)
    with torch.no_grad():
        ref = model(_ids()).logits  # torch path (CPU tensors)
        monkeypatch.setattr(pifa_module, "use_triton_quant_kernels", interpreter_dispatch)
        got = model(_ids()).logits
    n_layers = len(model.config.pifa_config["modules"])
    assert calls == [True] * n_layers
    # fp32 through 2 decoder layers: only summation order differs (measured 4e-7)
    assert _rel_err(got, ref) <= 1e-5


# ----------------------------------------------------------------- real GPU backend, no GPU
@pytest.mark.skipif(INTERPRETED, reason="compiles for the GPU backend; the child interprets")
def test_quant_kernels_compile_for_hopper():
    """The interpreter does not check what the GPU compiler needs; compile for sm_90 offline."""
    pytest.importorskip("triton.backends.nvidia")
    from pifa_modifier.kernels import triton_pifa_quant as tq

    strides = {"stride_ak": 1, "stride_qk": 1, "stride_sg": 1, "stride_on": 1, "stride_dn": 1}
    flags = {"HAS_BIAS": True, "STORE_DENSE": True, "F32_DOT": False, "BITS": 4}
    pointers = {"q_ptr": "*i32"}
    for group in (128, 32):  # one scale per tile, per-element scales
        config = tq._GEMM_CONFIGS[0]
        gemm = tq._qgemm_scatter_kernel
        compiled = _compile_for(
            90,
            gemm,
            "fp16",
            {**strides, **flags, "GROUP_SIZE": group, **config.kwargs},
            config.num_warps,
            config.num_stages,
            pointers,
        )
        assert "mma" in compiled.asm["ptx"]
    decode_config = tq._DECODE_CONFIGS[-1]
    compiled = _compile_for(
        90,
        tq._qdecode_kernel,
        "bf16",
        {
            **strides,
            **flags,
            "BITS": 8,
            "GROUP_SIZE": 0,
            "SPLIT_K": 4,
            "BLOCK_M": 16,
            "BLOCK_N": tq._DECODE_BLOCK_N,
            **decode_config.kwargs,
        },
        decode_config.num_warps,
        decode_config.num_stages,
        pointers,
    )
    assert "mma" in compiled.asm["ptx"]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does run on CPU tensors")
def test_compiled_kernels_refuse_cpu_tensors():
    layer = _quant_layer(24, 32, 16, 4, 16, True, torch.float16)
    with torch.no_grad(), pytest.raises(ValueError, match="CUDA"):
        _fused(layer, torch.randn(2, 32).half())


_PARENT_ONLY = (
    "test_interpreter_run",
    "test_quant_kernels_compile_for_hopper",
    "test_compiled_kernels_refuse_cpu_tensors",
    "test_loader_keeps_factors_packed_through_forward_and_save",
)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_interpreter_run(w4_checkpoint):
    """Run this file's tests in a child with TRITON_INTERPRET=1 (checkpoint built here)."""
    run_interpreted(__file__, _PARENT_ONLY, **{CKPT_ENV: str(w4_checkpoint)})
