"""Fused Triton forward of ``PIFALinear``, checked on CPU through Triton's interpreter.

``triton.jit`` decides at decoration time, process-wide (triton's own library
included), whether kernels are interpreted, so ``TRITON_INTERPRET=1`` cannot be
set for one test file only without leaking into every later one. Hence
``test_interpreter_run`` re-runs this file in a child process with the variable
set; the ``interpreted`` tests run only there (or in-process when the whole
session was started with ``TRITON_INTERPRET=1``). Dispatch tests run in both.

Tolerance: max |kernel - torch path| of the same layer over the output's largest
magnitude. Both round ``y_p = x P^T`` to the dtype before ``y_p C^T``; one-ulp
differences in ``y_p`` (summation order) then pass through C (|C| <= 1).
Measured worst case over this grid: fp32 2.7e-7, fp16 8.8e-4, bf16 8.7e-3; the
bounds below (1e-6, 4e-3, 3e-2) leave 3.4-4.5x headroom. bf16 is looser than it will be on a GPU:
the interpreter's fp32 -> bf16 cast truncates where the GPU rounds to nearest,
and its bf16 ``tl.dot`` is unsupported (triton-lang/triton#11584), so the kernel
upcasts bf16 operands under the interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pifa_modifier.kernels import supports_module, triton_available, use_triton_kernels
from pifa_modifier.math import non_pivot_index
from pifa_modifier.module import PIFALinear

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child process (test_interpreter_run)"
)
REL_TOL = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}
REPO = Path(__file__).resolve().parents[1]


def _layer(m: int, n: int, r: int, dtype: torch.dtype, bias: bool, seed: int) -> PIFALinear:
    """A layer with a random pivot set, P ~ N(0, 1/n) (so y_p ~ N(0, 1)) and |C| <= 1."""
    g = torch.Generator().manual_seed(seed)
    layer = PIFALinear(n, m, r, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.pivot.weight.copy_(torch.randn(r, n, generator=g) / n**0.5)
        layer.coeff.weight.copy_(torch.rand(m - r, r, generator=g) * 2 - 1)
        if bias:
            layer.bias.copy_(torch.randn(m, generator=g))
        layer.set_pivot_idx(torch.randperm(m, generator=g)[:r].sort().values)
    return layer


def _fused(layer: PIFALinear, x: torch.Tensor) -> torch.Tensor:
    from pifa_modifier.kernels.triton_pifa import pifa_forward

    return pifa_forward(
        x,
        layer.pivot.weight,
        layer.coeff.weight,
        layer.pivot_idx,
        layer.nonpivot_index(),
        layer.bias,
    )


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ----------------------------------------------------------------- interpreted kernels
@interpreted
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, 17, 40])
@pytest.mark.parametrize(("m", "n", "r"), [(16, 24, 4), (96, 64, 48), (70, 96, 20)])
def test_matches_torch_path(m, n, r, tokens, bias, dtype):
    layer = _layer(m, n, r, dtype, bias, seed=m * 1000 + n * 10 + r)
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.no_grad():
        ref = layer(x)
        out = _fused(layer, x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel_err(out, ref) <= REL_TOL[dtype]


@interpreted
def test_decode_split_k_matches_unsplit():
    """A shape whose pivot GEMM splits K (reduce kernel) and whose coeff GEMM does not."""
    from pifa_modifier.kernels.triton_pifa import _DECODE_K_ALIGN, decode_split

    m, n, r = 40, 90, 12
    assert decode_split(1, n, 4, _DECODE_K_ALIGN)[0] > 1
    assert decode_split(2, r, 4, _DECODE_K_ALIGN)[0] == 1
    layer = _layer(m, n, r, torch.float32, True, seed=3)
    x = torch.randn(5, n)
    with torch.no_grad():
        assert _rel_err(_fused(layer, x), layer(x)) <= REL_TOL[torch.float32]


@interpreted
def test_leading_shape_strides_and_empty():
    layer = _layer(48, 32, 16, torch.float16, True, seed=1)
    x = torch.randn(2, 3, 64).half()[..., ::2]  # non-contiguous last dim
    with torch.no_grad():
        out = _fused(layer, x)
        assert out.shape == (2, 3, 48)
        assert _rel_err(out, layer(x)) <= REL_TOL[torch.float16]
        assert _fused(layer, torch.empty(0, 4, 32).half()).shape == (0, 4, 48)


@interpreted
def test_real_factorization_fp16():
    """Factors from SVD + maxvol pivots of a dense layer, as PIFAModifier produces them."""
    g = torch.Generator().manual_seed(7)
    dense = nn.Linear(64, 80, bias=True)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(80, 64, generator=g) / 8)
    layer = PIFALinear.from_linear(dense, rank=24).half()
    x = torch.randn(9, 64, generator=g).half()
    with torch.no_grad():
        assert _rel_err(_fused(layer, x), layer(x)) <= REL_TOL[torch.float16]


def test_decode_split_heuristic():
    from pifa_modifier.kernels.triton_pifa import decode_split

    # GPU-like: 32 column tiles, K = 4096, 2 x 132 SMs -> 8 slices of 512.
    assert decode_split(32, 4096, 264, 256) == (8, 512)
    # Enough tiles already: no split.
    assert decode_split(416, 1024, 264, 256) == (1, 1024)
    # Never slices shorter than the alignment, never an empty slice.
    for n_tiles, k in [(1, 300), (3, 1000), (1, 5), (7, 4097)]:
        split, per = decode_split(n_tiles, k, 264, 256)
        assert per % 256 == 0 and (split - 1) * per < k <= split * per


@interpreted
def test_input_validation():
    from pifa_modifier.kernels.triton_pifa import pifa_forward

    layer = _layer(20, 16, 8, torch.float32, True, seed=0)
    args = [layer.pivot.weight, layer.coeff.weight, layer.pivot_idx, layer.nonpivot_index()]
    with torch.no_grad():
        with pytest.raises(ValueError, match="x"):
            pifa_forward(torch.randn(2, 15), *args, layer.bias)
        with pytest.raises(ValueError, match="bias"):
            pifa_forward(torch.randn(2, 16), *args, layer.bias[:-1])
        with pytest.raises(TypeError, match="dtype"):
            pifa_forward(torch.randn(2, 16).half(), *args, layer.bias)
    with pytest.raises(RuntimeError, match="backward"):
        pifa_forward(torch.randn(2, 16), *args, layer.bias)


# ----------------------------------------------------------------- real GPU backend, no GPU
def _compile_for(
    cap: int,
    kernel,
    pointer_dtype: str,
    constants: dict,
    warps: int,
    stages: int,
    pointers: dict[str, str] | None = None,
):
    """Compile ``kernel`` for sm_``cap`` offline, with the alignment hints a launch on
    16-byte-aligned tensors with N, K and strides divisible by 16 would give.
    ``pointers`` overrides the element type of named pointer arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    pointers = {"col_ptr": "*i32", "ws_ptr": "*fp32", **(pointers or {})}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        is_pointer = name.endswith("_ptr")
        signature[name] = pointers.get(name, f"*{pointer_dtype}") if is_pointer else "i32"
        if name != "M":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(
        kernel, signature, {(kernel.arg_names.index(k),): v for k, v in constants.items()}, attrs
    )
    target = GPUTarget("cuda", cap, 32)
    return compile(source, target=target, options={"num_warps": warps, "num_stages": stages})


@pytest.mark.skipif(INTERPRETED, reason="compiles for the GPU backend; the child interprets")
def test_kernels_compile_for_hopper_with_pipelined_loads():
    """The interpreter does not check what the GPU compiler needs; compile for sm_90 offline.

    Loads must be software-pipelined (several shared-memory stages): the 64-bit row
    offsets and K masks must not cost the compiler its contiguity/alignment facts.
    """
    pytest.importorskip("triton.backends.nvidia")
    from pifa_modifier.kernels import triton_pifa as tp

    strides = {"stride_ak": 1, "stride_wk": 1, "stride_on": 1, "stride_dn": 1}
    flags = {"HAS_BIAS": True, "STORE_DENSE": True, "F32_DOT": False}
    config = tp._GEMM_CONFIGS[0]
    gemm = _compile_for(
        90,
        tp._gemm_scatter_kernel,
        "bf16",
        {**strides, **flags, **config.kwargs},
        config.num_warps,
        config.num_stages,
    )
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    assert gemm.metadata.shared >= 2 * (bm + bn) * bk * 2
    assert "wgmma" in gemm.asm["ptx"]

    decode_config = next(c for c in tp._DECODE_CONFIGS if c.num_stages >= 3)
    bk = decode_config.kwargs["BLOCK_K"]
    decode = _compile_for(
        90,
        tp._decode_kernel,
        "fp16",
        {
            **strides,
            **flags,
            **decode_config.kwargs,
            "SPLIT_K": 4,
            "BLOCK_M": 16,
            "BLOCK_N": tp._DECODE_BLOCK_N,
        },
        decode_config.num_warps,
        decode_config.num_stages,
    )
    assert decode.metadata.shared >= 2 * (16 + tp._DECODE_BLOCK_N) * bk * 2
    _compile_for(
        90,
        tp._splitk_reduce_kernel,
        "fp16",
        {
            "stride_on": 1,
            "stride_dn": 1,
            "HAS_BIAS": True,
            "STORE_DENSE": True,
            "SPLIT_K": 4,
            "BLOCK_M": 16,
            "BLOCK_N": tp._DECODE_BLOCK_N,
        },
        4,
        1,
    )


@pytest.mark.skipif(INTERPRETED, reason="the interpreter does run on CPU tensors")
def test_compiled_kernels_refuse_cpu_tensors():
    from pifa_modifier.kernels.triton_pifa import pifa_forward

    layer = _layer(20, 16, 8, torch.float16, True, seed=0)
    with torch.no_grad(), pytest.raises(ValueError, match="CUDA"):
        pifa_forward(
            torch.randn(2, 16).half(),
            layer.pivot.weight,
            layer.coeff.weight,
            layer.pivot_idx,
            layer.nonpivot_index(),
            layer.bias,
        )


# ----------------------------------------------------------------- dispatch (both runs)
def test_triton_available_needs_cuda_or_explicit_interpreter():
    x = torch.randn(2, 4).half()
    assert not triton_available(x)
    assert triton_available(x, interpreter=True) == INTERPRETED
    assert not triton_available(torch.randn(2, 4).double(), interpreter=True)


def _supported_layer() -> tuple[PIFALinear, torch.Tensor]:
    return _layer(24, 16, 8, torch.float16, True, seed=0), torch.randn(3, 16).half()


def _quantized_looking(kind: str) -> PIFALinear:
    layer = _layer(24, 16, 8, torch.float16, True, seed=0)
    child = layer.coeff
    if kind == "weight_scale":
        child.register_parameter("weight_scale", nn.Parameter(torch.ones(16, 1).half()))
    elif kind == "extra_buffer":  # observers' running statistics
        child.register_buffer("input_min", torch.zeros(1))
    elif kind == "quantization_scheme":
        child.quantization_scheme = object()
    elif kind == "wrapped_forward":  # compressed-tensors' fake-quant forward
        child.forward = lambda x: nn.Linear.forward(child, x)
    elif kind == "forward_hook":  # GPTQ / observers
        child.register_forward_hook(lambda *_: None)
    elif kind == "forward_pre_hook":
        layer.pivot.register_forward_pre_hook(lambda *_: None)
    elif kind == "linear_subclass":
        layer.pivot = type("QLinear", (nn.Linear,), {})(16, 8, bias=False, dtype=torch.float16)
    elif kind == "int_weight":
        child.weight = nn.Parameter(child.weight.to(torch.int8), requires_grad=False)
    elif kind == "tensor_subclass":
        child.weight = nn.Parameter(child.weight.detach().as_subclass(_WeightSubclass))
    return layer


class _WeightSubclass(torch.Tensor):
    """Stands in for quantized tensor subclasses (torchao and the like)."""


@pytest.mark.parametrize(
    "kind",
    [
        "weight_scale",
        "extra_buffer",
        "quantization_scheme",
        "wrapped_forward",
        "forward_hook",
        "forward_pre_hook",
        "linear_subclass",
        "int_weight",
        "tensor_subclass",
    ],
)
def test_dispatch_falls_back_for_quantized_or_hooked_children(kind):
    layer, x = _supported_layer()
    with torch.no_grad():
        assert supports_module(layer, x)
        assert not supports_module(_quantized_looking(kind), x)


def test_dispatch_needs_matching_dtype_device_and_no_grad():
    layer, x = _supported_layer()
    with torch.no_grad():
        assert supports_module(layer, x)
        assert not supports_module(layer, x.float())
        assert not supports_module(layer, x.to("meta"))
        assert not use_triton_kernels(layer, x)  # CPU input: torch path
    assert not supports_module(layer, x)  # autograd would need the torch path
    handle = nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        with torch.no_grad():
            assert not supports_module(layer, x)
    finally:
        handle.remove()


def test_fx_symbolic_trace_keeps_torch_path():
    layer = _layer(24, 16, 8, torch.float32, True, seed=0)
    traced = torch.fx.symbolic_trace(layer)
    targets = {str(node.target) for node in traced.graph.nodes}
    assert "pivot" in targets and "coeff" in targets
    x = torch.randn(3, 16)
    torch.testing.assert_close(traced(x), layer(x))


def test_nonpivot_index_cached_refreshed_and_not_saved():
    layer = PIFALinear(16, 10, 4, bias=False)
    assert layer.nonpivot_index().tolist() == list(range(4, 10))
    assert layer.nonpivot_index().dtype == torch.int32
    layer.set_pivot_idx(torch.tensor([1, 3, 6, 9]))
    assert layer.nonpivot_index().tolist() == [0, 2, 4, 5, 7, 8]
    assert "nonpivot_idx" not in layer.state_dict()
    state = layer.state_dict()
    state["pivot_idx"] = torch.tensor([0, 2, 4, 8], dtype=torch.int32)
    fresh = PIFALinear(16, 10, 4, bias=False)
    fresh.load_state_dict(state)
    expected = non_pivot_index(state["pivot_idx"], 10).tolist()
    assert fresh.nonpivot_index().tolist() == expected


def test_import_without_triton():
    """Triton stays optional: with it unimportable the package loads and runs the torch path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pifa_modifier\n"
        "from pifa_modifier.module import PIFALinear\n"
        "from pifa_modifier.kernels import triton_available\n"
        "x = torch.randn(2, 8)\n"
        "assert not triton_available(x, interpreter=True)\n"
        "assert PIFALinear(8, 6, 3)(x).shape == (2, 6)\n"
        "assert 'pifa_modifier.kernels.triton_pifa' not in sys.modules\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # so only the missing import says no
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


_PARENT_ONLY = (
    "test_interpreter_run",
    "test_import_without_triton",
    "test_kernels_compile_for_hopper_with_pipelined_loads",
    "test_compiled_kernels_refuse_cpu_tensors",
)


def run_interpreted(test_file: str, parent_only: tuple[str, ...], **env: str) -> None:
    """Run ``test_file``'s tests but ``parent_only`` in a child with TRITON_INTERPRET=1."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            test_file,
            "-q",
            "-o",
            "addopts=",
            "-p",
            "no:cacheprovider",
            "-k",
            f"not ({' or '.join(parent_only)})",
        ],
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, output
    # Nothing may be skipped there: a skipped kernel test would pass silently.
    assert re.search(rf"\d+ passed, {len(parent_only)} deselected in", proc.stdout), output


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run")
def test_interpreter_run():
    """Run this file's ``interpreted`` tests in a child with TRITON_INTERPRET=1."""
    run_interpreted(__file__, _PARENT_ONLY)
