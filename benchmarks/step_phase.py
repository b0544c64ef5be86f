"""Which phase of a training step sets the peak RSS: the backward pass or the optimizer step.

For each variant, a fresh process trains 2 optimizer steps and reads ru_maxrss just before and just after every
optimizer step (torch.optim's global step hooks). A peak that grows across a step was set inside it: weights,
every gradient, both AdamW states and the step's temporaries are live there. Beside it, the planner's prediction
of each phase (`qtrain.plan.predict`: `terms` for the backward, `step_terms` for the step).

    python benchmarks/step_phase.py            # writes benchmarks/results/step_phase.{json,md}

Runs with jemalloc preloaded unless --allocator glibc.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_results  # noqa: E402

VARIANTS = [  # (shape from plan_heldout.SHAPES, or "default"; method; checkpointing; seq; micro-batch)
    ("llama-gqa (vocab 100k, untied)", "full", False, 512, 1),
    ("llama-wide-shallow (MHA, tied)", "full", False, 512, 1),
    ("gpt-neox (GELU MLP, untied)", "full", False, 512, 1),
    ("default", "full", True, 256, 4),
    ("default", "lora", True, 256, 4),
]


def worker(spec: list, out: Path) -> None:
    import resource

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    marks: list[tuple[str, int]] = []

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    register_optimizer_step_pre_hook(lambda *a, **k: marks.append(("before step", peak())))
    register_optimizer_step_post_hook(lambda *a, **k: marks.append(("after step", peak())))
    import plan_heldout
    from qtrain.plan import model_shape, predict
    from qtrain.recipe import load_recipe
    from qtrain.train import fit

    name, method, gc, seq, mb = spec
    with tempfile.TemporaryDirectory() as d:
        model = None if name == "default" else plan_heldout.build(plan_heldout.SHAPES[name], Path(d) / "m")
        recipe = load_recipe(None, [f"method={method}", f"gradient_checkpointing={gc}", f"seq_len={seq}",
                                    f"micro_batch_size={mb}", "grad_accum_steps=1", "max_steps=2", "save_every=0",
                                    "warmup_steps=1", "val_max_sequences=2"])
        pred = predict(model_shape(model), recipe, "cpu")
        s = fit(recipe, model=model, output=Path(d) / "run")
    out.write_text(json.dumps({"variant": spec, "peak_bytes": s["peak_memory_bytes"], "marks": marks,
                               "allocator": s.get("allocator"), "predicted_backward_bytes": sum(pred.terms.values()),
                               "predicted_step_bytes": pred.step_peak_bytes, "predicted_peak_bytes": pred.peak_bytes,
                               "step_terms": pred.step_terms}))


def render(r: dict) -> str:
    lines = ["# Which phase sets the peak: backward or the optimizer step", "",
             f"Machine: {r['machine'].get('cpu')} ({r['machine'].get('cores')} cores); git {r['git']}; allocator "
             f"{r['allocator']}. Reproduce: `{r['command']}`. Peak RSS (ru_maxrss) read just before and after each "
             "optimizer step of a 2-step run in a fresh process; predictions from `qtrain.plan.predict`.", "",
             "| shape | method | ckpt | seq x mb | peak before step 2 (GiB) | peak after step 2 (GiB) | set in | "
             "predicted backward (GiB) | predicted step (GiB) | predicted peak vs measured |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        name, method, gc, seq, mb = x["variant"]
        before, after = x["marks"][-2][1], x["marks"][-1][1]
        lines.append(f"| {name} | {method} | {'on' if gc else 'off'} | {seq} x {mb} | {before / 2**30:.3f} | "
                     f"{after / 2**30:.3f} | {'optimizer step' if after > before else 'backward'} | "
                     f"{x['predicted_backward_bytes'] / 2**30:.3f} | {x['predicted_step_bytes'] / 2**30:.3f} | "
                     f"{100 * (x['predicted_peak_bytes'] / x['peak_bytes'] - 1):+.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--allocator", choices=("jemalloc", "glibc"), default="jemalloc")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker), Path(args.out))
        return
    env = dict(os.environ)
    if args.allocator == "jemalloc":
        from qtrain.measure import find_jemalloc, jemalloc_preload_env

        lib = find_jemalloc()
        if lib is None:
            raise SystemExit("--allocator jemalloc: no libjemalloc.so.2 found; apt install libjemalloc2, or --allocator glibc")
        env.update(jemalloc_preload_env(lib, env))
    env["QTRAIN_ALLOCATOR"] = args.allocator  # fit must not re-execute itself under another allocator
    rows = []
    for spec in VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = Path(f.name)
        subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec), "--out", str(out)], check=True,
                       env=env, capture_output=True)
        rows.append(json.loads(out.read_text()))
        out.unlink()
        print(rows[-1]["variant"], rows[-1]["marks"][-2:], flush=True)
    command = "python benchmarks/step_phase.py" + (" --allocator glibc" if args.allocator == "glibc" else "")
    name = "step_phase" + ("_glibc" if args.allocator == "glibc" else "")
    result = header(name, command=command, allocator=args.allocator, rows=rows)
    write_results(name, result, render(result))
    print(render(result))


if __name__ == "__main__":
    main()
