"""Dataclass configs from YAML files plus `section.field=value` overrides from the command line."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass
class _Origin:
    """Where each value came from, so an error names the YAML file or the command-line override."""

    file: str = "config"
    overrides: dict = dataclasses.field(default_factory=dict)  # dotted key -> the override as typed

    def override_of(self, key: str) -> str | None:
        for k, text in self.overrides.items():
            if key == k or key.startswith(k + "."):
                return text
        return None

    def where(self, key: str) -> str:
        text = self.override_of(key)
        if text is not None:
            return f"override {text!r}"
        return f"{self.file}.{key}" if key else self.file


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _to_int(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        pass
    try:  # YAML 1.1 reads 1e3 (no dot) as a string: accept a whole number in exponent form
        x = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not x.is_integer():
        raise ConfigError(f"{where}: expected int, got {value}")
    return int(x)


def _convert(tp: Any, value: Any, key: str, origin: _Origin) -> Any:
    where = origin.where(key)
    origin_tp = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, key, origin)
    if origin_tp is typing.Union or str(origin_tp) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, key, origin) if len(args) == 1 else value
    if tp is str and not isinstance(value, str) and value is not None:
        # YAML reads a bare `no`/`yes` as a boolean (e.g. mixed_precision: no); keep the word.
        return ("yes" if value else "no") if isinstance(value, bool) else str(value)
    if tp is int and isinstance(value, str):
        return _to_int(value, where)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin_tp in (list, tuple) and isinstance(value, (str, int, float, bool)):
        value = [value]  # `space.ratio=1` or `pools: data/syn` means a one-element list, not its characters
    if origin_tp in (list, tuple) and isinstance(value, (list, tuple)):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return origin_tp(_convert(inner, v, key, origin) if inner is not Any else v for v in value)
    if tp in (int, float, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        # a list, mapping or true/false where a number belongs would otherwise fail later with a TypeError
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _unknown_fields(cls: type, data: dict, key: str, origin: _Origin) -> list[str]:
    """Every unknown field at every level (a typo in two sections is reported at once)."""
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    by_where: dict[str, list[str]] = {}
    for k in sorted(set(data) - set(names)):
        text = origin.override_of(_join(key, k))
        by_where.setdefault(f"override {text!r}" if text else origin.where(key), []).append(k)
    problems = [f"{w}: unknown field(s) {ks}; valid: {names}" for w, ks in by_where.items()]
    for k, v in data.items():
        if k in hints and dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            problems += _unknown_fields(hints[k], v, _join(key, k), origin)
    return problems


def _blame(message: str, key: str, origin: _Origin) -> str:
    """A dataclass's own check failed: blame an override whose field the message names, else the file."""
    for k, text in origin.overrides.items():
        rel = k[len(key) + 1 :] if key and k.startswith(key + ".") else (k if not key else None)
        if rel and re.search(rf"(?<![\w.]){re.escape(rel)}(?![\w])", message):
            return f"override {text!r}"
    return origin.where(key)


def _build(cls: type[T], data: dict, key: str, origin: _Origin) -> T:
    hints = typing.get_type_hints(cls)
    values = {k: _convert(hints[k], v, _join(key, k), origin) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own checks (e.g. steps must be positive): say which file or override
        raise ConfigError(f"{_blame(str(e), key, origin)}: {e}") from None


def from_dict(cls: type[T], data: dict, where: str = "config", overrides: dict | None = None) -> T:
    """`cls` from a plain mapping; errors name `where` (the file), or the override a value came from."""
    origin = _Origin(where, dict(overrides or {}))
    unknown = _unknown_fields(cls, data, "", origin)
    if unknown:
        raise ConfigError("; ".join(unknown))
    return _build(cls, data, "", origin)


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message spans several lines)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


def apply_override(data: dict, override: str) -> str:
    """Set the value in `data`; returns the dotted key it set."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    path, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({yaml_problem(e)})") from None
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    node[leaf] = value
    return path


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {yaml_problem(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    given = {apply_override(data, o): o for o in overrides}
    return from_dict(cls, data, str(path or "config"), given)


def _field_notes(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the dataclass's source: its note in `--help`."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen app): fields without notes
        return {}
    tokens = tokenize.generate_tokens(io.StringIO(src).readline)
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}
    return {
        n.target.id: comments[n.end_lineno]
        for n in ast.parse(src).body[0].body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.end_lineno in comments
    }


def _yaml_value(value: Any) -> str:
    """A value as it would be written in an override (`[train]`, `null`, `0.0002`)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def config_fields(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(dotted field, default written as YAML, note) for every leaf field of a dataclass config."""
    defaults = cls() if defaults is None else defaults
    notes, rows = _field_notes(cls), []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += config_fields(type(value), _join(prefix, f.name), value)
        else:
            rows.append((_join(prefix, f.name), _yaml_value(value), notes.get(f.name, "")))
    return rows


def config_help(cls: type) -> str:
    """Every field with its default, generated from the dataclasses (so `--help` cannot drift)."""
    rows = [(f"  {k} = {v}", note) for k, v, note in config_fields(cls)]
    width = min(max(len(left) for left, _ in rows), 40) + 2
    return "settings and their defaults (override with field=value; a YAML --config nests sections):\n" + "\n".join(
        f"{left:{width}}# {note}" if note else left for left, note in rows
    )


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, what: str, example: str) -> None:
    """--config, --print-config and field=value overrides, with every field listed in the epilog."""
    parser.add_argument("--config", help=f"YAML {what} config")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (file, then overrides) as YAML and exit"
    )
    parser.add_argument("overrides", nargs="*", help=f"field=value overrides (e.g. {example})")
    parser.epilog = config_help(cls)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the field table's lines


def config_from_args(cls: type[T], args: argparse.Namespace) -> T | None:
    """The config from --config and the overrides; None after --print-config printed it."""
    cfg = load_config(cls, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False), end="")
        return None
    return cfg
