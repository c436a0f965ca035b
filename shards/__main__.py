"""``python -m shards {validate,info,index,to-coco,from-coco,from-release,from-layoutsam,to-layoutsam,from-python,report} ...``: the dataset command line.

A user's mistake (a dataset or file that is not there, an output folder missing, bad COCO input)
ends as one ``error: ...`` line on stderr and exit code 2; problems found in the data exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli import CliError, require_dataset, require_output_file, require_shards, run_command


def _validate(args: argparse.Namespace) -> int:
    from .validate import validate_dataset

    require_dataset(args.dataset)
    problems = validate_dataset(args.dataset)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dataset}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: OK")
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import provenance
    from .dataset import list_shards, read_run, read_stats
    from .validate import shard_problem

    shards = list_shards(require_dataset(args.dataset))
    complete = [s for s in shards if s.complete]
    totals = {"samples": 0, "failures": 0, "filtered": 0, "objects": 0}
    by_stage: dict[str, int] = {}
    damaged: dict[str, str] = {}
    for s in complete:
        try:
            st = read_stats(args.dataset, s)
        except (OSError, ValueError) as e:
            damaged[s.name] = f"stats unreadable: {e}"
            continue
        problem = shard_problem(args.dataset, s, stats=st)
        if problem:
            damaged[s.name] = problem
        for k in totals:
            totals[k] += st[k]
        for stage, n in st["failures_by_stage"].items():
            by_stage[stage] = by_stage.get(stage, 0) + n
    run = read_run(args.dataset)
    info = {
        "dataset": args.dataset,
        "shards": len(shards),
        "complete_shards": len(complete),
        "incomplete_shards": [s.name for s in shards if not s.complete],
        "damaged_shards": damaged,
        **totals,
        "inputs": totals["samples"] + totals["failures"] + totals["filtered"],
        "not_kept_by_stage": by_stage,
        "fingerprint": (run or {}).get("fingerprint"),
        "models": provenance.fields_of(run),  # record field -> the model that made it, or "unknown"
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            lines = provenance.summary_lines(run) if k == "models" else [v]
            for n, line in enumerate(lines):
                print(f"{k:>18}: {line}" if n == 0 else f"{'':>20}{line}")
    for name, why in damaged.items():
        print(f"shard {name}: {why}", file=sys.stderr)
    return 1 if damaged else 0


def _index(args: argparse.Namespace) -> int:
    from .dataset import build_index

    index = build_index(require_dataset(args.dataset))
    print(json.dumps(index["totals"]))
    return 0


def _to_coco(args: argparse.Namespace) -> int:
    from .coco import to_coco

    n = to_coco(require_shards(args.dataset), require_output_file(args.out))
    print(f"wrote {args.out}: {n['images']} images, {n['annotations']} annotations, {n['crowd']} crowd regions")
    for name, why in n["skipped_shards"].items():
        print(f"shard {name} left out: {why}", file=sys.stderr)
    for where in n["bad_samples"]:
        print(f"sample left out: {where}", file=sys.stderr)
    for where in n["bad_masks"]:
        print(f"mask left out: {where}", file=sys.stderr)
    if n["incomplete_shards"]:
        print(f"{len(n['incomplete_shards'])} incomplete shard(s) not read (no stats file): "
              f"{', '.join(n['incomplete_shards'])}", file=sys.stderr)
    if n["skipped_shards"] or n["bad_samples"]:
        print(f"error: {len(n['skipped_shards'])} shard(s) and {len(n['bad_samples'])} sample(s) could not be read "
              f"and are not in {args.out}", file=sys.stderr)
        return 1
    return 0


def _from_coco(args: argparse.Namespace) -> int:
    from .coco import CocoError, from_coco

    try:
        n = from_coco(
            instances=args.instances,
            images=args.images,
            out=args.out,
            captions=args.captions,
            stuff=args.stuff,
            shard_size=args.shard_size,
            min_area_frac=args.min_area_frac,
        )
    except CocoError as e:
        raise CliError(str(e)) from None
    print(f"wrote {args.out}: {n['samples']} samples, {n['failures']} failures, {n['shards']} shards")
    return 0


def _from_release(args: argparse.Namespace) -> int:
    from .release import from_release

    try:
        n = from_release(args.labels, args.images, args.out, label_size=args.label_size, unpad=args.unpad,
                         shard_size=args.shard_size)  # fmt: skip
    except (ValueError, OSError, RuntimeError) as err:
        raise CliError(str(err)) from None
    print(f"wrote {args.out}: {n['samples']} samples, {n['failures']} failures, {n['shards']} shards")
    return 0


def _from_layoutsam(args: argparse.Namespace) -> int:
    from .layoutsam import from_layoutsam

    try:
        n = from_layoutsam(args.src, args.out, args.images, shard_size=args.shard_size)
    except (ValueError, OSError, RuntimeError) as err:
        raise CliError(str(err)) from None
    resumed = f" ({n['resumed_shards']} kept from an earlier run)" if n["resumed_shards"] else ""
    print(f"wrote {args.out}: {n['samples']} samples, {n['failures']} failures, {n['shards']} shards{resumed}")
    for tar, why in n["image_problems"].items():
        print(f"--images: {tar} could not be read to its end: {why}", file=sys.stderr)
    return 0


def _to_layoutsam(args: argparse.Namespace) -> int:
    from .layoutsam import to_layoutsam

    try:
        n = to_layoutsam(require_shards(args.dataset), args.out)
    except ValueError as err:
        raise CliError(str(err)) from None
    print(f"wrote {args.out}: {n['rows']} rows in {n['files']} parquet files")
    for name, why in n["skipped_shards"].items():
        print(f"shard {name} left out: {why}", file=sys.stderr)
    for where in n["bad_samples"]:
        print(f"sample left out: {where}", file=sys.stderr)
    if n["skipped_shards"] or n["bad_samples"]:
        print(f"error: {len(n['skipped_shards'])} shard(s) and {len(n['bad_samples'])} sample(s) could not be read "
              f"and are not in {args.out}", file=sys.stderr)
        return 1
    return 0


def _from_python(args: argparse.Namespace) -> int:
    from .user_dataset import load_callable, write_dataset

    try:
        fn = load_callable(args.function)
        try:
            items = fn()
        except Exception as err:  # noqa: BLE001 - the user's function: one line naming it, no traceback
            raise CliError(f"{args.function}() raised {type(err).__name__}: {err}") from None
        n = write_dataset(items, args.out, shard_size=args.shard_size, name=args.function)
    except (ValueError, OSError, RuntimeError) as err:
        raise CliError(str(err)) from None
    print(f"wrote {args.out}: {n['samples']} samples, {n['failures']} failures of {n['items']} items, "
          f"{n['shards']} shards")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check every shard; exit 1 listing each problem with shard and key")
    v.add_argument("dataset", help="dataset folder or fsspec URI")
    v.set_defaults(fn=_validate)

    i = sub.add_parser("info", help="print sample, failure and object counts; exit 1 when a shard's tar size disagrees with its stats")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(fn=_info)

    x = sub.add_parser("index", help="rebuild index.json from the shards' stats files")
    x.add_argument("dataset")
    x.set_defaults(fn=_index)

    tc = sub.add_parser("to-coco", help="export a dataset as COCO instances JSON (RLE masks, descriptions)")
    tc.add_argument("dataset")
    tc.add_argument("out", help="output JSON path")
    tc.set_defaults(fn=_to_coco)

    fc = sub.add_parser("from-coco", help="convert COCO (instances [+ stuff] [+ captions]) into shards")
    fc.add_argument("--instances", required=True, help="instances_*.json")
    fc.add_argument("--stuff", help="stuff_*.json (merged with instances, as the paper does)")
    fc.add_argument("--captions", help="captions_*.json (all captions kept; one is drawn at read time)")
    fc.add_argument("--images", required=True, help="folder holding the images named in the JSON")
    fc.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    fc.add_argument("--min-area-frac", type=float, default=0.0, help="drop boxes smaller than this image fraction")
    fc.add_argument("out", help="output dataset folder")
    fc.set_defaults(fn=_from_coco)

    r = sub.add_parser("from-release", help="convert the release's label_<image>.json files and images into shards")
    r.add_argument("--labels", required=True, help="folder of label_<image>.json files (searched recursively)")
    r.add_argument("--images", required=True, help="folder of the images (searched recursively by name)")
    r.add_argument("--label-size", type=int, help="long side of the image when labelled (RC-COCO: 768)")
    r.add_argument("--unpad", action="store_true", help="cut the uniform border of square-padded images (LAION)")
    r.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    r.add_argument("out", help="output dataset folder")
    r.set_defaults(fn=_from_release)
    fl = sub.add_parser("from-layoutsam", help="convert LayoutSAM / LayoutSAM-Eval parquet (or a datasets save) into shards")
    fl.add_argument("src", help="a parquet file, or a folder or fsspec URI of LayoutSAM's parquet files or a datasets save_to_disk")
    fl.add_argument("out", help="output dataset folder (a rerun resumes it)")
    fl.add_argument("--images", help="images for rows without embedded ones (the training split): a folder "
                    "(folder/file_name), or SA-1B's .tar files (one, or a folder of them), local or fsspec")
    fl.add_argument("--shard-size", type=int, default=1000, help="rows per shard")
    fl.set_defaults(fn=_from_layoutsam)
    tl = sub.add_parser("to-layoutsam", help="export a dataset as LayoutSAM parquet (datasets loads it, CreatiLayout's loader parses it)")
    tl.add_argument("dataset")
    tl.add_argument("out", help="output folder for train-NNNNN-of-NNNNN.parquet")
    tl.set_defaults(fn=_to_layoutsam)
    u = sub.add_parser("from-python", help="write the items of your own Python dataset (the release's form) as shards")
    u.add_argument("function", help="module:function or file.py:function returning an iterable or map-style dataset")
    u.add_argument("out", help="output dataset folder")
    u.add_argument("--shard-size", type=int, default=1000, help="items per shard")
    u.set_defaults(fn=_from_python)

    from .report import add_report_arguments

    add_report_arguments(sub.add_parser("report", help="static HTML report with figures and galleries"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 and one ``error:`` line for a user's mistake)."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
