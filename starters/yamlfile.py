"""Reading the YAML files users give the CLI: one safe loader for every command.

Refuses what would crash or hang a naive loader: files that are not UTF-8 text, files over
MAX_FILE_BYTES, duplicate keys, aliases that expand to more than MAX_VALUES values or refer to
themselves, and nesting deeper than MAX_DEPTH. Messages never quote the file's lines (one may
hold a password).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

#: largest file the CLI reads
MAX_FILE_BYTES = 1_048_576
#: most values (mappings, lists, scalars) a file may hold once its aliases are expanded
MAX_VALUES = 100_000
#: deepest nesting of mappings and lists
MAX_DEPTH = 64


class YamlFileError(Exception):
    """The file cannot be used; the message names the file and what is wrong."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class says so
            if duplicate:
                line = key_node.start_mark.line + 1
                raise _Duplicate(f"duplicate key {key!r} at line {line}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Duplicate(Exception):
    pass


def read_yaml(path: Path) -> Any:
    """The file's data; YamlFileError saying why it cannot be used."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise YamlFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise YamlFileError(
            f"{path}: cannot read it ({exc.strerror or type(exc).__name__})"
        ) from None
    if len(raw) > MAX_FILE_BYTES:
        raise YamlFileError(f"{path}: {len(raw)} bytes; at most {MAX_FILE_BYTES} allowed")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlFileError(
            f"{path}: not a UTF-8 text file (byte {exc.start} cannot be decoded)"
        ) from None
    if "\x00" in text:
        raise YamlFileError(f"{path}: not a text file (it holds NUL bytes)")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _Duplicate as exc:
        raise YamlFileError(f"{path}: {exc}; give each key once") from None
    except RecursionError:
        raise YamlFileError(f"{path}: nested too deeply (at most {MAX_DEPTH} levels)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or "syntax error"
        if isinstance(exc, ConstructorError) and "unhashable" in problem:
            problem = "a key must be a plain value, not a list or mapping"
        raise YamlFileError(f"{path}: not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        reason = getattr(exc, "reason", None) or "syntax error"
        raise YamlFileError(f"{path}: not valid YAML: {reason}") from None
    _check_shape(path, data)
    return data


def _check_shape(path: Path, data: Any) -> None:
    """Refuse self-referencing aliases, alias bombs and deep nesting (walks without recursion)."""
    count = 0
    stack: list[tuple[Any, int, frozenset[int]]] = [(data, 1, frozenset())]
    while stack:
        value, depth, parents = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise YamlFileError(
                f"{path}: more than {MAX_VALUES} values once its aliases (*name) are expanded"
            )
        if not isinstance(value, dict | list):
            continue
        if id(value) in parents:
            raise YamlFileError(f"{path}: an alias (*name) refers to the value that holds it")
        if depth > MAX_DEPTH:
            raise YamlFileError(f"{path}: nested too deeply (at most {MAX_DEPTH} levels)")
        inner = parents | {id(value)}
        children = list(value.values()) if isinstance(value, dict) else value
        stack.extend((child, depth + 1, inner) for child in children)
