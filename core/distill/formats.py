"""Recognise an uploaded model file from its bytes, and refuse what must not be opened.

Nothing here unpickles anything: pickles are recognised from their first bytes or from a zip's
member names, and the pickles that a ``torch.export`` archive carries are checked opcode by
opcode (:mod:`pickletools` reads them without running them).
"""

from __future__ import annotations

import io
import json
import pickletools
import struct
import zipfile
from pathlib import Path, PurePosixPath

from core.errors import ModelInvalid, UnsafeModelFile

FORMATS = ("exported_program", "onnx", "safetensors", "torchscript")

HOW_TO_EXPORT = (
    "export the model instead: torch.export.save(torch.export.export(model, example_inputs), "
    "'model.pt2'), torch.jit.save(torch.jit.script(model), 'model.pt'), a safetensors state dict "
    "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) plus the built-in "
    "'arch' it fits, or ONNX (torch.onnx.export); a scikit-learn model (joblib or pickle): "
    "convert it to ONNX with skl2onnx, skl2onnx.to_onnx(model, X[:1].astype('float32'), "
    "options={'zipmap': False}), and upload the .onnx file"
)
ONNX_SINGLE_FILE = (
    "save the model as one file: torch.onnx.export(..., external_data=False) or "
    "onnx.save(model, path, save_as_external_data=False)"
)
_SAFETENSORS_MAX_HEADER = 100 * 1024**2

# The only callables a tensor pickle inside a torch.export archive needs (sample inputs).
_SAFE_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch", "device"),
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}


def detect_format(path: Path, declared: str | None = None) -> str:
    """The model format judged from the file's bytes; ``declared`` must agree with it.

    Raises UnsafeModelFile for pickles, ModelInvalid for anything unrecognised or for an ONNX
    file with external data.
    """
    if declared is not None and declared not in FORMATS:
        raise ModelInvalid(
            f"unknown model format '{declared}'; accepted formats are: {', '.join(FORMATS)}"
        )
    found = _sniff(Path(path))
    if declared is not None and declared != found:
        raise ModelInvalid(
            f"the file was declared as '{declared}' but its bytes are a '{found}' file; "
            f"leave format out to have it detected, or upload a {declared} file"
        )
    return found


def _sniff(path: Path) -> str:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise ModelInvalid(f"cannot read the model file: {exc.strerror}") from None
    if size == 0:
        raise ModelInvalid("the model file is empty; upload the saved model")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise UnsafeModelFile(
            "the file is a Python pickle (torch.save of a model, joblib.dump or pickle.dump); "
            f"pickles run code when opened and are never loaded; {HOW_TO_EXPORT}"
        )
    if _looks_like_safetensors(path, head, size):
        return "safetensors"
    if _looks_like_onnx(path):
        check_onnx_single_file(path)
        return "onnx"
    raise ModelInvalid(
        "the file is not a model this service reads (not a torch.export archive, TorchScript "
        f"archive, ONNX model or safetensors file; first bytes {head[:8].hex()}); "
        "upload one of those, or check the upload was not truncated"
    )


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelInvalid(
            f"the file starts like a zip archive but cannot be read ({exc}); it may be "
            "truncated: upload it again"
        ) from None
    parts = [PurePosixPath(n).parts for n in names]
    inner = {"/".join(p[1:]) for p in parts if len(p) > 1}
    if any(n.startswith("models/") and n.endswith(".json") for n in inner):
        return "exported_program"
    if any(n.startswith("code/") for n in inner) and "constants.pkl" in inner:
        return "torchscript"
    if "data.pkl" in inner or any(n.endswith(".pkl") for n in names):
        raise UnsafeModelFile(
            "the file is a torch.save pickle archive (data.pkl without TorchScript code); "
            f"pickles run code when opened and are never loaded; {HOW_TO_EXPORT}"
        )
    raise ModelInvalid(
        "the file is a zip archive but neither a torch.export archive (models/*.json) nor a "
        "TorchScript archive (code/, constants.pkl); save it with torch.export.save or "
        "torch.jit.save"
    )


def _looks_like_safetensors(path: Path, head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > _SAFETENSORS_MAX_HEADER or head[8:9] != b"{":
        return False
    if 8 + n > size:
        raise ModelInvalid(
            f"the safetensors header says {n} bytes but the file has only {size - 8} after the "
            "length; the file is truncated: upload it again"
        )
    with path.open("rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInvalid(f"the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelInvalid("the safetensors header is not a JSON object")
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2
    ]
    if ends and 8 + n + max(ends) > size:
        raise ModelInvalid(
            f"the safetensors file needs {8 + n + max(ends)} bytes but has {size}; the file is "
            "truncated: upload it again"
        )
    return True


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's header (empty when absent)."""
    with Path(path).open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def _onnx_field_tags() -> tuple[bytes, ...]:
    """The encoded tag of every field of ONNX's ModelProto: a model file starts with one."""
    import onnx
    from google.protobuf.descriptor import FieldDescriptor

    varints = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_BOOL)
    tags = []
    for field in onnx.ModelProto.DESCRIPTOR.fields:
        # Wire type 0 for integers; 2 (length-delimited) for strings, bytes and messages.
        value = (field.number << 3) | (0 if field.type in varints else 2)
        encoded = bytearray()
        while value >= 0x80:
            encoded.append((value & 0x7F) | 0x80)
            value >>= 7
        encoded.append(value)
        tags.append(bytes(encoded))
    return tuple(tags)


def _looks_like_onnx(path: Path) -> bool:
    import onnx
    from google.protobuf.message import DecodeError

    with path.open("rb") as fh:
        head = fh.read(4)
    # Parsing a large file that is not protobuf at all takes seconds; its first bytes tell.
    if not head.startswith(_onnx_field_tags()):
        return False
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return False
    return model.ir_version > 0 and len(model.graph.output) > 0


def check_onnx_single_file(path: Path) -> None:
    """Refuse an ONNX model whose tensors live in other files, without reading those files."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(path), load_external_data=False)
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        pure = PurePosixPath(location.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or location[1:3] == ":\\":
            raise ModelInvalid(
                f"tensor '{tensor.name}' points to external data at '{location}', outside the "
                f"model's folder; it was not read. {ONNX_SINGLE_FILE}"
            )
        raise ModelInvalid(
            f"the ONNX model keeps tensor '{tensor.name}' in an external file ('{location}'), "
            f"which an upload cannot carry; {ONNX_SINGLE_FILE}"
        )


def check_exported_program_archive(path: Path) -> None:
    """Refuse a torch.export archive that would unpickle arbitrary Python objects on load.

    ``torch.export.load`` unpickles tensor-subclass weights, custom objects and the sample
    inputs; a normal export has plain tensor weights and a sample-input pickle that only
    rebuilds tensors, which is checked here opcode by opcode without running it.
    """
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            inner = "/".join(PurePosixPath(name).parts[1:])
            if inner.startswith("data/") and inner.endswith("_config.json"):
                config = json.loads(zf.read(name)).get("config", {})
                for fqn, meta in config.items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                        ("weight_", "tensor_")
                    ):
                        raise UnsafeModelFile(
                            f"the torch.export archive stores '{fqn}' as a pickled Python "
                            "object, which is never loaded; export a model whose weights and "
                            "constants are plain tensors"
                        )
            elif inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"):
                raise UnsafeModelFile(
                    f"the torch.export archive has a legacy pickled weights file ('{inner}'); "
                    "save it again with torch.export.save from a current torch"
                )
            elif inner.startswith("data/sample_inputs/"):
                _check_tensor_pickle(zf.read(name), inner)


def _check_tensor_pickle(data: bytes, where: str) -> None:
    if data[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            for name in inner.namelist():
                if name.endswith(".pkl"):
                    _check_tensor_pickle(inner.read(name), f"{where}:{name}")
        return
    if not data:
        return
    for module, name in _pickle_globals(data, where):
        safe = (module, name) in _SAFE_PICKLE_GLOBALS or (
            module == "torch" and name.endswith("Storage")
        )
        if not safe:
            raise UnsafeModelFile(
                f"'{where}' in the archive is a pickle that calls {module}.{name}; only plain "
                "tensors are accepted there. Export the model again with plain tensor inputs"
            )


def _pickle_globals(data: bytes, where: str) -> list[tuple[str, str]]:
    """Every (module, name) a pickle imports, read from its opcodes without executing it."""
    found: list[tuple[str, str]] = []
    strings: list[str | None] = []  # values pushed, for STACK_GLOBAL
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL" or op.name == "INST":
                module, _, name = str(arg).partition(" ")
                found.append((module, name))
                strings.append(None)
            elif op.name == "STACK_GLOBAL":
                if len(strings) < 2 or strings[-1] is None or strings[-2] is None:
                    raise UnsafeModelFile(
                        f"'{where}' in the archive is a pickle whose imports cannot be checked; "
                        "export the model again with plain tensor inputs"
                    )
                found.append((str(strings[-2]), str(strings[-1])))
                strings.append(None)
            elif op.name in _STRING_OPS:
                strings.append(str(arg))
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif op.name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                strings.append(memo.get(int(arg)))
            elif op.name not in ("PROTO", "FRAME"):
                strings.append(None)
    except ValueError as exc:
        raise ModelInvalid(f"'{where}' in the archive is a damaged pickle ({exc})") from None
    return found
