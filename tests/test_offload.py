"""PIFAModifier on models offloaded to disk, as llm-compressor runs big models (issue #9).

Three ways to get a disk-offloaded model on a CPU-only machine, each compared with
the same oneshot on a plain, non-offloaded copy (same seed, same 8 calibration
samples, no shuffling):

- ``dispatch``: compressed-tensors' own ``dispatch_with_map`` (``onload cpu``,
  ``offload disk``) on a loaded model;
- ``accelerate``: ``from_pretrained(device_map=..., offload_folder=...)`` with the
  decoder layers on ``"disk"``; oneshot converts the accelerate hooks into
  compressed-tensors offloading (``from_accelerate``);
- ``load_offloaded_model``: the same load inside compressed-tensors'
  ``load_offloaded_model()`` (converted at load time).

Run ``python tests/test_offload.py [hidden_size]`` for the peak-RSS comparison
(plain vs disk-offloaded, 8 layers; prints figures, asserts nothing).
"""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from compressed_tensors.offload import (
    disable_onloading,
    dispatch_with_map,
    load_offloaded_model,
)
from compressed_tensors.offload.cache import CPUCache, DiskCache
from conftest import calibration_dataset, make_model, make_tokenizer
from llmcompressor import oneshot
from safetensors.torch import load_file
from test_composition import RECIPE
from transformers import AutoModelForCausalLM

import pifa_modifier  # noqa: F401  (registers the modifier)
from pifa_modifier import PIFALinear, PIFAModifier

LAYERS_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(7))


def compress(model, samples: int = 8, seq_len: int = 32, rank_multiple: int = 4):
    oneshot(
        model=model,
        dataset=calibration_dataset(samples, seq_len),
        recipe=PIFAModifier(density=0.5, rank_multiple=rank_multiple, reconstruct_steps=1),
        processor=make_tokenizer(),
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def pifa_layers(model) -> dict[str, PIFALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PIFALinear)}


def read_from_disk(module, name: str, offload_dir: Path) -> torch.Tensor:
    """A tensor as stored in the offload folder (not an onloaded copy)."""
    cache = module._parameters if name in module._parameters else module._buffers
    assert isinstance(cache, DiskCache), f"{name} of {type(module).__name__} is not on disk"
    with disable_onloading():
        meta = cache[name]
    assert meta.device.type == "meta"  # nothing held in memory
    info = DiskCache.index[meta]
    path = Path(info["safetensors_file"])
    assert path.parent == offload_dir.resolve() and not path.is_symlink()
    return load_file(path)[info["weight_name"]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("offload") / "llama"
    make_model("llama", path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    return compress(AutoModelForCausalLM.from_pretrained(checkpoint))


def load_offloaded(mode: str, checkpoint: Path, offload_dir: Path):
    if mode == "dispatch":
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        device_map = {
            name: ("cpu", "disk")
            for name, module in model.named_modules()
            if next(module.parameters(recurse=False), None) is not None
        }
        offload_dir.mkdir()
        dispatch_with_map(model, device_map, offload_dir=str(offload_dir), show_progress=False)
        return model
    kwargs = dict(device_map=LAYERS_ON_DISK, offload_folder=str(offload_dir))
    if mode == "accelerate":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
        assert model.hf_device_map["model.layers"] == "disk"
        return model
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    assert isinstance(model.model.layers[0].mlp.up_proj._parameters, DiskCache)
    return model


@pytest.mark.parametrize("mode", ["dispatch", "accelerate", "load_offloaded_model"])
def test_disk_offloaded_model_matches_plain_run(mode, checkpoint, reference, tmp_path):
    ckpt_hash = sha256(checkpoint / "model.safetensors")
    offload_dir = tmp_path / "offload"
    model = compress(load_offloaded(mode, checkpoint, offload_dir))

    ref_layers, layers = pifa_layers(reference), pifa_layers(model)
    assert set(layers) == set(ref_layers) and len(layers) == 14
    worst = 0.0
    for name, layer in layers.items():
        ref = ref_layers[name]
        assert layer.dense_weight is None and layer.rank == ref.rank
        # the factors live in the offload folder: read the files, not an onloaded copy
        assert torch.equal(read_from_disk(layer.pivot, "weight", offload_dir), ref.pivot.weight)
        assert torch.equal(read_from_disk(layer.coeff, "weight", offload_dir), ref.coeff.weight)
        assert torch.equal(read_from_disk(layer, "pivot_idx", offload_dir), ref.pivot_idx)
        assert torch.equal(read_from_disk(layer, "out_perm", offload_dir), ref.out_perm)
        worst = max(worst, float((layer.to_dense() - ref.to_dense()).abs().max()))
    out, ref_out = logits(model), logits(reference)
    logit_diff = float((out - ref_out).abs().max())
    print(f"\n[{mode}] max |to_dense diff| {worst:.3g}, max |logit diff| {logit_diff:.3g}")
    assert worst == 0.0 and logit_diff == 0.0  # measured: bit-identical to the plain run

    # the replaced dense linears were dropped from the offload folder (no model-size
    # leftover); the source checkpoint, which accelerate's offload links to, is intact
    stored = {p.name for p in offload_dir.iterdir()}
    assert stored == _files_in_use(model)
    assert sha256(checkpoint / "model.safetensors") == ckpt_hash

    model.save_pretrained(tmp_path / "ckpt", save_compressed=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), out)


def _files_in_use(model) -> set[str]:
    """Names of the offload files that the model's disk caches point to."""
    files = set()
    with disable_onloading():
        for module in model.modules():
            for cache in (module._parameters, module._buffers):
                if isinstance(cache, DiskCache):
                    files |= {
                        Path(DiskCache.index[t]["safetensors_file"]).name
                        for t in cache.values()
                        if t is not None
                    }
    return files


def test_pivot_idx_reaches_storage_when_onloading_copies(
    checkpoint, reference, monkeypatch, tmp_path
):
    """On a GPU the pipeline onloads to cuda: every access to an offloaded buffer gives a
    copy. Simulated here by an onload that clones. Writing ``pivot_idx`` in place (as
    before this test) updated only that copy: the model ran right (``out_perm`` was
    written through the cache) but saved ``pivot_idx = arange(r)`` and reloaded wrong
    (max logit difference 0.64 on this model)."""
    monkeypatch.setattr(CPUCache, "onload", lambda self, t: None if t is None else t.clone())
    model = compress(AutoModelForCausalLM.from_pretrained(checkpoint))
    monkeypatch.undo()
    for name, layer in pifa_layers(model).items():
        assert torch.equal(layer.pivot_idx, pifa_layers(reference)[name].pivot_idx), name
    model.save_pretrained(tmp_path / "ckpt", save_compressed=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(reference))


def test_pifa_then_gptq_on_disk_offloaded_model(checkpoint, tmp_path):
    """PIFA + GPTQ (W4, group 8) with the decoder layers on disk: GPTQ quantizes the
    disk-offloaded factors; same logits as the plain run, exact reload."""
    recipe = RECIPE.format(bits=4, actorder="static")
    outputs = {}
    for mode in ("plain", "disk"):
        kwargs = (
            {}
            if mode == "plain"
            else dict(device_map=LAYERS_ON_DISK, offload_folder=str(tmp_path / "offload"))
        )
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
        oneshot(
            model=model,
            dataset=calibration_dataset(8),
            recipe=recipe,
            processor=make_tokenizer(),
            num_calibration_samples=8,
            max_seq_length=32,
            shuffle_calibration_samples=False,
            output_dir=str(tmp_path / mode),
            save_compressed=True,
        )
        outputs[mode] = logits(model)
        assert torch.equal(
            logits(AutoModelForCausalLM.from_pretrained(tmp_path / mode)), outputs[mode]
        )
    pivot = model.model.layers[1].mlp.down_proj.pivot
    assert isinstance(pivot._parameters, DiskCache) and pivot.quantization_scheme is not None
    assert torch.equal(outputs["disk"], outputs["plain"])


# ------------------------------------------------------------------ peak RSS
def _rss_child(mode: str, path: Path) -> None:
    def rss() -> float:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    if mode == "plain":
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        offload = tempfile.mkdtemp()
        model = AutoModelForCausalLM.from_pretrained(
            path, device_map=LAYERS_ON_DISK, offload_folder=offload
        )
    loaded, start = rss(), time.perf_counter()
    compress(model, samples=8, seq_len=64, rank_multiple=8)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"RSS {mode:5s}: after load {loaded:.0f} MB, after oneshot {rss():.0f} MB, "
        f"peak {peak:.0f} MB, oneshot {time.perf_counter() - start:.0f} s"
    )


def measure_rss(hidden: int = 512) -> None:
    """Peak RSS of oneshot on an 8-layer random Llama, plain vs decoder layers on disk."""
    from transformers import LlamaConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=256,
            max_position_embeddings=128,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        size = (path / "model.safetensors").stat().st_size / 2**20
        print(f"8 layers, hidden {hidden}, intermediate {3 * hidden}: {size:.0f} MB fp32")
        for mode in ("plain", "disk"):  # one process each: ru_maxrss is per process
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(path)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            print(next(line for line in out.splitlines() if line.startswith("RSS")))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _rss_child(sys.argv[2], Path(sys.argv[3]))
    else:
        measure_rss(int(sys.argv[1]) if len(sys.argv) > 1 else 512)
