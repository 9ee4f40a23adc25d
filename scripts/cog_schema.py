"""The OpenAPI schema `cog build` would write for predict.py and train.py, read the way cog reads them.

cog 0.20+ does not import the adapters: it parses them as text (replicate/cog pkg/schema/python) and
keeps only what it can read there. This module applies the same rules with Python's `ast`, so tests can
compare cog's view with Python's, and the local server can validate requests as the built image does
(coglet loads `.cog/openapi_schema.json` from its working directory).

The rules, as cog applies them:
- `default=` and `description=` are a literal, or a name assigned a literal at the top level of the same
  file; anything else becomes None (default) or disappears (description). A string's text is what lies
  between its quotes, unescaped: implicit concatenation keeps the inner quotes, f-strings are dropped.
- `ge=`/`le=` must be number literals (no names, no arithmetic), else they silently vanish.
- `choices=` must be a list literal, a same-file name bound to a list or tuple literal, `A + B` of
  those, or `list(D.keys())`/`list(D.values())` of a same-file dict literal; anything else stops the build.
- A default of None on a type that is not `T | None` / `Optional[T]` makes the input required
  (Secret is the exception: optional).

    python scripts/cog_schema.py [--write]   # print the schema, or write .cog/openapi_schema.json
"""

from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_SCHEMA = Path(".cog") / "openapi_schema.json"
ADAPTERS = {"predict": ("predict.py", "Runner", "run"), "train": ("train.py", "train", "train")}


class SchemaError(ValueError):
    """What makes `cog build` stop: an input cog cannot read."""


_NO_VALUE = object()  # "cog could not resolve this" (distinct from a resolved None)

PRIMITIVES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
}


@dataclass
class StaticInput:
    """One input as cog reads it from the source text."""

    name: str
    order: int
    primitive: str  # a key of PRIMITIVES
    repeated: bool = False  # list[T]
    nullable: bool = False  # T | None / Optional[T]
    default: object = _NO_VALUE  # the resolved default, or _NO_VALUE when there is none
    description: str | None = None
    ge: float | None = None
    le: float | None = None
    choices: list | None = None
    extras: dict = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return not self.has_default

    @property
    def has_default(self) -> bool:
        if self.default is _NO_VALUE:
            return False
        # None is a real default only on an optional input (and, by cog's exception, on a Secret).
        return self.default is not None or self.nullable or self.primitive == "Secret"

    def json_schema(self) -> dict:
        prop: dict = {"x-order": self.order}
        if not self.choices:
            prop["title"] = self.name.replace("_", " ").title()
            item = dict(PRIMITIVES[self.primitive])
            prop.update({"type": "array", "items": item} if self.repeated else item)
        if self.has_default:
            prop["default"] = self.default
        if self.nullable or (self.primitive == "Secret" and self.default is None):
            prop["nullable"] = True
        if self.description is not None:
            prop["description"] = self.description
        if self.ge is not None:
            prop["minimum"] = self.ge
        if self.le is not None:
            prop["maximum"] = self.le
        return prop


def _find_function(tree: ast.Module, name: str) -> ast.FunctionDef | None:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    return None


def _module_scope(tree: ast.Module) -> dict[str, object]:
    """Top-level `NAME = <literal>` assignments: the only names cog resolves."""
    scope = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _literal(node.value)
            if value is not _NO_VALUE:
                scope[node.targets[0].id] = value
    return scope


def _read_input(order: int, arg: ast.arg, default: ast.expr | None, scope: dict, where: str) -> StaticInput:
    if arg.annotation is None:
        raise SchemaError(f"{where}: parameter {arg.arg!r} has no type annotation")
    primitive, repeated, nullable = _read_type(arg.annotation, f"{where}: {arg.arg}")
    item = StaticInput(arg.arg, order, primitive, repeated, nullable)
    if default is None:
        return item
    if not _is_input_call(default):
        value = _resolve(default, scope)
        if value is _NO_VALUE:
            raise SchemaError(
                f"{where}: {arg.arg}: default {ast.unparse(default)} cannot be statically resolved"
            )
        item.default = value
        return item
    for keyword in default.keywords:
        value = keyword.value
        if keyword.arg == "default":
            resolved = _resolve(value, scope)
            item.default = None if resolved is _NO_VALUE else resolved
        elif keyword.arg == "description":
            text = _resolve_string(value, scope)
            if text is not None:
                item.description = text
        elif keyword.arg in ("ge", "le"):
            number = _number(value)
            if number is not None:
                setattr(item, keyword.arg, number)
        elif keyword.arg == "choices":
            choices = _resolve_choices(value, scope)
            if choices is None:
                raise SchemaError(
                    f"{where}: {arg.arg}: choices expression {ast.unparse(value)} cannot be statically resolved"
                )
            item.choices = choices
        elif keyword.arg == "default_factory":
            raise SchemaError(f"{where}: {arg.arg}: default_factory is not supported")
        else:
            item.extras[keyword.arg] = ast.unparse(value)
    return item


def _is_input_call(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Input"


def _read_type(node: ast.expr, where: str) -> tuple[str, bool, bool]:
    """(primitive, repeated, nullable) of an annotation."""
    nullable = False
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        parts = [node.left, node.right]
        nones = [p for p in parts if isinstance(p, ast.Constant) and p.value is None]
        if len(nones) != 1:
            raise SchemaError(f"{where}: only `T | None` unions are supported here")
        node = next(p for p in parts if p not in nones)
        nullable = True
    elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Optional":
        node, nullable = node.slice, True
    repeated = False
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("list", "List")
    ):
        node, repeated = node.slice, True
    if not isinstance(node, ast.Name) or node.id not in PRIMITIVES:
        raise SchemaError(f"{where}: unsupported type {ast.unparse(node)}")
    return node.id, repeated, nullable


def _literal(node: ast.expr) -> object:
    """A literal as cog parses it (strings by their raw text between quotes), else _NO_VALUE."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return _string_text(node)
        if node.value is None or isinstance(node.value, (bool, int, float)):
            return node.value
        return _NO_VALUE
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
    ):
        if isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
            return -node.operand.value
        return _NO_VALUE
    if isinstance(node, ast.List):
        items = [_literal(e) for e in node.elts]
        return _NO_VALUE if any(i is _NO_VALUE for i in items) else items
    if isinstance(node, ast.Tuple):  # cog keeps the items it can read
        return [i for i in (_literal(e) for e in node.elts) if i is not _NO_VALUE]
    if isinstance(node, ast.Dict):
        pairs = [
            (_literal(k), _literal(v)) for k, v in zip(node.keys, node.values, strict=True) if k is not None
        ]
        return {k: v for k, v in pairs if k is not _NO_VALUE and v is not _NO_VALUE}
    return _NO_VALUE


def _string_text(node: ast.Constant) -> object:
    """What cog keeps of a string literal: the raw source between the outer quotes (no unescaping)."""
    source = getattr(node, "_cog_source", None)
    if source is None:
        return _NO_VALUE
    for quote in ('"""', "'''"):
        if source.startswith(quote) and len(source) >= 6:
            return source[3:-3]
    if source[:1] in "\"'" and len(source) >= 2:
        return source[1:-1]
    if source[:2] in ('r"', "r'") and len(source) >= 3:
        return source[2:-1]
    return _NO_VALUE  # f-strings, byte strings, other prefixes


def _resolve(node: ast.expr, scope: dict) -> object:
    value = _literal(node)
    if value is _NO_VALUE and isinstance(node, ast.Name) and node.id in scope:
        return scope[node.id]
    return value


def _resolve_string(node: ast.expr, scope: dict) -> str | None:
    value = _resolve(node, scope)
    return value if isinstance(value, str) else None


def _number(node: ast.expr) -> float | None:
    value = _literal(node)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _resolve_choices(node: ast.expr, scope: dict) -> list | None:
    if isinstance(node, ast.List):
        value = _literal(node)
        return None if value is _NO_VALUE else value
    if isinstance(node, ast.Name):
        value = scope.get(node.id)
        return value if isinstance(value, list) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _resolve_choices(node.left, scope), _resolve_choices(node.right, scope)
        return None if left is None or right is None else left + right
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "list"
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Call)
        and isinstance(node.args[0].func, ast.Attribute)
        and isinstance(node.args[0].func.value, ast.Name)
        and node.args[0].func.attr in ("keys", "values")
    ):
        table = scope.get(node.args[0].func.value.id)
        if isinstance(table, dict):
            return list(table.keys() if node.args[0].func.attr == "keys" else table.values())
    return None


def _attach_sources(tree: ast.AST, text: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node._cog_source = ast.get_source_segment(text, node)
        if isinstance(node, ast.JoinedStr):
            for part in ast.walk(node):
                if isinstance(part, ast.Constant):
                    part._cog_source = None  # an f-string's pieces are not literals for cog


def _parse(path: Path) -> ast.Module:
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    _attach_sources(tree, text)
    return tree


def static_inputs(mode: str, root: Path = ROOT) -> list[StaticInput]:
    """The inputs cog reads from the adapter of `mode` ("predict" or "train")."""
    filename, _, function = ADAPTERS[mode]
    path = root / filename
    tree = _parse(path)
    scope = _module_scope(tree)
    target = _find_function(tree, function)
    if target is None:
        raise SchemaError(f"{filename}: no function {function!r}")
    args = target.args
    positional = [a for a in args.args if a.arg not in ("self", "cls")]
    defaults: dict[str, ast.expr] = {}
    if args.defaults:
        for arg, value in zip(args.args[-len(args.defaults) :], args.defaults, strict=True):
            defaults[arg.arg] = value
    for arg, value in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        if value is not None:
            defaults[arg.arg] = value
    params = positional + list(args.kwonlyargs)
    return [_read_input(i, arg, defaults.get(arg.arg), scope, filename) for i, arg in enumerate(params)]


def input_component(inputs: list[StaticInput], title: str) -> tuple[dict, dict]:
    """(the Input component, the enum components its choices refer to)."""
    properties, enums, required = {}, {}, []
    for item in inputs:
        prop = item.json_schema()
        if item.choices:
            kind = PRIMITIVES[item.primitive].get("type", "string")
            enums[item.name] = {
                "title": item.name,
                "description": "An enumeration.",
                "enum": item.choices,
                "type": kind,
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{item.name}"}]
        properties[item.name] = prop
        if item.required:
            required.append(item.name)
    component = {"title": title, "type": "object", "properties": properties}
    if required:
        component["required"] = required
    return component, enums


OUTPUTS = {
    "predict": {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}},
    "train": {
        "title": "TrainingOutput",
        "type": "object",
        "properties": {"weights": {"title": "Weights", "type": "string", "format": "uri"}},
        "required": ["weights"],
    },
}


def openapi_schema(root: Path = ROOT) -> dict:
    """Both adapters' components in one document: coglet validates /predictions against `Input` and
    /trainings against `TrainingInput`, and picks `Output` / `TrainingOutput` by its mode."""
    schemas: dict = {}
    paths: dict = {}
    for mode, (input_key, output_key, endpoint) in {
        "predict": ("Input", "Output", "/predictions"),
        "train": ("TrainingInput", "TrainingOutput", "/trainings"),
    }.items():
        component, enums = input_component(static_inputs(mode, root), input_key)
        for name, enum in enums.items():
            if name in schemas and schemas[name] != enum:
                raise SchemaError(f"enum component {name!r} differs between predict.py and train.py")
        schemas.update(enums)
        schemas[input_key] = component
        schemas[output_key] = OUTPUTS[mode]
        paths[endpoint] = {"post": {"summary": mode.title(), "x-cog-streaming": False}}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def write_bundled_schema(root: Path = ROOT) -> Path:
    """Write `.cog/openapi_schema.json` under `root` (atomically: servers may start side by side)."""
    target = root / BUNDLED_SCHEMA
    target.parent.mkdir(exist_ok=True)
    text = json.dumps(openapi_schema(root), indent=1)
    if target.is_file() and target.read_text() == text:
        return target
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(target)
    return target


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        print(write_bundled_schema())
    else:
        print(json.dumps(openapi_schema(), indent=2))
