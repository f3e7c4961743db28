"""The operators an uploaded TorchScript or ``torch.export`` graph may call: an allowlist.

How the allowlist is derived: every operator schema registered with torch
(``torch._C._jit_get_all_schemas()``) in the namespaces of plain inference (``aten``, ``prim``,
``quantized``), less every operator that reaches outside the process's own tensors:

- files: ``aten::from_file``, ``aten::save`` and any operator with a file-name or path string
  argument (:data:`_PATH_ARGUMENTS`);
- shared or raw storage: any operator that takes a ``Storage``;
- the Python interpreter, other processes and the network: ``prim::PythonOp``, remote calls
  (``prim::rpc_*``) and the operators of :data:`_DENIED`;

plus the structural nodes of TorchScript graphs that are not operators (constants, control flow,
attribute access, list and tuple building: :data:`_STRUCTURAL`) and, in ``torch.export`` graphs,
the plain arithmetic on sizes (:data:`_EXPORT_FUNCTIONS`). Every other namespace (custom
operators, ``c10d``, ``profiler`` ...) and every higher-order operator is refused.

The check walks the graphs of a loaded model; loading builds the graphs but runs none of them,
so it runs before any forward pass. Code that TorchScript runs while loading (``__setstate__``)
is refused before loading, in :mod:`core.distill.formats`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from functools import cache
from typing import Any

from core.errors import UnsafeModelFile

_NAMESPACES = ("aten", "prim", "quantized")
_PATH_ARGUMENTS = {"filename", "file", "path", "filepath", "file_name", "dirname", "directory"}
_DENIED = {
    "aten::from_file",
    "aten::save",
    "aten::_print",
    "prim::Print",
    "prim::PythonOp",
    "prim::IgnoredPythonOp",
    "prim::rpc_async",
    "prim::rpc_remote",
    "prim::rpc_sync",
    "prim::profile",
    "prim::profile_ivalue",
}
# Nodes of TorchScript graphs that are no registered operator but the language itself. Calls
# (prim::CallMethod, prim::CallFunction) are inlined before the walk; one left over goes through
# an interface, whose target the walk cannot follow, and is refused.
_STRUCTURAL = {
    "prim::Constant",
    "prim::If",
    "prim::Loop",
    "prim::Return",
    "prim::GetAttr",
    "prim::SetAttr",
    "prim::TupleConstruct",
    "prim::TupleUnpack",
    "prim::TupleIndex",
    "prim::TupleSlice",
    "prim::ListConstruct",
    "prim::ListUnpack",
    "prim::DictConstruct",
    "prim::CreateObject",
    "prim::Uninitialized",
    "prim::unchecked_cast",
    "prim::RaiseException",
    "prim::isinstance",
    "prim::Enter",
    "prim::Exit",
}
_EXPORT_FUNCTIONS = {
    *(
        getattr(operator, name)
        for name in [
            "getitem",
            "add",
            "sub",
            "mul",
            "truediv",
            "floordiv",
            "mod",
            "pow",
            "neg",
            "pos",
            "abs",
            "eq",
            "ne",
            "lt",
            "le",
            "gt",
            "ge",
            "and_",
            "or_",
            "not_",
            "xor",
        ]
    ),
    math.ceil,
    math.floor,
    math.trunc,
    math.sqrt,
}


@cache
def allowed_operators() -> frozenset[str]:
    """Qualified names (``aten::linear``) of the operators an uploaded graph may call."""
    import torch

    allowed = set(_STRUCTURAL)
    for schema in torch._C._jit_get_all_schemas():
        namespace = schema.name.split("::", 1)[0]
        if namespace not in _NAMESPACES or _touches_outside(schema):
            continue
        allowed.add(schema.name)
    return frozenset(allowed - _DENIED)


def _touches_outside(schema: Any) -> bool:
    if schema.name.startswith("prim::rpc"):
        return True
    for arg in schema.arguments:
        kind = str(arg.type)
        if "Storage" in kind or (arg.name.lower() in _PATH_ARGUMENTS and "str" in kind):
            return True
    return False


def _refuse(name: str, where: str) -> UnsafeModelFile:
    return UnsafeModelFile(
        f"the model calls operator '{name}' (in {where}), which this service does not run: "
        "uploaded models may call only tensor operators of aten, prim and quantized that touch "
        "no file, storage, process, network or Python code. Export the model without it",
        details={"operator": name},
    )


# --- TorchScript -------------------------------------------------------------------------------


def check_torchscript(module: Any) -> None:
    """Refuse a loaded ``torch.jit.ScriptModule`` whose code calls an operator not allowed.

    Every method of the module and of its submodules is walked, with the calls it makes inlined
    (functions and methods of TorchScript classes included), through every nested block.
    """
    import torch

    allowed = allowed_operators()
    for path, sub in module.named_modules():
        for method_name in sub._c._method_names():
            where = f"{path or type(module).__name__}.{method_name}".lstrip(".")
            graph = sub._c._get_method(method_name).graph.copy()
            torch._C._jit_pass_inline(graph)
            for node in _script_nodes(graph.nodes()):
                kind = node.kind()
                if kind not in allowed:
                    raise _refuse(kind, where)


def _script_nodes(nodes: Any) -> Iterator[Any]:
    """Every node, in nested blocks and in the subgraphs some nodes hold as attributes."""
    for node in nodes:
        yield node
        for block in node.blocks():
            yield from _script_nodes(block.nodes())
        for name in node.attributeNames():
            kind = node.kindOf(name)
            graphs = [node.g(name)] if kind == "g" else node.gs(name) if kind == "gs" else []
            for graph in graphs:
                yield from _script_nodes(graph.nodes())


# --- torch.export ------------------------------------------------------------------------------


def check_exported_program(program: Any) -> None:
    """Refuse a loaded ``torch.export.ExportedProgram`` whose graph calls an operator not allowed.

    Every graph module is walked (the top graph and any nested one); a ``call_function`` must be
    an allowed aten/prim/quantized overload or plain arithmetic on sizes.
    """
    import torch

    allowed = allowed_operators()
    for path, sub in program.graph_module.named_modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        where = path or "the graph"
        for node in sub.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            if node.op != "call_function":
                raise _refuse(f"{node.op} {target}", where)
            if isinstance(target, torch._ops.OpOverload):
                name = target._schema.name
                if name not in allowed:
                    raise _refuse(name, where)
            elif not _is_export_function(target):
                raise _refuse(getattr(target, "__name__", None) or str(target), where)


def _is_export_function(target: Any) -> bool:
    import torch

    try:
        if target in _EXPORT_FUNCTIONS:
            return True
    except TypeError:  # unhashable
        return False
    sym = ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt")
    return any(target is getattr(torch, name, None) for name in sym)


allowed_operators()  # derived at import, so that a warm sandbox child has it ready (~75 ms)
