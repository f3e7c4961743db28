"""Transfer sets: dataset files → tensors, with a deterministic validation split.

Accepted files (API.md, "Datasets"): ``.npz``, ``.csv``, ``.parquet``, ``.zip`` (an image folder
``class_name/*.png|jpg``) and ``.jsonl`` (``{"text": …, "label": …}`` lines).

Labels are int64 class indices where ``-1`` marks an unlabeled sample, so one transfer set can
be, say, 10% labeled and 90% unlabeled: the teacher teaches on every sample, the labels help
where they exist. Float ``y`` of shape (N, k) holds regression targets. No ``y`` at all means
the set is unlabeled (``y_train is None``).

Integer ``x`` stays int64 (token ids for text teachers); every other ``x`` becomes float32.
Text is encoded by the built-in byte tokenizer: id = byte + 1, 0 is padding.
"""

from __future__ import annotations

import json
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from core.distill.jsonl import json_objects
from core.distill.types import TransferSet
from core.errors import DatasetInvalid
from core.spec import DatasetInfo

FORMATS = {".npz": "npz", ".csv": "csv", ".parquet": "parquet", ".zip": "zip", ".jsonl": "jsonl"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAX_UNCOMPRESSED_BYTES = 4 * 1024**3  # per archive (npz or image zip)
MAX_IMAGE_PIXELS = 4096 * 4096  # per image
VOCAB_SIZE = 257  # byte tokenizer: 256 bytes + padding


@dataclass
class _Arrays:
    x: np.ndarray
    y: np.ndarray | None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    class_names: list[str] | None = None


def dataset_format(filename: str) -> str:
    """The dataset format from a file name's extension."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in FORMATS:
        raise DatasetInvalid(
            f"unknown dataset file type '{suffix or filename}'; accepted: {', '.join(FORMATS)}"
        )
    return FORMATS[suffix]


def load_transfer_set(
    path: Path,
    format: str | None = None,
    *,
    options: dict[str, Any] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_text_len: int = 256,
) -> TransferSet:
    """Read a dataset file and split off a validation set (given ``x_val``, else carved).

    ``options``: ``label_column`` (csv/parquet), ``max_uncompressed_bytes`` and
    ``max_image_pixels`` (archives). The carved split is stratified by label and deterministic
    for a seed; unlabeled samples are spread at random.
    """
    path = Path(path)
    options = dict(options or {})
    fmt = format or dataset_format(path.name)
    readers = {
        "npz": _read_npz,
        "csv": _read_table,
        "parquet": _read_table,
        "zip": _read_images,
        "jsonl": _read_jsonl,
    }
    if fmt not in readers:
        raise DatasetInvalid(
            f"unknown dataset format '{fmt}'; accepted: {', '.join(sorted(readers))}"
        )
    try:
        if path.stat().st_size == 0:
            raise DatasetInvalid("the dataset file is empty; upload a file with samples")
    except OSError as exc:
        raise DatasetInvalid(f"cannot read the dataset file: {exc.strerror}") from None
    options["_format"] = fmt
    options["_max_text_len"] = max_text_len
    arrays = readers[fmt](path, options)
    ts = _to_transfer_set(arrays, val_fraction, seed)
    ts.text = fmt == "jsonl"
    ts.prompts = ts.text and _has_prompts(path)
    return ts


def _has_prompts(path: Path) -> bool:
    """Whether a .jsonl has a {"prompt": ...} line (causal LMs' seqkd and gkd need one)."""
    with path.open("rb") as fh:
        for raw in fh:
            if b'"prompt"' in raw:
                row = json.loads(raw)
                if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                    return True
    return False


def dataset_info(ts: TransferSet, n_samples: int | None = None) -> DatasetInfo:
    """What the service records about a dataset (load it with ``val_fraction=0`` so that
    ``n_val`` counts only a validation split the file itself gives)."""
    y = ts.y_train
    y_shape: list[int | None] | None = None
    if y is not None and ts.has_labels:
        y_shape = [None, *y.shape[1:]]
    return DatasetInfo(
        n_samples=n_samples if n_samples is not None else len(ts.x_train),
        x_shape=[None, *ts.x_train.shape[1:]],
        x_dtype=str(ts.x_train.dtype).removeprefix("torch."),
        has_labels=ts.has_labels,
        n_classes=ts.n_classes,
        y_shape=y_shape,
        n_val=len(ts.x_val) or None,
        text=ts.text,
        prompts=ts.prompts,
        class_names=ts.class_names,
    )


# --- readers -----------------------------------------------------------------------------------


def _read_npz(path: Path, options: dict[str, Any]) -> _Arrays:
    _check_archive_size(path, options, "the .npz")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DatasetInvalid(
            f"the .npz file cannot be read ({exc}); save it with np.savez"
        ) from None
    with npz:
        names = list(npz.files)
        if "x" not in names:
            raise DatasetInvalid(
                f"the .npz has no array 'x' (it has: {', '.join(names) or 'nothing'}); "
                "save the inputs as x: np.savez(path, x=inputs, y=labels)"
            )
        try:
            arrays = {k: npz[k] for k in ("x", "y", "x_val", "y_val") if k in names}
        except ValueError as exc:
            raise DatasetInvalid(
                f"the .npz holds Python objects ({exc}); save plain numeric arrays"
            ) from None
    if "y_val" in arrays and "x_val" not in arrays:
        raise DatasetInvalid("the .npz has y_val but no x_val; add x_val or drop y_val")
    return _Arrays(arrays["x"], arrays.get("y"), arrays.get("x_val"), arrays.get("y_val"))


def _read_table(path: Path, options: dict[str, Any]) -> _Arrays:
    import pandas as pd

    try:
        read = pd.read_csv if options["_format"] == "csv" else pd.read_parquet
        frame = read(path)
    except pd.errors.EmptyDataError:
        raise DatasetInvalid("the csv file has no rows; upload a file with samples") from None
    except pd.errors.ParserError as exc:
        raise DatasetInvalid(
            f"the csv rows are ragged or malformed: {str(exc).strip()}; every row needs the "
            "same number of fields as the header"
        ) from None
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DatasetInvalid(f"the {options['_format']} file cannot be read: {exc}") from None
    if len(frame) == 0:
        raise DatasetInvalid(f"the {options['_format']} file has a header but no rows")
    label = options.get("label_column")
    y = None
    class_names = None
    if label is not None:
        if label not in frame.columns:
            raise DatasetInvalid(
                f"label_column '{label}' is not a column; the columns are: "
                f"{', '.join(map(str, frame.columns))}"
            )
        y, class_names = _labels_from_values(frame[label].tolist(), f"label column '{label}'")
        frame = frame.drop(columns=[label])
    if frame.shape[1] == 0:
        raise DatasetInvalid("the table has no feature columns besides the label column")
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        hint = f" (or name the label column with label_column='{bad[0]}')" if not label else ""
        raise DatasetInvalid(
            f"columns {bad} are not numeric; feature columns must hold numbers{hint}"
        )
    x = frame.to_numpy(dtype=np.float32)
    nan_rows, nan_cols = np.nonzero(~np.isfinite(x))
    if len(nan_rows):
        raise DatasetInvalid(
            f"column '{frame.columns[nan_cols[0]]}' has a missing, NaN or infinite value in data "
            f"row {nan_rows[0] + 1} ({len(nan_rows)} such cells); fill or drop them"
        )
    return _Arrays(x, y, class_names=class_names)


def _read_jsonl(path: Path, options: dict[str, Any]) -> _Arrays:
    texts: list[str] = []
    labels: list[Any] = []
    for lineno, row in json_objects(path):
        if isinstance(row.get("prompt"), str):
            # a causal LM's prompt (and completion): the text is the two together
            row = {"text": row["prompt"] + str(row.get("completion") or "")}
        if not isinstance(row.get("text"), str):
            raise DatasetInvalid(
                f'line {lineno} has no "text" string; each line is {{"text": …, "label": …}}'
            )
        texts.append(row["text"])
        labels.append(row.get("label"))
    if not texts:
        raise DatasetInvalid("the .jsonl file has no lines; upload a file with samples")
    x = encode_texts(texts, int(options.get("_max_text_len", 256)))
    y, class_names = None, None
    if any(v is not None for v in labels):
        y, class_names = _labels_from_values(labels, "label")
    return _Arrays(x, y, class_names=class_names)


def encode_texts(texts: list[str], max_len: int = 256) -> np.ndarray:
    """The byte tokenizer: (N, L) int64 ids (byte + 1, 0 = padding), L = min(longest, max_len)."""
    encoded = [t.encode("utf-8")[:max_len] for t in texts]
    length = max(1, max((len(e) for e in encoded), default=1))
    out = np.zeros((len(encoded), length), dtype=np.int64)
    for i, e in enumerate(encoded):
        out[i, : len(e)] = np.frombuffer(e, dtype=np.uint8).astype(np.int64) + 1
    return out


def _read_images(path: Path, options: dict[str, Any]) -> _Arrays:
    from PIL import Image

    max_pixels = int(options.get("max_image_pixels", MAX_IMAGE_PIXELS))
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetInvalid(f"the .zip cannot be read ({exc}); upload it again") from None
    with zf:
        entries = []
        for info in zf.infolist():
            name = info.filename
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
                raise DatasetInvalid(
                    f"zip entry '{name}' escapes its folder (absolute path or '..'); zip the "
                    "class folders with relative paths"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DatasetInvalid(
                    f"zip entry '{name}' is a symbolic link; links are not accepted, zip the "
                    "image files themselves"
                )
            if info.is_dir() or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                continue
            if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if len(parts) < 2:
                raise DatasetInvalid(
                    f"image '{name}' is not inside a class folder; lay the zip out as "
                    "class_name/image.png"
                )
            entries.append((info, parts[-2]))
        if not entries:
            raise DatasetInvalid(
                "the zip holds no .png or .jpg images; lay it out as class_name/image.png"
            )
        _check_archive_size(path, options, "the zip", zf=zf)
        classes = sorted({c for _, c in entries})
        index = {c: i for i, c in enumerate(classes)}
        images = []
        for info, _ in entries:
            images.append(_open_image(zf, info, max_pixels, Image))
    gray = all(img.mode in ("1", "L", "I", "I;16", "F") for img in images)
    size = images[0].size
    need = len(images) * size[0] * size[1] * (1 if gray else 3) * 4
    limit = int(options.get("max_uncompressed_bytes", MAX_UNCOMPRESSED_BYTES))
    if need > limit:
        raise DatasetInvalid(
            f"the images would take {need / 1e9:.1f} GB as float32 (limit {limit / 1e9:.1f} GB); "
            "upload fewer or smaller images"
        )
    arrays = []
    for img in images:
        img = img.convert("L" if gray else "RGB")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arrays.append(arr[None] if gray else arr.transpose(2, 0, 1))
    x = np.stack(arrays)
    y = np.array([index[c] for _, c in entries], dtype=np.int64)
    return _Arrays(x, y, class_names=classes)


def _open_image(zf: zipfile.ZipFile, info: zipfile.ZipInfo, max_pixels: int, image_mod: Any) -> Any:
    import io

    data = zf.read(info)  # bounded by the declared size, checked against the limit already
    try:
        img = image_mod.open(io.BytesIO(data))
        width, height = img.size  # read from the header, before decoding any pixels
        if width * height > max_pixels:
            raise DatasetInvalid(
                f"image '{info.filename}' is {width}x{height} pixels, more than the "
                f"{max_pixels} allowed per image; upload smaller images"
            )
        img.load()
    except DatasetInvalid:
        raise
    except Exception as exc:  # PIL raises many types for a broken image
        raise DatasetInvalid(f"image '{info.filename}' cannot be decoded ({exc})") from None
    return img


def _check_archive_size(
    path: Path, options: dict[str, Any], what: str, zf: zipfile.ZipFile | None = None
) -> None:
    """Refuse an archive whose members would decompress to more than the limit."""
    limit = int(options.get("max_uncompressed_bytes", MAX_UNCOMPRESSED_BYTES))
    try:
        owned = zf is None
        zf = zf or zipfile.ZipFile(path)
        total = sum(i.file_size for i in zf.infolist())
        if owned:
            zf.close()
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetInvalid(f"{what} file cannot be read as an archive ({exc})") from None
    if total > limit:
        raise DatasetInvalid(
            f"{what} decompresses to {total} bytes, more than the {limit} allowed; upload a "
            "smaller dataset"
        )


# --- validation and labels ---------------------------------------------------------------------


def _labels_from_values(values: list[Any], what: str) -> tuple[np.ndarray, list[str] | None]:
    """Labels from a column or jsonl field: ints as given, strings as sorted class indices,
    missing (None/NaN/empty) as -1."""

    def missing(v: Any) -> bool:
        return v is None or v == "" or (isinstance(v, float) and np.isnan(v))

    present = [v for v in values if not missing(v)]
    if present and all(isinstance(v, str) for v in present):
        names = sorted(set(present))
        index = {n: i for i, n in enumerate(names)}
        return np.array([-1 if missing(v) else index[v] for v in values], dtype=np.int64), names
    out = np.full(len(values), -1, dtype=np.int64)
    for i, v in enumerate(values):
        if missing(v):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise DatasetInvalid(
                f"{what} mixes numbers and text (row {i + 1}: {v!r}); use one kind of label"
            )
        if float(v) != int(v):
            raise DatasetInvalid(
                f"{what} has a value that is not an integer class (row {i + 1}: {v}); class "
                "labels are integers or strings (regression targets go in an .npz y of "
                "shape (N, k))"
            )
        out[i] = int(v)
    return out, None


def _as_x(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype == object or x.dtype.kind not in "biuf":
        raise DatasetInvalid(
            f"{name} has dtype {x.dtype}; it must be numeric (ragged rows cannot form an array: "
            "pad every sample to the same shape)"
        )
    if x.ndim < 2:
        raise DatasetInvalid(
            f"{name} has shape {list(x.shape)}; it needs a sample axis and at least one feature "
            "axis, (N, …)"
        )
    if len(x) == 0:
        raise DatasetInvalid(f"{name} has no samples")
    if x.dtype.kind in "biu":
        return x.astype(np.int64)
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad)[0].tolist()
        raise DatasetInvalid(
            f"{name} has {int(bad.sum())} NaN or infinite values (first at index {first}); "
            "replace them before uploading"
        )
    return x


def _as_y(y: np.ndarray, n: int, name: str, xname: str) -> np.ndarray:
    if y.dtype == object or y.dtype.kind not in "biuf":
        raise DatasetInvalid(f"{name} has dtype {y.dtype}; labels must be integers")
    if len(y) != n:
        raise DatasetInvalid(
            f"{xname} has {n} samples but {name} has {len(y)}; give one label per sample"
        )
    if y.ndim == 1:
        if y.dtype.kind == "f":
            if not np.isfinite(y).all():
                raise DatasetInvalid(f"{name} has NaN labels; use -1 for an unlabeled sample")
            if (y != np.round(y)).any():
                bad = float(y[y != np.round(y)][0])
                raise DatasetInvalid(
                    f"{name} has labels that are not integers (e.g. {bad}); class labels are "
                    "integers (-1: unlabeled), regression targets have shape (N, k)"
                )
        labels = y.astype(np.int64)
        if (labels < -1).any():
            raise DatasetInvalid(
                f"{name} has negative labels below -1; classes are 0..k-1 and -1 is unlabeled"
            )
        return labels
    targets = y.reshape(len(y), -1).astype(np.float32) if y.ndim > 2 else y.astype(np.float32)
    if not np.isfinite(targets).all():
        raise DatasetInvalid(f"{name} has NaN or infinite targets; replace them")
    return targets


def _to_transfer_set(arrays: _Arrays, val_fraction: float, seed: int) -> TransferSet:
    x = _as_x(np.asarray(arrays.x), "x")
    y = _as_y(np.asarray(arrays.y), len(x), "y", "x") if arrays.y is not None else None
    x_val = y_val = None
    if arrays.x_val is not None:
        x_val = _as_x(np.asarray(arrays.x_val), "x_val")
        if x_val.shape[1:] != x.shape[1:]:
            raise DatasetInvalid(
                f"x_val samples have shape {list(x_val.shape[1:])} but x samples have "
                f"{list(x.shape[1:])}; they must match"
            )
        if arrays.y_val is not None:
            y_val = _as_y(np.asarray(arrays.y_val), len(x_val), "y_val", "x_val")
        elif y is not None and y.ndim == 1:
            y_val = np.full(len(x_val), -1, dtype=np.int64)
        elif y is not None:
            raise DatasetInvalid("x_val needs y_val because y holds regression targets")
    else:
        train_idx, val_idx = split_indices(len(x), y, val_fraction, seed)
        x, x_val = x[train_idx], x[val_idx]
        if y is not None:
            y, y_val = y[train_idx], y[val_idx]
    n_classes = None
    if y is not None and y.ndim == 1:
        top = max(int(y.max(initial=-1)), int(y_val.max(initial=-1)) if y_val is not None else -1)
        n_classes = len(arrays.class_names) if arrays.class_names else (top + 1 or None)
    return TransferSet(
        x_train=torch.from_numpy(np.ascontiguousarray(x)),
        y_train=torch.from_numpy(y) if y is not None else None,
        x_val=torch.from_numpy(np.ascontiguousarray(x_val)),
        y_val=torch.from_numpy(y_val) if y_val is not None else None,
        n_classes=n_classes,
        class_names=arrays.class_names,
    )


def split_indices(
    n: int, y: np.ndarray | None, val_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: stratified by class when ``y`` holds labels (unlabeled -1
    samples are spread at random), random otherwise; sorted, deterministic per seed."""
    if not 0 <= val_fraction < 1:
        raise DatasetInvalid(f"val_fraction must be in [0, 1), not {val_fraction}")
    rng = np.random.default_rng(seed)
    if val_fraction == 0 or n < 2:
        return np.arange(n), np.arange(0)
    groups = [np.arange(n)]
    if y is not None and y.ndim == 1:
        groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    val = []
    for group in groups:
        take = int(round(len(group) * val_fraction))
        val.append(rng.permutation(group)[:take])
    val_idx = np.sort(np.concatenate(val)) if val else np.arange(0)
    if len(val_idx) == 0:
        val_idx = np.sort(rng.permutation(n)[:1])
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return train_idx, val_idx
