"""Calibration statistics are shared per input, and compression is reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import calibration_dataset, make_model, make_tokenizer
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM

import pifa_modifier  # noqa: F401  (registers the modifier, installs the loader)
from pifa_modifier import PIFAModifier
from pifa_modifier.modifier import replay


def _oneshot(model, output_dir: Path | None = None, **fields) -> None:
    oneshot(
        model=model,
        processor=make_tokenizer(),
        recipe=PIFAModifier(rank_multiple=4, **fields),
        dataset=calibration_dataset(4),
        num_calibration_samples=4,
        max_seq_length=16,
        output_dir=None if output_dir is None else str(output_dir),
    )


@pytest.mark.parametrize(
    "fields, matrices",
    [({}, 3), ({"reconstruct_steps": 0}, 1), ({"group_order": "layer"}, 3)],
)
def test_one_statistics_object_per_distinct_input(tmp_path, monkeypatch, fields, matrices):
    """q/k/v share one set of n x n moments, gate/up another: 4 per Llama layer, not 7."""
    created: list[replay.GroupStats] = []
    zeros = replay.GroupStats.zeros.__func__

    def spy(cls, *args, **kwargs):
        created.append(zeros(cls, *args, **kwargs))
        return created[-1]

    monkeypatch.setattr(replay.GroupStats, "zeros", classmethod(spy))
    model = make_model("llama", tmp_path / "m")
    _oneshot(model, **fields)
    # inputs of q/k/v, o, gate/up, down (hidden 64, intermediate 128), two layers
    assert [s.h_old.shape[0] for s in created] == [64, 64, 64, 128] * 2
    for stats in created:
        kept = [t for t in (stats.h_old, stats.h_new, stats.cross) if t is not None]
        assert len(kept) == matrices
        assert stats.tokens == 4 * 16


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_same_inputs_and_seed_give_identical_checkpoint_files(tmp_path):
    base = tmp_path / "base"
    make_model("llama", base)
    digests = []
    for run in ("a", "b"):
        torch.manual_seed(0)  # oneshot shuffles the calibration samples with torch's RNG
        model = AutoModelForCausalLM.from_pretrained(base)
        _oneshot(model, tmp_path / run)
        digests.append(_digest(tmp_path / run))
    assert digests[0].keys() >= {"model.safetensors", "config.json", "recipe.yaml"}
    assert digests[0] == digests[1]
