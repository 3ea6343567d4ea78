"""Publish a checkpoint directory only once it is complete.

Everything is written into a fresh sibling directory (same filesystem), then
renamed onto the destination. An exception before that leaves the destination
untouched (absent, or holding the previous checkpoint) and removes the
partial directory.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "copy_missing_files", "is_weight_file"]

_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def is_weight_file(name: str) -> bool:
    """Weight shards and their indexes: never carried from an older checkpoint."""
    return name.endswith(_WEIGHT_SUFFIXES)


@contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty directory; on success it replaces ``destination``.

    Files of an existing ``destination`` that the new checkpoint does not write
    (a tokenizer, notes) are kept, as ``save_pretrained`` keeps them; its
    weight files are not, since they would mix with the new ones.
    """
    dst = Path(destination).absolute()
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"{dst} exists and is not a directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(dst, "partial")
    tmp.mkdir()  # plain mkdir: honours the umask, unlike tempfile.mkdtemp's 0o700
    try:
        yield tmp
        if dst.exists():
            copy_missing_files(dst, tmp)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_missing_files(src: Path, dst: Path) -> None:
    """Copy entries of ``src`` that ``dst`` lacks, except weight files."""
    for entry in src.iterdir():
        target = dst / entry.name
        if target.exists() or is_weight_file(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target, follow_symlinks=False)


def _publish(tmp: Path, dst: Path) -> None:
    if not dst.exists():
        os.rename(tmp, dst)
        return
    backup = _sibling(dst, "old")
    os.rename(dst, backup)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _sibling(dst: Path, tag: str) -> Path:
    return dst.parent / f".{dst.name}.{tag}-{uuid.uuid4().hex[:12]}"
