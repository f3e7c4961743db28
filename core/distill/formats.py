"""Recognise an uploaded model file from its bytes, and refuse what must not be opened.

Nothing here unpickles anything: pickles are recognised from their first bytes or from a zip's
member names, and the pickles that a ``torch.export`` archive carries are checked opcode by
opcode (:mod:`pickletools` reads them without running them).
"""

from __future__ import annotations

import ast
import io
import json
import pickletools
import re
import struct
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from core.errors import ModelInvalid, UnsafeModelFile

FORMATS = ("exported_program", "hf", "onnx", "safetensors", "torchscript")

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
SAVE_AGAIN = (
    "save the model again with torch.export.save or torch.jit.save, or zip the folder that "
    "save_pretrained wrote"
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


def _head(path: Path) -> tuple[bytes, int]:
    """The first 16 bytes of a file and its size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            return fh.read(16), size
    except OSError as exc:
        raise ModelInvalid(f"cannot read the model file: {exc.strerror}") from None


def _sniff(path: Path) -> str:
    head, size = _head(path)
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
    check_archive_names(names)
    parts = [PurePosixPath(n).parts for n in names]
    inner = {"/".join(p[1:]) for p in parts if len(p) > 1}
    if any(n.startswith("models/") and n.endswith(".json") for n in inner):
        return "exported_program"
    if any(n.startswith("code/") for n in inner) and "constants.pkl" in inner:
        return "torchscript"
    from core.distill.hf.archive import check_hf_archive, is_hf_archive

    if is_hf_archive(names):  # a save_pretrained folder: checked before anything is loaded
        check_hf_archive(path)
        return "hf"
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
    header = json_object(raw, "the safetensors header")
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
    """The ``__metadata__`` strings of a safetensors file's header (empty when absent), once the
    file passes the checks of an upload: a JSON header of a sane length, and the whole data."""
    path = Path(path)
    if not _looks_like_safetensors(path, *_head(path)):
        raise ModelInvalid(
            "the file is not a safetensors file (no JSON header after the 8-byte length); "
            "save it with safetensors.torch.save_file"
        )
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ModelInvalid("the safetensors header's __metadata__ is not a JSON object")
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
    """Refuse an ONNX model whose tensors live in other files, without reading those files.

    Every tensor of the model counts: initializers and sparse initializers (values and
    indices), tensor and sparse-tensor attributes, in the main graph, in subgraphs (If, Loop,
    Scan bodies, nested), in functions and in training graphs.
    """
    import onnx

    check_onnx_tensors(onnx.load(str(path), load_external_data=False))


def check_onnx_tensors(model: Any) -> None:
    """:func:`check_onnx_single_file` on a model already parsed (without its external data)."""
    import onnx

    for tensor in _onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
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


def _onnx_tensors(message: Any) -> Iterator[Any]:
    """Every TensorProto anywhere in an ONNX message, found by walking all its fields."""
    import onnx
    from google.protobuf.descriptor import FieldDescriptor

    stack = [message]
    while stack:
        item = stack.pop()
        if isinstance(item, onnx.TensorProto):
            yield item
            continue
        for field, value in item.ListFields():
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            if field.is_repeated:  # ONNX has no map fields
                stack.extend(value)
            else:
                stack.append(value)


def check_archive_names(names: list[str], what: str = "the archive") -> None:
    """Refuse entry names that two zip readers could take for different entries.

    torch's reader (miniz) finds an entry by a case-insensitive search and returns whichever
    of two equal names it meets, where Python's ``zipfile`` takes the last: an archive with
    two entries of one name (or of names equal but for case or Unicode normalisation) could
    pass a check that reads one and load the other. Names that are not plain relative paths
    (``.``, ``..``, empty parts, backslashes, a leading ``/``, control characters) are refused
    too: no writer torch ships produces them.
    """
    seen: dict[str, str] = {}
    for name in names:
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or any(part in ("", ".", "..") for part in parts[:-1] + [parts[-1] or "x"])
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
        ):
            raise UnsafeModelFile(
                f"{what} has an entry named {name!r}, which is not a plain relative path (it "
                f"escapes its folder or is not a file name); {SAVE_AGAIN}"
            )
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            same = "twice" if seen[key] == name else f"twice ({seen[key]!r} and {name!r})"
            raise UnsafeModelFile(
                f"{what} holds the entry {name!r} {same}; zip readers disagree on which copy "
                f"counts, so the file is refused; {SAVE_AGAIN}"
            )
        seen[key] = name


def _open_torch_archive(source: Path | bytes, what: str) -> tuple[Any, list[str]]:
    """torch's own reader of a zip archive and its entry names (within the archive's folder).

    The names are checked with :func:`check_archive_names` and must be the ones Python's
    ``zipfile`` lists too (``torch.export.load`` falls back to ``zipfile`` for old archives).
    """
    import torch

    buffer = io.BytesIO(source) if isinstance(source, bytes) else None
    try:
        reader = torch._C.PyTorchFileReader(buffer if buffer is not None else str(source))
        names = list(reader.get_all_records())
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise ModelInvalid(
            f"{what} cannot be read by torch's archive reader ({reason}); save it again with "
            "torch.export.save or torch.jit.save"
        ) from None
    check_archive_names(names, what)
    try:
        with zipfile.ZipFile(buffer if buffer is not None else source) as zf:
            listed = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelInvalid(f"{what} is not a readable zip archive ({exc})") from None
    prefix = listed[0].split("/", 1)[0] + "/" if listed else ""
    inner = [n[len(prefix) :] for n in listed]
    if not all(n.startswith(prefix) for n in listed) or inner != names:
        raise UnsafeModelFile(
            f"{what} lists different entries to different zip readers; save the model again "
            "with torch.export.save or torch.jit.save"
        )
    return reader, names


def check_torchscript_archive(path: Path) -> None:
    """Refuse a TorchScript archive that would run its own code while it is being loaded.

    ``torch.jit.load`` calls the ``__setstate__`` method of every module and object that
    defines one, before anything can look at the loaded graphs
    (:func:`core.distill.operators.check_torchscript` walks them after loading). Models that
    ``torch.jit.script`` writes from ordinary modules define none.
    """
    what = "the TorchScript archive"
    reader, names = _open_torch_archive(Path(path), what)
    for name in names:
        if name.casefold().endswith(".py") and b"__setstate__" in reader.get_record(name):
            raise UnsafeModelFile(
                f"{what} defines __setstate__ in '{name}', code that would run while the model "
                "is loaded; it is not loaded. Script a model without __getstate__/__setstate__"
            )


# Every entry torch.export.save (torch 2.13) writes in the archive's folder; anything else (an
# AOTInductor library, ExecuTorch programs, legacy pickled weights) is refused.
_EXPORT_LAYOUT = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/\w+\.json|extra/[\w.-]+"
    r"|data/sample_inputs/\w+\.pt"
    r"|data/weights/(weight_\d+|\w+_weights_config\.json)"
    r"|data/constants/(tensor_\d+|opaque_obj_\d+|\w+_constants_config\.json)"
)
_PAYLOAD_NAME = re.compile(r"(weight|tensor|opaque_obj)_\d+")
# Every entry of a torch.save archive; a TorchScript one (constants.pkl, code/) inside an export
# archive would be handed to torch.jit.load.
_TORCH_SAVE_LAYOUT = re.compile(
    r"data\.pkl|byteorder|version|\.data/version|\.data/serialization_id|\.format_version"
    r"|\.storage_alignment|data/\w+"
)


def check_exported_program_archive(path: Path) -> None:
    """Refuse a torch.export archive that would run anything but torch's own code on load.

    ``torch.export.load`` unpickles tensor-subclass weights, opaque constants and the sample
    inputs, loads AOTInductor libraries, and hands symbolic-shape expressions to
    ``sympy.sympify`` (which evaluates them as Python). A normal export has plain tensor
    weights, a sample-input pickle that only rebuilds tensors, and sympy expressions built
    from a few sympy classes: each is checked here on the bytes torch's reader returns, without
    running them.
    """
    what = "the torch.export archive"
    reader, names = _open_torch_archive(Path(path), what)
    for name in names:
        if not _EXPORT_LAYOUT.fullmatch(name):
            raise UnsafeModelFile(
                f"{what} has an entry '{name}' that torch.export.save does not write (compiled "
                "libraries, pickled weights and other payloads are never loaded); export the "
                "model again with torch.export.save"
            )
    present = set(names)
    for name in names:
        if name.endswith(("_weights_config.json", "_constants_config.json")):
            folder = name.rsplit("/", 1)[0] + "/"
            config = _json_record(reader, name, what).get("config", {})
            if not isinstance(config, dict):
                raise ModelInvalid(f"'{name}' in {what} has no config object")
            for fqn, meta in config.items():
                _check_payload(reader, present, folder, str(fqn), meta, what)
        elif name.startswith("models/"):
            _check_sympy_expressions(_json_record(reader, name, what), name)
        elif name.startswith("data/sample_inputs/"):
            _check_tensor_pickle(reader.get_record(name), name)


def _json_record(reader: Any, name: str, what: str) -> dict[str, Any]:
    return json_object(reader.get_record(name), f"'{name}' in {what}")


def json_object(raw: bytes | str, what: str) -> dict[str, Any]:
    """``raw`` parsed as a JSON object, else ModelInvalid saying that ``what`` is not one."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInvalid(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelInvalid(f"{what} is not a JSON object")
    return value


def _check_payload(
    reader: Any, present: set[str], folder: str, fqn: str, meta: Any, what: str
) -> None:
    path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
    record = folder + path_name
    if not _PAYLOAD_NAME.fullmatch(path_name) or record not in present:
        raise UnsafeModelFile(
            f"{what} stores '{fqn}' as '{path_name}', which is not a tensor payload it holds; "
            "export a model whose weights and constants are plain tensors"
        )
    if path_name.startswith("opaque_obj_"):
        # torch.export.load runs pickle.loads on these: only tensor-rebuilding pickles pass.
        _check_tensor_pickle(reader.get_record(record), record, raw=True)
    elif meta.get("use_pickle"):
        _check_tensor_pickle(reader.get_record(record), record)


def _check_tensor_pickle(data: bytes, where: str, raw: bool = False) -> None:
    """A torch.save zip payload (or, ``raw``, one pickle) may only rebuild plain tensors."""
    if not data:
        return
    if not raw and data[:4] != b"PK\x03\x04":
        # torch.load reads other bytes as its legacy formats, a tar archive among them, whose
        # inner pickle a check of the outer bytes would not see.
        raise UnsafeModelFile(
            f"'{where}' in the archive is not a torch.save zip archive (older torch.save "
            "formats are not loaded); export the model again with a current torch"
        )
    if not raw:
        reader, names = _open_torch_archive(data, f"'{where}' in the archive")
        for name in names:
            if not _TORCH_SAVE_LAYOUT.fullmatch(name):
                raise UnsafeModelFile(
                    f"'{where}' in the archive holds '{name}', which a tensor saved with "
                    "torch.save does not; export the model again with plain tensor inputs"
                )
            if name.endswith(".pkl"):
                _check_tensor_pickle(reader.get_record(name), f"{where}:{name}", raw=True)
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


# The names a sympy expression of a torch.export graph is built from (``srepr`` form).
_SYMPY_NAMES = {
    *[
        "Symbol",
        "Dummy",
        "Integer",
        "Rational",
        "Float",
        "Add",
        "Mul",
        "Pow",
        "Mod",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "floor",
        "ceiling",
        "Integer",
        "true",
        "false",
        "oo",
        "zoo",
        "nan",
    ],
    *[
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
    ],
}
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")
_SYMBOL_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_FLOAT_STRING = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)")
_SYMPY_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.UnaryOp,
    ast.BinOp, ast.Compare, ast.BoolOp, ast.operator, ast.unaryop, ast.cmpop, ast.boolop,
)  # fmt: skip


def _check_sympy_expressions(value: Any, where: str) -> None:
    """Every ``expr_str`` of an exported graph must be a plain sympy expression.

    ``torch.export.load`` passes them to ``sympy.sympify``, which evaluates a string as Python;
    here each is parsed (not evaluated) and may only call sympy's expression classes.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            expr = item.get("expr_str")
            if expr is not None and not _is_sympy_expression(expr):
                shown = str(expr)[:80]
                raise UnsafeModelFile(
                    f"'{where}' in the torch.export archive has a shape expression that is not "
                    f"a plain sympy expression ({shown!r}); it would run as Python code on "
                    "load and is refused. Export the model again with torch.export.save"
                )
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _is_sympy_expression(expr: Any) -> bool:
    if not isinstance(expr, str) or len(expr) > 10_000:
        return False
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    # sympy functions sympify string arguments (evaluating them): a string may only be the name
    # of a Symbol or the digits of a Float.
    names: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Name) and not (
            node.id in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(node.id)
        ):
            return False
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_NAMES):
                return False
            first = node.args[0] if node.args else None
            pattern = _SYMBOL_STRING if node.func.id in ("Symbol", "Dummy") else _FLOAT_STRING
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if node.func.id not in ("Symbol", "Dummy", "Float"):
                    return False
                if not pattern.fullmatch(first.value):
                    return False
                names.add(id(first))
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and id(node) not in names:
                return False
            if not isinstance(node.value, (str, int, float, bool, type(None))):
                return False
    return True


def _pickle_globals(data: bytes, where: str) -> list[tuple[str, str]]:
    """Every (module, name) a pickle imports, read from its opcodes without executing it."""
    found: list[tuple[str, str]] = []
    strings: list[str | None] = []  # values pushed, for STACK_GLOBAL
    memo: dict[int, str | None] = {}
    end = 0
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            end = pos + 1
            if op.name in ("EXT1", "EXT2", "EXT4"):  # imports through copyreg's registry
                raise UnsafeModelFile(
                    f"'{where}' in the archive is a pickle that imports through copyreg's "
                    "extension registry; export the model again with plain tensor inputs"
                )
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
    if end != len(data):
        # torch.load's legacy format unpickles what follows the first pickle as well.
        raise UnsafeModelFile(
            f"'{where}' in the archive has {len(data) - end} bytes after its pickle; export the "
            "model again with plain tensor inputs"
        )
    return found
