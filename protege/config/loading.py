"""Reading a config: a YAML file, then `--section.key value` overrides, into a Config (or one clear error);
and `protege config --help`'s list of every field.
"""

from __future__ import annotations

import copy
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from protege.config.run import Config
from protege.config.sections import ConfigError


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Config from an optional YAML file, then `section.key=value` / `--section.key value` overrides."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        merge_dicts(data, read_yaml(path))
    for key, value in parse_overrides(overrides or []):
        set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict, with clear errors for a missing file, bad YAML or a non-mapping."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {_one_line(e)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """['--a.b', '1', 'c.d=x', '--e.f=2'] -> [('a.b', 1), ('c.d', 'x'), ('e.f', 2)] (values parsed as YAML)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            key, raw = key.split("=", 1)
        elif arg.startswith("--") and i + 1 < len(args):
            i += 1
            raw = args[i]
        else:
            raise ConfigError(f"override {arg!r} has no value: write --section.key VALUE or section.key=VALUE")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: the value {raw!r} is not valid YAML ({_one_line(e)}); quote it "
                              "or fix it") from None
        out.append((key.replace("-", "_"), value))
        i += 1
    return out


def merge_dicts(dst: dict, src: dict) -> None:
    """Merge `src` into `dst` in place: nested mappings key by key, any other value replaced."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge_dicts(dst[k], v)
        else:
            dst[k] = v


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for dotted "a.b.c", creating missing sections; ConfigError past a non-section."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            section = _section_of(e["loc"][:-1])
            known = ", ".join(section.model_fields) if section else ""
            lines.append(f"{field}: unknown key (known keys here: {known})")
        elif e["type"] == "missing":
            hint = {"teacher": " (set teacher.path or teacher.urls, or teacher.self)",
                    "student": " (set student.path)"}.get(field, "")
            lines.append(f"{field}: required, not set{hint}")
        elif e["type"] == "value_error":  # our own validators: the message names the fields and the fix
            lines.append(str(e["ctx"]["error"]) if "ctx" in e else f"{field}: {e['msg']}")
        else:
            got = repr(e.get("input"))
            lines.append(f"{field}: {e['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})")
    return "invalid config: " + "; ".join(lines)


def _one_line(e: Exception) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def _section_of(loc) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):  # an entry of a list of sections (teachers.0)
            continue
        field = model.model_fields.get(str(part))
        model = _section_type(field.annotation) if field is not None else None
        if model is None:
            return None
    return model


def _section_type(annotation) -> type[BaseModel] | None:
    """The section class of a field typed as a section, an optional section or a list of sections, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    inner = [_section_type(a) for a in getattr(annotation, "__args__", ())]
    return next((a for a in inner if a is not None), None)


def describe_config() -> str:
    """Every field with its default and description (for `protege config --help`)."""
    lines = []

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            section = _section_type(f.annotation)
            if section is not None:
                walk(section, f"{prefix}{name}{'[].' if 'list' in str(f.annotation) else '.'}")
                continue
            value = None if f.is_required() else f.get_default(call_default_factory=True)
            default = "required" if f.is_required() else repr(value.value if isinstance(value, Enum) else value)
            lines.append(f"  {prefix}{name} = {default}\n      {f.description or ''}")

    walk(Config, "")
    return "\n".join(lines)
