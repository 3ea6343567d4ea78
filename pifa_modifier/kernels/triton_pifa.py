"""Fused PIFA forward in Triton: two GEMMs whose epilogues scatter columns into place.

Why: the torch path runs ``x P^T`` and ``y_p C^T``, then a ``cat``, an
``index_select`` and a bias add, i.e. three more passes over the (tokens, m)
output. Here each GEMM stores its columns straight to their original positions
(column ``j`` goes to ``col_idx[j]``: ``pivot_idx`` for GEMM 1, the non-pivot
rows for GEMM 2) with the bias fused, into one preallocated output. The only
extra traffic is the small (tokens, r) ``y_p`` buffer that GEMM 2 reads.

* Prefill (tokens > ``DECODE_MAX_TOKENS``): tiled GEMM, autotuned on the GPU.
* Decode (few tokens, memory-bound): one 16-row tile per program, so each factor
  is streamed once; K is split across programs when there are too few column
  tiles to keep every SM busy, and a small kernel reduces the fp32 partials
  (deterministically, no atomics) before the same epilogue.

Importing this module needs triton (``pifa_modifier.kernels`` imports it
lazily). With ``TRITON_INTERPRET=1`` set for the whole process (triton decides
at import and decoration time, for its own library too), the kernels are
interpreted and run on CPU tensors, with one small fixed config: autotuning
under the interpreter is slow and meaningless.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["DECODE_MAX_TOKENS", "INTERPRET", "decode_split", "pifa_forward"]

DECODE_MAX_TOKENS = 16


@triton.jit
def _dot_loop(
    a_ptr,
    w_ptr,
    offs_m,
    offs_n,
    k_start,
    k_end,
    M,
    N,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 ``a[offs_m, k_start:k_end] @ w[offs_n, k_start:k_end]^T`` (w is N x K, row-major)."""
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit row offsets: tokens x features can pass 2**31 in long prefills.
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    mask_m = (offs_m < M)[:, None]
    mask_n = (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        ks = k + offs_k
        in_k = ks < k_end
        a = tl.load(a_rows + ks[None, :] * stride_ak, mask=mask_m & in_k[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=mask_n & in_k[:, None], other=0.0)
        if F32_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _store_columns(
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
    HAS_BIAS: tl.constexpr,
    STORE_DENSE: tl.constexpr,
):
    """Epilogue: optional dense copy (GEMM 2's input), then ``out[:, col] = acc + bias[col]``."""
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if STORE_DENSE:
        dense = dense_ptr + rows * stride_dm + offs_n[None, :] * stride_dn
        tl.store(dense, acc.to(dense_ptr.dtype.element_ty), mask=mask)
    cols = tl.load(col_ptr + offs_n, mask=mask_n, other=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_scatter_kernel(
    a_ptr,
    w_ptr,
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
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_dm,
    stride_dn,
    HAS_BIAS: tl.constexpr,
    STORE_DENSE: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Prefill: one (BLOCK_M, BLOCK_N) output tile per program, full K."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles reuse each weight tile while it sits in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _dot_loop(
        a_ptr,
        w_ptr,
        offs_m,
        offs_n,
        0,
        K,
        M,
        N,
        stride_am,
        stride_ak,
        stride_wn,
        stride_wk,
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
def _decode_kernel(
    a_ptr,
    w_ptr,
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
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_dm,
    stride_dn,
    HAS_BIAS: tl.constexpr,
    STORE_DENSE: tl.constexpr,
    F32_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Decode: all M (<= BLOCK_M) rows x BLOCK_N columns x one K slice per program.

    With ``SPLIT_K == 1`` it finishes with the epilogue; otherwise it writes fp32
    partials to ``ws`` (SPLIT_K, M, N) for ``_splitk_reduce_kernel``.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = _dot_loop(
        a_ptr,
        w_ptr,
        offs_m,
        offs_n,
        k_start,
        k_end,
        M,
        N,
        stride_am,
        stride_ak,
        stride_wn,
        stride_wk,
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


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr,
    out_ptr,
    dense_ptr,
    col_ptr,
    bias_ptr,
    M,
    N,
    stride_om,
    stride_on,
    stride_dm,
    stride_dn,
    HAS_BIAS: tl.constexpr,
    STORE_DENSE: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K fp32 partials in a fixed order, then run the shared epilogue."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws + s * M * N, mask=mask, other=0.0)
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


# triton.jit returns an InterpretedFunction instead of a JITFunction under TRITON_INTERPRET=1.
INTERPRET = not isinstance(_gemm_scatter_kernel, triton.runtime.JITFunction)


def _configs(specs: list[tuple[int, ...]], names: tuple[str, ...]) -> list[triton.Config]:
    """``triton.Config`` per ``(*block sizes, num_stages, num_warps)`` tuple."""
    return [
        triton.Config(
            dict(zip(names, spec[:-2], strict=True)), num_stages=spec[-2], num_warps=spec[-1]
        )
        for spec in specs
    ]


_GEMM_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
_DECODE_NAMES = ("BLOCK_K",)
if INTERPRET:
    # Tiny tiles so small test shapes still cover several tiles, partial tiles and groups.
    _GEMM_CONFIGS = _configs([(16, 16, 16, 2, 1, 1)], _GEMM_NAMES)
    _DECODE_CONFIGS = _configs([(16, 1, 1)], _DECODE_NAMES)
    _DECODE_BLOCK_N = 16
    _DECODE_TARGET_PROGRAMS = 4
else:
    # Triton-tutorial style tiles for Ampere/Hopper (shared memory <= ~160 KB).
    _GEMM_CONFIGS = _configs(
        [
            (128, 256, 64, 8, 3, 8),
            (256, 128, 64, 8, 3, 8),
            (128, 128, 64, 8, 4, 8),
            (128, 128, 32, 8, 4, 4),
            (128, 64, 64, 8, 4, 4),
            (64, 128, 64, 8, 4, 4),
            (64, 64, 64, 8, 4, 4),
            (64, 256, 64, 8, 3, 8),
            (32, 128, 128, 8, 3, 4),
            (32, 64, 128, 8, 4, 4),
            (32, 64, 64, 8, 5, 2),
        ],
        _GEMM_NAMES,
    )
    # A 16 x 32 output tile gives at most 4 warps distinct mma work.
    _DECODE_CONFIGS = _configs(
        [(k, s, w) for k in (64, 128, 256) for s in (3, 4) for w in (2, 4)], _DECODE_NAMES
    )
    _DECODE_BLOCK_N = 32
    _DECODE_TARGET_PROGRAMS = 0  # 0: two programs per SM of the device (see _target_programs)

# Every split boundary is a multiple of every decode BLOCK_K (aligned, full-width loads).
_DECODE_K_ALIGN = max(c.kwargs["BLOCK_K"] for c in _DECODE_CONFIGS)


def _prune_gemm_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """Skip row tiles far taller than M (mostly masked work) to keep tuning short."""
    limit = max(32, triton.next_power_of_2(named_args["M"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit] or configs


_gemm_tuned = triton.autotune(
    configs=_GEMM_CONFIGS,
    key=["M_BUCKET", "N", "K"],
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_gemm_scatter_kernel)
_decode_tuned = triton.autotune(configs=_DECODE_CONFIGS, key=["N", "K", "SPLIT_K"])(_decode_kernel)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if _DECODE_TARGET_PROGRAMS:
        return _DECODE_TARGET_PROGRAMS
    return 2 * _num_sms(device.index or 0)


def decode_split(n_tiles: int, k: int, target_programs: int, align: int) -> tuple[int, int]:
    """``(split_k, k_per_split)`` for the decode kernel.

    Splits K only as far as needed for ``n_tiles * split_k >= target_programs``
    (a memory-bound kernel needs every SM streaming), never into slices shorter
    than ``align``; slices are multiples of ``align`` and none is empty.
    """
    split = max(1, min(target_programs // max(n_tiles, 1), k // align))
    k_per_split = triton.cdiv(triton.cdiv(k, split), align) * align
    return triton.cdiv(k, k_per_split), k_per_split


@dataclass(frozen=True)
class KernelPair:
    """A decode (split-K) and a prefill kernel that take the same arguments.

    Both are called as ``(a, *weights, out-or-workspace, [out,] dense, col_idx, bias, M, N,
    K, ...strides)``: only the weight tensors differ between the float and packed kernels.
    """

    decode: Callable
    gemm: Callable
    decode_block_n: int
    k_align: int


def launch_scatter_gemm(
    kernels: KernelPair,
    a: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    weight_strides: tuple[int, ...],
    n_out: int,
    out: torch.Tensor,
    dense: torch.Tensor | None,
    col_idx: torch.Tensor,
    bias: torch.Tensor | None,
    **constexprs: int,
) -> None:
    """``out[:, col_idx] = a @ W.T (+ bias[col_idx])``, and ``dense = a @ W.T`` if given.

    Up to ``DECODE_MAX_TOKENS`` rows take the split-K decode kernel (reduced by
    ``_splitk_reduce_kernel`` when split), more take the tiled GEMM.
    """
    M, K = a.shape
    N = n_out
    epilogue = {"HAS_BIAS": bias is not None, "STORE_DENSE": dense is not None}
    # fp32 inputs: exact (not TF32) products. bf16 under the interpreter: its tl.dot
    # runs np.matmul on bf16's uint16 storage, so upcast (exact for bf16 products).
    f32_dot = a.dtype == torch.float32 or (INTERPRET and a.dtype == torch.bfloat16)
    dense_arg = out if dense is None else dense
    bias_arg = col_idx if bias is None else bias
    dense_strides = (0, 0) if dense is None else dense.stride()
    if M <= DECODE_MAX_TOKENS:
        n_tiles = triton.cdiv(N, kernels.decode_block_n)
        split, k_per_split = decode_split(n_tiles, K, _target_programs(a.device), kernels.k_align)
        ws = a.new_empty((split, M, N), dtype=torch.float32) if split > 1 else out
        tiles = {"BLOCK_M": DECODE_MAX_TOKENS, "BLOCK_N": kernels.decode_block_n}
        kernels.decode[(n_tiles, split)](
            a,
            *weights,
            ws,
            out,
            dense_arg,
            col_idx,
            bias_arg,
            M,
            N,
            K,
            k_per_split,
            *a.stride(),
            *weight_strides,
            *out.stride(),
            *dense_strides,
            F32_DOT=f32_dot,
            SPLIT_K=split,
            **tiles,
            **constexprs,
            **epilogue,
        )
        if split > 1:
            _splitk_reduce_kernel[(n_tiles,)](
                ws,
                out,
                dense_arg,
                col_idx,
                bias_arg,
                M,
                N,
                *out.stride(),
                *dense_strides,
                SPLIT_K=split,
                **tiles,
                **epilogue,
            )
        return

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    kernels.gemm[grid](
        a,
        *weights,
        out,
        dense_arg,
        col_idx,
        bias_arg,
        M,
        N,
        K,
        triton.next_power_of_2(M),
        *a.stride(),
        *weight_strides,
        *out.stride(),
        *dense_strides,
        F32_DOT=f32_dot,
        **constexprs,
        **epilogue,
    )


_FLOAT_KERNELS = KernelPair(_decode_tuned, _gemm_tuned, _DECODE_BLOCK_N, _DECODE_K_ALIGN)


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    dense: torch.Tensor | None,
    col_idx: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    """``out[:, col_idx] = a @ w.T (+ bias[col_idx])``, and ``dense = a @ w.T`` if given."""
    launch_scatter_gemm(_FLOAT_KERNELS, a, (w,), w.stride(), w.shape[0], out, dense, col_idx, bias)


def pifa_forward(
    x: torch.Tensor,
    pivot_weight: torch.Tensor,
    coeff_weight: torch.Tensor,
    pivot_idx: torch.Tensor,
    nonpivot_idx: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """PIFA forward: ``y[..., piv] = x P^T + b[piv]``, ``y[..., nonpiv] = (x P^T) C^T + b[nonpiv]``.

    ``x`` is (..., n), ``pivot_weight`` P is (r, n), ``coeff_weight`` C is (m-r, r),
    the int32/int64 indices partition range(m). ``x P^T`` is rounded to ``x``'s
    dtype before GEMM 2, as in the torch path; each GEMM accumulates in fp32.
    Index *values* are trusted (``PIFALinear`` validates them when set):
    checking them here would cost a device sync per call. Inference only.
    """
    _check_inputs(x, pivot_weight, coeff_weight, pivot_idx, nonpivot_idx, bias)
    n = x.shape[-1]
    r = pivot_weight.shape[0]
    m = r + coeff_weight.shape[0]
    x2 = x.reshape(-1, n)
    out = x.new_empty((x2.shape[0], m))
    if x2.shape[0]:
        y_pivot = x.new_empty((x2.shape[0], r))
        bias = None if bias is None else bias.contiguous()  # the epilogue gathers bias[col]
        _launch(x2, pivot_weight, out, y_pivot, pivot_idx.contiguous(), bias)
        _launch(y_pivot, coeff_weight, out, None, nonpivot_idx.contiguous(), bias)
    return out.reshape(*x.shape[:-1], m)


def _check_inputs(
    x: torch.Tensor,
    pivot_weight: torch.Tensor,
    coeff_weight: torch.Tensor,
    pivot_idx: torch.Tensor,
    nonpivot_idx: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    if pivot_weight.ndim != 2 or coeff_weight.ndim != 2:
        raise ValueError("pivot_weight (r, n) and coeff_weight (m - r, r) must be 2-D")
    r, n = pivot_weight.shape
    m = r + coeff_weight.shape[0]
    shapes = {
        "x[..., -1]": (x.shape[-1:] if x.ndim else (), (n,)),
        "coeff_weight": (tuple(coeff_weight.shape), (m - r, r)),
        "pivot_idx": (tuple(pivot_idx.shape), (r,)),
        "nonpivot_idx": (tuple(nonpivot_idx.shape), (m - r,)),
    }
    if bias is not None:
        shapes["bias"] = (tuple(bias.shape), (m,))
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            raise ValueError(f"{name} has shape {tuple(got)}, expected {want}")
    floats = [x, pivot_weight, coeff_weight] + ([] if bias is None else [bias])
    if len({t.dtype for t in floats}) != 1 or x.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise TypeError(
            "x, the weights and the bias must share one dtype among float16/bfloat16/float32, "
            f"got {sorted({str(t.dtype) for t in floats})}"
        )
    for name, idx in (("pivot_idx", pivot_idx), ("nonpivot_idx", nonpivot_idx)):
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {idx.dtype}")
    if len({t.device for t in [*floats, pivot_idx, nonpivot_idx]}) != 1:
        raise ValueError("all inputs must be on one device")
    if not (x.is_cuda or INTERPRET):
        raise ValueError(
            "the kernels need CUDA tensors (or TRITON_INTERPRET=1 before importing triton), "
            f"got {x.device}"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in floats):
        raise RuntimeError(
            "pifa_forward has no backward: call it under torch.no_grad() / inference_mode()"
        )
