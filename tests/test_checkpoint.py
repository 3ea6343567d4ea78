"""PIFA checkpoints: round trips, validation, atomic saves, the no-plugin guard, dense export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import calibration_dataset, make_model, make_tokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from llmcompressor.transformers.compression import compressed_tensors_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

from pifa_modifier.checkpoint import (
    PIFACheckpointError,
    attach_pifa_save,
    build_pifa_config,
    export_dense,
    install,
    parse_pifa_config,
)
from pifa_modifier.checkpoint.load import PIFACompressedTensorsHfQuantizer
from pifa_modifier.module import PIFALinear

Q = "model.layers.0.self_attn.q_proj"  # 64 x 64, rank 32
DOWN = "model.layers.1.mlp.down_proj"  # 64 x 128, rank 32
W_PROJ = "model.layers.0.self_attn.w_proj"  # no such module in Llama
GROUP = 16  # GPTQ group size: divides every rank and in_features used here


@pytest.fixture(scope="module", autouse=True)
def _plugin() -> None:
    install()


def _inputs() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_inputs()).logits


def _pifa_model(arch: str, base: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny model (saved to ``base`` for oneshot) with all Linears but lm_head in PIFA form."""
    model = make_model(arch, base, dtype=dtype)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                rank = 16 if min(child.weight.shape) <= 32 else 32
                setattr(parent, child_name, PIFALinear.from_linear(child, rank))
    return model.eval()


def _gptq(bits: int, actorder: str | None) -> GPTQModifier:
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": GROUP,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        actorder=actorder,
    )


def _oneshot(model: nn.Module, recipe: GPTQModifier, output_dir: Path) -> None:
    oneshot(
        model=model,
        processor=make_tokenizer(),
        recipe=recipe,
        dataset=calibration_dataset(num=4, seq_len=16),
        num_calibration_samples=4,
        max_seq_length=16,
        output_dir=str(output_dir),
    )


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _header(path: Path) -> dict[str, tuple[list[int], str]]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}


def _assert_pifa_checkpoint(path: Path, model: nn.Module) -> None:
    config = _config(path)
    assert config["pifa_config"] == build_pifa_config(model)
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    header = _header(path)
    for name, spec in parse_pifa_config(config["pifa_config"]).items():
        assert header[f"{name}.pivot_idx"] == ([spec.rank], "I32")
        assert f"{name}.weight" not in header


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """Unquantized fp32 Llama checkpoint saved with save_pretrained, and its logits."""
    root = tmp_path_factory.mktemp("dense")
    model = _pifa_model("llama", root / "base")
    attach_pifa_save(model)
    ref = _logits(model)
    model.save_pretrained(root / "ckpt", save_compressed=True)
    _assert_pifa_checkpoint(root / "ckpt", model)
    return root / "ckpt", ref


@pytest.fixture(scope="module")
def w4_ckpt(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """W4A16 (static actorder) tied-embedding Llama, saved by oneshot(output_dir=...)."""
    root = tmp_path_factory.mktemp("w4")
    model = _pifa_model("llama-tied", root / "base")
    attach_pifa_save(model)  # before oneshot: oneshot must keep our wrapper outermost
    _oneshot(model, _gptq(4, "static"), root / "ckpt")
    assert getattr(model.save_pretrained, "_pifa_save", False)
    _assert_pifa_checkpoint(root / "ckpt", model)
    return root / "ckpt", _logits(model)


@pytest.fixture(scope="module")
def w8_ckpt(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """W8A16 (no actorder) Qwen2 with q/k/v biases; attached the way PIFAModifier does it."""
    root = tmp_path_factory.mktemp("w8")
    model = _pifa_model("qwen2", root / "base")
    # oneshot wraps save_pretrained before any modifier initialises; PIFAModifier attaches
    # in on_initialize, i.e. on top of llmcompressor's wrapper
    compressed_tensors_utils.modify_save_pretrained(model)
    attach_pifa_save(model)
    _oneshot(model, _gptq(8, None), root / "ckpt")
    _assert_pifa_checkpoint(root / "ckpt", model)
    return root / "ckpt", _logits(model)


@pytest.fixture(scope="module")
def exported(w4_ckpt, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("export") / "dense"
    export_dense(w4_ckpt[0], dst)
    return dst


# ------------------------------------------------------------------------ round trips
@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("llama", torch.bfloat16),
        ("llama-tied", torch.float32),
        ("qwen2", torch.bfloat16),
    ],
)
def test_unquantized_round_trip_is_bit_identical(tmp_path, arch, dtype):
    model = _pifa_model(arch, tmp_path / "base", dtype=dtype)
    attach_pifa_save(model)
    ref = _logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    _assert_pifa_checkpoint(tmp_path / "ckpt", model)
    quant = _config(tmp_path / "ckpt")["quantization_config"]
    assert quant["format"] == "dense"
    assert [g["weights"] for g in quant["config_groups"].values()] == [None]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.get_submodule(Q), PIFALinear)
    assert loaded.dtype == dtype
    assert torch.equal(_logits(loaded), ref)


def test_fp32_checkpoint_round_trip(dense_ckpt):
    path, ref = dense_ckpt
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(isinstance(loaded.get_submodule(n), PIFALinear) for n in (Q, DOWN))
    assert torch.equal(_logits(loaded), ref)


@pytest.mark.parametrize("fixture", ["w4_ckpt", "w8_ckpt"])
def test_quantized_round_trip_is_bit_identical(request, fixture):
    path, ref = request.getfixturevalue(fixture)
    weights = _config(path)["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["actorder"]) == (
        (4, "static") if fixture == "w4_ckpt" else (8, None)
    )
    header = _header(path)
    assert header[f"{Q}.pivot.weight_packed"][1] == "I32"
    loaded = AutoModelForCausalLM.from_pretrained(path)
    layer = loaded.get_submodule(Q)
    assert isinstance(layer, PIFALinear)
    assert (layer.bias is not None) == (fixture == "w8_ckpt")  # Qwen2 q/k/v biases
    assert torch.equal(_logits(loaded), ref)
    if fixture == "w4_ckpt":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.parametrize("fixture", ["dense_ckpt", "w4_ckpt"])
def test_loaded_model_resaves_as_pifa(request, tmp_path, fixture):
    src, ref = request.getfixturevalue(fixture)
    path = shutil.copytree(src, tmp_path / "src")
    # llmcompressor 0.14 writes GPTQ's resolved actorder into recipe.yaml as a python tag it
    # cannot parse back when a later save appends to the recipe: not a PIFA concern
    (path / "recipe.yaml").unlink()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded.save_pretrained(tmp_path / "again")
    again = _config(tmp_path / "again")
    assert again["pifa_config"] == _config(path)["pifa_config"]
    assert again["quantization_config"]["format"] == _config(path)["quantization_config"]["format"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), ref)


def test_sharded_round_trip(dense_ckpt, tmp_path):
    path, ref = dense_ckpt
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(
        tmp_path / "sharded", max_shard_size="100KB"
    )
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")), ref)


def test_plain_compressed_tensors_checkpoints_still_load(tmp_path):
    model = make_model("llama", tmp_path / "base")
    _oneshot(model, _gptq(8, None), tmp_path / "ckpt")
    ref = _logits(model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded.hf_quantizer, PIFACompressedTensorsHfQuantizer)
    assert not any(isinstance(m, PIFALinear) for m in loaded.modules())
    assert torch.equal(_logits(loaded), ref)


# ------------------------------------------------------------------------------- API
def test_attach_is_idempotent_and_needs_pifa_layers(tmp_path):
    model = _pifa_model("llama", tmp_path / "base")
    attach_pifa_save(model)
    first = model.save_pretrained
    attach_pifa_save(model)
    compressed_tensors_utils.modify_save_pretrained(model)  # what oneshot calls
    assert model.save_pretrained is first
    with pytest.raises(PIFACheckpointError, match="no PIFALinear modules"):
        attach_pifa_save(make_model("llama", tmp_path / "plain"))


def test_install_is_idempotent():
    install()
    install()
    assert AUTO_QUANTIZER_MAPPING["compressed-tensors"] is PIFACompressedTensorsHfQuantizer


def test_unfactorized_skeleton_is_not_saved(tmp_path):
    model = _pifa_model("llama", tmp_path / "base")
    attach_pifa_save(model)
    layer = model.get_submodule(Q)
    layer.dense_weight = layer.to_dense()
    with pytest.raises(PIFACheckpointError, match=f"{Q}: not factorized yet"):
        model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------- atomic
def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model = _pifa_model("llama", tmp_path / "base")
    attach_pifa_save(model)
    dst = tmp_path / "out" / "ckpt"

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # runs inside llmcompressor's wrapper, after the weights and config are written
    with monkeypatch.context() as patch:
        patch.setattr(compressed_tensors_utils, "update_and_save_recipe", fail)
        with pytest.raises(RuntimeError, match="disk full"):
            model.save_pretrained(dst)
    assert list((tmp_path / "out").iterdir()) == []

    model.save_pretrained(dst)
    (dst / "notes.txt").write_text("kept")
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(compressed_tensors_utils, "update_and_save_recipe", fail)
        with pytest.raises(RuntimeError, match="disk full"):
            model.save_pretrained(dst)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ckpt"]

    model.save_pretrained(dst)  # a successful save replaces the weights, keeps other files
    assert (dst / "notes.txt").read_text() == "kept"
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(dst)), _logits(model))


# ------------------------------------------------------------------------- no plugin
_NO_PLUGIN = """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

for path in sys.argv[1:3]:
    try:
        AutoModelForCausalLM.from_pretrained(path)
    except Exception as err:
        print("REFUSED", type(err).__name__, err)
    else:
        print("LOADED", path)
dense = AutoModelForCausalLM.from_pretrained(sys.argv[3])
with torch.no_grad():
    logits = dense(load_file(sys.argv[4])["ids"]).logits
save_file({"logits": logits}, sys.argv[5])
assert "pifa_modifier" not in sys.modules
"""


def test_plain_transformers_refuses_pifa_checkpoints(dense_ckpt, w4_ckpt, exported, tmp_path):
    save_file({"ids": _inputs()}, tmp_path / "ids.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [dense_ckpt[0], w4_ckpt[0], exported, tmp_path / "ids.safetensors", tmp_path / "o"]
    result = subprocess.run(
        [sys.executable, "-c", _NO_PLUGIN, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    refusals = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert len(refusals) == 2, result.stdout
    assert all("ValueError" in line and "pifa_modifier" in line for line in refusals)
    # the dense export loads in plain transformers and matches the PIFA model
    torch.testing.assert_close(
        load_file(tmp_path / "o")["logits"], w4_ckpt[1], rtol=1e-5, atol=1e-5
    )


# ----------------------------------------------------------------------------- export
def test_export_dense(exported, w4_ckpt):
    config = _config(exported)
    assert not {"pifa_config", "quantization_config", "transformers_weights"} & config.keys()
    assert (exported / "tokenizer.json").is_file()  # copied from the PIFA checkpoint
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model.get_submodule(Q)) is nn.Linear
    assert not any(isinstance(m, PIFALinear) for m in model.modules())
    # fp32: C @ P is formed once instead of per token; differences are rounding only
    torch.testing.assert_close(_logits(model), w4_ckpt[1], rtol=1e-5, atol=1e-5)


def test_export_rejects_non_pifa_checkpoints(exported, tmp_path):
    with pytest.raises(PIFACheckpointError, match="not a PIFA checkpoint"):
        export_dense(exported, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ corruption
def _edit_config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        config = _config(path)
        fn(config)
        (path / "config.json").write_text(json.dumps(config))

    return apply


def _edit_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        tensors = load_file(path / "model.safetensors")
        fn(tensors)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    return apply


def _modules(config: dict) -> dict:
    return config["pifa_config"]["modules"]


def _set_pivot(index: int, value: Callable[[torch.Tensor], int]):
    def fn(t: dict[str, torch.Tensor]) -> None:
        idx = t[f"{Q}.pivot_idx"].clone()
        idx[index] = value(idx)
        t[f"{Q}.pivot_idx"] = idx

    return _edit_tensors(fn)


def _swap_first_pivots(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q}.pivot_idx"] = t[f"{Q}.pivot_idx"][[1, 0, *range(2, 32)]]


DENSE_CORRUPTIONS = {
    "pivot_idx unsorted": (_edit_tensors(_swap_first_pivots), rf"{Q}.pivot_idx: .*ascending"),
    "pivot_idx duplicate": (_set_pivot(1, lambda i: int(i[0])), rf"{Q}.pivot_idx: .*ascending"),
    "pivot_idx out of range": (_set_pivot(-1, lambda i: 64), rf"{Q}.pivot_idx: .*\[0, 64\)"),
    "pivot_idx int64": (
        _edit_tensors(lambda t: t.update({f"{Q}.pivot_idx": t[f"{Q}.pivot_idx"].long()})),
        rf"{Q}.pivot_idx: dtype must be int32",
    ),
    "rank in pifa_config": (
        _edit_config(lambda c: _modules(c)[Q].update(rank=16)),
        rf"{Q}.pivot_idx: shape \[32\] does not match rank 16",
    ),
    "rank in tensors": (
        _edit_tensors(lambda t: t.update({f"{Q}.coeff.weight": t[f"{Q}.coeff.weight"][:, :31]})),
        rf"{Q}: coeff weight is \[32, 31\].* implies \[32, 32\]",
    ),
    "tensor missing": (
        _edit_tensors(lambda t: t.pop(f"{DOWN}.coeff.weight")),
        rf"{DOWN}: the checkpoint has no coeff weight",
    ),
    "stray dense weight": (
        _edit_tensors(lambda t: t.update({f"{Q}.weight": torch.zeros(64, 64)})),
        rf"{Q}: the checkpoint has tensors \['{Q}.weight'\]",
    ),
    "module listed but missing": (
        _edit_config(lambda c: _modules(c).update({W_PROJ: _modules(c)[Q]})),
        rf"{W_PROJ}: listed in pifa_config, but LlamaForCausalLM has no such module",
    ),
    "module listed is not a Linear": (
        _edit_config(lambda c: _modules(c).update({"model.layers.0.mlp": _modules(c)[Q]})),
        r"model.layers.0.mlp: .* it is a LlamaMLP, not an nn.Linear",
    ),
    "shape differs from the architecture": (
        _edit_config(lambda c: _modules(c)[Q].update(bias=True)),
        rf"{Q}: pifa_config says .* \(64, 64, True\), but .* built \(64, 64, False\)",
    ),
    "bad format_version": (
        _edit_config(lambda c: c["pifa_config"].update(format_version=2)),
        r"format_version 2 is not supported",
    ),
    "entry missing from pifa_config": (
        _edit_config(lambda c: _modules(c).pop(DOWN)),
        rf"{DOWN}: the checkpoint stores PIFA tensors .* no entry for it$",
    ),
    "entry lacks a field": (
        _edit_config(lambda c: _modules(c)[Q].pop("rank")),
        rf"pifa_config.modules\['{Q}'\] lacks \['rank'\]",
    ),
    "pifa_config removed": (
        _edit_config(lambda c: c.pop("pifa_config")),
        r"marks a PIFA checkpoint .* but has no pifa_config",
    ),
    "pifa_config and guard removed": (
        _edit_config(lambda c: [c.pop("pifa_config"), c.pop("transformers_weights")]),
        r"model.layers.0.mlp.down_proj: the checkpoint stores PIFA tensors .* 13 other modules",
    ),
}

QUANTIZED_CORRUPTIONS = {
    "weight_shape vs rank": (
        _edit_tensors(lambda t: t.update({f"{Q}.pivot.weight_shape": torch.tensor([32, 48])})),
        rf"{Q}: pivot weight is \[32, 48\]",
    ),
    "packed tensor shape": (
        _edit_tensors(
            lambda t: t.update({f"{Q}.coeff.weight_packed": t[f"{Q}.coeff.weight_packed"][:-1]})
        ),
        rf"{Q}.coeff.weight_packed: shape \[31, 4\] in the checkpoint, .* imply \[32, 4\]",
    ),
}


def _corrupted(src: Path, dst: Path, corrupt: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    corrupt(dst)
    return dst


@pytest.mark.parametrize("case", DENSE_CORRUPTIONS)
def test_corrupted_checkpoint_raises(dense_ckpt, tmp_path, case):
    corrupt, message = DENSE_CORRUPTIONS[case]
    path = _corrupted(dense_ckpt[0], tmp_path / "ckpt", corrupt)
    with pytest.raises(PIFACheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("case", QUANTIZED_CORRUPTIONS)
def test_corrupted_quantized_checkpoint_raises(w4_ckpt, tmp_path, case):
    corrupt, message = QUANTIZED_CORRUPTIONS[case]
    path = _corrupted(w4_ckpt[0], tmp_path / "ckpt", corrupt)
    with pytest.raises(PIFACheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "must be a JSON object"),
        ({"format": "lora", "format_version": 1, "modules": {}}, "format must be 'pifa'"),
        ({"format": "pifa", "format_version": True, "modules": {"a": {}}}, "format_version"),
        ({"format": "pifa", "format_version": 1, "modules": {}}, "non-empty"),
        (
            {
                "format": "pifa",
                "format_version": 1,
                "modules": {"a": {"in_features": 8, "out_features": 8, "rank": 8, "bias": False}},
            },
            "rank 8 is invalid",
        ),
    ],
)
def test_parse_pifa_config_rejects(raw, message):
    with pytest.raises(PIFACheckpointError, match=message):
        parse_pifa_config(raw)
