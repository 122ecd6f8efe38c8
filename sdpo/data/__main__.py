"""`python -m sdpo.data prepare NAME --out DIR [--source PATH_OR_HUB] [--revision REV]`

Writes DIR/train.jsonl, DIR/test.jsonl and DIR/manifest.json, the rows the recipes' environments read
(see docs/paper_settings.md). `python -m sdpo.data list` names the datasets."""

from __future__ import annotations

import argparse
import sys

from environments.loaders import PREPARERS, prepare_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo.data", description="Prepare the paper's datasets.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the datasets that can be prepared")
    prep = commands.add_parser("prepare", help="write DIR/train.jsonl and DIR/test.jsonl")
    prep.add_argument("name", choices=sorted(PREPARERS))
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--source", default=None,
                      help="local file or directory of the raw dataset (offline), or a hub name / URL instead of the default")
    prep.add_argument("--revision", default=None, help="hub revision (default: the dataset's pinned one, if any)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(sorted(PREPARERS)))
        return 0
    try:
        counts = prepare_dataset(args.name, args.out, source=args.source, revision=args.revision)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: " + ", ".join(f"{split} {n} rows" for split, n in counts.items()) + f" -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
