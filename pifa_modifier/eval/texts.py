"""Read user-supplied text (calibration or evaluation) from local files, never the hub.

Supported: ``.txt`` (the whole file is one text), ``.jsonl`` / ``.json`` (records with
a ``"text"`` field, or a JSON list of strings), and a ``datasets`` directory written by
``save_to_disk`` (a ``"text"`` column; a ``DatasetDict`` uses its ``train`` split or its
only split). The texts are later joined with ``"\\n\\n"`` and tokenized once, as the
perplexity protocol does for its own text, so documents never need padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["SUPPORTED_TEXT_SOURCES", "read_texts"]

SUPPORTED_TEXT_SOURCES = (
    "a .txt file, a .json/.jsonl file with a 'text' field, "
    "or a directory written by datasets' save_to_disk with a 'text' column"
)


def read_texts(path: str | Path) -> list[str]:
    """The non-blank texts stored at ``path``; ValueError/FileNotFoundError naming the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text source {path} does not exist; pass {SUPPORTED_TEXT_SOURCES}")
    if path.is_dir():
        texts = _dataset_dir_texts(path)
    elif path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    elif path.suffix == ".jsonl":
        texts = _jsonl_texts(path, path.read_text(encoding="utf-8"))
    elif path.suffix == ".json":
        texts = _json_texts(path)
    else:
        raise ValueError(
            f"unsupported text source {path} (suffix {path.suffix!r}); "
            f"pass {SUPPORTED_TEXT_SOURCES}"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text (it is empty or every text is blank)")
    return texts


def _record_text(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise ValueError(f"{where}: expected a string or an object with a string 'text' field")


def _jsonl_texts(path: Path, content: str) -> list[str]:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {number} is not JSON: {e}") from e
        texts.append(_record_text(record, f"{path} line {number}"))
    return texts


def _json_texts(path: Path) -> list[str]:
    content = path.read_text(encoding="utf-8")
    if not content.strip():
        return []
    try:
        data = json.loads(content)
    except json.JSONDecodeError:
        return _jsonl_texts(path, content)  # JSON Lines saved as .json, as datasets allows
    if isinstance(data, dict) and "text" in data:
        data = data["text"] if isinstance(data["text"], list) else [data]
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a list of records with a 'text' field (or JSON Lines), "
            f"got a JSON {type(data).__name__}"
        )
    return [_record_text(r, f"{path} item {i}") for i, r in enumerate(data)]


def _dataset_dir_texts(path: Path) -> list[str]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(
            f"{path} is a directory but not a datasets save_to_disk directory ({e}); "
            f"pass {SUPPORTED_TEXT_SOURCES}"
        ) from e
    if isinstance(data, DatasetDict):
        splits = list(data)
        if "train" in data:
            data = data["train"]
        elif len(splits) == 1:
            data = data[splits[0]]
        else:
            raise ValueError(
                f"{path} holds splits {splits} and none is 'train'; save the split to use alone"
            )
    if "text" not in data.column_names:
        raise ValueError(f"{path} has columns {data.column_names}; a 'text' column is required")
    return list(_strings(data["text"], path))


def _strings(values: Iterable[Any], path: Path) -> Iterable[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{path} row {i}: 'text' is {type(value).__name__}, not a string")
        yield value
