"""Loading a config: YAML file -> dict -> dotted overrides -> validation, plus hashing, YAML dumps and
the field listing of ``srum config --list``.

Overrides are ``section.key=value`` strings (``learner.lambda_c=0.3``), values parsed as YAML so
``true``, ``3``, ``null`` and ``[0.9, 0.99]`` work; plain-string fields keep the raw text (so
``run.name=123`` stays a string). Overrides that switch a backend (``judge.backend=openai``) are applied
before the others, so the keys that follow are checked against the section the config ends up with; a
switch drops the file's settings that only the previous backend has (``regions.proposer=none`` on a
config with SAM thresholds runs without regions; the settings both backends share are kept).

Unknown keys, wrong types and out-of-range values all raise one :class:`ConfigError` listing every
problem with its full dotted key and what is allowed. Nothing is silently ignored: duplicate YAML keys
are errors too. (pydantic-settings and tyro parse ``--flag value`` command lines, not positional
``key=value`` overrides merged into a YAML file with these messages, so this small layer stays.)
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from core.config import SRUMConfig

__all__ = [
    "ConfigError", "FieldDoc", "config_hash", "config_to_yaml", "describe_config", "format_config_help",
    "load_config", "parse_overrides", "validate_config",
]


class ConfigError(ValueError):
    """A configuration problem; ``errors`` holds one line per problem, each naming its dotted key."""

    def __init__(self, errors: str | Sequence[str], source: str | None = None) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        self.source = source
        head = f"invalid config{f' ({source})' if source else ''}"
        if len(self.errors) == 1:
            super().__init__(f"{head}: {self.errors[0]}")
        else:
            super().__init__(f"{head}: {len(self.errors)} problems:\n" + "\n".join(f"  - {e}" for e in self.errors))


# --------------------------------------------------------------------------------------------------
# schema introspection (sections, tagged unions of sections, constraints)


def _unwrap_optional(ann: Any) -> tuple[Any, bool]:
    """Return (inner annotation, accepts None)."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1 and len(args) < len(get_args(ann)):
            return args[0], True
    return ann, False


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def variants(info: Any) -> tuple[str, dict[str, type[BaseModel]]] | None:
    """``(tag field, {tag value: section model})`` of a tagged-union section field, else None."""
    disc = getattr(info, "discriminator", None)
    if not isinstance(disc, str):
        return None
    out: dict[str, type[BaseModel]] = {}
    for member in get_args(info.annotation):
        for tag in get_args(member.model_fields[disc].annotation):
            out[tag] = member
    return disc, out


def section_model(info: Any, value: Any = None) -> type[BaseModel] | None:
    """The section model a field holds: for a tagged union, the member ``value``'s tag selects (the
    default's member when ``value`` has no tag; None for an unknown tag); None for a plain value."""
    union = variants(info)
    if union is None:
        inner, _ = _unwrap_optional(info.annotation)
        return inner if _is_model(inner) else None
    disc, members = union
    tag = value.get(disc) if isinstance(value, dict) else None
    if tag is None:
        return type(info.get_default(call_default_factory=True))
    return members.get(tag) if isinstance(tag, str) else None


def _tag_of(model: type[BaseModel], info: Any) -> str | None:
    union = variants(info)
    if union is None:
        return None
    return next((t for t, m in union[1].items() if m is model), None)


_BOUNDS = ((at.Ge, ">=", "ge"), (at.Gt, ">", "gt"), (at.Le, "<=", "le"), (at.Lt, "<", "lt"))


def _constraints(metadata: Sequence[Any]) -> list[str]:
    out = []
    for m in metadata:
        for cls, sym, attr in _BOUNDS:
            if isinstance(m, cls):
                out.append(f"{sym} {getattr(m, attr)}")
        if isinstance(m, at.MinLen) and m.min_length > 0:
            out.append("non-empty")
        if getattr(m, "metadata", None):  # a nested FieldInfo inside Annotated
            out.extend(_constraints(m.metadata))
    return out


def _type_text(ann: Any, constraints: Sequence[str] = ()) -> str:
    """'float (> 0)', "one of 'a', 'b'", 'list of str or null', ... for an annotation."""
    inner, optional = _unwrap_optional(ann)
    origin = get_origin(inner)
    if origin is Literal:
        text = "one of " + ", ".join(repr(a) for a in get_args(inner))
    elif origin is Annotated:
        base, *meta = get_args(inner)
        text = _type_text(base, [*_constraints(meta), *constraints])
        constraints = ()
    elif origin is list:
        text = f"list of {_type_text(get_args(inner)[0])}"
    elif origin is tuple:
        parts = [_type_text(a) for a in get_args(inner)]
        text = f"[{', '.join(parts)}]" if len(set(parts)) > 1 else f"list of {len(parts)} x {parts[0]}"
    elif _is_model(inner):
        text = "section: " + ", ".join(inner.model_fields)
    else:
        text = getattr(inner, "__name__", str(inner))
    text = f"{text} ({', '.join(constraints)})" if constraints else text
    return f"{text}, or null" if optional else text


def _allowed_text(info: Any) -> str:
    """Human-readable description of what a field accepts, e.g. 'float (> 0)' or "one of 'a', 'b'"."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("allowed") or _type_text(info.annotation, _constraints(info.metadata)))


def _dotted(parts: Sequence[str | int]) -> str:
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s


def _where(model: type[BaseModel], prefix: str, owner_info: Any = None) -> str:
    tag = _tag_of(model, owner_info) if owner_info is not None else None
    if tag is None:
        return prefix or "top level"
    return f"{prefix} with {variants(owner_info)[0]}={tag!r}"


def _unknown_key(model: type[BaseModel], prefix: str, key: Any, owner_info: Any = None) -> str:
    allowed = list(model.model_fields)
    full = f"{prefix}.{key}" if prefix else str(key)
    msg = f"{full}: unknown key"
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.5)
    if close:
        msg += f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    return msg + f" (allowed at {_where(model, prefix, owner_info)}: {', '.join(allowed)})"


def _numeric(annotation: Any) -> bool:
    """Whether a field holds an int or a float (possibly optional or constrained), not a bool."""
    if get_origin(annotation) is Annotated:
        return _numeric(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_numeric(a) for a in get_args(annotation) if a is not type(None))
    return annotation in (int, float)


def _check_keys(model: type[BaseModel], data: dict[str, Any], prefix: str, errors: list[str],
                owner_info: Any = None) -> None:
    """Report (and remove) unknown keys and booleans given for numbers (pydantic would read ``true`` as
    1: ``run.max_steps=true``), recursing into sections; null sections become {}."""
    for key in list(data):
        if key not in model.model_fields:
            errors.append(_unknown_key(model, prefix, key, owner_info))
            del data[key]
            continue
        info = model.model_fields[key]
        if isinstance(data[key], bool) and _numeric(info.annotation):
            errors.append(f"{prefix + '.' if prefix else ''}{key}: must be a number, got the boolean "
                          f"{str(data[key]).lower()} (allowed: {_allowed_text(info)})")
            del data[key]
            continue
        if data[key] is None and section_model(info) is not None:
            data[key] = {}  # `learner:` with everything below commented out means "defaults"
        section = section_model(info, data[key])
        if section is not None and isinstance(data[key], dict):
            union = variants(info)
            if union is not None:  # a section without its tag is the default's backend
                data[key].setdefault(union[0], _tag_of(section, info))
            _check_keys(section, data[key], f"{prefix}.{key}" if prefix else key, errors, info)


def _resolve(parts: Sequence[str | int], data: Any = None) -> tuple[list[str | int], Any]:
    """Walk a pydantic ``loc`` (or an override path) through the schema: returns the loc without union
    tags and the FieldInfo it ends on (None when unknown)."""
    owner: type[BaseModel] | None = SRUMConfig
    clean: list[str | int] = []
    info = None
    skip_tag = False
    for p in parts:
        if isinstance(p, int):
            clean.append(p)
            continue
        if skip_tag:  # pydantic puts the union member's tag into the loc
            skip_tag = False
            union = variants(info)
            if union is not None and p in union[1]:
                owner = union[1][p]
                continue
        if owner is None or p not in owner.model_fields:
            return clean + [p], None
        info = owner.model_fields[p]
        clean.append(p)
        value = data.get(p) if isinstance(data, dict) else None
        data = value
        owner = section_model(info, value)
        skip_tag = variants(info) is not None
    return clean, info


# --------------------------------------------------------------------------------------------------
# overrides and loading


def _parse_value(raw: str, info: Any) -> Any:
    """Parse an override value as YAML; plain-string fields keep the raw text (so `run.name=123` works)."""
    inner, optional = _unwrap_optional(info.annotation)
    if inner in (str, SecretStr):
        if optional and raw.strip() in ("null", "Null", "NULL", "~"):
            return None
        return raw
    return yaml.safe_load(raw) if raw.strip() else raw


def _switches_backend(key: str) -> bool:
    section, _, leaf = key.partition(".")
    info = SRUMConfig.model_fields.get(section)
    return info is not None and variants(info) is not None and leaf == variants(info)[0]


def parse_overrides(overrides: Sequence[str],
                    data: dict[str, Any] | None = None) -> tuple[list[tuple[list[str], Any]], list[str]]:
    """Parse ``a.b.c=value`` strings against the schema (tagged unions resolved against ``data``, the
    config they apply to); returns ([(path, value)], [error lines])."""
    data = data if data is not None else {}
    parsed: list[tuple[list[str], Any]] = []
    errors: list[str] = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r} has no '=': write it as dotted.key=value, e.g. learner.lambda_c=0.3")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            errors.append(f"override {item!r}: empty key or empty segment in {key!r}")
            continue
        owner, prefix, info, node, owner_info = SRUMConfig, "", None, data, None
        ok = True
        for i, p in enumerate(parts):
            if owner is None:
                errors.append(f"{_dotted(parts)}: '{prefix}' is a value, not a section with keys")
                ok = False
                break
            if p not in owner.model_fields:
                errors.append(_unknown_key(owner, prefix, p, owner_info))
                ok = False
                break
            info = owner.model_fields[p]
            prefix = f"{prefix}.{p}" if prefix else p
            node = node.get(p) if isinstance(node, dict) else None
            owner_info = info
            owner = section_model(info, node) if i < len(parts) - 1 else None
        if not ok:
            continue
        try:
            value = _parse_value(raw, info)
        except yaml.YAMLError as e:
            errors.append(f"{key}: cannot parse value {raw!r} as YAML ({str(e).splitlines()[0]})")
            continue
        parsed.append((parts, value))
    return parsed, errors


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (plain safe_load keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" if not path.exists() else f"not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections ({', '.join(SRUMConfig.model_fields)}), "
                          f"got {type(data).__name__}")
    return data


def _format_error(err: dict[str, Any], data: dict[str, Any]) -> str:
    """One pydantic error -> 'dotted.key: problem (got X; allowed: Y)'."""
    loc, info = _resolve(list(err["loc"]), data)
    key = _dotted(loc) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid" and info is not None:
        disc, members = variants(info)
        return (f"{key}.{disc}: unknown {disc} {err['ctx'].get('tag')!r} "
                f"(allowed: one of {', '.join(repr(t) for t in members)})")
    if err["type"] == "extra_forbidden" and loc:
        parent_loc, parent = _resolve(loc[:-1], data)
        section = section_model(parent, _get(data, parent_loc)) if parent is not None else SRUMConfig
        return _unknown_key(section or SRUMConfig, _dotted(parent_loc), loc[-1], parent)
    section = section_model(info, _get(data, loc)) if info is not None else None
    if info is not None and section is None:
        return f"{key}: {msg} (got {err.get('input')!r}; allowed: {_allowed_text(info)})"
    if section is not None and err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: must be a mapping (got {err.get('input')!r}; allowed keys: {', '.join(section.model_fields)})"
    return f"{key}: {msg}"


def _get(data: Any, loc: Sequence[str | int]) -> Any:
    for p in loc:
        data = data.get(p) if isinstance(data, dict) and isinstance(p, str) else None
    return data


def _set_path(data: dict[str, Any], parts: Sequence[str], value: Any) -> str | None:
    """Set ``data[a][b][c] = value`` (dicts merge into existing sections); returns an error or None."""
    node = data
    for i, p in enumerate(parts[:-1]):
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            return f"{'.'.join(parts)}: cannot set inside {'.'.join(parts[: i + 1])}, which is {node[p]!r}, not a mapping"
        node = node[p]
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}
    else:
        node[last] = value
    return None


def validate_config(data: dict[str, Any], source: str | None = None, extra_errors: Sequence[str] = ()) -> SRUMConfig:
    """Validate a plain dict; every problem (unknown keys, types, ranges) is raised in one ConfigError."""
    errors = list(extra_errors)
    data = copy.deepcopy(data) if data else {}
    _check_keys(SRUMConfig, data, "", errors)
    cfg = None
    try:
        cfg = SRUMConfig.model_validate(data)
    except ValidationError as e:
        errors.extend(_format_error(err, data) for err in e.errors())
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SRUMConfig:
    """Load a YAML config (or defaults when ``path`` is None), apply dotted overrides, validate.

    Raises ConfigError naming the dotted key and what is allowed for every problem found.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    data = _read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else None
    ordered = sorted(overrides, key=lambda o: not _switches_backend(o.split("=", 1)[0].strip()))
    errors: list[str] = []
    for item in ordered:  # one at a time: an override may switch the section the next ones are checked against
        parsed, errs = parse_overrides([item], data)
        errors += errs
        for parts, value in parsed:
            if len(parts) == 2 and _switches_backend(".".join(parts)):
                _keep_shared_keys(data, parts[0], value)
            problem = _set_path(data, parts, value)
            if problem:
                errors.append(problem)
    return validate_config(data, source, errors)


def _keep_shared_keys(data: dict[str, Any], section: str, tag: Any) -> None:
    """Before ``section``'s backend becomes ``tag``: drop the keys of ``data[section]`` the new backend lacks."""
    disc, members = variants(SRUMConfig.model_fields[section])
    old, new = data.get(section), members.get(tag) if isinstance(tag, str) else None
    if isinstance(old, dict) and new is not None and old.get(disc, tag) != tag:
        data[section] = {k: v for k, v in old.items() if k in new.model_fields}


def config_hash(cfg: BaseModel) -> str:
    """Stable sha256 hex digest of the canonical JSON dump (sorted keys, no whitespace)."""
    payload = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def config_to_yaml(cfg: BaseModel) -> str:
    """YAML text of the full config; ``load_config`` of it gives back an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------------------------------
# documentation


class FieldDoc(NamedTuple):
    key: str
    allowed: str
    default: Any
    description: str
    section: str  # "judge" or, for a tagged union member, "judge (backend='openai')"


def describe_config(cfg: BaseModel | None = None, *, all_variants: bool = False) -> list[FieldDoc]:
    """Every leaf field as (dotted key, allowed values, default, description, section), in declaration
    order, for the sections ``cfg`` selects (the defaults' when None); ``all_variants`` lists every
    member of each tagged union instead."""
    return _describe(type(cfg) if cfg is not None else SRUMConfig, cfg, "", "top level", all_variants)


def _describe(model: type[BaseModel], cfg: BaseModel | None, prefix: str, heading: str,
              all_variants: bool) -> list[FieldDoc]:
    docs: list[FieldDoc] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        value = getattr(cfg, name) if cfg is not None else None
        union = variants(info)
        if union is not None:
            disc, members = union
            chosen = [type(value)] if value is not None else [section_model(info)]
            for member in (dict.fromkeys(members.values()) if all_variants else chosen):
                tags = " | ".join(repr(t) for t, m in members.items() if m is member)
                sub = value if value is not None and type(value) is member else None
                docs += _describe(member, sub, key, f"{key} ({disc}={tags})", all_variants)
            continue
        section = section_model(info)
        if section is not None:
            docs += _describe(section, value, key, key, all_variants)
            continue
        default = info.get_default(call_default_factory=True)
        docs.append(FieldDoc(key, _allowed_text(info), default, info.description or "", heading))
    return docs


def format_config_help(docs: Sequence[FieldDoc] | None = None) -> str:
    """A text table of :func:`describe_config` for ``srum config --list``."""
    docs = describe_config() if docs is None else docs
    groups: dict[str, list[FieldDoc]] = {}
    for d in docs:
        groups.setdefault(d.section, []).append(d)
    lines = []
    for section, items in groups.items():
        lines.append(f"[{section}]")
        for d in items:
            default = json.dumps(list(d.default) if isinstance(d.default, tuple) else d.default, default=str)
            lines.append(f"  {d.key} = {default}    ({d.allowed})\n      {d.description}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
