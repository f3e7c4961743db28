"""The ``hf`` upload: a zip of a ``save_pretrained`` folder, checked before anything is loaded.

Accepted: ``config.json``, ``*.safetensors`` weights (sharded with their index), the tokenizer's
files, ``generation_config.json`` and other small JSON/text files, at the zip root or in one top
folder. Refused: pickled weights (``*.bin``, ``*.pt``, …), Python files or a config asking for
custom code (``auto_map``), an architecture the installed ``transformers`` does not have, and any
entry that would land outside the folder, a link, or more bytes than the limit.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from core.distill.formats import json_object
from core.errors import ModelInvalid, UnsafeModelFile

MAX_UNCOMPRESSED_BYTES = 16 * 1024**3
MAX_CONFIG_BYTES = 4 * 1024**2
MAX_ENTRIES = 10_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".joblib")
SAVE_SAFELY = (
    "save the folder again with model.save_pretrained(dir, safe_serialization=True) and "
    "tokenizer.save_pretrained(dir), then zip it"
)


def is_hf_archive(names: list[str]) -> bool:
    """Whether a zip's entry names look like a ``save_pretrained`` folder (a ``config.json`` at
    the root or in one top folder)."""
    return _config_name(names) is not None


def _config_name(names: list[str]) -> str | None:
    for name in names:
        parts = PurePosixPath(name).parts
        if parts and parts[-1] == "config.json" and len(parts) <= 2:
            return name
    return None


def check_hf_archive(path: Path) -> dict[str, Any]:
    """Refuse an ``hf`` zip that must not be opened; return its ``config.json``.

    UnsafeModelFile for pickled weights, ModelInvalid for custom code, an unknown
    architecture, a missing file or a damaged archive.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            config_name = _config_name([i.filename for i in infos])
            if config_name is None:
                raise ModelInvalid(
                    "the zip has no config.json at its root or in one top folder; zip the "
                    "folder that model.save_pretrained(dir) wrote"
                )
            _check_entries(infos)
            info = zf.getinfo(config_name)
            if info.file_size > MAX_CONFIG_BYTES:
                raise ModelInvalid("config.json is larger than 4 MB; this is not a model config")
            raw = zf.read(info)
    except zipfile.BadZipFile as exc:
        raise ModelInvalid(f"the zip cannot be read ({exc}); upload it again") from None
    config = json_object(raw, "config.json")
    check_config(config)
    return config


def _check_entries(infos: list[zipfile.ZipInfo]) -> None:
    if len(infos) > MAX_ENTRIES:
        raise ModelInvalid(f"the zip has {len(infos)} entries; a model folder has a few")
    weights = []
    for info in infos:
        name = info.filename
        pure = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in pure.parts:
            raise ModelInvalid(
                f"zip entry '{name}' escapes its folder (absolute path or '..'); zip the model "
                "folder with relative paths"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ModelInvalid(f"zip entry '{name}' is a symbolic link; zip the files themselves")
        suffix = pure.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise UnsafeModelFile(
                f"'{name}' holds pickled weights, which run code when opened and are never "
                f"loaded; {SAVE_SAFELY}"
            )
        if suffix == ".py":
            raise ModelInvalid(
                f"'{name}' is Python code; models that need custom code are not accepted "
                "(never trust_remote_code): use an architecture that transformers ships"
            )
        if suffix == ".safetensors":
            weights.append(name)
    total = sum(i.file_size for i in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise ModelInvalid(
            f"the zip decompresses to {total} bytes, more than the {MAX_UNCOMPRESSED_BYTES} "
            "allowed; upload a smaller model"
        )
    if not weights:
        raise ModelInvalid(f"the zip has no *.safetensors weights; {SAVE_SAFELY}")


def check_config(config: dict[str, Any]) -> None:
    """Refuse a config that needs custom code or names an architecture transformers lacks."""
    import transformers

    if config.get("auto_map"):
        raise ModelInvalid(
            "config.json has 'auto_map', which asks for custom code from the hub; custom code "
            "is never run (no trust_remote_code): remove 'auto_map' from config.json and use "
            "an architecture that transformers ships",
            details={"field": "auto_map"},
        )
    model_type = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise ModelInvalid(
            f"config.json has model_type {model_type!r}, which the installed transformers "
            f"{transformers.__version__} does not know; save a model of a built-in family "
            "(bert, distilbert, roberta, …)"
        )
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not architectures:
        raise ModelInvalid(
            "config.json names no 'architectures'; save the model with model.save_pretrained "
            "so that its class is recorded"
        )
    for arch in architectures:
        if not isinstance(arch, str) or not hasattr(transformers, arch):
            raise ModelInvalid(
                f"architecture {arch!r} does not exist in the installed transformers "
                f"{transformers.__version__}; use a model class that transformers ships",
                details={"field": "architectures"},
            )


def extract_hf_archive(path: Path, dest: Path) -> Path:
    """Check and unzip an ``hf`` zip into ``dest``; the folder that holds ``config.json``."""
    check_hf_archive(path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            target = (root / info.filename).resolve()
            if not target.is_relative_to(root):
                raise ModelInvalid(f"zip entry '{info.filename}' escapes its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                # Bounded by the declared size, checked above; a lying header stops here.
                shutil.copyfileobj(_Limited(src, info.file_size), out)
        config_name = _config_name(zf.namelist())
    assert config_name is not None
    return (root / config_name).parent


class _Limited:
    """A reader that refuses to give more than ``limit`` bytes (a zip entry lying about its
    size)."""

    def __init__(self, fh: Any, limit: int) -> None:
        self.fh, self.left = fh, limit

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n if n >= 0 else self.left + 1)
        self.left -= len(data)
        if self.left < 0:
            raise ModelInvalid("a zip entry holds more bytes than its header says; upload again")
        return data
