"""BitNet b1.58 at equal wall-clock: full fine-tuning, LoRA, BitNet without and with distillation from the
full-precision model, on the default model and the same data and seed, each through `qtrain fit --time` in its
own process, one after the other. Validation perplexity (held-out standard-library code; BitNet always fully
ternary) is logged every few steps for the curves. Then the distilled run's packed directory is loaded back through
transformers' BitLinear and scored on the same split, which states what the bf16 embeddings change.

    python benchmarks/bitnet_distill.py [--minutes 60] [--eval-every 4] [--keep DIR] [--render-only]
    python benchmarks/bitnet_distill.py --combine bitnet_60min,bitnet_60min_plain --name bitnet_60min_all

Writes benchmarks/results/bitnet_distill.{json,md,png} (or NAME.*). Four 60-minute runs are four hours, more than
one sitting here, so runs made by separate invocations (``--runs``, ``--name``) can be merged with ``--combine``:
the table then names each part's command, revision and start, since the host's load differed between them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, header, write_results  # noqa: E402 - benchmarks/common.py, beside this script

from qtrain.recipe import load_recipe

BASE_PPL_GOAL_FACTOR = 3  # the goal: the ternary model within 3x the base model's perplexity
# The ternary runs name their step size and learning rate: cpu-bitnet.yaml took 8 sequences a step at lr 3e-4
# when the first of them were measured, so each command in benchmarks/results still reproduces what it measured.
_PLAIN = ["distill_weight=0", "bitnet_start=absmean"]
_LR = "learning_rate=3e-4"
RUNS = {  # name: (recipe, overrides)
    "full fp32": ("cpu-full.yaml", []),
    "LoRA r16": ("cpu-lora.yaml", []),
    "BitNet": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=8", _LR]),
    "BitNet (GPTQ start)": ("cpu-bitnet.yaml", ["distill_weight=0", "bitnet_start=gptq", "grad_accum_steps=8", _LR]),
    "BitNet + distillation": ("cpu-bitnet.yaml", ["distill_weight=0.5", "bitnet_start=absmean", "grad_accum_steps=8", _LR]),
    # the learning rate and step size of plain BitNet: a shadow weight must move by about half the layer's mean |W|
    # (~0.01 here) to flip its ternary value, which at 3e-4 per Adam step takes tens of steps
    "BitNet lr 1e-3": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=8", "learning_rate=1e-3"]),
    "BitNet lr 3e-3": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=8", "learning_rate=3e-3"]),
    "BitNet lr 1e-4": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=8", "learning_rate=1e-4"]),
    "BitNet accum 2": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=2", _LR]),
    "BitNet accum 1": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=1", _LR]),
    "BitNet lr 1e-4 accum 2": ("cpu-bitnet.yaml", [*_PLAIN, "learning_rate=1e-4", "grad_accum_steps=2"]),
    # at one sequence a step: a larger learning rate, and transformers BitLinear's RMSNorm before each layer's
    # activation quantisation (use_rms_norm, which the packed format carries; the HF 1.58-bit write-up found it
    # steadied training)
    "BitNet accum 1 lr 1e-3": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=1", "learning_rate=1e-3"]),
    "BitNet accum 1 rms norm": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=1", _LR, "bitnet_rms_norm=true"]),
    "BitNet accum 1 lr 2e-3": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=1", "learning_rate=2e-3"]),
    # 256-token sequences: twice the optimizer steps for the same tokens (validated on the same 512-token split)
    "BitNet accum 1 lr 1e-3 seq 256": ("cpu-bitnet.yaml", [*_PLAIN, "grad_accum_steps=1", "learning_rate=1e-3",
                                                          "seq_len=256", "val_seq_len=512"]),
    # cpu-bitnet.yaml as it is now
    "BitNet + distillation accum 1 lr 1e-3 seq 256": ("cpu-bitnet.yaml", [
        "distill_weight=0.5", "bitnet_start=absmean", "grad_accum_steps=1", "learning_rate=1e-3", "seq_len=256",
        "val_seq_len=512"]),
    "BitNet + distillation accum 1 lr 1e-3": ("cpu-bitnet.yaml", ["distill_weight=0.5", "bitnet_start=absmean",
                                                               "grad_accum_steps=1", "learning_rate=1e-3"]),
}


def train(work: Path, minutes: float, eval_every: int, val_sequences: int, names: list[str]) -> dict:
    out = {}
    for name in names:
        recipe, extra = RUNS[name]
        run = work / slug(name)
        # --eval-every counts steps of 8 micro-batches, so a run with smaller steps is evaluated after the same
        # number of tokens
        every = max(1, eval_every * 8 // load_recipe(ROOT / "recipes" / recipe, extra).grad_accum_steps)
        cmd = [sys.executable, "-m", "qtrain", "fit", "--recipe", f"recipes/{recipe}", "-o", str(run), "--overwrite",
               "--time", f"{minutes}m", "max_steps=100000", f"eval_every={every}", "save_every=0",
               f"val_max_sequences={val_sequences}", *extra]
        print("$", " ".join(cmd[2:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        out[name] = read_run(run, recipe, extra, time.perf_counter() - start)
    return out


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def read_run(run: Path, recipe: str, extra: list[str], wall_seconds: float | None) -> dict:
    """One finished run directory as a result entry: its summary and its validation curve by training time."""
    summary = json.loads((run / "summary.json").read_text())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    seconds, tokens, at = 0.0, 0, {}
    for x in lines:
        if "loss" in x:
            seconds += x["step_seconds"]
            tokens = x["tokens"]
            at[x["step"]] = (round(seconds, 1), tokens)
    curve = [{"step": 0, "train_seconds": 0.0, "tokens": 0, "val_ppl": summary["val_perplexity_before"]}]
    curve += [{"step": x["step"], "train_seconds": at[x["step"]][0], "tokens": at[x["step"]][1],
               "val_ppl": round(math.exp(x["val_loss"]), 3)} for x in lines if "val_loss" in x]
    if curve[-1]["step"] != summary["steps"]:  # the last step is often also an evaluation step
        curve.append({"step": summary["steps"], "train_seconds": summary["train_seconds"],
                      "tokens": summary["train_tokens"], "val_ppl": summary["val_perplexity_after"]})
    return {"recipe": recipe, "overrides": extra, "dir": str(run),
            "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
            "summary": {k: summary.get(k) for k in (
                "steps", "train_tokens", "train_seconds", "tokens_per_second", "mfu", "peak_memory_bytes",
                "val_perplexity_before", "val_perplexity_after", "trainable_params", "distill")},
            "val_curve": curve}


def loaded_back(run_dir: str | None, val_sequences: int) -> dict:
    """The saved packed model (bf16 embeddings and norms) scored through transformers' BitLinear on the
    validation split the run used, against the training-time forward's perplexity in its summary; with no
    ``run_dir``, the default (pretrained) model on the same split."""
    load = (f"load_trained({run_dir!r})" if run_dir else
            "__import__('qtrain.models').models.load_model(resolve_model_source(None), dtype=torch.float32)")
    code = f"""
import json, math, torch
from qtrain.recipe import load_recipe
from qtrain.models import load_tokenizer, resolve_model_source
from qtrain.runs import load_trained
from qtrain.train import build_data
from qtrain.loss import forward_loss_sum, fused_head
recipe = load_recipe("recipes/cpu-bitnet.yaml", ["val_max_sequences={val_sequences}"])
packed = build_data(None, recipe, load_tokenizer(resolve_model_source(None)))
model = {load}.eval()
total = n = 0
with torch.no_grad():
    for s in range(0, len(packed.val_ids), 4):
        y = packed.val_labels[s:s + 4]
        total += float(forward_loss_sum(model, model, packed.val_ids[s:s + 4], y, fused_head(model)))
        n += int((y[:, 1:] != -100).sum())
print(json.dumps({{"val_ppl": math.exp(total / n), "layer": type(model.model.layers[0].mlp.down_proj).__name__}}))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    files = {p.name: p.stat().st_size for p in Path(run_dir).glob("*.safetensors")} if run_dir else {}
    return {**got, "model_file_bytes": sum(files.values())}


def extrapolate(curve: list[dict], goal: float) -> dict | None:
    """Tokens to reach ``goal`` from a power law ppl = a * tokens^b fitted to the curve's trained points (a
    straight line in log-log through the second half of them): a rough reading, not a prediction."""
    pts = list({p["tokens"]: (p["tokens"], p["val_ppl"]) for p in curve if p["tokens"] > 0}.values())
    pts = pts[len(pts) // 2:] if len(pts) >= 4 else pts
    if len(pts) < 2:
        return None
    xs = [math.log(t) for t, _ in pts]
    ys = [math.log(v) for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    if b >= 0:
        return {"slope": round(b, 3), "tokens_to_goal": None, "points": len(pts)}
    return {"slope": round(b, 3), "tokens_to_goal": int(math.exp((math.log(goal) - a) / b)), "points": len(pts)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, run in result["runs"].items():
        c = run["val_curve"]
        ax.plot([p["train_seconds"] / 60 for p in c], [p["val_ppl"] for p in c], marker="o", label=name)
    ax.axhline(result["goal_ppl"], color="grey", linestyle="--", label=f"goal ({result['goal_ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("training minutes (validation excluded)")
    ax.set_ylabel("validation perplexity (log)")
    ax.set_title(f"Equal wall-clock ({result['minutes']:g} min a run), default model, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(r: dict) -> str:
    m = r["machine"]
    title = ("BitNet b1.58 with and without distillation, against full fine-tuning and LoRA"
             if set(r["runs"]) == set(RUNS) - {"BitNet (GPTQ start)"} else
             "BitNet b1.58 at equal wall-clock: " + ", ".join(r["runs"]))
    lines = [f"# {title}", "",
             f"Machine: {m.get('cpu')} ({m.get('cores')} cores); git {r['git']}. Reproduce: `{r['command']}`. "
             f"{r['minutes']:g} minutes of `qtrain fit --time` per run, one after the other; same data (the "
             f"embedded standard-library corpus), seed and validation split ({r['val_tokens']:,} tokens). "
             "BitNet's validation is always fully ternary.", ""]
    if r.get("parts"):
        lines += ["The runs come from separate invocations on the same machine (its load differed between them):",
                  ""] + [f"- {', '.join(p['runs'])}: git {p['git']}"
                         + (f", started {p['started']}" if p.get("started") else "") + f"; `{p['command']}`"
                         for p in r["parts"]] + [""]
    lines += [
             "| run | steps | tokens | tok/s | peak RSS (GiB) | val ppl before | val ppl after |",
             "|---|---|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        s = run["summary"]
        lines.append(f"| {name} | {s['steps']} | {s['train_tokens']:,} | {s['tokens_per_second']:.0f} | "
                     f"{s['peak_memory_bytes'] / 2**30:.2f} | {s['val_perplexity_before']:,.2f} | "
                     f"{s['val_perplexity_after']:,.2f} |")
    lines += ["", "Validation perplexity by training minute:", ""]
    for name, run in r["runs"].items():
        pts = ", ".join(f"{p['train_seconds'] / 60:.1f}: {p['val_ppl']:,.1f}" for p in run["val_curve"])
        lines.append(f"- {name}: {pts}")
    lines += ["", f"![curves]({r.get('name', 'bitnet_distill')}.png)", "", f"Goal: {r['goal_ppl']:.1f} (3x the base model's "
              f"{r['base_ppl']:.2f})."]
    for name, ex in r["extrapolation"].items():
        if ex is None:
            continue
        if ex["tokens_to_goal"] is None:
            lines.append(f"- {name}: the curve's fitted slope is {ex['slope']} (not falling); no extrapolation.")
        else:
            lines.append(f"- {name}: a power law through the last {ex['points']} points (slope {ex['slope']}) "
                         f"reaches it at about {ex['tokens_to_goal']:,} tokens (a rough reading).")
    lb = r.get("loaded_back")
    if lb:
        lines += ["", "## The saved ternary model, loaded back", "",
                  f"The {lb.get('run', 'BitNet + distillation')} run's directory ({lb['model_file_bytes'] / 1e6:.1f} MB of safetensors, bf16 "
                  f"embeddings and norms, 2-bit layers) loads as transformers `{lb['layer']}` layers; validation "
                  f"perplexity {lb['val_ppl']:,.2f} there against {lb['training_ppl']:,.2f} from the training-time "
                  f"forward (fp32 embeddings): a ratio of {lb['val_ppl'] / lb['training_ppl']:.4f}."]
    return "\n".join(lines) + "\n"


def combine(names: list[str]) -> dict:
    """One result from several results files of runs made separately: runs in the order of RUNS, the base
    perplexity from a full-precision run's "before" when one is there, each part's command and revision kept."""
    parts = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    minutes = {p["minutes"] for p in parts}
    if len(minutes) != 1:
        raise SystemExit(f"--combine: the parts ran for different times {sorted(minutes)} minutes; "
                         "combine only runs of equal wall-clock")
    runs: dict = {}
    for p in parts:
        runs.update(p["runs"])
    runs = {n: runs[n] for n in RUNS if n in runs}
    plain = [r for n, r in runs.items() if not n.startswith("BitNet")]
    base_ppl = plain[0]["summary"]["val_perplexity_before"] if plain else parts[0]["base_ppl"]
    goal = BASE_PPL_GOAL_FACTOR * base_ppl
    back = next((p["loaded_back"] for p in parts if p.get("loaded_back")), None)
    first = parts[0]
    return {**{k: first[k] for k in ("benchmark", "machine", "versions", "minutes", "val_tokens")},
            "git": ", ".join(dict.fromkeys(p["git"] for p in parts)),
            "command": " ; ".join(p["command"] for p in parts)
            + f" ; python benchmarks/bitnet_distill.py --combine {','.join(names)}",
            "parts": [{"name": n, "git": p["git"], "command": p["command"], "runs": list(p["runs"]),
                       "started": p.get("started")} for n, p in zip(names, parts)],
            "base_ppl": base_ppl, "goal_ppl": goal, "runs": runs, "loaded_back": back,
            "extrapolation": {n: extrapolate(r["val_curve"], goal) for n, r in runs.items() if n.startswith("BitNet")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--val-sequences", type=int, default=16)
    ap.add_argument("--keep", help="keep the run directories here")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    ap.add_argument("--name", default="bitnet_distill", help="results file name (benchmarks/results/NAME.*)")
    ap.add_argument("--combine", help="comma-separated results names to merge into --name, instead of training")
    ap.add_argument("--collect", help="read the --runs' finished directories kept (--keep) under this directory by "
                    "an invocation that was stopped before it wrote its results, instead of training")
    ap.add_argument("--collect-command", default="", help="with --collect: the command that trained those runs")
    args = ap.parse_args()
    names = [n.strip() for n in args.runs.split(",")]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    if args.combine:
        result = combine([n.strip() for n in args.combine.split(",")])
    elif args.collect:
        runs = {n: read_run(Path(args.collect) / slug(n), *RUNS[n], None) for n in names}
        base_ppl = next(iter(runs.values()))["summary"]["val_perplexity_before"] if not any(
            n.startswith("BitNet") for n in runs) else round(loaded_back(None, args.val_sequences)["val_ppl"], 3)
        goal = BASE_PPL_GOAL_FACTOR * base_ppl
        result = header(args.name, command=args.collect_command + f" (stopped; its finished runs read back by "
                        f"`python benchmarks/bitnet_distill.py --collect {args.collect} --runs '{args.runs}'`)",
                        minutes=args.minutes, val_tokens=args.val_sequences * 512, base_ppl=base_ppl, goal_ppl=goal,
                        runs=runs, loaded_back=None,
                        extrapolation={n: extrapolate(r["val_curve"], goal) for n, r in runs.items()
                                       if n.startswith("BitNet")})
    elif args.render_only:
        result = json.loads((RESULTS / f"{args.name}.json").read_text())
        for run in result["runs"].values():  # drop a final point repeated from the last evaluation
            c = run["val_curve"]
            run["val_curve"] = [p for i, p in enumerate(c) if i == 0 or p["step"] != c[i - 1]["step"]]
        result["extrapolation"] = {n: extrapolate(r["val_curve"], result["goal_ppl"])
                                   for n, r in result["runs"].items() if n.startswith("BitNet")}
    else:
        work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qtrain-bitnet-distill-"))
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        runs = train(work, args.minutes, args.eval_every, args.val_sequences, names)
        plain = [r for n, r in runs.items() if not n.startswith("BitNet")]
        base_ppl = (plain[0]["summary"]["val_perplexity_before"] if plain else
                    round(loaded_back(None, args.val_sequences)["val_ppl"], 3))
        goal = BASE_PPL_GOAL_FACTOR * base_ppl
        ternary = [r for n, r in runs.items() if n.startswith("BitNet")]
        back = None
        if ternary:  # the last ternary run's saved directory, loaded back
            back = loaded_back(ternary[-1]["dir"], args.val_sequences)
            back["training_ppl"] = ternary[-1]["summary"]["val_perplexity_after"]
            back["run"] = [n for n, r in runs.items() if r is ternary[-1]][0]
        result = header(args.name, command=f"python benchmarks/bitnet_distill.py --minutes {args.minutes:g} "
                        f"--eval-every {args.eval_every} --val-sequences {args.val_sequences}"
                        + (f" --runs '{args.runs}' --name {args.name}" if args.name != "bitnet_distill" else ""),
                        started=started, minutes=args.minutes, val_tokens=args.val_sequences * 512, base_ppl=base_ppl, goal_ppl=goal,
                        runs=runs, loaded_back=back,
                        extrapolation={n: extrapolate(r["val_curve"], goal) for n, r in runs.items()
                                       if n.startswith("BitNet")})
    result["name"] = args.name
    write_results(args.name, result, render(result))
    plot(result, RESULTS / f"{args.name}.png")
    print(render(result))


if __name__ == "__main__":
    main()
