"""Token perplexity on non-overlapping windows, exactly per the project protocol.

Every window counts: a non-finite logit or NLL raises instead of being skipped,
because silently dropping bad windows (as the reference evaluator does) hides
exactly the numerical failures compression causes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NonFiniteError", "PerplexityResult", "perplexity"]


class NonFiniteError(FloatingPointError):
    """A window produced NaN/inf logits or NLL."""


@dataclass(frozen=True)
class PerplexityResult:
    """PPL with the counts needed to compare or pool runs."""

    ppl: float
    nll_sum: float  # float64 sum of token NLLs (nats)
    n_tokens: int  # n_windows * (seq_len - 1)
    n_windows: int
    seq_len: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seq_len: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 1,
) -> PerplexityResult:
    """exp(mean NLL) over the first ``max_windows`` non-overlapping windows of ``input_ids``.

    One forward per window (no cache, no context carried across windows); in each
    window positions ``0..seq-2`` predict ``1..seq-1``. The tail shorter than a window
    is dropped; ``max_windows=None`` uses every full window. Log-softmax runs in
    float32 whatever the model dtype; per-window sums accumulate in float64.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    n_windows = input_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"{input_ids.numel()} tokens hold no full window of {seq_len}")
    windows = input_ids[: n_windows * seq_len].to(torch.long).view(n_windows, seq_len)
    device = model.get_input_embeddings().weight.device

    nll_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, n_windows, batch_size):
                batch = windows[first : first + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                _check_finite(logits, first, "logits")
                nll = F.cross_entropy(
                    logits.transpose(1, 2), batch[:, 1:], reduction="none"
                ).double()
                _check_finite(nll, first, "NLL")
                nll_sum += nll.sum().item()
    finally:
        model.train(was_training)

    n_tokens = n_windows * (seq_len - 1)
    return PerplexityResult(
        ppl=math.exp(nll_sum / n_tokens),
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_windows=n_windows,
        seq_len=seq_len,
    )


def _check_finite(values: torch.Tensor, first_window: int, what: str) -> None:
    """Raise naming the first window (global index) whose values are not all finite."""
    finite = torch.isfinite(values).flatten(1).all(dim=1)
    if not finite.all():
        bad = first_window + int((~finite).nonzero()[0])
        raise NonFiniteError(f"non-finite {what} in window {bad}")
