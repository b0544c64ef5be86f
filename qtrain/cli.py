"""The ``qtrain`` command line: fit, plan, recipes, export, generate (eval, bench and serve arrive with their issues)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from qtrain.errors import UsageError
from qtrain.recipe import load_recipe

DEFAULT_CPU_BUDGET_TIME_S = 12 * 60  # `qtrain fit --budget 8GB` on a CPU: a first result in minutes
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _default_output(recipe_name: str) -> Path:
    return Path("runs") / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_duration(text: str) -> float:
    """'30m', '2h', '90s', '1h30m', '45' (seconds) -> seconds."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms]?)", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s+", "", text.strip().lower()):
        raise UsageError(f"--time {text!r} is not a duration; write it like 30m, 2h, 90s or 1h30m")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"--time {text!r} must be positive")
    return seconds


def _plan_from_args(args, base, allocator: str | None = None):
    from qtrain.plan import plan_for

    # `qtrain fit --budget` under `accelerate launch` plans for the processes it runs in (WORLD_SIZE)
    devices = getattr(args, "devices", None)
    if devices is None:
        devices = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return plan_for(args.model, args.budget, args.device, base, allocator, devices)


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from qtrain.plan import render_plan

    base = load_recipe(args.recipe, list(args.overrides))
    plan = _plan_from_args(args, base, allocator="fit")
    measured = None
    if args.measure:
        from qtrain.calibrate import measure_plan

        measured = measure_plan(plan, args.model, args.data, args.measure_steps,
                                say=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({**plan.to_dict(), **({"measured": measured} if measured else {})}, indent=2))
    else:
        print(render_plan(plan))
        if measured:
            from qtrain.calibrate import render_measured

            print(render_measured(measured))
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
        raise UsageError("--resume needs --output/-o naming the run directory to continue")
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
    eval_opts = before = None
    if args.eval:
        import shutil
        import tempfile

        from qtrain.evaluate import run_eval
        from qtrain.train import prepare_output_dir

        # refuse a bad output directory before spending minutes on the first evaluation
        prepare_output_dir(output, args.resume, args.overwrite, check_only=True)
        eval_opts = _eval_options(args, args.eval, args.eval_limit, args.eval_data)
        before_dir = Path(tempfile.mkdtemp(prefix="qtrain-eval-before-"))
        print(f"qtrain fit: evaluating {args.eval} before training ...", file=sys.stderr)
        before = run_eval(args.model, eval_opts, before_dir)
    fit(recipe, model=args.model, data=args.data, output=output, resume=args.resume, overwrite=args.overwrite,
        skip_bad_lines=args.skip_bad_lines, extra_summary=extra, time_limit_s=time_limit,
        # on a CPU the budget is also enforced at run time: resident memory above it backs the micro-batch off
        memory_limit_bytes=extra.get("budget_bytes"))
    if args.eval:
        from qtrain.evaluate import compare

        eval_root = output / "eval"
        eval_root.mkdir(exist_ok=True)
        if (eval_root / "before").exists():
            shutil.rmtree(eval_root / "before")
        shutil.move(str(before_dir), eval_root / "before")
        print(f"qtrain fit: evaluating {args.eval} after training ...", file=sys.stderr)
        run_eval(str(output), eval_opts, eval_root / "after")
        table = compare([str(eval_root / "before"), str(eval_root / "after")])
        from qtrain.io import atomic_write_text

        atomic_write_text(eval_root / "comparison.md", table + "\n")
        print(table)
    del before
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from qtrain.recipe import shipped_recipes

    for path in shipped_recipes().values():
        r = load_recipe(path)
        print(f"{path.name:28s} method={r.method:6s} seq_len={r.seq_len:<5d} batch={r.micro_batch_size}x"
              f"{r.grad_accum_steps} max_steps={r.max_steps}")
    return 0


def _parse_agreement(values: list[str] | None) -> dict:
    from qtrain.export.onnx import DEFAULT_MIN_AGREEMENT

    out = dict(DEFAULT_MIN_AGREEMENT)
    for v in values or []:
        fmt, _, num = v.rpartition("=")
        try:
            x = float(num)
        except ValueError:
            x = -1.0
        if not 0.0 <= x <= 1.0 or (fmt and fmt not in out):
            raise UsageError(f"--min-agreement {v!r}: give a fraction in [0, 1], for all formats (0.9) or "
                              f"one format ({'=0.9, '.join(out)}=0.9)")
        for k in ([fmt] if fmt else list(out)):
            out[k] = x
    return out


def cmd_export(args: argparse.Namespace) -> int:
    if not (args.onnx or args.gguf):
        raise UsageError("say what to export: --onnx (with --int8/--int4) and/or --gguf")
    if (args.int8 or args.int4) and not args.onnx:
        raise UsageError("--int8 and --int4 are ONNX formats; add --onnx")
    if args.block_size not in (16, 32, 64, 128, 256):
        raise UsageError(f"--block-size {args.block_size} is not one onnxruntime's MatMulNBits supports; "
                          "use 16, 32, 64, 128 or 256")
    src = args.run
    if args.onnx:
        from qtrain.export.onnx import ExportOptions, export_onnx, render_report

        opts = ExportOptions(int8=args.int8, int4=args.int4, int4_block_size=args.block_size,
                             int4_head_bits=args.int4_head_bits, int4_method=args.int4_method,
                             int4_calibration=args.int4_calibration,
                             int4_symmetric=not args.int4_asymmetric, int4_act_order=not args.int4_no_act_order,
                             int4_accuracy_level=args.accuracy_level, quantize_lm_head=not args.keep_lm_head,
                             min_agreement=_parse_agreement(args.min_agreement), data=args.data,
                             speed=not args.no_speed, threads=args.threads)
        out = Path(args.output) if args.output else (Path(src) / "onnx" if src else Path("exports/default-onnx"))
        report = export_onnx(src, out, opts, overwrite=args.overwrite)
        print(render_report(report))
        print(f"wrote {out} (report: {out / 'report.json'})")
        if report["failing"]:
            msg = (f"export {', '.join(report['failing'])} FAILING: next-token agreement below the threshold "
                   f"(see {out / 'report.json'}); use it anyway with --allow-degraded, or lower --min-agreement")
            if not args.allow_degraded:
                print(f"qtrain export: error: {msg}", file=sys.stderr)
                return 3
            print(f"qtrain export: warning: {msg}", file=sys.stderr)
    if args.gguf:
        from qtrain.bitnet import is_bitnet_dir
        from qtrain.export.gguf import export_gguf

        if args.outtype is None:
            args.outtype = "tq2_0" if src and is_bitnet_dir(Path(src)) else "q8_0"
        out = Path(args.gguf_output) if args.gguf_output else (
            Path(src) / f"model-{args.outtype}.gguf" if src else Path(f"exports/default-{args.outtype}.gguf"))
        info = export_gguf(src, out, outtype=args.outtype, overwrite=args.overwrite, data=args.data,
                           pre_tokenizer=args.gguf_pre)
        print(info["summary"])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from qtrain.infer import load_for_inference, stream_generate

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be positive")
    loaded = load_for_inference(args.model, threads=args.threads)
    chat = loaded.is_chat if args.chat is None else args.chat
    if args.chat and not loaded.is_chat:
        raise UsageError(f"{loaded.name} has no chat template; drop --chat")
    start = time.perf_counter()
    text = ""
    if not chat:
        sys.stdout.write(prompt)  # a completion continues the prompt: show both
    for piece in stream_generate(loaded, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, stop=args.stop, seed=args.seed, chat=chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
        text += piece
    seconds = time.perf_counter() - start
    n = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    print(f"\n[{loaded.kind}: {n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qtrain import bench

    if not args.matrix and not args.budget and not args.report:
        raise UsageError("say what to do: --matrix methods|tradeoff|budget|FILE.yaml to run a matrix, --budget 8GB "
                          "for the recipes that fit, or --report DIR to redraw a result")
    if args.report:
        rows = bench.load_rows(Path(args.report))
        if rows and rows[0].get("matrix") == "quality":
            from qtrain.quality import command_of, render_quality

            print(render_quality(rows, Path(args.report), command_of(rows)))
            return 0
        print(bench.render_report(rows, Path(args.report), f"qtrain bench: {Path(rows[0]['matrix']).stem if rows else '?'} matrix",
                                  f"qtrain bench --matrix {rows[0]['matrix'] if rows else '?'} --steps "
                                  f"{rows[0]['steps_requested'] if rows else '?'}"))
        return 0
    if args.matrix == "budget":
        out = Path(args.output or "runs/bench-budget")
        models = [args.model] if args.model else list(bench.BUDGET_MODELS)
        print(bench.render_budget(bench.budget_table(models), out, "qtrain bench --matrix budget"))
        return 0
    if args.matrix == "quality":
        return _bench_quality(args)
    if args.matrix:
        name = Path(args.matrix).stem
        out = Path(args.output or f"runs/bench-{name}")
        rows = bench.run_matrix(args.matrix, out, args.steps, model=args.model, data=args.data, country=args.country,
                                say=lambda m: print(m, flush=True), keep_runs=args.keep_runs)
        command = f"qtrain bench --matrix {args.matrix} --steps {args.steps}"
        print(bench.render_report(rows, out, f"qtrain bench: {name} matrix", command))
        return _failed_rows(rows)
    shipped = RECIPES_DIR.parent / "benchmarks" / "results"
    results = [Path(p) for p in (args.results or [])] or [shipped / "bench-methods", shipped / "bench-quality"]
    print(bench.answer_budget(args.budget, args.model, args.device, results))
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    from qtrain import bench
    from qtrain.quality import quality_rows, render_quality

    if not args.eval_data:
        raise UsageError("--matrix quality scores every row on MBPP's test split: give --eval-data mbpp.jsonl")
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise UsageError(f"--eval-limit {args.eval_limit} must be positive")
    time_s = parse_duration(args.time or "20m")
    out = Path(args.output or "runs/bench-quality")
    rows = bench.run_matrix("quality", out, 1_000_000, model=args.model, data=args.data, country=args.country,
                            say=lambda m: print(m, flush=True), keep_runs=args.keep_runs,
                            rows=quality_rows(time_s, args.sft_data),
                            quality={"mbpp": str(Path(args.eval_data).resolve()), "limit": args.eval_limit})
    command = (f"qtrain bench --matrix quality --time {args.time or '20m'} --eval-data MBPP.jsonl"
               + (f" --eval-limit {args.eval_limit}" if args.eval_limit else "")
               + (" --sft-data SELFTRAIN.jsonl" if args.sft_data else ""))
    print(render_quality(rows, out, command))
    return _failed_rows(rows)


def _failed_rows(rows: list[dict]) -> int:
    """Exit status of a matrix run: 1, with the way out, when any row failed."""
    failed = [r["name"] for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"qtrain bench: {len(failed)} row(s) failed: {', '.join(failed)}; run the same command again to retry "
              "them (finished rows are kept)", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import ipaddress

    from qtrain.infer import load_for_inference

    try:
        from qtrain.serve import ServeConfig, serve
    except ImportError as exc:
        raise UsageError(f"qtrain serve needs the serve extra: pip install 'qtrain[serve]' ({exc})") from None
    for name in ("max_tokens", "max_prompt_tokens", "queue", "concurrency", "port"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout {args.timeout} must be a positive number of seconds")
    key = args.api_key or os.environ.get("QTRAIN_API_KEY") or None
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not key:
        print(f"qtrain serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              "machine can use the model; set --api-key or QTRAIN_API_KEY", file=sys.stderr)
    loaded = load_for_inference(args.model, threads=args.threads)
    cfg = ServeConfig(model_id=args.model_name or loaded.name, max_prompt_tokens=args.max_prompt_tokens,
                      max_tokens=args.max_tokens, max_queue=args.queue, concurrency=args.concurrency,
                      timeout_s=args.timeout, api_key=key,
                      allowed_hosts=_allowed_hosts(args.host, args.allow_host or []))
    print(f"serving {cfg.model_id} ({loaded.kind}) on http://{args.host}:{args.port}/ (OpenAI API under /v1"
          f"{', API key required' if key else ''})", file=sys.stderr, flush=True)
    serve(loaded, cfg, host=args.host, port=args.port, threads=args.threads)
    return 0


def _allowed_hosts(bind: str, extra: list[str]) -> tuple[str, ...]:
    """The Host names a keyless server answers to: loopback names, the bound address unless it is a wildcard,
    and any --allow-host."""
    from qtrain.serve import ServeConfig

    names = list(ServeConfig.allowed_hosts)
    if bind not in ("0.0.0.0", "::", ""):
        names.append(bind)
    return tuple(dict.fromkeys(names + extra))


def _eval_options(args, task: str, limit, data):
    from qtrain.evaluate import EvalError, EvalOptions

    try:
        ks = tuple(int(k) for k in str(args.k).split(",") if k.strip())
    except ValueError:
        raise EvalError(f"--k {args.k!r}: give comma-separated integers, e.g. 1,10") from None
    return EvalOptions(task=task, data=data,
                       n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p, ks=ks or (1,),
                       limit=limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, chat=args.chat,
                       workers=args.workers, timeout_s=args.timeout, seed=args.seed, engine=args.engine,
                       unsafe_no_sandbox=args.unsafe_no_sandbox)


def _print_eval(summary: dict, out) -> None:
    ks = [k for k in summary if k.startswith("pass@")]
    print(f"{summary['task']} ({summary['problems']} problems, {summary['samples']} samples, {summary['prompting']} "
          f"prompting): " + ", ".join(f"{k} {summary[k]:.2%}" for k in ks if summary[k] is not None)
          + f"; test-case accuracy {summary['test_case_accuracy']:.2%}; sandbox {summary['sandbox_mode']}"
          + (" (UNSAFE: no sandbox, --unsafe-no-sandbox)" if summary["sandbox"]["degraded"] else ""))
    if summary.get("generation_tokens_per_second"):
        print(f"generation {summary['generation_tokens_per_second']:.1f} tokens/s; validation perplexity "
              f"{summary.get('val_perplexity')}; wrote {out}/summary.json and samples.jsonl")


def cmd_eval(args: argparse.Namespace) -> int:
    from qtrain.evaluate import compare, run_eval

    if args.compare:
        print(compare(args.compare))
        return 0
    opts = _eval_options(args, args.task, args.limit, args.data)
    out = Path(args.output) if args.output else Path("runs") / f"eval-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_eval(args.model, opts, out, samples_file=args.samples)
    _print_eval(summary, out)
    return 0


def cmd_rejection_sample(args: argparse.Namespace) -> int:
    from qtrain.selftrain import SampleOptions, run_rejection_sampling

    opts = SampleOptions(problems=args.problems, output=args.output, samples_per_problem=args.samples_per_problem,
                         temperature=args.temperature, top_p=args.top_p, keep_per_problem=args.keep_per_problem,
                         add_references=args.references, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, seed=args.seed, timeout_s=args.timeout, workers=args.workers,
                         limit=args.limit, previous=args.previous, unsafe_no_sandbox=args.unsafe_no_sandbox)
    report = run_rejection_sampling(args.model, opts, say=lambda m: print(m, file=sys.stderr, flush=True))
    r = report["rounds"][-1]
    print(f"round {r['round']}: {r['problems_solved']}/{r['problems']} problems solved by a sample "
          f"({r['samples_passed']}/{r['samples']} samples passed), {r['samples_kept']} kept, "
          f"{r['references_passed']}/{r['references_run']} reference solutions passed; wrote {report['records']} "
          f"records to {args.output} ({report['records_by_origin']}) and its .report.json")
    return 0


def _add_sandbox_args(p) -> None:
    """How model-written programs are run: the same options for eval and rejection-sample."""
    p.add_argument("--workers", type=int, help="sandboxes at a time (default: CPU count, at most 8)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run model-written programs WITHOUT a sandbox when bubblewrap is missing or fails its "
                   "self-test: they can read and write whatever you can (recorded in the summary)")
    p.add_argument("--seed", type=int, default=0)


def _add_eval_args(p, with_task: bool = True) -> None:
    if with_task:
        p.add_argument("--task", default="humaneval", choices=["humaneval", "mbpp"])
        p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--n-samples", type=int, default=1, help="samples per problem")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--k", default="1", help="pass@k values, comma-separated (each <= --n-samples)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    p.add_argument("--engine", default="auto", choices=["auto", "continuous", "static"],
                   help="continuous batching (PyTorch models; a finished answer's slot goes to the next prompt) or "
                   "static batches through transformers' generate (default: continuous where the model allows)")
    p.add_argument("--max-new-tokens", type=int, default=384)
    _add_sandbox_args(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="chat template + instruction (default: when the tokenizer has one)")


def _add_rejection_sample_parser(sub) -> None:
    rs = sub.add_parser("rejection-sample", help="chat SFT data from sampled solutions that pass their tests",
                        description="Sample answers to training problems, run them with their tests in the sandbox, "
                                    "keep those that pass (plus the reference solutions that pass) as chat SFT JSONL "
                                    "for qtrain fit --data. MBPP's test split and HumanEval are refused.")
    rs.add_argument("model", nargs="?", help="run directory, model dir / hub id / .gguf; default: embedded")
    rs.add_argument("--problems", required=True,
                    help="MBPP's original mbpp.jsonl (task ids 511-974 are used) or JSONL of task_id, prompt, tests")
    rs.add_argument("-o", "--output", required=True, help="JSONL to write (a .report.json is written beside it)")
    rs.add_argument("-k", "--samples-per-problem", type=int, default=4)
    rs.add_argument("--temperature", type=float, default=0.8)
    rs.add_argument("--top-p", type=float, default=0.95)
    rs.add_argument("--keep-per-problem", type=int, default=2, help="distinct passing samples kept per problem")
    rs.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                    help="also keep the dataset's reference solutions that pass their tests")
    rs.add_argument("--previous", help="an earlier round's output: its records are kept and the round number grows")
    rs.add_argument("--limit", type=int, help="first N problems only")
    rs.add_argument("--max-new-tokens", type=int, default=384)
    rs.add_argument("--batch-size", type=int, default=16)
    _add_sandbox_args(rs)
    rs.set_defaults(func=cmd_rejection_sample)


def _add_fit_parser(sub) -> None:

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
    fit.add_argument("--eval", choices=["humaneval", "mbpp"], help="evaluate before and after training (see qtrain eval)")
    fit.add_argument("--eval-limit", type=int, help="with --eval: first N problems only")
    fit.add_argument("--eval-data", help="with --eval mbpp: the original mbpp.jsonl")
    _add_eval_args(fit, with_task=False)
    fit.set_defaults(func=cmd_fit)


def _add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="predict memory per recipe and pick the one that fits a budget",
                          description="Predict peak training memory from the model config alone and pick a recipe.")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="base recipe overrides (e.g. seq_len=2048)")
    plan.add_argument("--model", help="hub id (offline: the shipped configs), local directory, .gguf; default: embedded")
    plan.add_argument("--budget", help="memory budget, e.g. 8GB (default on CPU: available RAM minus 10%%)")
    plan.add_argument("--device", default="auto", help="cpu, cuda or auto")
    plan.add_argument("--devices", type=int, default=1,
                      help="devices (processes) of that kind, each with --budget: plans DDP or FSDP sharding")
    plan.add_argument("--recipe", help="base recipe (target seq_len, effective batch, LoRA rank)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--measure", action="store_true",
                      help="also train the pick for a few steps on this device and show measured against predicted "
                      "(loads the real model: it must be local or downloadable)")
    plan.add_argument("--measure-steps", type=int, default=3, help="optimizer steps for --measure (default 3)")
    plan.add_argument("--data", help="with --measure: training data (default: the standard-library corpus)")
    plan.set_defaults(func=cmd_plan)


def _add_export_parser(sub) -> None:
    exp = sub.add_parser("export", help="export a trained model to ONNX (fp32/int8/int4) or GGUF, with a parity report",
                         description="Export a run directory (or any model) to ONNX and/or GGUF and prove parity.")
    exp.add_argument("run", nargs="?", help="run directory of `qtrain fit` (or a model dir / hub id); "
                     "default: the embedded model")
    exp.add_argument("--onnx", action="store_true", help="ONNX decoder with KV cache (fp32), via torch.onnx.export")
    exp.add_argument("--int8", action="store_true", help="also 8-bit weight-only (MatMulNBits), in OUT/int8")
    exp.add_argument("--int4", action="store_true", help="also 4-bit weight-only (MatMulNBits), in OUT/int4")
    exp.add_argument("--block-size", type=int, default=16, help="int4 quantization block size (16..256, power of 2; default 16)")
    exp.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                     help="int4 MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations")
    exp.add_argument("--keep-lm-head", action="store_true", help="leave the LM head in fp32 when quantizing")
    exp.add_argument("--int4-method", default="gptq", choices=["gptq", "rtn", "hqq", "kquant"],
                     help="int4 rounding: GPTQ on calibration code (default), or onnxruntime's round-to-nearest, "
                     "HQQ or k-quant")
    exp.add_argument("--int4-calibration", default="mix", choices=["mix", "train"],
                     help="GPTQ calibration code: half the training split and half general library code (default), "
                     "or the training split only")
    exp.add_argument("--int4-asymmetric", action="store_true",
                     help="int4 with a zero point per block (MatMulNBits' asymmetric grid) instead of symmetric")
    exp.add_argument("--int4-no-act-order", action="store_true",
                     help="GPTQ left to right instead of the inputs with the most energy first")
    exp.add_argument("--int4-head-bits", type=int, default=8, choices=[4, 8], help="LM head precision in the int4 export")
    exp.add_argument("--min-agreement", action="append", metavar="[FORMAT=]FRACTION",
                     help="greedy next-token agreement below which a format fails (default fp32=0.99, int8=0.95, "
                     "int4=0.8)")
    exp.add_argument("--allow-degraded", action="store_true", help="exit 0 even when a format fails parity")
    exp.add_argument("--data", help="held-out code for parity (default: the standard library's validation split)")
    exp.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    exp.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    exp.add_argument("-o", "--output", help="ONNX output directory (default: RUN/onnx)")
    exp.add_argument("--gguf", action="store_true", help="write a GGUF file for llama.cpp")
    exp.add_argument("--outtype", default=None, choices=["f32", "f16", "q8_0", "tq2_0", "tq1_0"],
                     help="GGUF tensor type (default: q8_0; tq2_0 for a BitNet run, whose ternary layers it stores in "
                          "llama.cpp's TQ2_0/TQ1_0 where rows are multiples of 256, Q8_0 elsewhere)")
    exp.add_argument("--gguf-output", help="GGUF file (default: RUN/model-OUTTYPE.gguf)")
    exp.add_argument("--gguf-pre", help="llama.cpp pre-tokenizer name, when qtrain does not recognise the tokenizer")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing export")
    exp.set_defaults(func=cmd_export)


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a run, an ONNX export or any model (streamed)")
    gen.add_argument("model", nargs="?", help="run directory, ONNX export directory, model dir / hub id / .gguf; "
                     "default: the embedded model")
    gen.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads standard input)")
    gen.add_argument("-n", "--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="use the chat template (default: when the tokenizer has one)")
    gen.add_argument("--threads", type=int)
    gen.set_defaults(func=cmd_generate)


def _add_bench_parser(sub) -> None:
    ben = sub.add_parser("bench", help="benchmark a matrix of recipes (memory, tokens/s, energy, loss) or answer a budget",
                         description="Run a matrix of recipes, each in its own process under CodeCarbon, into one JSON "
                                     "per row, then Markdown tables and PNG plots; or list what fits a budget.")
    ben.add_argument("--matrix", help="methods, tradeoff, quality (equal wall-clock, scored on MBPP and held-out "
                     "code), budget (planner only) or a YAML file of rows")
    ben.add_argument("--steps", type=int, default=3, help="optimizer steps per row (default 3)")
    ben.add_argument("--model", help="model for every row (default: the embedded model)")
    ben.add_argument("--data", help="training data for every row (default: the standard-library corpus)")
    ben.add_argument("--budget", help="with no --matrix: the recipes that fit this budget, measured where a bench ran")
    ben.add_argument("--device", default="auto", help="cpu, cuda or auto (for --budget)")
    ben.add_argument("--results", nargs="+", help="bench result directories to take measured figures from (--budget)")
    ben.add_argument("-o", "--output", help="result directory (default: runs/bench-MATRIX); rerunning resumes it")
    ben.add_argument("--report", metavar="DIR", help="redraw the tables and plots of a result directory")
    ben.add_argument("--keep-runs", action="store_true",
                     help="keep each row's trained weights in OUTPUT/runs (default: only its summary and metrics)")
    ben.add_argument("--country", default="USA", help="ISO code of the grid whose carbon intensity CodeCarbon uses")
    ben.add_argument("--time", help="quality matrix: wall-clock training time per row (default 20m)")
    ben.add_argument("--sft-data", help="quality matrix: self-training JSONL (qtrain rejection-sample) for the "
                     "'+selftrain' rows")
    ben.add_argument("--eval-data", help="quality matrix: MBPP's original mbpp.jsonl (its test split scores each row)")
    ben.add_argument("--eval-limit", type=int, help="quality matrix: the first N MBPP test problems (default all 500)")
    ben.set_defaults(func=cmd_bench)


def _add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="an OpenAI-compatible completion server and a web page to try the model",
                         description="Serve a run directory, an ONNX export or any model: POST /v1/completions, "
                                     "/v1/chat/completions, GET /v1/models, /health, and a page at /.")
    srv.add_argument("model", nargs="?", help="run directory, ONNX export, model dir / hub id / .gguf; default: embedded")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or set QTRAIN_API_KEY)")
    srv.add_argument("--allow-host", action="append", metavar="NAME",
                     help="without an API key, also answer requests whose Host is NAME (repeatable; loopback names "
                     "and the bound address are always allowed)")
    srv.add_argument("--model-name", help="the model id clients use (default: the model's name)")
    srv.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    srv.add_argument("--max-prompt-tokens", type=int, default=2048)
    srv.add_argument("--queue", type=int, default=16, help="requests waiting or running before 429")
    srv.add_argument("--concurrency", type=int, default=1, help="generations at once (1 is fastest on a CPU)")
    srv.add_argument("--timeout", type=float, default=120.0, help="seconds one generation may take")
    srv.add_argument("--threads", type=int)
    srv.set_defaults(func=cmd_serve)


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="pass@k on HumanEval / MBPP with generated code run in a sandbox",
                        description="Generate solutions and run them with their tests in a sandbox (bubblewrap).")
    ev.add_argument("model", nargs="?", help="run directory, ONNX export, model dir / hub id / .gguf; default: embedded")
    _add_eval_args(ev)
    ev.add_argument("--data", help="MBPP: the original mbpp.jsonl; HumanEval: another HumanEval.jsonl(.gz)")
    ev.add_argument("--samples", help="score completions from this JSONL (task_id, completion) instead of generating; "
                    "scored as chat answers or completions as their prompting field or the summary.json beside "
                    "them says (else completions), unless --chat / --no-chat")
    ev.add_argument("--compare", nargs="+", metavar="SUMMARY", help="print these summary.json files side by side")
    ev.add_argument("-o", "--output", help="output directory (default: runs/eval-TASK-TIMESTAMP)")
    ev.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtrain", description="Fine-tune small code models within a memory budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    from qtrain import __version__

    parser.add_argument("--version", action="version", version=f"qtrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fit_parser(sub)
    _add_plan_parser(sub)
    _add_export_parser(sub)
    _add_generate_parser(sub)
    _add_bench_parser(sub)
    _add_serve_parser(sub)
    _add_eval_parser(sub)
    _add_rejection_sample_parser(sub)

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
        if args.command == "fit" and argv is None:  # a real command line, not an in-process call
            from qtrain.measure import jemalloc_exec_env

            env = jemalloc_exec_env(dict(os.environ))
            if env is not None:
                sys.stdout.flush()
                sys.stderr.flush()
                os.execve(sys.executable, [sys.executable, "-m", "qtrain", *sys.argv[1:]], env)
        return args.func(args)
    except QtrainError as exc:
        print(f"qtrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
