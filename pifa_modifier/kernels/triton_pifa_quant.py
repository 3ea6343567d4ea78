"""Fused PIFA forward from packed int4/int8 factors: dequantize inside the GEMM tile loop.

Why: a W4A16 PIFA layer is only ~1/4 the bytes of its fp16 factors if the factors
stay packed in GPU memory; dequantizing them to float at load (or per call, in
torch) gives that back. These kernels read compressed-tensors' ``pack-quantized``
tensors as they are (see ``pifa_modifier.kernels.packed`` for the layout), turn
each (BLOCK_K, BLOCK_N) tile into floats in registers, and otherwise do what
``triton_pifa`` does for float factors: GEMM 1 ``x P^T`` and GEMM 2 ``y_p C^T``
store their columns straight to their original positions with the bias fused,
prefill as a tiled GEMM, decode (few tokens) as one 16-row tile per program with
split-K and the same deterministic reduction.

Maintained alternatives did not fit: Marlin/Machete live in vLLM's CUDA ops (a
serving dependency, with their own repacked layouts), and torch's
``_weight_int4pack_mm`` needs its own repacking, bf16 only, and neither fuses the
PIFA scatter. The dequantized tile is ``round(q * s)`` in the activation dtype,
computed exactly in fp32 first, i.e. the same weight the torch path builds.

Shares the epilogue, split-K reduction, split heuristic and config helpers with
``triton_pifa`` (same interpreter handling: ``TRITON_INTERPRET=1`` before import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pifa_modifier.kernels.packed import SUPPORTED_BITS, PackedWeight
from pifa_modifier.kernels.triton_pifa import (
    INTERPRET,
    KernelPair,
    _configs,
    _prune_gemm_configs,
    _store_columns,
    launch_scatter_gemm,
)

__all__ = ["pifa_quant_forward"]


@triton.jit
def _qdot_loop(
    a_ptr,
    q_ptr,
    s_ptr,
    offs_m,
    offs_n,
    k_start,
    k_end,
    M,
    N,
    stride_am,
    stride_ak,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``a[offs_m, k_start:k_end] @ dequant(w)[offs_n, k_start:k_end]^T``.

    ``w`` is N x K packed along K (``32 // BITS`` values per int32, unsigned with
    offset ``2**(BITS-1)``), scales ``s`` N x (K / GROUP_SIZE); ``GROUP_SIZE == 0``
    means one scale per row. When a K block lies inside one group (``k_start`` and
    BLOCK_K aligned, GROUP_SIZE a multiple of BLOCK_K) one scale row serves the
    whole tile; otherwise scales are gathered per element.
    """
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    n64 = offs_n.to(tl.int64)[None, :]
    q_cols = q_ptr + n64 * stride_qn
    s_cols = s_ptr + n64 * stride_sn
    shifts = ((offs_k % PER_WORD) * BITS)[:, None]
    mask_m = (offs_m < M)[:, None]
    mask_n = (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        ks = k + offs_k
        in_k = ks < k_end
        mask_w = mask_n & in_k[:, None]
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=mask_m & in_k[None, :], other=0.0)
        words = tl.load(q_cols + (ks // PER_WORD)[:, None] * stride_qk, mask=mask_w, other=0)
        q = ((words >> shifts) & MASK) - OFFSET
        if GROUP_SIZE == 0:
            s = tl.load(s_cols, mask=mask_n, other=0.0)
        elif GROUP_SIZE % BLOCK_K == 0:
            s = tl.load(s_cols + (k // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)
        else:
            s = tl.load(s_cols + (ks // GROUP_SIZE)[:, None] * stride_sg, mask=mask_w, other=0.0)
        # exact in fp32 (<= 8-bit q times a <= 24-bit scale), then one rounding, as in torch
        w = q.to(tl.float32) * s.to(tl.float32)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a_ptr.dtype.element_ty), acc)
    return acc


@triton.jit
def _qgemm_scatter_kernel(
    a_ptr,
    q_ptr,
    s_ptr,
    out_ptr,
    dense_ptr,
    col_ptr,
    bias_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only: next power of two of M
    stride_am,
    stride_ak,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
    stride_dm,
    stride_dn,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_DENSE: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Prefill: one (BLOCK_M, BLOCK_N) output tile per program, full K (as the float kernel)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _qdot_loop(
        a_ptr,
        q_ptr,
        s_ptr,
        offs_m,
        offs_n,
        0,
        K,
        M,
        N,
        stride_am,
        stride_ak,
        stride_qn,
        stride_qk,
        stride_sn,
        stride_sg,
        BITS,
        GROUP_SIZE,
        F32_DOT,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    _store_columns(
        acc,
        offs_m,
        offs_n,
        M,
        N,
        out_ptr,
        stride_om,
        stride_on,
        dense_ptr,
        stride_dm,
        stride_dn,
        col_ptr,
        bias_ptr,
        HAS_BIAS,
        STORE_DENSE,
    )


@triton.jit
def _qdecode_kernel(
    a_ptr,
    q_ptr,
    s_ptr,
    ws_ptr,
    out_ptr,
    dense_ptr,
    col_ptr,
    bias_ptr,
    M,
    N,
    K,
    K_PER_SPLIT,
    stride_am,
    stride_ak,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_om,
    stride_on,
    stride_dm,
    stride_dn,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_DENSE: tl.constexpr,
    F32_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode: all M (<= BLOCK_M) rows x BLOCK_N columns x one K slice (as ``_decode_kernel``).

    Slices start at multiples of every decode BLOCK_K, so the one-scale-per-tile
    case of ``_qdot_loop`` stays aligned to the groups.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = _qdot_loop(
        a_ptr,
        q_ptr,
        s_ptr,
        offs_m,
        offs_n,
        k_start,
        k_end,
        M,
        N,
        stride_am,
        stride_ak,
        stride_qn,
        stride_qk,
        stride_sn,
        stride_sg,
        BITS,
        GROUP_SIZE,
        F32_DOT,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    if SPLIT_K == 1:
        _store_columns(
            acc,
            offs_m,
            offs_n,
            M,
            N,
            out_ptr,
            stride_om,
            stride_on,
            dense_ptr,
            stride_dm,
            stride_dn,
            col_ptr,
            bias_ptr,
            HAS_BIAS,
            STORE_DENSE,
        )
    else:
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        ws = ws_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws, acc, mask=mask)


_GEMM_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_DECODE_NAMES = ("BLOCK_K",)
if INTERPRET:
    # BLOCK_K 32: group size 16 takes the per-element scale path, 32 the per-tile one.
    _GEMM_CONFIGS = _configs([(16, 16, 32, 2, 1, 1)], _GEMM_NAMES)
    _DECODE_CONFIGS = _configs([(32, 1, 1)], _DECODE_NAMES)
    _DECODE_BLOCK_N = 16
else:
    # Dequantizing costs registers: no 256-wide tiles; BLOCK_K <= 128 so group 128 takes
    # the one-scale-per-tile path.
    _GEMM_CONFIGS = _configs(
        [
            (128, 128, 64, 8, 3, 8),
            (128, 128, 32, 8, 4, 4),
            (128, 64, 64, 8, 4, 4),
            (64, 128, 64, 8, 4, 4),
            (64, 64, 64, 8, 4, 4),
            (64, 64, 128, 8, 3, 4),
            (32, 128, 128, 8, 3, 4),
            (32, 64, 128, 8, 4, 4),
            (32, 64, 64, 8, 5, 2),
        ],
        _GEMM_NAMES,
    )
    _DECODE_CONFIGS = _configs(
        [(k, s, w) for k in (64, 128) for s in (3, 4) for w in (2, 4)], _DECODE_NAMES
    )
    _DECODE_BLOCK_N = 32

# Every split boundary is a multiple of every decode BLOCK_K (and so of 32 // BITS).
_DECODE_K_ALIGN = max(c.kwargs["BLOCK_K"] for c in _DECODE_CONFIGS)

_qgemm_tuned = triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_qgemm_scatter_kernel)
_qdecode_tuned = triton.autotune(
    configs=_DECODE_CONFIGS, key=["N", "K", "SPLIT_K", "BITS", "GROUP_SIZE"]
)(_qdecode_kernel)


_QUANT_KERNELS = KernelPair(_qdecode_tuned, _qgemm_tuned, _DECODE_BLOCK_N, _DECODE_K_ALIGN)


def _launch(
    a: torch.Tensor,
    w: PackedWeight,
    out: torch.Tensor,
    dense: torch.Tensor | None,
    col_idx: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """``out[:, col_idx] = a @ W.T (+ bias[col_idx])`` and ``dense = a @ W.T``, W = dequant(w)."""
    launch_scatter_gemm(
        _QUANT_KERNELS,
        a,
        (w.packed, w.scale),
        (*w.packed.stride(), *w.scale.stride()),
        w.out_features,
        out,
        dense,
        col_idx,
        bias,
        BITS=w.num_bits,
        # one group per row: a constant 0 instead of K, so K does not specialise the kernel
        GROUP_SIZE=0 if w.group_size == a.shape[1] else w.group_size,
    )


def pifa_quant_forward(
    x: torch.Tensor,
    pivot: PackedWeight,
    coeff: PackedWeight,
    pivot_idx: torch.Tensor,
    nonpivot_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """PIFA forward with packed factors: ``y[..., piv] = x P^T + b[piv]``,
    ``y[..., nonpiv] = (x P^T) C^T + b[nonpiv]``, ``P``/``C`` dequantized in-kernel.

    ``x`` is (..., n); the scales, ``x`` and ``bias`` share one float dtype.
    ``x P^T`` is rounded to that dtype before GEMM 2, as in the torch path. Index
    and packed *values* are trusted (``PIFALinear``/the loader validated them).
    Inference only.
    """
    _check_inputs(x, pivot, coeff, pivot_idx, nonpivot_idx, bias)
    n = x.shape[-1]
    r = pivot.out_features
    m = r + coeff.out_features
    x2 = x.reshape(-1, n)
    out = x.new_empty((x2.shape[0], m))
    if x2.shape[0]:
        y_pivot = x.new_empty((x2.shape[0], r))
        bias = None if bias is None else bias.contiguous()
        _launch(x2, pivot, out, y_pivot, pivot_idx.contiguous(), bias)
        _launch(y_pivot, coeff, out, None, nonpivot_idx.contiguous(), bias)
    return out.reshape(*x.shape[:-1], m)


def _check_inputs(
    x: torch.Tensor,
    pivot: PackedWeight,
    coeff: PackedWeight,
    pivot_idx: torch.Tensor,
    nonpivot_idx: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    r, n = pivot.out_features, pivot.in_features
    m = r + coeff.out_features
    shapes = {
        "x[..., -1]": (tuple(x.shape[-1:]) if x.ndim else (), (n,)),
        "coeff in_features": ((coeff.in_features,), (r,)),
        "pivot_idx": (tuple(pivot_idx.shape), (r,)),
        "nonpivot_idx": (tuple(nonpivot_idx.shape), (m - r,)),
    }
    for name, w in (("pivot", pivot), ("coeff", coeff)):
        k, words = w.in_features, -(-w.in_features * w.num_bits // 32)
        if w.num_bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}: num_bits must be one of {SUPPORTED_BITS}, got {w.num_bits}")
        if w.group_size < 1 or k % w.group_size:
            raise ValueError(f"{name}: group_size {w.group_size} does not divide {k}")
        shapes[f"{name}.packed"] = (tuple(w.packed.shape), (w.out_features, words))
        shapes[f"{name}.scale"] = (tuple(w.scale.shape), (w.out_features, k // w.group_size))
        if w.packed.dtype != torch.int32:
            raise TypeError(f"{name}.packed must be int32, got {w.packed.dtype}")
    if bias is not None:
        shapes["bias"] = (tuple(bias.shape), (m,))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, expected {want}")
    floats = [x, pivot.scale, coeff.scale] + ([] if bias is None else [bias])
    if len({t.dtype for t in floats}) != 1 or x.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise TypeError(
            "x, the scales and the bias must share one dtype among float16/bfloat16/float32, "
            f"got {sorted({str(t.dtype) for t in floats})}"
        )
    for name, idx in (("pivot_idx", pivot_idx), ("nonpivot_idx", nonpivot_idx)):
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {idx.dtype}")
    tensors = [*floats, pivot.packed, coeff.packed, pivot_idx, nonpivot_idx]
    if len({t.device for t in tensors}) != 1:
        raise ValueError("all inputs must be on one device")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(
            "the kernels need CUDA tensors (or TRITON_INTERPRET=1 before importing triton), "
            f"got {x.device}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in floats):
        raise RuntimeError(
            "pifa_quant_forward has no backward: call it under torch.no_grad() / inference_mode()"
        )
