"""The ``qtrain`` command line: fit, recipes (plan, export, eval, bench and serve arrive with their issues)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from qtrain.recipe import RecipeError, load_recipe

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _default_output(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_fit(args: argparse.Namespace) -> int:
    from qtrain.train import fit

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    recipe = load_recipe(args.recipe, overrides)
    output = Path(args.output) if args.output else _default_output(recipe.name)
    if args.resume and not args.output:
        raise RecipeError("--resume needs --output/-o naming the run directory to continue")
    fit(recipe, model=args.model, data=args.data, output=output, resume=args.resume, overwrite=args.overwrite,
        skip_bad_lines=args.skip_bad_lines)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        r = load_recipe(path)
        print(f"{path.name:28s} method={r.method:6s} seq_len={r.seq_len:<5d} batch={r.micro_batch_size}x"
              f"{r.grad_accum_steps} max_steps={r.max_steps}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtrain", description="Fine-tune small code models within a memory budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fine-tune a model", description="Fine-tune a model on code. Any recipe field "
                         "can be overridden as key=value (e.g. lora_r=8 learning_rate=1e-4).")
    fit.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    fit.add_argument("--recipe", help="recipe YAML (see `qtrain recipes`); default: built-in LoRA defaults")
    fit.add_argument("--model", help="hub id, local model directory or .gguf file; default: embedded SmolLM2-135M-Instruct")
    fit.add_argument("--data", help="directory of source files, JSONL (text or Alpaca) or hub dataset; "
                     "default: the Python standard library")
    fit.add_argument("-o", "--output", help="run directory; default: runs/RECIPE-TIMESTAMP")
    fit.add_argument("--max-steps", type=int, help="optimizer steps (overrides the recipe's max_steps)")
    fit.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing run in --output")
    fit.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) malformed JSONL lines")
    fit.set_defaults(func=cmd_fit)

    rec = sub.add_parser("recipes", help="list the shipped recipes")
    rec.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may stand anywhere among the options (argparse stops collecting positionals at
    # the first option), so gather the leftovers that look like overrides.
    args, rest = parser.parse_known_args(argv)
    if rest:
        bad = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides) + rest
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # bitsandbytes warns at import that an optional CPU kernel package is missing; not actionable here
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from qtrain.checkpoint import CheckpointError
    from qtrain.data.corpus import DataError
    from qtrain.models import ModelError
    from qtrain.train import RunError

    try:
        return args.func(args)
    except (RecipeError, DataError, ModelError, RunError, CheckpointError) as exc:
        print(f"qtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
