"""What self-training buys the default model: base vs execution-filtered self-trained LoRA, on MBPP test (500) and
HumanEval (164), greedy, with paired 95% intervals; plus evaluation speed, static batches vs continuous batching,
on the same HumanEval run. Every stage runs the documented CLI command in its own process.

    python benchmarks/selftrain.py --mbpp ../shared/data/mbpp.jsonl [--work runs/selftrain-bench] [-k 4]

Stages (a stage whose output exists is reused, so an interrupted run resumes):
  1. base HumanEval with --engine static, then with continuous batching (eval speed, identical greedy samples)
  2. base MBPP test split
  3. qtrain rejection-sample on MBPP task ids 511-974          (pipeline)
  4. qtrain fit --recipe cpu-selftrain --data that.jsonl       (pipeline)
  5. the tuned model on HumanEval and MBPP test
Writes benchmarks/results/selftrain.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import git_sha, write_results  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_stage(name: str, cmd: list[str], done: Path, log: Path, timings: dict) -> None:
    """Run one CLI stage unless ``done`` exists; record its wall time."""
    if done.exists():
        print(f"[{name}] reusing {done}", flush=True)
        return
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    with open(log, "a") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    timings[name] = round(time.perf_counter() - t, 1)
    print(f"[{name}] {timings[name]:.0f} s", flush=True)


def identical_samples(a: Path, b: Path) -> dict:
    ra = [json.loads(x) for x in (a / "samples.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "samples.jsonl").read_text().splitlines()]
    ka = {(r["task_id"], r["sample"]): r for r in ra}
    same = [(k, r["completion"] == ka[k]["completion"]) for k, r in ((( r["task_id"], r["sample"]), r) for r in rb)]
    differ = [k[0] for k, s in same if not s]
    verdicts = sum(ka[(r["task_id"], r["sample"])]["passed"] != r["passed"] for r in rb)
    return {"samples": len(same), "identical": len(same) - len(differ), "differing_task_ids": differ,
            "verdicts_differing": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbpp", required=True, help="MBPP's original mbpp.jsonl")
    ap.add_argument("--work", default=str(ROOT / "runs" / "selftrain-bench"))
    ap.add_argument("-k", type=int, default=4, help="samples per training problem")
    ap.add_argument("--recipe", default="cpu-selftrain")
    ap.add_argument("--rs-batch-size", type=int, default=32, help="rows sampled together (more rows, more tokens/s)")
    ap.add_argument("--rs-max-new-tokens", type=int, default=192,
                    help="longest sampled answer (MBPP solutions are short; a rambling sample fails anyway)")
    ap.add_argument("--no-speed", action="store_true", help="skip the static-batch HumanEval run")
    ap.add_argument("--limit", type=int, help="smoke test: first N problems of every set")
    ap.add_argument("--max-steps", type=int, help="smoke test: training steps")
    args = ap.parse_args()

    from qtrain.evaluate import paired_comparisons
    from qtrain.io import atomic_write_json, atomic_write_text
    from qtrain.measure import machine_info
    from qtrain.stats import wilson_interval

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    q = [sys.executable, "-m", "qtrain"]
    lim = ["--limit", str(args.limit)] if args.limit else []
    steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
    mbpp = str(Path(args.mbpp).resolve())
    model = work / "model"

    def stage(name, cmd, done):
        run_stage(name, cmd, done, log, timings)
        atomic_write_json(timings_file, timings)

    if not args.no_speed:
        stage("base_humaneval_static", q + ["eval", "--task", "humaneval", "--engine", "static", "-o",
                                            str(work / "base-humaneval-static")] + lim,
              work / "base-humaneval-static" / "summary.json")
    stage("base_humaneval", q + ["eval", "--task", "humaneval", "-o", str(work / "base-humaneval")] + lim,
          work / "base-humaneval" / "summary.json")
    stage("base_mbpp", q + ["eval", "--task", "mbpp", "--data", mbpp, "-o", str(work / "base-mbpp")] + lim,
          work / "base-mbpp" / "summary.json")
    stage("rejection_sample", q + ["rejection-sample", "--problems", mbpp, "-k", str(args.k), "--max-new-tokens",
                                   str(args.rs_max_new_tokens), "--batch-size", str(args.rs_batch_size), "-o",
                                   str(work / "data.jsonl")] + lim, work / "data.report.json")
    stage("fit", q + ["fit", "--recipe", args.recipe, "--data", str(work / "data.jsonl"), "-o", str(model)] + steps,
          model / "summary.json")
    stage("tuned_humaneval", q + ["eval", str(model), "--task", "humaneval", "-o", str(work / "tuned-humaneval")] + lim,
          work / "tuned-humaneval" / "summary.json")
    stage("tuned_mbpp", q + ["eval", str(model), "--task", "mbpp", "--data", mbpp, "-o", str(work / "tuned-mbpp")] + lim,
          work / "tuned-mbpp" / "summary.json")

    load = lambda p: json.loads((work / p / "summary.json").read_text())  # noqa: E731
    git = git_sha()
    result = {"benchmark": "selftrain", "machine": machine_info(), "git": git,
              "command": f"python benchmarks/selftrain.py --mbpp MBPP.jsonl -k {args.k} --rs-batch-size "
                         f"{args.rs_batch_size} --rs-max-new-tokens {args.rs_max_new_tokens}"
                         + (f" --max-steps {args.max_steps}" if args.max_steps else ""), "timings_seconds": timings,
              "pipeline_seconds": round(timings.get("rejection_sample", 0) + timings.get("fit", 0), 1),
              "data_report": json.loads((work / "data.report.json").read_text()),
              "training": {k: json.loads((model / "summary.json").read_text()).get(k) for k in (
                  "method", "steps", "train_tokens", "tokens_per_second", "wall_seconds", "val_loss_before",
                  "val_loss_after", "peak_memory_bytes")}}
    tasks = {}
    for task in ("humaneval", "mbpp"):
        base, tuned = load(f"base-{task}"), load(f"tuned-{task}")
        paired = paired_comparisons([str(work / f"base-{task}"), str(work / f"tuned-{task}")])[0]
        row = {"problems": base["problems"], "paired": paired}
        for side, s in (("base", base), ("tuned", tuned)):
            solved = round(s["pass@1"] * s["problems"])
            row[side] = {"pass@1": s["pass@1"], "solved": solved,
                         "wilson95": [round(x, 4) for x in wilson_interval(solved, s["problems"])],
                         "val_perplexity": s.get("val_perplexity"),
                         "generation_tokens_per_second": s.get("generation_tokens_per_second"),
                         "generation_seconds": s.get("generation_seconds")}
        tasks[task] = row
    result["tasks"] = tasks
    ppl_b, ppl_t = tasks["mbpp"]["base"]["val_perplexity"], tasks["mbpp"]["tuned"]["val_perplexity"]
    result["heldout_perplexity"] = {"base": ppl_b, "tuned": ppl_t,
                                    "change": round(ppl_t / ppl_b - 1, 4) if ppl_b and ppl_t else None}
    if not args.no_speed:
        st, co = load("base-humaneval-static"), load("base-humaneval")
        result["eval_speed"] = {
            "static": {k: st.get(k) for k in ("generation_seconds", "generation_tokens", "generation_tokens_per_second")},
            "continuous": {k: co.get(k) for k in ("generation_seconds", "generation_tokens",
                                                  "generation_tokens_per_second", "forward_tokens")},
            "end_to_end_seconds": {"static": timings.get("base_humaneval_static"),
                                   "continuous": timings.get("base_humaneval")},
            "speedup": round(st["generation_seconds"] / co["generation_seconds"], 2),
            "samples": identical_samples(work / "base-humaneval-static", work / "base-humaneval")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("selftrain", result, render(result))
    atomic_write_text(RESULTS / "selftrain-summary.md", render_summary(result))
    print(render(result))


def render_summary(r: dict) -> str:
    """The README's short version: base vs self-trained, with the paired intervals."""
    lines = [f"# Self-training on the default model: base vs tuned (greedy pass@1; `{r['command']}`)", "",
             "| | base | self-trained | difference (paired 95% CI) |", "|---|---|---|---|"]
    for task, row in r["tasks"].items():
        p = row["paired"]
        lines.append(f"| {task} ({row['problems']} problems) | {row['base']['pass@1']:.2%} | "
                     f"{row['tuned']['pass@1']:.2%} | {p['difference']:+.2%} ({p['ci_low']:+.2%} to "
                     f"{p['ci_high']:+.2%}) |")
    h = r["heldout_perplexity"]
    lines.append(f"| held-out code perplexity | {h['base']} | {h['tuned']} | {h['change']:+.1%} |")
    lines += ["", f"The whole pipeline (sampling, sandbox, training) took {r['pipeline_seconds'] / 60:.0f} minutes on a "
              f"2-core CPU; {r['data_report']['records']} training records."]
    return "\n".join(lines) + "\n"


def render(r: dict) -> str:
    m = r["machine"]
    d = r["data_report"]
    lines = ["# Self-training: what execution-filtered data buys the default model", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores), torch {m.get('torch')}; git {r['git']}. "
             f"Reproduce: `{r['command']}`.", "",
             f"Pipeline (rejection sampling + training): {r['pipeline_seconds'] / 60:.1f} min "
             f"(sampling and sandbox {r['timings_seconds'].get('rejection_sample', 0) / 60:.1f} min, training "
             f"{r['timings_seconds'].get('fit', 0) / 60:.1f} min).", ""]
    for rd in d["rounds"]:
        lines.append(f"- Round {rd['round']}: {rd['problems']} MBPP train/validation problems (ids 511-974), "
                     f"{rd['samples']} samples at temperature {d['options']['temperature']}: {rd['samples_passed']} "
                     f"passed ({rd['sample_pass_rate']:.1%}), {rd['problems_solved']} problems solved "
                     f"({rd['solve_rate']:.1%}), {rd['samples_kept']} distinct samples kept; "
                     f"{rd['references_passed']}/{rd['references_run']} reference solutions passed.")
    t = r["training"]
    lines += [f"- Data: {d['records']} chat records ({d['records_by_origin']}).",
              f"- Training: {t['method']}, {t['steps']} steps, {t['train_tokens']} tokens at "
              f"{t['tokens_per_second']:.0f} tokens/s; SFT validation loss {t['val_loss_before']:.3f} -> "
              f"{t['val_loss_after']:.3f}.", "",
              "| task | problems | base pass@1 (95% Wilson) | tuned pass@1 (95% Wilson) | difference (paired 95% "
              "bootstrap CI) | only base / only tuned | exact McNemar p |",
              "|---|---|---|---|---|---|---|"]
    for task, row in r["tasks"].items():
        b, tu, p = row["base"], row["tuned"], row["paired"]
        ci = lambda s: f"{s['pass@1']:.2%} ({s['solved']}; {s['wilson95'][0]:.1%}-{s['wilson95'][1]:.1%})"  # noqa: E731
        lines.append(f"| {task} | {row['problems']} | {ci(b)} | {ci(tu)} | {p['difference']:+.2%} "
                     f"({p['ci_low']:+.2%} to {p['ci_high']:+.2%}) | {p['only_before']} / {p['only_after']} | "
                     f"{p['mcnemar_p']:.3g} |")
    h = r["heldout_perplexity"]
    lines += ["", f"Held-out code perplexity (the standard library's validation split, 2,048 positions): "
              f"{h['base']} -> {h['tuned']} ({h['change']:+.1%})." if h["change"] is not None else ""]
    if "eval_speed" in r:
        e = r["eval_speed"]
        s = e["samples"]
        lines += ["", f"## Evaluation speed (HumanEval, {r['tasks']['humaneval']['problems']} problems, greedy, batch 16, "
                  "same run)", "",
                  "| engine | generation s | new tokens | tokens/s | end to end s |", "|---|---|---|---|---|",
                  f"| static batches (`generate`) | {e['static']['generation_seconds']} | "
                  f"{e['static']['generation_tokens']} | {e['static']['generation_tokens_per_second']} | "
                  f"{e['end_to_end_seconds']['static']} |",
                  f"| continuous batching | {e['continuous']['generation_seconds']} | "
                  f"{e['continuous']['generation_tokens']} | {e['continuous']['generation_tokens_per_second']} | "
                  f"{e['end_to_end_seconds']['continuous']} |", "",
                  f"Speed-up {e['speedup']}x. Identical greedy samples: {s['identical']} of {s['samples']}"
                  + (f" (differing: {', '.join(s['differing_task_ids'])}; verdicts that differ: "
                     f"{s['verdicts_differing']})" if s["differing_task_ids"] else "") + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
