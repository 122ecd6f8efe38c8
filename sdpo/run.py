"""`python -m sdpo.run RECIPE.yaml [dotted.key=value ...] [--dry-run]`"""

from __future__ import annotations

import argparse
import sys

from sdpo.cluster import check_fits_locally, describe_placement
from sdpo.recipe import RecipeError, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdpo.run", description="Train a language model with SDPO.")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. steps=50 loss.alpha=1.0")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and actor placement, then exit")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        check_fits_locally(cfg)
        if not args.dry_run:
            from environments import load_environment

            load_environment(cfg.environment.name, cfg.environment.kwargs)  # a bad plug-in fails now, not after start-up
    except (RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg))
        print(describe_placement(cfg))
        return 0
    from sdpo.trainer import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
