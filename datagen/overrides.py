"""``--set dotted.key=value`` arguments of ``python -m datagen run|plan|size`` as a nested override mapping.

One parser for every subcommand (``datagen.cli`` for run/plan, ``datagen.sizing`` for ``size --config``),
so the same flag means the same thing everywhere.
"""

from __future__ import annotations

import yaml

from .config import ConfigError


def parse_overrides(pairs: list[str]) -> dict:
    """``a.b=value`` pairs (values parsed as YAML) as a nested mapping; a malformed pair is a ConfigError."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {pair!r}: expected dotted.key=value")
        node = out
        *parents, last = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):  # --set a=1 --set a.b=2: a cannot be both
                raise ConfigError(f"--set {pair!r}: {p!r} was already set to a value")
            node = child
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({e})") from None
    return out
