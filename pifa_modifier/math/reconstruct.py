"""Data-aware low-rank fits: whitened truncated SVD (SVD-LLM) and the M refit.

All statistics are input second moments of one linear layer (n x n):
``H_old = sum x_old x_old^T`` on the dense stream, ``H = sum x_new x_new^T`` on the
compressed stream and ``K = sum x_old x_new^T`` across them. Everything is
solved in float64 on the statistics' device.
"""

from __future__ import annotations

import torch

__all__ = [
    "damped",
    "whitened_svd",
    "m_refit",
    "relative_output_error",
]


def damped(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """``H + dampening * mean(diag H) * I`` in float64; raises if H carries no signal."""
    h = hessian.to(torch.float64)
    if not torch.isfinite(h).all():
        raise ValueError(
            "input statistics contain NaN or Inf: the calibration activations "
            "overflowed; calibrate in float32 or check the inputs"
        )
    scale = torch.diagonal(h).mean()
    if not scale > 0:
        raise ValueError(
            "input statistics are all zero: the layer saw no calibration "
            "tokens (or only zero activations); provide calibration data"
        )
    return h + (dampening * scale) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def whitened_svd(
    weight: torch.Tensor, hessian: torch.Tensor, rank: int, dampening: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``A @ B`` minimising ``||(W - A B) X||_F`` for ``X X^T = hessian``.

    SVD-LLM: with ``H = S S^T`` (Cholesky), ``SVD(W S) = U s V^T`` and
    ``A = U_r s_r^1/2``, ``B = s_r^1/2 V_r^T S^-1``. Dead input features make H
    singular; ``dampening`` (relative to the mean diagonal) keeps it positive
    definite, and is raised tenfold up to three times if Cholesky still fails.
    """
    w = weight.to(device=hessian.device, dtype=torch.float64)
    chol = None
    for attempt in range(4):
        chol, info = torch.linalg.cholesky_ex(damped(hessian, dampening * 10**attempt))
        if int(info) == 0:
            break
    else:
        raise ValueError(
            "input statistics are not positive definite even with 1000x "
            "dampening; raise `dampening` or check the calibration data"
        )
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    # B = diag(root) V_r^T S^-1  <=>  B S = diag(root) V_r^T
    b = torch.linalg.solve_triangular(chol, root[:, None] * vh[:rank], upper=False, left=False)
    return a, b


def m_refit(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    hessian: torch.Tensor,
    cross: torch.Tensor,
    old_output_factor: float = 0.25,
    steps: int = 2,
    ridge: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares of ``A B x_new`` towards ``y* = (1-λ) W x_new + λ W x_old``.

    Needs only ``H`` (compressed-stream second moment) and ``K = sum x_old x_new^T``:
    ``G = sum y* x_new^T = W ((1-λ) H + λ K)``. Steps alternate U, V, U, ...:
    U: ``A = G B^T (B H B^T)^-1``; V: ``B = A^+ W~`` with the ridge-regularised
    unconstrained optimum ``W~ = (G + μW)(H + μI)^-1`` (μ = ridge * mean diag H).
    """
    dev = hessian.device
    w = weight.to(device=dev, dtype=torch.float64)
    h = damped(hessian, 0.0)
    g = w @ ((1.0 - old_output_factor) * h + old_output_factor * cross.to(dev, torch.float64))
    a = a.to(dev, torch.float64)
    b = b.to(dev, torch.float64)
    mu = ridge * torch.diagonal(h).mean()
    eye_n = torch.eye(h.shape[0], dtype=h.dtype, device=dev)
    for step in range(steps):
        if step % 2 == 0:  # U-step
            gram = b @ h @ b.T
            gram += mu * torch.eye(gram.shape[0], dtype=h.dtype, device=dev)
            a = torch.linalg.solve(gram, b @ g.T).T
        else:  # V-step
            target = torch.linalg.solve(h + mu * eye_n, (g + mu * w).T).T
            b = torch.linalg.pinv(a) @ target
    return a, b


def relative_output_error(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor
) -> float:
    """``||(W - W') X|| / ||W X||`` from the second moment alone (no activations kept)."""
    h = hessian.to(torch.float64)
    w = weight.to(h.device, torch.float64)
    diff = w - approx.to(h.device, torch.float64)
    num = torch.einsum("ij,jk,ik->", diff, h, diff)
    den = torch.einsum("ij,jk,ik->", w, h, w)
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())
