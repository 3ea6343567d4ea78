"""PIFA + GPTQ in one recipe through oneshot, saved and reloaded bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import calibration_dataset, make_model
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

import pifa_modifier  # noqa: F401
from pifa_modifier import PIFALinear

RECIPE = """
pifa_stage:
  pifa_modifiers:
    PIFAModifier:
      density: 0.5
      rank_multiple: 8
      ignore: ["lm_head"]
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: ["lm_head"]
      config_groups:
        factors:
          targets: ["re:.*\\\\.(pivot|coeff)$"]
          weights: {{num_bits: {bits}, type: int, symmetric: true, strategy: group,
                    group_size: 8, actorder: {actorder}}}
"""


@pytest.mark.parametrize("arch, bits, actorder", [("llama", 4, "static"), ("qwen2", 8, "null")])
def test_pifa_then_gptq_round_trip(arch, bits, actorder, tmp_path, tokenizer):
    model = make_model(arch, tmp_path / "base")
    out = tmp_path / "out"
    oneshot(
        model=model,
        dataset=calibration_dataset(),
        recipe=RECIPE.format(bits=bits, actorder=actorder),
        processor=tokenizer,
        num_calibration_samples=16,
        max_seq_length=32,
        output_dir=str(out),
        save_compressed=True,
    )
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, PIFALinear)
    assert q.pivot.quantization_scheme.weights.num_bits == bits
    assert q.coeff.quantization_scheme.weights.num_bits == bits

    replay = Recipe.create_instance(str(out / "recipe.yaml"))
    assert [type(m).__name__ for m in replay.modifiers] == ["PIFAModifier", "GPTQModifier"]

    config = json.loads((out / "config.json").read_text())
    assert config["pifa_config"]["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == q.rank
    assert config["quantization_config"]["format"] == "pack-quantized"

    ids = torch.randint(3, 256, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(out)
        got = loaded(ids).logits
    assert torch.isfinite(ref).all()
    assert torch.equal(got, ref)


def test_recipe_file_enum_tags_are_rewritten(tmp_path):
    from pifa_modifier.checkpoint.recipe_file import sanitize_recipe_file

    path = tmp_path / "recipe.yaml"
    path.write_text(
        "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      actorder: !!python/object/"
        "apply:compressed_tensors.quantization.quant_args.ActivationOrdering\n      - static\n"
    )
    sanitize_recipe_file(path)
    assert "static" in path.read_text() and "python" not in path.read_text()
    path.write_text("a: !!python/object/apply:os.system\n- [1, 2]\n")
    with pytest.raises(Exception, match="unsupported Python object"):
        sanitize_recipe_file(path)
