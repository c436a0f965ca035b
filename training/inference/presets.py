"""What the generate and evaluate command lines share: presets (``configs/eval``), overrides and the error rule.

A preset is a YAML file of ``configs/eval`` (``--preset NAME``) or any path (``--config FILE``); each CLI
reads its own section (``generate`` or ``evaluate``) and applies ``--set key=value`` overrides. A file that
has no such section is an error naming the sections it has (an empty file would otherwise silently give
the built-in defaults: the real hub models). :func:`run_cli` runs a job: its summary on stdout and exit 0,
or one ``error:`` line and exit 2 for any mistake of the user's (config, files, models that cannot load).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from shards.config import ConfigError, load, read_yaml

__all__ = ["PRESET_DIR", "add_preset_arguments", "config_from_args", "load_section", "one_line", "run_cli"]

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


def load_section(
    cls: type, preset: str | None, config: str | None, section: str, overrides: list[str]
) -> Any:
    """Build ``cls`` from one section of a preset (name in ``configs/eval`` or a YAML path) plus overrides."""
    if preset and config:
        raise ConfigError("give --preset or --config, not both")
    path = Path(config) if config else PRESET_DIR / f"{preset}.yaml" if preset else None
    if path is not None and not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset file {path} (presets: {known})")
    try:
        if path is not None and read_yaml(path).get(section) is None:
            sections = sorted(read_yaml(path))
            raise ConfigError(f"{path}: no '{section}' section (it has {sections}): not a {section} preset")
        return load(cls, path, overrides, section=section)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path or 'an override'}: YAML nested too deep") from None


def add_preset_arguments(parser: argparse.ArgumentParser, section: str) -> None:
    """``--preset``, ``--config``, ``--tiny`` and ``--set``: where a CLI's ``section`` config comes from."""
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    parser.add_argument("--preset", default=None, help=f"a configs/eval preset: {known} (default: built-in)")
    parser.add_argument("--config", default=None, help=f"a preset YAML file (its '{section}' section)")
    parser.add_argument(
        "--tiny", action="store_true", help="shorthand for --preset tiny (offline, random weights)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field"
    )


def config_from_args(cls: type, args: argparse.Namespace, section: str, overrides: list[str]) -> Any:
    """The ``section`` config of a CLI's preset arguments, with ``overrides`` then ``--set`` applied."""
    preset = "tiny" if args.tiny and not args.config else args.preset
    return load_section(cls, preset, args.config, section, overrides + args.set)


def one_line(err: BaseException) -> str:
    """An exception's message on one line (hub and library errors span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def run_cli(job: Callable[[], dict]) -> int:
    """Run a CLI's job: its summary JSON (without the config) on stdout and 0, or one error line and 2.

    Mistakes are ConfigError / ValueError (bad input, named), OSError (a file or folder that cannot be
    read or written, a model that cannot load offline) and SafetensorError (a weights file that is not one).
    """
    try:
        summary = job()
    except (ConfigError, ValueError, OSError, SafetensorError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))
    return 0
