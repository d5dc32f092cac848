"""The program of a torch.export archive (``models/model.json``, read as torch's schema
dataclasses) checked before anything is built from it: a pure function of one image tensor.

Refused: programs in another dialect or schema version, names that are not identifiers (torch
pastes them into generated code), symbolic shape expressions outside sympy's arithmetic
(torch ``eval``s them), ops outside torch's own namespaces, higher-order ops and custom
objects, an in-place op writing to a parameter, buffer, constant or the input (directly or
through a view), and a signature other than one tensor in and one tensor out.
`evaluator.models.pt2` calls `check_program` from both of its entry points.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from evaluator.models.pt2_rules import MAX_NAME, refuse, refuse_pickle

__all__ = ["check_program"]


_MAX_EXPR = 1_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
# Expressions arrive as sympy's ``srepr``: ``Mul(Integer(2), Symbol('s77', positive=True))``.
_EXPR_TOKEN = re.compile(
    r"\s+|[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|[A-Za-z_][A-Za-z0-9_]*"
    r"|'[a-z]+[0-9]+'|'[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?'"
    r"|\*\*|//|<=|>=|==|!=|[-+*/%(),<>&|~=]"
)
# What sympy prints for shape arithmetic, and torch's own sympy functions (see
# ``GraphModuleDeserializer.sympy_functions``); anything else would reach ``eval`` as a name.
_SYMPY_NAMES = frozenset(
    """
    Abs Add Mul Pow Symbol Integer Float Rational True False oo precision
    positive negative nonnegative nonpositive integer real finite infinite zero nonzero even
    odd rational And Or Not Eq Ne Ge Gt Le Lt Max Min Mod ceiling floor sqrt
    CeilDiv CeilToInt CleanDiv FloatPow FloatTrueDiv FloorDiv FloorToInt Identity IntTrueDiv
    IsNonOverlappingAndDenseIndicator LShift ModularIndexing PowByNatural PythonMod RShift
    RoundDecimal RoundToInt ToFloat TruncToFloat TruncToInt Where
    """.split()
)
# Python-level targets torch.export emits for arithmetic on symbolic sizes.
_SYM_TARGETS = frozenset(
    {f"_operator.{n}" for n in (
        "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_", "getitem",
    )}
    | {f"torch.{n}" for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum",
    )}
    | {f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")}
)  # fmt: skip
_OP_NAMESPACES = ("aten", "prims")
# torch's own ops that reach outside the tensor world (files, stdout).
_REFUSED_OPS = frozenset({"from_file", "save", "_print"})
# The program dialects torch.export itself writes.
_DIALECTS = frozenset({"", "ATEN", "TRAINING"})
# Argument kinds that carry code or objects rather than values.
_REFUSED_ARGUMENTS = frozenset({"as_graph", "as_custom_obj", "as_operator"})


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (field name, value) pair in a schema dataclass tree, depth first."""
    import dataclasses

    from torch._export.serde.union import _Union

    stack = [("", node)]
    while stack:
        key, value = stack.pop()
        yield key, value
        if isinstance(value, _Union):
            stack.append((str(value.type), value.value))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        elif isinstance(value, list | tuple):
            stack.extend((key, v) for v in value)
        elif isinstance(value, dict):
            stack.extend((key, v) for v in value.values())


def _check_expression(expr: Any) -> None:
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR:
        raise refuse("a symbolic shape expression is not a short string")
    position = 0
    while position < len(expr):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None:
            raise refuse(f"the symbolic shape expression {expr[:80]!r} is not plain arithmetic")
        token = match.group()
        if _IDENTIFIER.fullmatch(token) and not (token in _SYMPY_NAMES or _SYMBOL.fullmatch(token)):
            raise refuse(f"the symbolic shape expression {expr[:80]!r} names {token!r}")
        position = match.end()


def _check_names(program: Any) -> None:
    """Names torch pastes into generated code must be identifiers; expressions arithmetic."""
    for key, value in _walk(program):
        if key == "expr_str":
            _check_expression(value)
        elif key in ("name", "as_name") and value is not None:
            if (
                not isinstance(value, str)
                or not _IDENTIFIER.fullmatch(value)
                or len(value) > MAX_NAME
            ):
                raise refuse(f"the value name {str(value)[:80]!r} is not a plain identifier")
    graph = program.graph_module.graph
    for table in (
        graph.tensor_values,
        graph.sym_int_values,
        graph.sym_bool_values,
        graph.sym_float_values,
    ):
        for name in table:
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise refuse(f"the value name {str(name)[:80]!r} is not a plain identifier")
    for name in program.range_constraints:
        if not isinstance(name, str) or not _SYMBOL.fullmatch(name):
            raise refuse(f"the shape symbol {str(name)[:80]!r} is not a plain symbol name")


def _resolve_op(target: str) -> Any:
    """The torch op a node's target names, or a refusal naming it."""
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and parts[2] in _OP_NAMESPACES:
        namespace, name, overload = parts[2:]
        if _OP_NAME.fullmatch(name) and _OP_NAME.fullmatch(overload):
            if name in _REFUSED_OPS:
                raise refuse(f"the program calls {target}, which reads or writes outside tensors")
            try:
                return getattr(getattr(getattr(torch.ops, namespace), name), overload)
            except (AttributeError, RuntimeError):
                raise refuse(
                    f"the program calls {target}, which this PyTorch "
                    f"({torch.__version__.split('+')[0]}) does not have"
                ) from None
    raise refuse(
        f"the program calls {str(target)[:120]!r}, which is outside torch's own operators "
        f"({', '.join(_OP_NAMESPACES)}); custom ops, higher-order ops (cond, map, while_loop) "
        "and delegates are not run"
    )


def _tensor_names(argument: Any) -> list[str]:
    kind, value = argument.type, argument.value
    if kind == "as_tensor":
        return [value.name]
    if kind == "as_tensors":
        return [t.name for t in value]
    if kind == "as_optional_tensor":
        return [value.value.name] if value.type == "as_tensor" else []
    if kind == "as_optional_tensors":
        return [t.value.name for t in value if t.type == "as_tensor"]
    if kind == "as_nested_tensors":
        return [t.name for group in value for t in group]
    return []


def _check_nodes(program: Any) -> None:
    """Only torch's ops, and none that writes to the model's state or its input."""
    graph = program.graph_module.graph
    # Values that alias a placeholder (weights, buffers, constants, the input): writing to any
    # of them would make the model's answer depend on earlier calls.
    state: set[str] = set()
    for argument in graph.inputs:
        state.update(_tensor_names(argument))
    for node in graph.nodes:
        for named in node.inputs:
            if named.arg.type in _REFUSED_ARGUMENTS:
                raise refuse(
                    f"the program passes a {named.arg.type[3:]} to {str(node.target)[:120]}, "
                    "which only higher-order ops and custom objects do"
                )
        if node.target in _SYM_TARGETS:
            continue
        op = _resolve_op(node.target)
        schema = op._schema
        by_name = {named.name: named.arg for named in node.inputs}
        aliases_state = False
        for arg in schema.arguments:
            names = _tensor_names(by_name[arg.name]) if arg.name in by_name else []
            touches_state = any(n in state for n in names)
            if arg.alias_info is not None and arg.alias_info.is_write and touches_state:
                raise refuse(
                    f"the program calls {node.target}, which writes to the model's parameters, "
                    "buffers, constants or input; a model must be a pure function of its input "
                    "(export after model.eval(), without in-place updates of its state)"
                )
            if arg.alias_info is not None and touches_state:
                aliases_state = True
        # An annotated (``Tensor(a)``) input is one the outputs may view: split, view, t...
        if aliases_state:
            for output in node.outputs:
                state.update(_tensor_names(output))


def _check_signature(
    program: Any, contents_weights: Mapping[str, Any], constants: Mapping[str, Any]
) -> None:
    signature = program.graph_module.signature
    user_inputs = 0
    for spec in signature.input_specs:
        kind, value = spec.type, spec.value
        if kind == "user_input":
            if value.arg.type != "as_tensor":
                raise refuse("the program takes an input that is not a tensor")
            user_inputs += 1
        elif kind == "parameter":
            if value.parameter_name not in contents_weights:
                raise refuse(f"the parameter {str(value.parameter_name)[:80]!r} has no weights")
        elif kind == "buffer":
            if value.buffer_name not in contents_weights and value.buffer_name not in constants:
                raise refuse(f"the buffer {str(value.buffer_name)[:80]!r} has no data")
        elif kind == "tensor_constant":
            if value.tensor_constant_name not in constants:
                raise refuse(f"the constant {str(value.tensor_constant_name)[:80]!r} has no data")
        elif kind == "custom_obj":
            raise refuse_pickle(f"the custom object {str(value.custom_obj_name)[:80]!r}")
        else:
            raise refuse(f"the program takes a {kind} input; a classifier takes one image batch")
    if user_inputs != 1:
        raise refuse(f"the program takes {user_inputs} inputs; it must take one image batch")
    outputs = [spec.type for spec in signature.output_specs]
    mutations = [kind for kind in outputs if kind != "user_output"]
    if mutations:
        raise refuse(
            f"the program updates state when it runs ({', '.join(sorted(set(mutations)))}); a "
            "model must be a pure function of its input: export after model.eval(), without "
            "in-place updates of buffers or of the input"
        )
    if len(outputs) != 1:
        raise refuse(f"the program returns {len(outputs)} values; it must return one logits tensor")
    root = [entry for entry in program.graph_module.module_call_graph if entry.fqn == ""]
    if len(root) != 1 or root[0].signature is None:
        raise refuse("the program has no call signature")
    _check_call_spec(root[0].signature)


def _check_call_spec(signature: Any) -> None:
    """One positional tensor in, one tensor out: anything else reaches generated guard code."""
    from torch.utils import _pytree as pytree

    want_in = pytree.tree_flatten(((0,), {}))[1]
    want_out = pytree.tree_flatten(0)[1]
    try:
        have_in = pytree.treespec_loads(signature.in_spec)
        have_out = pytree.treespec_loads(signature.out_spec)
    except Exception:  # hostile text: any failure means "not a plain call"
        raise refuse("the program's call signature cannot be read") from None
    if have_in != want_in or have_out != want_out:
        raise refuse("the program must be called as model(images) and return one logits tensor")


def check_program(program: Any, weights: Mapping[str, Any], constants: Mapping[str, Any]) -> None:
    from torch._export.serde.schema import SCHEMA_VERSION

    if program.schema_version.major != SCHEMA_VERSION[0]:
        raise refuse(
            f"its program was written with export schema {program.schema_version.major}, not "
            f"the {SCHEMA_VERSION[0]} that PyTorch {torch.__version__.split('+')[0]} reads; "
            "re-export it with this version"
        )
    dialects = [d for d in program.verifiers if d not in _DIALECTS]
    if dialects:
        raise refuse(f"its program is in the {str(dialects[0])[:40]!r} dialect, not torch's ATen")
    for name, bounds in program.range_constraints.items():
        if not all(v is None or type(v) is int for v in (bounds.min_val, bounds.max_val)):
            raise refuse(f"the range of shape symbol {str(name)[:40]!r} is not integers")
    graph = program.graph_module.graph
    if graph.custom_obj_values:
        raise refuse_pickle("a custom object")
    _check_names(program)
    _check_signature(program, weights, constants)
    _check_nodes(program)
