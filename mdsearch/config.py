"""Strict dict -> dataclass loading, shared by architecture specs and trial recipes.

Every key must be a field (unknown keys get a did-you-mean), every value must have the field's
type, and nested dataclasses (and lists of them) are built recursively. Errors name the source,
the key path and the reason, as one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import MdsearchError, closest, did_you_mean


class ConfigError(MdsearchError):
    """A malformed configuration file or dict: names the source, the field and the reason."""


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let SafeLoader report it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {first} and "
                    f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, error=ConfigError) -> Any:
    """A YAML (or JSON) file, strictly: text only, no key given twice."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # a SafeLoader: no objects
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (expected YAML or JSON)") from None
    except OSError as err:  # unreadable: permissions, a broken mount
        raise error(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML/JSON: {' '.join(str(err).split())}") from None


def named_file(path_or_name: str | Path, folder: Path) -> Path:
    """A file path as given, or the name of a YAML file in `folder` (`cpu_quick` ->
    folder/cpu_quick.yaml) when no such path exists."""
    path = Path(path_or_name)
    # a built-in name wins over a local folder of that name (`runs/`, `full/`), never over a file
    if not path.is_file() and (folder / f"{path_or_name}.yaml").is_file():
        return folder / f"{path_or_name}.yaml"
    bare = str(path_or_name)
    if not path.exists() and "/" not in bare and not bare.endswith((".yaml", ".yml")):
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"{bare}: no such file, nor a name in {folder.name}/"
                          + did_you_mean(bare, names))
    return path


def from_dict(cls, data: Any, source: str, prefix: str = "", error=ConfigError):
    """Build dataclass `cls` from `data`, strictly."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise error(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise error(f"{source}: unknown field {prefix + str(key)!r}{did_you_mean(key, fields)}")
        kwargs[key] = _value(hints[key], value, source, f"{prefix}{key}", error)
    missing = [name for name, f in fields.items() if name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise error(f"{source}: {where} is missing required field(s): {', '.join(missing)}")
    return cls(**kwargs)


def _value(tp, value: Any, source: str, where: str, error):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _value(inner[0], value, source, where, error)
        for option in inner:  # e.g. int | str: the first that accepts the value
            try:
                return _value(option, value, source, where, error)
            except error:
                continue
        raise error(f"{source}: field {where}: {value!r} is not a {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, f"{where}.", error)
    if origin is list:
        if not isinstance(value, list):
            raise error(f"{source}: field {where}: expected a list, got {value!r}")
        return [_value(args[0], v, source, f"{where}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise error(f"{source}: field {where}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp](value)
    if not ok:
        raise error(f"{source}: field {where}: expected {tp.__name__}, got {value!r}")
    return float(value) if tp is float else value


def set_path(data: dict, key: str, value: Any, source: str, error=ConfigError) -> None:
    """Set a dotted path (`levels.2.channels`, negative list indices allowed) in nested dicts."""
    node: Any = data
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            try:
                index = int(part)
                node[index]  # noqa: B018 - bounds check
            except (ValueError, IndexError):
                raise error(f"{source}: {key!r}: {part!r} is not a valid index into a list "
                            f"of {len(node)}") from None
            part = index
        elif not isinstance(node, dict) or part not in node:
            match = closest(part, node) if isinstance(node, dict) else None
            hint = f"; did you mean {'.'.join([*parts[:depth], match])!r}?" if match else ""
            raise error(f"{source}: unknown field {key!r}{hint}")
        if last:
            node[part] = value
        else:
            node = node[part]


def parse_set(items: list[str] | None, error=ConfigError) -> dict[str, Any]:
    """CLI `--set k=v` items to an override dict; values are parsed as YAML scalars."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise error(f"--set {item!r}: expected FIELD=VALUE, e.g. ffn_expansion=3")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides
