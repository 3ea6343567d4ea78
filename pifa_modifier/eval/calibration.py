"""Calibration windows drawn from the TRAIN token stream, exactly per the protocol.

Windows are cut from one tokenized stream (not per-document samples) so that every
sample is a full ``seq_len`` tokens and none needs padding or truncation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset

from pifa_modifier.eval.assets import tokenize_text

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

__all__ = ["calibration_dataset", "calibration_windows", "oneshot_windows", "text_windows"]


def calibration_windows(
    train_ids: torch.Tensor, num_samples: int = 128, seq_len: int = 512, seed: int = 0
) -> torch.Tensor:
    """``(num_samples, seq_len)`` non-overlapping windows of ``train_ids``.

    With ``S = L - n*seq``: ``u = randint(0, S+1, (n,), Generator().manual_seed(seed))``
    sorted, ``start_k = u_k + seq*k``. Sorting makes ``start_{k+1} - start_k >= seq``,
    so windows never overlap, and the draw depends only on (L, n, seq, seed).
    """
    if train_ids.dim() != 1:
        raise ValueError(f"train_ids must be 1-D, got shape {tuple(train_ids.shape)}")
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 1, got {num_samples}, {seq_len}")
    length = train_ids.numel()
    slack = length - num_samples * seq_len
    if slack < 0:
        raise ValueError(
            f"calibration text too short: {length} tokens < {num_samples} windows x "
            f"{seq_len} tokens = {num_samples * seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, slack + 1, (num_samples,), generator=generator).sort().values
    starts = offsets + seq_len * torch.arange(num_samples)
    index = starts[:, None] + torch.arange(seq_len)
    return train_ids.to(torch.long)[index]


def text_windows(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``calibration_windows`` of arbitrary texts: joined with ``"\\n\\n"``, tokenized once.

    The same treatment as the protocol's own train text, so user data is windowed
    like the bundled wiki text (full windows, no padding, short documents merged).
    """
    if not texts:
        raise ValueError("no texts to cut calibration windows from")
    return calibration_windows(
        tokenize_text(tokenizer, "\n\n".join(texts)), num_samples, seq_len, seed
    )


def calibration_dataset(windows: torch.Tensor) -> Dataset:
    """Pre-tokenized ``Dataset`` (``input_ids``, ``attention_mask``) for ``oneshot``.

    llm-compressor skips tokenization for any dataset with an ``input_ids`` column, so
    the windows reach the model unchanged. Call ``oneshot`` with
    ``shuffle_calibration_samples=False``: each window is then used once in a fixed
    order (a permutation from its length sort of equal lengths) that does not touch
    the global torch RNG, which the default random sampler would.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be 2-D (samples, seq_len), got {tuple(windows.shape)}")
    ids = windows.to(torch.long)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


def oneshot_windows(
    model: nn.Module, windows: torch.Tensor, recipe: Any, processor: Any = None
) -> float:
    """``llmcompressor.oneshot`` on ``windows`` (each once, in order); returns its seconds.

    Every window is exactly ``seq_len`` tokens, so the default truncation collator changes
    nothing. ``processor=None`` lets oneshot find the tokenizer next to the model (it
    insists on one when given a dataset, though pre-tokenized windows never use it).
    """
    from llmcompressor import oneshot

    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=calibration_dataset(windows),
        recipe=recipe,
        processor=processor,
        num_calibration_samples=windows.shape[0],
        max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    return time.perf_counter() - start
