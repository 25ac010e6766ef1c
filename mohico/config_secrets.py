"""Values set through ``${oc.env:NAME}`` (API keys, tokens in shard URLs) stay out of what a run
writes down: the saved ``config.yaml``, the checkpoint meta and the W&B config keep the
expression (``${oc.env:NAME}``), never the resolved value.

    raw = OmegaConf.to_container(merged, resolve=False)
    keep_env_expressions(cfg, env_expressions(raw))     # in load_config
    saved = redact_env(cfg, to_dict(cfg))               # what gets written
"""
from __future__ import annotations

import copy
from typing import Any

ATTR = "_env_expressions"


def env_expressions(raw: Any, prefix: str = "") -> dict[str, str]:
    """``{dotted key: expression}`` for every string value of an unresolved config that uses ``oc.env``."""
    out: dict[str, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            out.update(env_expressions(v, f"{prefix}{k}."))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            out.update(env_expressions(v, f"{prefix}{i}."))
    elif isinstance(raw, str) and "oc.env" in raw:
        out[prefix[:-1]] = raw
    return out


def keep_env_expressions(cfg, expressions: dict[str, str]) -> None:
    """Remember on ``cfg`` (an attribute, not a config field) which keys came from the environment."""
    setattr(cfg, ATTR, dict(expressions))


def redact_env(cfg, data: dict) -> dict:
    """A copy of ``data`` (``to_dict(cfg)``) with every environment-sourced string value replaced by its
    ``${oc.env:...}`` expression."""
    expressions = getattr(cfg, ATTR, None) or {}
    if not expressions:
        return data
    out = copy.deepcopy(data)
    for dotted, expr in expressions.items():
        node, parts = out, dotted.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            last = parts[-1]
            key = int(last) if isinstance(node, list) else last
            try:
                if isinstance(node[key], str):
                    node[key] = expr
            except (KeyError, IndexError, TypeError):
                pass
    return out


def env_sourced(cfg, dotted: str) -> bool:
    """Whether the value at ``dotted`` (or any value under it) came from ``${oc.env:...}``."""
    expressions = getattr(cfg, ATTR, None) or {}
    return any(k == dotted or k.startswith(dotted + ".") for k in expressions)
