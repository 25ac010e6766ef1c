"""Typed dataclasses from YAML/dicts, with errors that name the key, the file and a suggestion.

The generic half of :mod:`mohico.config`: ``collect`` reads a YAML file and its ``defaults:``
chain (OmegaConf's safe loader) into ``(origin, dict)`` sources; ``check_keys`` rejects unknown
keys per source, so the message names the file that has them; ``build`` converts the merged
dict into the dataclass tree, checking every value's type (the message names the source that
set the bad value).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence

from mohico.errors import ConfigError


def collect(path: Path, sources: list, stack: tuple = ()) -> None:
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: inheritance cycle in 'defaults': {chain}")
    if not path.is_file():
        where = f" (inherited by {stack[-1]})" if stack else (
            f"; give a YAML path, or the name of a packaged config: {', '.join(packaged_names())} "
            f"(e.g. `mohico train tiny_cpu`)")
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # safe YAML loader
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    parents = data.pop("defaults", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths relative to this file")
    for parent in parents:
        collect(path.parent / parent, sources, (*stack, path))
    sources.append((str(path), data))


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_names() -> list[str]:
    """The names of the configs installed with mohico (``mohico/configs/*.yaml``), without ``.yaml``."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def packaged_fallback(path: Path) -> Path:
    """A config named by what is not a file here -> the file it means: a bare name (``tiny_cpu``,
    ``tiny_cpu.yaml``) -> ``configs/NAME.yaml`` in the current directory (the repository's), else
    the copy installed with mohico (``mohico/configs/NAME.yaml``, package data of the wheel);
    ``configs/NAME[.yaml]`` -> that installed copy too. Any other path unchanged."""
    if path.is_file() or path.is_absolute():
        return path
    names = [path.name] if path.suffix in (".yaml", ".yml") else [path.name + ".yaml", path.name]
    bare = len(path.parts) == 1
    folders = ([Path("configs")] if bare else []) + \
        ([PACKAGED_CONFIGS] if bare or (len(path.parts) == 2 and path.parts[0] == "configs") else [])
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return path


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_keys(data: Any, cls, prefix: tuple, origin: str, root=None) -> None:
    """Unknown keys, reported per source so the message names the file that has them."""
    if not isinstance(data, dict):
        return
    names = _fields(cls)
    hints = _hints(cls)
    for key, value in data.items():
        dotted = ".".join((*prefix, str(key)))
        if key not in names:
            raise ConfigError(f"{origin}: unknown key '{dotted}'{_suggest(str(key), prefix, names, root or cls)} "
                              f"(valid keys in '{'.'.join(prefix) or 'top level'}': {', '.join(sorted(names))})")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{dotted}' must be a mapping (section {sub.__name__}), got {value!r}")
            check_keys(value, sub, (*prefix, str(key)), origin, root or cls)


def _suggest(key: str, prefix: tuple, names, root) -> str:
    """'; did you mean 'x.y'?' from the same section, else from anywhere in the schema."""
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{'.'.join((*prefix, close[0]))}'?"
    everywhere = _all_dotted(root)
    leaf = {d.rsplit(".", 1)[-1]: d for d in everywhere}
    close = difflib.get_close_matches(key, list(leaf), n=1, cutoff=0.75)
    return f"; did you mean '{leaf[close[0]]}'?" if close else ""


def _all_dotted(cls, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        dotted = f"{prefix}{name}"
        out.append(dotted)
        if dataclasses.is_dataclass(tp):
            out.extend(_all_dotted(tp, dotted + "."))
    return out


def _origin_of(dotted: tuple, sources: list) -> str:
    for origin, data in reversed(sources):
        node = data
        for part in dotted:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return origin
    return "defaults"


def build(cls, data: Any, prefix: tuple, sources: list):
    data = {} if data is None else data
    kwargs = {}
    for name, tp in _hints(cls).items():
        if name not in data:
            continue
        kwargs[name] = _convert(tp, data[name], (*prefix, name), sources)
    return cls(**kwargs)


def _convert(tp, value, dotted: tuple, sources: list):
    key = ".".join(dotted)

    def bad(expect: str):
        origin = _origin_of(dotted, sources)
        return ConfigError(f"{origin}: '{key}' must be {expect}, got {value!r} ({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        return build(tp, value, dotted, sources)
    org = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if org is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            origin = _origin_of(dotted, sources)
            raise ConfigError(f"{origin}: '{key}' must be one of {list(args)}, got {value!r}{hint}")
        return value
    if org in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, dotted, sources)
    if org in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {args[0].__name__ if args else 'values'}")
        return [_convert(args[0], v, (*dotted[:-1], f"{dotted[-1]}[{i}]"), sources) for i, v in enumerate(value)] if args else list(value)
    if org is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise bad(f"of type {tp}")  # pragma: no cover - a schema type this loader does not know


def mapping_fields_set(data: dict, cls, prefix: tuple = ()) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` for each mapping-typed field (e.g. ``model.backbone_options``) that
    ``data`` sets as a whole: a command-line ``key={...}`` replaces the inherited mapping instead of
    merging into it (``model.backbone_options={}`` clears it; ``model.backbone_options.width=8``
    still sets one entry)."""
    out = []
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return out
    hints = _hints(cls)
    for key, value in data.items():
        tp = hints.get(key)
        if tp is None:
            continue
        if dataclasses.is_dataclass(tp):
            out.extend(mapping_fields_set(value, tp, (*prefix, key)))
        elif typing.get_origin(tp) is dict:
            out.append((".".join((*prefix, key)), value))
    return out
