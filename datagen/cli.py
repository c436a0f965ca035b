"""``python -m datagen run|plan|size``: raw images -> shards, resumable, with an end-of-run summary.

    python -m datagen run  --config configs/datagen/tiny.yaml --input images/ --output out/
    python -m datagen run  ... --retry-failed      # redo the rows recorded as failed in parquet
    python -m datagen run  ... --new-run           # the config changed: discard the old shards
    python -m datagen run  ... --verify            # also check each complete shard's tar sha256
    python -m datagen run  ... --wait-for-resources  # no node has what a stage asks: wait for an autoscaler
    python -m datagen plan --config configs/datagen/real.yaml [--input ... --output ...]
    python -m datagen size --from out/ --images 3300000 --hours 24   # GPUs for a target (datagen.sizing)

Each subcommand imports what it needs when it runs: ``size`` reads JSON and never imports Ray or torch.
A user's mistake (config, inputs, output, a changed configuration, a full disk) is one ``error:`` line on
stderr and exit 2; a run that stops on purpose (a stage failing everywhere) exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _logging(args: argparse.Namespace) -> None:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _config(args: argparse.Namespace):
    from .config import load_config

    wait = ["execution.wait_for_resources=true"] if getattr(args, "wait_for_resources", False) else []
    return load_config(args.config, [*args.set, *wait])


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan_text

    print(plan_text(_config(args), args.input, args.output))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError
    from .run import run

    try:
        summary = run(_config(args), args.input, args.output, new_run=args.new_run, retry_failed=args.retry_failed,
                      progress=False if args.no_progress else None, verify=args.verify)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0




def _size_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m datagen size``."""
    p.add_argument("--from", dest="source", metavar="OUTPUT_OR_JSON",
                   help="a datagen output folder (its newest runs/*.json) or one run record .json")
    p.add_argument("--config", help="size this config's pools (with --rates), e.g. configs/datagen/real.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --config, e.g. --set pools.detect.num_gpus=1")
    p.add_argument("--rates", action="append", default=[], metavar="STAGE=IMG_PER_S,...",
                   help="images/s of one worker of each stage while busy (the summary's img/s/worker), "
                        "measured elsewhere; replaces measured rates; 'inf' for a negligible stage")
    p.add_argument("--images", type=int, required=True, help="images to process, e.g. 3300000 for CC3M")
    p.add_argument("--hours", type=float, default=24.0, help="in how many hours (default 24)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--cpus-per-node", type=int, default=None, help="CPUs per node, if CPUs may decide the node count")
    p.add_argument("--headroom", type=float, default=0.0,
                   help="extra capacity as a fraction, e.g. 0.15 (start-up, stragglers, the last shards)")
    p.add_argument("--objects-per-image", type=float, default=None,
                   help="expected objects per image of the full run (default: as measured); scales describe/score")
    p.add_argument("--measured-objects-per-image", type=float, default=None,
                   help="objects per image at which --rates for describe/score were measured")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def plan_from_args(args: argparse.Namespace):
    """The sizing plan ``python -m datagen size`` asks for (a ``datagen.sizing.Plan``)."""
    from .measurement import (
        SizingError,
        load_measurement,
        measurement_from_config,
        measurement_from_rates,
        parse_rates,
        with_rates,
    )
    from .sizing import size

    rates = parse_rates(args.rates)
    if args.source and args.config:
        raise SizingError("give --from (a measured run: its pools and rates) or --config (pools, with --rates), not both")
    if args.set and not args.config:
        raise SizingError("--set changes --config; without --config there is nothing to set")
    if args.source:
        m = load_measurement(args.source)
        m = with_rates(m, rates, args.measured_objects_per_image) if rates or args.measured_objects_per_image else m
    elif args.config:
        from .config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.set)
        except ConfigError as e:
            raise SizingError(str(e)) from None
        m = with_rates(measurement_from_config(cfg, args.config), rates, args.measured_objects_per_image)
    elif rates:
        m = measurement_from_rates(rates, args.measured_objects_per_image)
    else:
        raise SizingError("nothing to size from: give --from <output or run record>, or --rates (with --config)")
    return size(m, args.images, args.hours, gpus_per_node=args.gpus_per_node, headroom=args.headroom,
                objects_per_image=args.objects_per_image, cpus_per_node=args.cpus_per_node)


def _size(args: argparse.Namespace) -> int:
    """Print the plan (a table, or JSON with --json); 2 on a bad request or measurement."""
    from .measurement import SizingError

    try:
        plan = plan_from_args(args)
    except SizingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_json(), indent=1, allow_nan=False) if args.json else plan.format())
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a mistake in the request or its environment (exit 2, one line)."""
    from shards import DatasetError, RunMismatchError
    from shards.paths import storage_errors

    from .config import ConfigError
    from .inputs import InputError
    from .plan import OutputError
    from .resources import ResourceError
    from .run import DiskFullError

    return ConfigError, InputError, OutputError, DatasetError, RunMismatchError, DiskFullError, ResourceError, *storage_errors()


def build_parser() -> argparse.ArgumentParser:
    from . import sizing  # light (its docstring is size's help): no Ray or torch

    p = argparse.ArgumentParser(prog="python -m datagen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_, fn in (("run", "process inputs into shards", _run),
                            ("plan", "print the resolved config and resources", _plan)):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=True, help="YAML preset, e.g. configs/datagen/tiny.yaml")
        s.add_argument("--input", action="append", required=name == "run", default=None,
                       help="image folder, img2dataset output, .tar, .parquet/.csv list; local or fsspec URI "
                            "(repeatable; brace and glob patterns allowed)")
        s.add_argument("--output", required=name == "run", help="dataset folder (local path or fsspec URI)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set inputs.samples_per_shard=500")
        s.add_argument("--log-level", default="INFO")
        s.set_defaults(fn=fn)
    r = sub.choices["run"]
    r.add_argument("--new-run", action="store_true", help="the config changed: delete existing shards, start over")
    r.add_argument("--retry-failed", action="store_true", help="reprocess the rows recorded as failed in parquet")
    r.add_argument("--verify", action="store_true",
                   help="check each complete shard's tar against the sha256 in its stats (reads every tar); "
                        "without it only the tar's size is checked; a shard that fails is redone")
    r.add_argument("--wait-for-resources", action="store_true",
                   help="a stage asks for more than any Ray node has (e.g. GPUs): wait for an autoscaler to add "
                        "such nodes, instead of stopping with an error at once")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (logs every 30 s instead)")
    z = sub.add_parser("size", help="GPUs, CPUs and nodes for a target, from a run's measured per-stage rates",
                       description=sizing.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _size_arguments(z)
    z.set_defaults(fn=_size)
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 the run stopped, 2 bad config/input/output/resume)."""
    args = build_parser().parse_args(argv)
    if args.command == "size":  # reports its own errors; nothing heavy to import
        return args.fn(args)
    _logging(args)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
