"""Reading ``.jsonl`` transfer sets: one JSON object per line, errors naming the line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import DatasetInvalid


def json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of ``path`` as (line number, object); a line that is not a JSON
    object raises :class:`DatasetInvalid` naming it."""
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DatasetInvalid(f"line {lineno} is not JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DatasetInvalid(f"line {lineno} is not a JSON object")
            yield lineno, row


def is_validation(row: dict[str, Any], lineno: int) -> bool:
    """Whether a line's ``"split"`` puts it in the validation split (``"train"`` by default)."""
    split = row.get("split", "train")
    if split not in ("train", "val"):
        raise DatasetInvalid(f'line {lineno}: "split" is "train" or "val", not {split!r}')
    return split == "val"
