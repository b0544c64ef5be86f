"""The quality matrix: what each recipe buys at equal wall-clock, beside what it costs.

Rows: the untrained model (the reference), then full fine-tuning, LoRA, QLoRA and BitNet, each on the default code
corpus and, where given, on self-training data (``qtrain rejection-sample``). Every trained row gets the same
wall-clock time on the same data; every row is scored on the same held-out sets: MBPP test pass@1 (greedy, a fixed
subset or all 500) with a Wilson interval and a paired interval against the untrained model, and perplexity on
held-out code (the standard library's validation split). Memory, throughput and energy come from the same runs
(qtrain/bench/matrix.py runs them, one process per row).
"""

from __future__ import annotations

from pathlib import Path

QUALITY_METHODS = (("full", "cpu-full.yaml"), ("lora", "cpu-lora.yaml"), ("qlora", "cpu-qlora.yaml"),
                   ("bitnet", "cpu-bitnet.yaml"))


def quality_rows(time_s: float, sft_data: str | None = None, methods=QUALITY_METHODS) -> list[dict]:
    """The matrix's rows: base, then each method on code and (with ``sft_data``) on the self-training data."""
    if not time_s > 0:
        raise ValueError(f"the quality matrix needs a positive training time per row, got {time_s!r}")
    rows = [{"name": "base", "recipe": None, "group": "base", "overrides": {}, "no_train": True}]
    datasets = [("code", None)] + ([("selftrain", str(Path(sft_data).resolve()))] if sft_data else [])
    for method, recipe in methods:
        for label, data in datasets:
            # a short run still warms up and checkpoints only at its end
            rows.append({"name": f"{method}+{label}", "recipe": recipe, "group": method, "data": data,
                         "time_s": float(time_s), "overrides": {"save_every": 0, "warmup_steps": 2}})
    return rows


def paired_against_base(rows: list[dict]) -> dict[str, dict]:
    """Row name -> paired comparison of its per-problem MBPP verdicts against the base row's (qtrain/stats.py)."""
    from qtrain.stats import compare_paired

    base = next((r for r in rows if r.get("name") == "base" and r.get("quality")), None)
    out = {}
    if base is None:
        return out
    for r in rows:
        if r is base or not r.get("quality"):
            continue
        result = compare_paired(base["quality"]["per_problem"], r["quality"]["per_problem"])
        out[r["name"]] = {**result.to_dict(), "text": result.describe()}
    return out


def render_quality(rows: list[dict], output: Path, command: str) -> str:
    """Markdown table (OUTPUT/report.md) and the quality-vs-memory and quality-vs-energy plots."""
    from qtrain.io import atomic_write_json, atomic_write_text

    ok = [r for r in rows if r.get("status") == "ok" and r.get("quality")]
    failed = [r for r in rows if r.get("status") != "ok"]
    paired = paired_against_base(ok)
    trained = [r for r in ok if r.get("steps")]
    m = trained[0]["machine"] if trained else {}
    q0 = ok[0]["quality"] if ok else {}
    lines = ["# What a recipe buys: quality at equal wall-clock", "",
             f"Machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores), torch {m.get('torch', '?')}; git "
             f"{ok[0].get('git', '?') if ok else '?'}. Reproduce: `{command}`.", "",
             f"Every trained row had the same wall-clock budget ({_minutes(rows)}) on the same data; scored on MBPP test "
             f"(the first {q0.get('problems', '?')} problems of task ids 11-510, greedy, chat prompting) and on "
             "held-out code perplexity (the standard library's validation split, 2,048 positions). Intervals: "
             "Wilson 95% for pass@1; paired bootstrap 95% for the difference against the untrained model.", "",
             "| row | method | data | steps | tokens | peak (GiB) | energy (Wh) | held-out ppl | MBPP pass@1 (95% CI) | "
             "vs base (paired 95% CI) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        q, p = r["quality"], paired.get(r["name"], {})
        e = (r.get("energy") or {}).get("kwh")
        diff = (f"{p['difference']:+.2%} ({p['ci_low']:+.2%} to {p['ci_high']:+.2%})" if "difference" in p
                else p.get("error", "-"))
        cells = [r["name"], r["method"], "-" if r["name"] == "base" else r["name"].split("+", 1)[-1],
                 r.get("steps", 0), r.get("train_tokens", 0),
                 f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-",
                 f"{e * 1000:.2f}" if e else "-", f"{q['val_perplexity']:.3f}" if q.get("val_perplexity") else "-",
                 f"{q['pass@1']:.2%} ({q['wilson95'][0]:.1%}-{q['wilson95'][1]:.1%})", diff]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for r in failed:
        lines.append(f"| {r['name']} | FAILED: {str(r.get('error', ''))[:150]} | | | | | | | | |")
    pngs = plot_quality(ok, output)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    atomic_write_text(output / "report.md", text)
    atomic_write_text(output / "summary.md", render_summary(ok, command))
    atomic_write_json(output / "paired.json", paired)
    return text


def render_summary(rows: list[dict], command: str) -> str:
    """The few numbers a user picks a recipe by, one line per trained row, with the intervals (for the README)."""
    trained = [r for r in rows if r.get("steps") and r.get("quality")]
    base = next((r for r in rows if r["name"] == "base" and r.get("quality")), None)
    paired = paired_against_base(rows)
    problems = (base or (trained[0] if trained else {})).get("quality", {}).get("problems", "?")
    lines = [f"# Recipes on the default model at equal wall-clock ({_minutes(rows)} each; `{command}`)", "",
             f"MBPP pass@1 on {problems} test problems, greedy, with its Wilson 95% interval; the difference against the "
             "untrained model with its paired bootstrap 95% interval.", "",
             "| recipe | data | steps | peak memory (GiB) | tokens/s | held-out perplexity | MBPP pass@1 (95% CI) | "
             "vs untrained (paired 95% CI) |", "|---|---|---|---|---|---|---|---|"]

    def score(q: dict) -> str:
        return f"{q['pass@1']:.1%} ({q['wilson95'][0]:.1%}-{q['wilson95'][1]:.1%})"

    if base:
        q = base["quality"]
        lines.append(f"| untrained | - | 0 | - | - | {q['val_perplexity']:.2f} | {score(q)} | - |")
    for r in trained:
        q, p = r["quality"], paired.get(r["name"], {})
        diff = (f"{p['difference']:+.1%} ({p['ci_low']:+.1%} to {p['ci_high']:+.1%})" if "difference" in p
                else p.get("error", "-"))
        lines.append(f"| {r['method']} | {r['name'].split('+', 1)[-1]} | {r['steps']} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} | {r['tokens_per_second']:.0f} | {q['val_perplexity']:.2f} | "
                     f"{score(q)} | {diff} |")
    return "\n".join(lines) + "\n"


def command_of(rows: list[dict]) -> str:
    """The `qtrain bench` command that made these quality rows (for a report redrawn from them)."""
    times = sorted({r["time_s"] for r in rows if r.get("time_s")})
    limit = next((r["quality"]["problems"] for r in rows if r.get("quality")), None)
    selftrain = any(r["name"].endswith("+selftrain") for r in rows)
    return ("qtrain bench --matrix quality" + (f" --time {times[0] / 60:g}m" if len(times) == 1 else "")
            + " --eval-data MBPP.jsonl" + (f" --eval-limit {limit}" if limit and limit != 500 else "")
            + (" --sft-data SELFTRAIN.jsonl" if selftrain else ""))


def _minutes(rows: list[dict]) -> str:
    times = sorted({r["time_s"] for r in rows if r.get("time_s")})
    return ", ".join(f"{t / 60:g} min" for t in times) or "?"


def plot_quality(rows: list[dict], output: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qtrain.bench.report import _label, _save

    trained = [r for r in rows if r.get("peak_memory_bytes")]
    base = next((r for r in rows if r["name"] == "base"), None)
    made = []
    for key, xlabel, fname, xval in (
            ("memory", "measured peak memory (GiB)", "quality_vs_memory.png", lambda r: r["peak_memory_bytes"] / 2**30),
            ("energy", "energy of the training run (Wh, CodeCarbon)", "quality_vs_energy.png",
             lambda r: (r.get("energy") or {}).get("kwh", 0) * 1000)):
        pts = [r for r in trained if key != "energy" or r.get("energy")]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for r in pts:
            q = r["quality"]
            y = q["pass@1"] * 100
            ax.errorbar(xval(r), y, yerr=[[y - q["wilson95"][0] * 100], [q["wilson95"][1] * 100 - y]], fmt="o",
                        capsize=3, color="#4c72b0" if "selftrain" in r["name"] else "#dd8452")
        if base:
            ax.axhline(base["quality"]["pass@1"] * 100, color="grey", ls="--", lw=0.8)
            ax.text(ax.get_xlim()[0], base["quality"]["pass@1"] * 100, " untrained model", fontsize=7, color="grey",
                    va="bottom")
        _label(ax, [(r["name"], xval(r), r["quality"]["pass@1"] * 100) for r in pts])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MBPP test pass@1 (%), Wilson 95% interval")
        ax.set_title(f"Quality vs {key} (orange: code corpus, blue: self-training data)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        made.append(_save(fig, output / fname))
    return made
