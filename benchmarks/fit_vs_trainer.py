"""qtrain's loop vs the baseline a user would write by default (transformers Trainer + peft), side by side.

Each configuration runs in its own subprocess (clean peak RSS), on the embedded default model and the
default corpus (the same cleaned training documents for both), seq 512, effective batch 8 sequences.
The baseline tokenizes each file truncated to 512 tokens and pads with DataCollatorForLanguageModeling;
only real (non-padding) tokens are counted for it. Writes benchmarks/results/fit_vs_trainer.{json,md}.

    python benchmarks/fit_vs_trainer.py --steps 6 --repeats 3

The configurations run round-robin ``--repeats`` times (the machine is shared and noisy) and each row reports
the median. ``trainer-*-8x1`` is what a user gets by default: Trainer's default per-device batch is 8, so the
same effective batch of 8 sequences needs no accumulation, and each batch is padded to its longest file.
``trainer-*-1x8`` (one file per micro-batch, so no padding) is a stronger baseline, shown beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_sha  # noqa: E402 - benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# "-bf16": bf16 autocast over fp32 master weights (frozen LoRA bases held in bf16), for qtrain and for Trainer
CONFIGS = ["qtrain-lora", "trainer-lora-1x8", "qtrain-lora-bf16", "trainer-lora-1x8-bf16", "qtrain-qlora",
           "qtrain-full", "trainer-full-1x8", "qtrain-full-bf16", "trainer-full-1x8-bf16"]


def worker(name: str, steps: int, out: Path) -> None:
    import torch

    from qtrain.measure import machine_info, matmul_flops, mfu, peak_flops, peak_rss_bytes, train_flops_per_token
    from qtrain.recipe import load_recipe

    method = "full" if "full" in name else "qlora" if "qlora" in name else "lora"
    bf16 = name.endswith("-bf16")
    recipe = load_recipe(ROOT / "recipes" / f"cpu-{method}.yaml", [f"max_steps={steps}", "save_every=0",
                                                                   "warmup_steps=1", "val_max_sequences=4",
                                                                   "gradient_checkpointing=false",
                                                                   f"dtype={'bfloat16' if bf16 else 'float32'}"])
    if name.startswith("qtrain"):
        from qtrain.train import fit

        with tempfile.TemporaryDirectory() as d:
            s = fit(recipe, output=Path(d) / "run")
        result = {"tokens_per_second": s["tokens_per_second"], "mfu": s["mfu"], "train_tokens": s["train_tokens"],
                  "train_seconds": s["train_seconds"], "padding_fraction": 0.0}
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        from qtrain.data.corpus import load_corpus
        from qtrain.models import load_model, load_tokenizer, resolve_model_source

        mb, accum = (1, 8) if "-1x8" in name else (8, 1)
        src = resolve_model_source(None)
        tok = load_tokenizer(src)
        train_docs, _, _ = load_corpus(None)
        enc = tok([d.text for d in train_docs], truncation=True, max_length=recipe.seq_len)
        dataset = [{"input_ids": ids} for ids in enc["input_ids"]]
        # the strongest bf16 baseline: a frozen LoRA base held in bf16 (peft keeps the adapters in fp32) and
        # Trainer's bf16 autocast; full fine-tuning keeps fp32 weights under autocast, as qtrain does
        model = load_model(src, dtype=torch.bfloat16 if bf16 and method == "lora" else torch.float32)
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                                                     lora_dropout=recipe.lora_dropout, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        base = DataCollatorForLanguageModeling(tok, mlm=False)
        counted = {"real": 0, "padded": 0}

        def collate(features):
            batch = base(features)
            counted["real"] += int(batch["attention_mask"].sum())
            counted["padded"] += int(batch["attention_mask"].numel())
            return batch

        with tempfile.TemporaryDirectory() as d:
            args = TrainingArguments(output_dir=d, per_device_train_batch_size=mb, gradient_accumulation_steps=accum,
                                     max_steps=steps, learning_rate=recipe.learning_rate, warmup_steps=1,
                                     lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to=[],
                                     dataloader_num_workers=0, seed=0, use_cpu=True, bf16=bf16)
            trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
            out_metrics = trainer.train().metrics
        frozen, trainable = matmul_flops(model)
        cfg = model.config
        fpt = train_flops_per_token(frozen, trainable, cfg.num_hidden_layers, cfg.hidden_size, recipe.seq_len)
        ceiling, _ = peak_flops(torch.device("cpu"), torch.bfloat16 if bf16 else torch.float32)
        tps = counted["real"] / out_metrics["train_runtime"]
        result = {"tokens_per_second": round(tps, 2), "mfu": round(mfu(tps, fpt, ceiling), 4),
                  "train_tokens": counted["real"], "train_seconds": out_metrics["train_runtime"],
                  "padding_fraction": round(1 - counted["real"] / max(1, counted["padded"]), 4)}
    result.update(config=name, method=method, steps=steps, peak_rss_bytes=peak_rss_bytes(), machine=machine_info())
    out.write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="fit_vs_trainer",
                    help="results/NAME.{json,md}: another name keeps a run on another machine beside the first")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, Path(args.out))
        return
    names = args.configs.split(",")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for rep in range(args.repeats):
        for name in names:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = Path(f.name)
            t = time.time()
            proc = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                                   "--out", str(out)], capture_output=True, text=True)
            if proc.returncode != 0 or not out.read_text():
                errors[name] = proc.stderr[-2000:]
                print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            else:
                r = json.loads(out.read_text())
                runs[name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name}: {r['tokens_per_second']} tok/s, MFU {r['mfu']}, "
                      f"peak {r['peak_rss_bytes'] / 2**30:.2f} GiB ({time.time() - t:.0f} s)", file=sys.stderr)
            out.unlink(missing_ok=True)
    rows = []
    for name in names:
        if not runs[name]:
            rows.append({"config": name, "error": errors.get(name, "no run")})
            continue
        row = dict(runs[name][0])
        for key in ("tokens_per_second", "mfu", "peak_rss_bytes"):
            row[key] = statistics.median(r[key] for r in runs[name])
        row["tokens_per_second_runs"] = [r["tokens_per_second"] for r in runs[name]]
        rows.append(row)
    git = git_sha()
    by = {r["config"]: r for r in rows if "error" not in r}
    ratios = {}
    for method in ("lora", "full"):
        for sfx in ("", "-bf16"):  # same precision, side by side
            q, t = by.get(f"qtrain-{method}{sfx}"), by.get(f"trainer-{method}-1x8{sfx}")
            if q and t:
                ratios[f"qtrain-{method}{sfx} / trainer-{method}-1x8{sfx}"] = round(
                    q["tokens_per_second"] / t["tokens_per_second"], 3)
        # the measure: qtrain's best configuration against the best Trainer configuration
        qs = [r for r in by.values() if r["config"].startswith(f"qtrain-{method}")]
        ts = [r for r in by.values() if r["config"].startswith(f"trainer-{method}")]
        if qs and ts:
            qb, tb = (max(x, key=lambda r: r["tokens_per_second"]) for x in (qs, ts))
            ratios[f"best qtrain ({qb['config']}) / best Trainer ({tb['config']})"] = round(
                qb["tokens_per_second"] / tb["tokens_per_second"], 3)
    if by.get("qtrain-qlora") and by.get("qtrain-lora"):
        ratios["qtrain-qlora / qtrain-lora"] = round(by["qtrain-qlora"]["tokens_per_second"]
                                                     / by["qtrain-lora"]["tokens_per_second"], 3)
    result = {"benchmark": "fit_vs_trainer", "git": git, "steps": args.steps, "seq_len": 512,
              "effective_batch_sequences": 8, "rows": rows, "ratios": ratios,
              "repeats": args.repeats,
              "command": f"python benchmarks/fit_vs_trainer.py --steps {args.steps} --repeats {args.repeats}"
                         + (f" --configs {args.configs}" if args.configs != ",".join(CONFIGS) else "")
                         + (f" --name {args.name}" if args.name != "fit_vs_trainer" else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from qtrain.io import atomic_write_json, atomic_write_text

    atomic_write_json(RESULTS / f"{args.name}.json", result)
    machine = next((r["machine"] for r in rows if "machine" in r), {})
    lines = [f"# qtrain loop vs transformers Trainer + peft ({args.steps} optimizer steps, seq 512, effective batch 8)",
             "", f"Machine: {machine.get('cpu')} ({machine.get('cores')} cores, {machine.get('torch_threads')} torch threads), "
             f"torch {machine.get('torch')}; git {git}. Reproduce: `{result['command']}`.", "",
             f"Median of {args.repeats} round-robin runs per row (the runs' tokens/s in the last column). "
             "`trainer-*-8x1` is Trainer's default (per-device batch 8, padded); `1x8` avoids padding. `-bf16`: bf16 "
             "autocast over fp32 master weights (Trainer's `bf16=True`; frozen LoRA bases loaded in bf16 for both). "
             "MFU is against the measured matmul ceiling of the compute dtype (fp32 or bf16).", "",
             "| config | real tokens/s | MFU | padding | peak RSS (GiB) | runs (tokens/s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed | | | | |")
        else:
            lines.append(f"| {r['config']} | {r['tokens_per_second']:.1f} | {r['mfu']:.1%} | {r['padding_fraction']:.1%} | "
                         f"{r['peak_rss_bytes'] / 2**30:.2f} | {', '.join(f'{v:.1f}' for v in r['tokens_per_second_runs'])} |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    atomic_write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
