"""Tiny models, a tokenizer and calibration data built offline (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 256
_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON),
    "llama-tied": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**_COMMON),  # q/k/v carry biases
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=None),
    "gemma3": lambda: Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=16),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2"
    )


def make_model(
    arch: str, path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides
):
    """A random tiny model saved to ``path`` and loaded back (oneshot re-reads its config)."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def make_wide_llama(path: Path):
    """One-layer Llama 256 wide, head_dim 64: group size 64 and rank_multiple 64 both fit."""
    return make_model(
        "llama",
        path,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        num_hidden_layers=1,
    )


def calibration_dataset(num: int = 16, seq_len: int = 32, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (num, seq_len), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def calib() -> Dataset:
    return calibration_dataset()
