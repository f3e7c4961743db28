"""Transfer sets: every file format round-trips, malformed files say what is wrong."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cli.digits import write_digits_npz
from core.distill.data import dataset_info, encode_texts, load_transfer_set, split_indices
from core.errors import DatasetInvalid


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


# --- round trips -------------------------------------------------------------------------------


def test_npz_round_trip_with_a_carved_validation_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((100, 3, 4)).astype(np.float32)
    y = np.arange(100) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ts = load_transfer_set(tmp_path / "d.npz", val_fraction=0.2, seed=3)
    assert ts.x_train.shape == (80, 3, 4) and ts.x_val.shape == (20, 3, 4)
    assert ts.x_train.dtype == torch.float32 and ts.y_train.dtype == torch.long
    assert ts.n_classes == 4 and ts.has_labels
    # Every sample lands in exactly one split, with its own label.
    joined = torch.cat([ts.x_train, ts.x_val]).numpy()
    labels = torch.cat([ts.y_train, ts.y_val]).numpy()
    order = np.lexsort(joined.reshape(100, -1).T)
    ref = np.lexsort(x.reshape(100, -1).T)
    np.testing.assert_array_equal(joined[order], x[ref])
    np.testing.assert_array_equal(labels[order], y[ref])


def test_npz_given_validation_targets_and_unlabeled(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((30, 5)).astype(np.float32)
    targets = np.random.default_rng(1).random((30, 2))
    np.savez(tmp_path / "r.npz", x=x, y=targets, x_val=x[:4], y_val=targets[:4])
    ts = load_transfer_set(tmp_path / "r.npz")
    assert len(ts.x_train) == 30 and len(ts.x_val) == 4
    assert ts.y_train.dtype == torch.float32 and ts.y_train.shape == (30, 2)
    assert ts.n_classes is None
    info = dataset_info(ts)
    assert info.y_shape == [None, 2] and info.n_val == 4 and info.n_samples == 30
    np.savez(tmp_path / "u.npz", x=x)
    unlabeled = load_transfer_set(tmp_path / "u.npz", val_fraction=0.1)
    assert unlabeled.y_train is None and not unlabeled.has_labels
    assert len(unlabeled.x_train) == 27 and len(unlabeled.x_val) == 3


def test_partly_labeled_npz_keeps_minus_one_as_unlabeled(tmp_path: Path) -> None:
    write_digits_npz(tmp_path / "digits.npz", label_fraction=0.1)
    ts = load_transfer_set(tmp_path / "digits.npz", val_fraction=0.0)
    y = ts.y_train
    assert len(y) == 1797 and ts.n_classes == 10
    labeled = (y >= 0).float().mean().item()
    assert 0.09 < labeled < 0.12
    assert set(y[y >= 0].tolist()) == set(range(10))
    assert dataset_info(ts).has_labels


def test_csv_and_parquet_with_a_label_column(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"a": np.arange(12.0), "b": np.arange(12) * 2, "kind": ["dog", "cat", "eel"] * 4}
    )
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        ts = load_transfer_set(tmp_path / name, options={"label_column": "kind"}, val_fraction=0)
        assert ts.class_names == ["cat", "dog", "eel"]
        assert ts.y_train.tolist() == [1, 0, 2] * 4
        torch.testing.assert_close(ts.x_train[:, 1], torch.arange(12.0) * 2)
        assert ts.x_train.shape == (12, 2)


def test_image_zip_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("set/zebra/a.png", _png(np.full((6, 5), 255)))
        zf.writestr("set/ant/b.png", _png(np.zeros((6, 5))))
        zf.writestr("set/ant/c.png", _png(np.full((12, 10), 51)))  # resized to 6x5
        zf.writestr("set/README.txt", "not an image")
    ts = load_transfer_set(path, val_fraction=0)
    assert ts.class_names == ["ant", "zebra"]
    assert ts.x_train.shape == (3, 1, 6, 5)
    assert sorted(ts.y_train.tolist()) == [0, 0, 1]
    means = {round(float(x.mean()), 2): int(y) for x, y in zip(ts.x_train, ts.y_train, strict=True)}
    assert means == {1.0: 1, 0.0: 0, 0.2: 0}
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("set/ant/rgb.png", _png(np.zeros((6, 5, 3)), mode="RGB"))
    assert load_transfer_set(path, val_fraction=0).x_train.shape == (4, 3, 6, 5)


def test_jsonl_text_becomes_byte_tokens(tmp_path: Path) -> None:
    rows = [{"text": "hi", "label": "pos"}, {"text": "héllo there", "label": "neg"}, {"text": "x"}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ts = load_transfer_set(tmp_path / "t.jsonl", val_fraction=0, max_text_len=8)
    assert ts.x_train.dtype == torch.long and ts.x_train.shape == (3, 8)
    assert ts.x_train[0].tolist() == [ord("h") + 1, ord("i") + 1, 0, 0, 0, 0, 0, 0]
    assert ts.x_train[1, :3].tolist() == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1]
    assert ts.class_names == ["neg", "pos"] and ts.y_train.tolist() == [1, 0, -1]
    assert encode_texts(["ab", ""]).tolist() == [[98, 99], [0, 0]]


# --- malformed files ---------------------------------------------------------------------------


def _zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("cats/link.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([("../evil/a.png", b"x")], "'../evil/a.png' escapes its folder"),
        ([("/etc/a.png", b"x")], "'/etc/a.png' escapes its folder"),
        ([(_symlink_entry(), b"/etc/passwd")], "'cats/link.png' is a symbolic link"),
        ([("a.png", b"x")], "not inside a class folder"),
        ([("cats/a.txt", b"x")], "no .png or .jpg images"),
        ([("cats/a.png", b"not a png")], "'cats/a.png' cannot be decoded"),
    ],
)
def test_bad_image_zips(tmp_path: Path, entries: list, message: str) -> None:
    path = _zip(tmp_path / "bad.zip", entries)
    with pytest.raises(DatasetInvalid, match=message):
        load_transfer_set(path)


def test_decompression_bombs_are_refused(tmp_path: Path) -> None:
    big = _zip(tmp_path / "bomb.zip", [("cats/a.png", b"\0" * 5_000_000)])
    assert big.stat().st_size < 100_000
    with pytest.raises(DatasetInvalid, match="decompresses to 5000000 bytes"):
        load_transfer_set(big, options={"max_uncompressed_bytes": 1_000_000})
    huge = _zip(tmp_path / "pixels.zip", [("cats/a.png", _png(np.zeros((300, 400))))])
    with pytest.raises(DatasetInvalid, match="300 pixels|400x300 pixels"):
        load_transfer_set(huge, options={"max_image_pixels": 100_000})


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"inputs": np.zeros((4, 2))}, "no array 'x' \\(it has: inputs\\)"),
        ({"x": np.array([[1.0, np.nan], [0.0, 1.0]])}, "x has 1 NaN or infinite"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, 1, 1])}, "x has 4 samples but y has 3"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1.0, 2.0])}, "not integers \\(e.g. 0.5\\)"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -2, 1])}, "below -1"),
        ({"x": np.zeros(5)}, "x has shape \\[5\\]"),
        ({"x": np.array(["a", "b"])}, "must be numeric"),
    ],
)
def test_bad_npz(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetInvalid, match=message) as info:
        load_transfer_set(tmp_path / "bad.npz")
    assert info.value.code == "dataset_invalid"


def test_ragged_npz_cannot_hide_objects(tmp_path: Path) -> None:
    ragged = np.empty(2, dtype=object)
    ragged[:] = [np.zeros(3), np.zeros(4)]
    np.savez(tmp_path / "ragged.npz", x=ragged)
    with pytest.raises(DatasetInvalid, match="Python objects"):
        load_transfer_set(tmp_path / "ragged.npz")


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("a,b\n1,2\n3,4,5\n", {}, "ragged or malformed.*Expected 2 fields"),
        ("a,b\n1,2\n3\n", {}, "column 'b' has a missing, NaN or infinite value in data row 2"),
        ("a,name,b\n1,x,2\n", {}, "columns \\['name'\\] are not numeric"),
        ("a,b\n1,2\n", {"label_column": "y"}, "label_column 'y' is not a column; .*a, b"),
        ("a,y\n1,0.5\n", {"label_column": "y"}, "not an integer class"),
        ("", {}, "empty"),
    ],
)
def test_bad_csv(tmp_path: Path, text: str, options: dict, message: str) -> None:
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DatasetInvalid, match=message):
        load_transfer_set(tmp_path / "bad.csv", options=options)


def test_bad_jsonl_and_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DatasetInvalid, match="line 2 is not JSON"):
        load_transfer_set(tmp_path / "bad.jsonl")
    (tmp_path / "no_text.jsonl").write_text('{"label": 1}\n')
    with pytest.raises(DatasetInvalid, match='line 1 has no "text"'):
        load_transfer_set(tmp_path / "no_text.jsonl")
    (tmp_path / "data.h5").write_bytes(b"x")
    with pytest.raises(DatasetInvalid, match="unknown dataset file type '.h5'; accepted: .npz"):
        load_transfer_set(tmp_path / "data.h5")


# --- splits ------------------------------------------------------------------------------------


def test_split_is_stratified_and_deterministic() -> None:
    y = np.array([0] * 80 + [1] * 20 + [-1] * 100)
    train, val = split_indices(len(y), y, 0.25, seed=7)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    assert (y[val] == 0).sum() == 20 and (y[val] == 1).sum() == 5 and (y[val] == -1).sum() == 25
    again = split_indices(len(y), y, 0.25, seed=7)[1]
    other = split_indices(len(y), y, 0.25, seed=8)[1]
    np.testing.assert_array_equal(val, again)
    assert not np.array_equal(val, other)
    # Unlabeled rows are spread, not taken from one end.
    unlabeled_val = val[y[val] == -1]
    assert unlabeled_val.min() < 130 and unlabeled_val.max() > 170
