"""Robustness catalogue (issue #9): bad input fails early and clearly, or falls back soundly.

Cases already covered elsewhere are listed in docs/robustness.md, not repeated here.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import calibration_dataset, make_model, make_tokenizer
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.core import reset_session
from loguru import logger
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForCausalLM, modeling_utils

import pifa_modifier  # noqa: F401  (registers the modifier, installs the loader)
from pifa_modifier import PIFALinear, PIFAModifier
from pifa_modifier.checkpoint import PIFACheckpointError, atomic

YAML = "pifa_stage:\n  pifa_modifiers:\n    PIFAModifier:\n{body}"


def _oneshot(model, recipe, dataset=None, samples: int = 4, **kwargs) -> None:
    oneshot(
        model=model,
        processor=make_tokenizer(),
        recipe=recipe,
        dataset=calibration_dataset(samples, seq_len=16) if dataset is None else dataset,
        num_calibration_samples=samples,
        max_seq_length=16,
        **kwargs,
    )


def _pifa(model: nn.Module) -> dict[str, PIFALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PIFALinear)}


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits.float()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []


# ----------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "body, error, match",
    [
        ("      density: [0.5\n", ValueError, "Could not parse recipe"),  # YAML syntax
        ("      densty: 0.5\n", ValidationError, "densty\n  Extra inputs are not permitted"),
        ("      density: 1.5\n", ValidationError, "densities must lie in"),
        ("      rank_multiple: -8\n", ValidationError, "rank_multiple must be"),
    ],
)
def test_bad_yaml_recipe_fails_before_touching_the_model(tmp_path, body, error, match):
    model = make_model("llama", tmp_path / "m")
    with pytest.raises(error, match=match):
        _oneshot(model, YAML.format(body=body))
    assert not _pifa(model)


def test_misspelled_modifier_name(tmp_path):
    model = make_model("llama", tmp_path / "m")
    recipe = "pifa_stage:\n  pifa_modifiers:\n    PIFAModifer:\n      density: 0.5\n"
    with pytest.raises(ValueError, match="No modifier of type 'PIFAModifer'"):
        _oneshot(model, recipe)
    assert not _pifa(model)


# ------------------------------------------------------------------- calibration data
@pytest.mark.parametrize(
    "shuffle, match",
    [
        (True, "num_samples=0"),  # llm-compressor's RandomSampler, inside oneshot()
        (False, "empty calibration dataset"),  # PIFAModifier.on_initialize
    ],
)
def test_empty_calibration_data(tmp_path, shuffle, match):
    model = make_model("llama", tmp_path / "m")
    empty = Dataset.from_dict({"input_ids": [], "attention_mask": []})
    with pytest.raises(ValueError, match=match):
        _oneshot(model, PIFAModifier(rank_multiple=4), empty, shuffle_calibration_samples=shuffle)
    assert not _pifa(model)


def test_fewer_tokens_than_inputs_falls_back_on_dampening(tmp_path):
    """3 tokens for 64/128-wide inputs: singular statistics, a warning, a finite model."""
    model = make_model("llama", tmp_path / "m")
    short = Dataset.from_dict({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]})
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        _oneshot(model, PIFAModifier(rank_multiple=4), short, samples=16)
    finally:
        logger.remove(sink)
    assert any("only 3 calibration tokens" in m and "dampening" in m for m in messages)
    assert len(_pifa(model)) == 14
    assert all(torch.isfinite(m.to_dense()).all() for m in _pifa(model).values())
    assert torch.isfinite(_logits(model)).all()


def test_fp16_overflow_names_the_layer_and_refuses_to_save(tmp_path):
    model = make_model("llama", tmp_path / "m", dtype=torch.float16)
    with torch.no_grad():
        for param in model.model.layers[0].mlp.parameters():
            param.mul_(3000)  # gate * up overflows float16's 65504
    with pytest.raises(ValueError, match=r"model\.layers\.0 .*non-finite activations.*overflow"):
        _oneshot(model, PIFAModifier(rank_multiple=4))
    with pytest.raises(PIFACheckpointError, match="not factorized yet"):
        model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------ weights
def test_zero_duplicate_and_rank_deficient_rows_are_exact(tmp_path):
    """Rank-8 q_proj with zero and repeated rows, all-zero v_proj: ranks 16 and 12 keep them.

    The zero v_proj also makes o_proj's input all zero (the plain-SVD fallback).
    """
    model = make_model("llama", tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        w = torch.randn(64, 8, generator=g) @ torch.randn(8, 64, generator=g) / 8
        w[:10] = 0
        w[10:20] = w[20]
        attn.q_proj.weight.copy_(w)
        attn.v_proj.weight.zero_()
    dense = {"q": w.clone(), "v": torch.zeros(32, 64)}
    _oneshot(model, PIFAModifier(rank_multiple=4, reconstruct_steps=0))
    for key, module in (("q", attn.q_proj), ("v", attn.v_proj)):
        assert isinstance(module, PIFALinear) and module.rank >= 8
        assert (
            torch.isfinite(module.pivot.weight).all() and torch.isfinite(module.coeff.weight).all()
        )
        torch.testing.assert_close(module.to_dense(), dense[key], atol=1e-5, rtol=0)


def test_rank_deficient_rows_with_m_stay_finite(tmp_path):
    model = make_model("llama", tmp_path / "m")
    with torch.no_grad():
        up = model.model.layers[1].mlp.up_proj.weight
        up[:40] = 0
        up[40:80] = up[80]
    _oneshot(model, PIFAModifier(rank_multiple=4))
    assert torch.isfinite(model.model.layers[1].mlp.up_proj.to_dense()).all()
    assert torch.isfinite(_logits(model)).all()


# ------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_stay_tied_and_lm_head_is_refused(tmp_path):
    model = make_model("llama-tied", tmp_path / "m")
    head = model.lm_head.weight.detach().clone()
    _oneshot(model, PIFAModifier(rank_multiple=4), output_dir=str(tmp_path / "ckpt"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, head)

    again = make_model("llama-tied", tmp_path / "m2")
    with pytest.raises(ValueError, match="lm_head lies outside every decoder layer"):
        _oneshot(again, PIFAModifier(rank_multiple=4, targets=["re:.*lm_head$"], ignore=[]))
    assert not _pifa(again)


# ---------------------------------------------------------------------- interruption
def test_keyboard_interrupt_mid_compression_leaves_nothing_on_disk(tmp_path):
    model = make_model("llama", tmp_path / "m", num_hidden_layers=4)
    reference = _logits(model)

    def interrupt(module: nn.Module, args: tuple) -> None:
        if isinstance(args[0], torch.Tensor) and not isinstance(args[0], torch.fx.Proxy):
            raise KeyboardInterrupt

    handle = model.model.layers[2].register_forward_pre_hook(interrupt)
    out = tmp_path / "out" / "ckpt"
    modifier = PIFAModifier(rank_multiple=4)
    with pytest.raises(KeyboardInterrupt):
        _oneshot(model, modifier, output_dir=str(out))
    handle.remove()
    # llm-compressor runs no modifier code on an exception; its session reset finalizes
    # the modifier, which drops the caching hooks and the cached activations
    reset_session()
    _logits(model)
    assert modifier.finalized and not modifier._calls
    assert _siblings(out) == []  # no checkpoint, no partial directory

    layers = model.model.layers
    assert layers[1].mlp.down_proj.dense_weight is None  # layers 0-1 were compressed
    assert layers[2].self_attn.q_proj.dense_weight is not None  # 2-3 are still skeletons
    with pytest.raises(PIFACheckpointError, match=r"model\.layers\.2\..*interrupted"):
        model.save_pretrained(out)
    assert _siblings(out) == []
    # the half-compressed model still computes: skeletons run their dense weights
    assert torch.isfinite(_logits(model)).all()
    assert not torch.equal(_logits(model), reference)


# -------------------------------------------------------------------------- disk full
@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> nn.Module:
    model = make_model("llama", tmp_path_factory.mktemp("base"))
    _oneshot(model, PIFAModifier(rank_multiple=4))
    return model


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _half_written(tensors, filename, *args, **kwargs) -> None:
    Path(filename).write_bytes(b"\0" * 100)  # a torn shard, then the disk fills up
    _no_space()


@pytest.mark.parametrize("where", ["safetensors", "rename"])
def test_disk_full_during_save_leaves_no_checkpoint(compressed, tmp_path, monkeypatch, where):
    out = tmp_path / "out" / "ckpt"
    with monkeypatch.context() as patch:
        if where == "safetensors":
            patch.setattr(modeling_utils, "safe_save_file", _half_written)
        else:  # publishing the finished temporary directory
            patch.setattr(atomic.os, "rename", _no_space)
        with pytest.raises(OSError, match="No space left on device") as info:
            compressed.save_pretrained(out)
    assert info.value.errno == errno.ENOSPC
    assert _siblings(out) == []
    compressed.save_pretrained(out)  # and the model is still intact for a retry
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out)), _logits(compressed))
