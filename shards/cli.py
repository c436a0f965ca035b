"""What every ``shards`` command line shares: the user-mistake error, input checks and the runner.

A user's mistake (a dataset or file that is not there, an output folder missing, bad COCO input)
ends as one ``error: ...`` line on stderr and exit code 2, never a traceback; problems found in the
data are the command's own business (exit 1 with the list).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .dataset import DatasetError, RunMismatchError
from .paths import fs_and_root, is_local, storage_errors


class CliError(Exception):
    """A mistake in what the user asked for; ``run_command`` prints it as one ``error:`` line, exit 2."""


def require_dataset(dataset: str) -> str:
    """``dataset`` if it is an existing folder, else CliError naming it."""
    fs, root = fs_and_root(dataset)
    if not fs.exists(root):
        raise CliError(f"{dataset}: no such dataset folder")
    if not fs.isdir(root):
        raise CliError(f"{dataset}: not a dataset folder (a dataset is a folder of NNNNNN.tar/.parquet/.stats.json)")
    return dataset


def require_shards(dataset: str) -> str:
    """``require_dataset``, and it holds at least one complete shard (a stats file), else CliError: a
    folder without shards is the wrong folder, not an empty result."""
    from .dataset import list_shards

    shards = list_shards(require_dataset(dataset))
    if not shards:
        raise CliError(f"{dataset}: holds no shards (NNNNNN.tar + NNNNNN.parquet + NNNNNN.stats.json); is it the dataset folder?")
    if not any(s.complete for s in shards):
        raise CliError(f"{dataset}: holds no complete shard ({len(shards)} without a stats file: the run did not finish them)")
    return dataset


def require_output_file(out: str, make_folder: bool = False) -> str:
    """``out`` if it can be written as a file: not a folder, and (checked locally; object stores have
    no folders) its folder exists or ``make_folder`` allows creating it; else CliError."""
    fs, path = fs_and_root(out)
    if fs.isdir(path):
        raise CliError(f"{out}: is a folder; give the path of the file to write")
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    if is_local(fs) and not make_folder and not fs.isdir(parent or "/"):
        raise CliError(f"{out}: the output folder {parent} does not exist")
    return out


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv``, run ``args.fn(args)`` and return its exit code (2 and one line for a mistake)."""
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (CliError, DatasetError, RunMismatchError, *storage_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # A path the user gave that cannot be read or written: the message names it.
        print(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
