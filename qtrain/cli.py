"""The ``qtrain`` command line: fit, recipes (plan, export, eval, bench and serve arrive with their issues)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from qtrain.recipe import RecipeError, load_recipe

# A declared (not measured) dense bf16 ceiling for throughput predictions on a GPU qtrain cannot see:
# roughly an RTX 4090's 165 TFLOP/s halved for what training kernels reach; a prediction, labelled as such.
CUDA_DECLARED_FLOPS = 80e12
DEFAULT_CPU_BUDGET_TIME_S = 12 * 60  # `qtrain fit --budget 8GB` on a CPU: a first result in minutes
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _default_output(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_duration(text: str) -> float:
    """'30m', '2h', '90s', '1h30m', '45' (seconds) -> seconds."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise RecipeError(f"--time {text!r} is not a duration; write it like 30m, 2h, 90s or 1h30m")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise RecipeError(f"--time {text!r} must be positive")
    return seconds


def _plan_from_args(args, base):
    from qtrain.plan import default_budget, detect_device, model_shape, parse_bytes, plan_recipe

    budget = parse_bytes(args.budget) if args.budget else None
    if args.device in ("cuda", "cpu") and budget is not None and args.device == "cuda":
        device, memory = "cuda", None  # planning for a GPU: no need to import torch (plan answers fast)
    else:
        device, memory = detect_device(args.device)
    if budget is None:
        budget = default_budget(device, memory)
    shape = model_shape(args.model)
    if device == "cpu":
        import torch

        from qtrain.measure import peak_flops

        flops = peak_flops(torch.device("cpu"))[0]
    else:
        flops = CUDA_DECLARED_FLOPS
    return plan_recipe(shape, budget, device, base, flops)


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from qtrain.plan import render_plan

    base = load_recipe(args.recipe, list(args.overrides))
    plan = _plan_from_args(args, base)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render_plan(plan))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from qtrain.train import fit

    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    time_limit = parse_duration(args.time) if args.time else None
    if args.budget and time_limit is None and args.max_steps is None and not args.resume:
        import torch

        if not torch.cuda.is_available():
            time_limit = DEFAULT_CPU_BUDGET_TIME_S
            print(f"qtrain fit: no --time or --max-steps given: limiting this CPU run to "
                  f"{DEFAULT_CPU_BUDGET_TIME_S // 60:.0f} minutes (pass --time 2h or --max-steps N to change)",
                  file=sys.stderr)
    if time_limit is not None and args.max_steps is None:
        overrides.append("max_steps=1000000")  # the time limit decides how many steps
    recipe = load_recipe(args.recipe, overrides)
    extra = {}
    if args.budget:
        from qtrain.plan import render_plan

        plan = _plan_from_args(args, recipe)
        print(render_plan(plan, limit=5), file=sys.stderr)
        prefix = recipe.name if args.recipe else f"budget-{args.budget.replace(' ', '')}"
        recipe = plan.chosen.recipe.replace(name=f"{prefix}-{plan.chosen.recipe.method}")
        extra = {"budget_bytes": plan.budget_bytes, "plan_reason": plan.reason}
    if args.resume and not args.output:
        raise RecipeError("--resume needs --output/-o naming the run directory to continue")
    output = Path(args.output) if args.output else _default_output(recipe.name)
    from qtrain.models import resolve_model_source
    from qtrain.plan import model_shape, predict

    resolve_model_source(args.model)  # a missing model is one clear error, before anything else
    from qtrain.models import ModelError
    from qtrain.shapes import ShapeError

    try:
        shape = model_shape(args.model)
        device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
        extra["predicted_peak_bytes"] = predict(shape, recipe, device).peak_bytes
    except ShapeError as exc:  # a prediction is a bonus; an architecture the planner cannot read still trains
        print(f"qtrain fit: note: no memory prediction for this model ({exc})", file=sys.stderr)
    except ModelError:
        pass  # loading the model below reports this, once
    fit(recipe, model=args.model, data=args.data, output=output, resume=args.resume, overwrite=args.overwrite,
        skip_bad_lines=args.skip_bad_lines, extra_summary=extra, time_limit_s=time_limit)
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
    fit.add_argument("--budget", help="memory budget (e.g. 8GB): plan the recipe that fits, then train it")
    fit.add_argument("--device", default="auto", help="cpu, cuda or auto (what torch sees); used with --budget")
    fit.add_argument("--time", help="wall-time limit (e.g. 30m, 2h, 90s): steps are planned to fit it")
    fit.set_defaults(func=cmd_fit)

    plan = sub.add_parser("plan", help="predict memory per recipe and pick the one that fits a budget",
                          description="Predict peak training memory from the model config alone and pick a recipe.")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="base recipe overrides (e.g. seq_len=2048)")
    plan.add_argument("--model", help="hub id (offline: the shipped configs), local directory, .gguf; default: embedded")
    plan.add_argument("--budget", help="memory budget, e.g. 8GB (default on CPU: available RAM minus 10%%)")
    plan.add_argument("--device", default="auto", help="cpu, cuda or auto")
    plan.add_argument("--recipe", help="base recipe (target seq_len, effective batch, LoRA rank)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

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
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    from qtrain.errors import QtrainError

    try:
        return args.func(args)
    except QtrainError as exc:
        print(f"qtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
