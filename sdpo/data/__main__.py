"""`python -m sdpo.data prepare NAME --out DIR [--source PATH_OR_HUB] [--revision REV]
[--tokenizer MODEL --max-prompt-tokens N [--chat-template-kwargs JSON]]`

Writes DIR/train.jsonl, DIR/test.jsonl and DIR/manifest.json, the rows the recipes' environments read
(see docs/paper_settings.md); with a tokenizer and a budget, drops prompts longer than the budget
as the authors' loader does. `python -m sdpo.data list` names the datasets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from environments import PREPARERS, prepare_dataset


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
    prep.add_argument("--tokenizer", default=None, help="model whose chat template measures prompts (with --max-prompt-tokens)")
    prep.add_argument("--max-prompt-tokens", type=int, default=None,
                      help="drop rows whose templated prompt is longer (the authors: 2048 with Qwen/Qwen3-8B)")
    prep.add_argument("--chat-template-kwargs", default='{"enable_thinking": false}',
                      help="JSON object of chat-template arguments used when measuring (default: thinking off, as the recipes)")
    args = parser.parse_args(argv)
    if args.command == "list":
        print("\n".join(sorted(PREPARERS)))
        return 0
    if (args.tokenizer is None) != (args.max_prompt_tokens is None):
        parser.error("--tokenizer and --max-prompt-tokens go together")
    try:
        template_kwargs = json.loads(args.chat_template_kwargs)
        if not isinstance(template_kwargs, dict):
            raise ValueError
    except ValueError:
        parser.error(f"--chat-template-kwargs must be a JSON object, got {args.chat_template_kwargs!r}")
    try:
        counts = prepare_dataset(args.name, args.out, source=args.source, revision=args.revision)
        print(f"{args.name}: " + ", ".join(f"{split} {n} rows" for split, n in counts.items()) + f" -> {args.out}")
        if args.max_prompt_tokens is not None:
            from sdpo.data.overlong import drop_overlong_prompts

            summary = drop_overlong_prompts(Path(args.out), args.tokenizer, args.max_prompt_tokens, template_kwargs)
            print(f"prompts over {args.max_prompt_tokens} tokens dropped: "
                  + ", ".join(f"{split} {s['dropped']} (kept {s['kept']})" for split, s in summary.items()))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
