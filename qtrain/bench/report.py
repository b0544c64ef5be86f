"""Bench reports: Markdown tables and PNG plots of a matrix's rows, and the planner's budget table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from qtrain.bench.matrix import TRADEOFF_RANGES

# ---------------------------------------------------------------------------------------------- reports

def _gib(x) -> str:
    return f"{x / 2**30:.2f}" if x else "-"


def render_report(rows: list[dict], output: Path, title: str, command: str) -> str:
    """Markdown tables (written to OUTPUT/report.md) and PNG plots beside it."""
    from qtrain.io import atomic_write_text

    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    m = ok[0]["machine"] if ok else {}
    lines = [f"# {title}", "", f"Machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores{', ' + m['gpu'] if m.get('gpu') else ''}), "
             f"torch {m.get('torch', '?')}; git {ok[0]['git'] if ok else '?'}; {ok[0]['steps'] if ok else '?'} steps per row. "
             f"Reproduce: `{command}`.", ""]
    modes = sorted({r["energy"]["label"] for r in ok if r.get("energy")})
    if modes:
        lines += [f"Energy: CodeCarbon offline tracker around each whole run (load, validation, training), "
                  f"process mode; CPU figure: {'; '.join(modes)}. CO2 for {ok[0]['energy']['country']}'s grid mix.", ""]
    lines += ["| row | method | ckpt | seq | batch | peak (GiB) | predicted (GiB) | tok/s | MFU | val loss | energy (Wh) | "
              "Wh per M tokens | CO2 (g) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        rc, e = r["recipe"], r.get("energy") or {}
        wh = e.get("kwh", 0) * 1000
        lines.append(f"| {r['name']} | {r['method']} | {'yes' if rc['gradient_checkpointing'] else 'no'} | {rc['seq_len']} | "
                     f"{rc['micro_batch_size']}x{rc['grad_accum_steps']} | {_gib(r['peak_memory_bytes'])} | "
                     f"{_gib(r.get('predicted_peak_bytes'))} | {r['tokens_per_second']:.1f} | {r['mfu']:.1%} | "
                     f"{r['val_loss_after']:.3f} | {wh:.2f} | {wh / (r['train_tokens'] / 1e6):.1f} | "
                     f"{e.get('co2_kg', 0) * 1000:.2f} |")
    for r in failed:
        lines.append(f"| {r['name']} | FAILED: {r.get('error', '')[:150]} | | | | | | | | | | | |")
    exports = [r for r in ok if r.get("export")]
    if exports:
        lines += ["", "| row | export | size (MB) | decode tok/s |", "|---|---|---|---|"]
        for r in exports:
            x = r["export"]
            lines.append(f"| {r['name']} | {x.get('format', 'error: ' + x.get('error', ''))} | "
                         f"{x.get('bytes', 0) / 1e6:.1f} | {x.get('decode_tokens_per_second', '-')} |")
    notes = []
    if len({r["recipe"]["seq_len"] for r in ok}) > 1:
        notes.append("Validation loss is measured on sequences of each row's own length (more context, lower loss): "
                     "rows that differ in sequence length are not comparable on it.")
    same_work: dict[str, list[float]] = {}  # rows that differ only in learning rate do the same computation
    for r in ok:
        key = json.dumps({k: v for k, v in r["recipe"].items() if k not in ("learning_rate", "seed", "name")}, sort_keys=True)
        same_work.setdefault(key, []).append(r["tokens_per_second"])
    spread = max(same_work.values(), key=len, default=[])
    if len(spread) >= 3:
        notes.append(f"Run-to-run noise: {len(spread)} rows that differ only in learning rate (the same computation) "
                     f"trained at {min(spread):.1f}-{max(spread):.1f} tokens/s ({100 * (max(spread) / min(spread) - 1):.0f}% "
                     "apart); smaller throughput differences than that are not findings.")
    if notes:
        lines += [""] + notes
    san = [r for r in ok if (r.get("energy") or {}).get("sanity", {}).get("ratio")]
    if san:
        ratios = [r["energy"]["sanity"]["ratio"] for r in san]
        e0 = san[0]["energy"]
        lines += ["", f"Sanity check of the estimate: CPU energy recomputed as this process's CPU seconds x "
                  f"{e0['sanity']['tdp_per_core_w']:.1f} W (CodeCarbon's TDP {e0['tdp_w']} W / {e0['cpu_count']} cores) "
                  f"agrees with CodeCarbon's CPU energy within a ratio of {min(ratios):.2f}-{max(ratios):.2f} over "
                  f"{len(san)} rows; RAM energy is CodeCarbon's constant {e0['ram_power_w']:.0f} W x duration."]
    pngs = plot_rows(ok, output)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    text = "\n".join(lines) + "\n"
    atomic_write_text(output / "report.md", text)
    if ok:
        atomic_write_text(output / "summary.md", render_cost_summary(ok, title, command))
    return text


def render_cost_summary(rows: list[dict], title: str, command: str) -> str:
    """What each row costs, in the few numbers a user picks a recipe by (for the README)."""
    m = rows[0].get("machine") or {}
    lines = [f"# {title}: what each recipe costs on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), default model, "
             f"git {rows[0].get('git', '?')} (`{command}`)", "",
             "| recipe | peak memory (GiB) | tokens/s | energy (Wh per million tokens) |", "|---|---|---|---|"]
    for r in rows:
        e = r.get("energy") or {}
        wh = f"{e['kwh'] * 1000 / (r['train_tokens'] / 1e6):.0f}" if e.get("kwh") else "-"
        lines.append(f"| {r['name']} | {_gib(r['peak_memory_bytes'])} | {r['tokens_per_second']:.0f} | {wh} |")
    return "\n".join(lines) + "\n"


def _label(ax, points: list[tuple[str, float, float]]) -> None:
    """Name each point, moving a label down a line where it would overprint one already placed."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the limits, so data -> pixel is final
    placed: list[tuple[float, float]] = []
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = ax.transData.transform((x, y))
        dy = 3.0
        while any(abs(px - qx) < 70 and abs(py + dy - qy) < 9 for qx, qy in placed):
            dy -= 9.0
        placed.append((px, py + dy))
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, dy), textcoords="offset points")


def plot_rows(rows: list[dict], output: Path) -> list[Path]:
    if not rows:
        return []
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # 1. memory vs throughput, with budget lines
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        ax.scatter(r["tokens_per_second"], r["peak_memory_bytes"] / 2**30, s=40)
    top = max(r["peak_memory_bytes"] for r in rows) / 2**30
    ax.set_xlim(left=0, right=max(r["tokens_per_second"] for r in rows) * 1.25)
    ax.set_ylim(bottom=0, top=max(top * 1.15, min(b for b in (2, 4, 8, 16, 24, 48, 80) if b > top) * 1.05))
    for b in (2, 4, 8, 16, 24, 48, 80):
        if b <= ax.get_ylim()[1]:
            ax.axhline(b, color="grey", lw=0.8, ls="--")
            ax.text(ax.get_xlim()[0], b, f" {b} GB budget", va="bottom", fontsize=7, color="grey")
    _label(ax, [(r["name"], r["tokens_per_second"], r["peak_memory_bytes"] / 2**30) for r in rows])
    ax.set_xlabel("training throughput (tokens/s)")
    ax.set_ylabel("measured peak memory (GiB)")
    ax.set_title("Peak memory vs throughput per recipe")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    made.append(_save(fig, output / "memory_vs_throughput.png"))
    energy = [r for r in rows if r.get("energy")]
    if energy:
        # 2. energy per million training tokens
        fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(energy) + 1.5))
        vals = [r["energy"]["kwh"] * 1000 / (r["train_tokens"] / 1e6) for r in energy]
        ax.barh([r["name"] for r in energy], vals, color="#4c72b0")
        ax.invert_yaxis()
        est = "" if energy[0]["energy"]["measured"] else " (CodeCarbon estimate: TDP x CPU load)"
        ax.set_xlabel(f"energy per million training tokens (Wh){est}")
        ax.set_title("Energy per million training tokens (whole run incl. load and validation)")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        made.append(_save(fig, output / "energy_per_mtok.png"))
        # 3. validation loss vs energy
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for r in energy:
            ax.scatter(r["energy"]["kwh"] * 1000, r["val_loss_after"], s=40)
        losses = [r["val_loss_after"] for r in energy]
        if min(losses) > 0 and max(losses) / min(losses) > 3:
            ax.set_yscale("log")  # one diverged recipe would flatten the rest
            from matplotlib.ticker import FormatStrFormatter

            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        _label(ax, [(r["name"], r["energy"]["kwh"] * 1000, r["val_loss_after"]) for r in energy])
        ax.set_xlabel(f"energy of the run (Wh){est}")
        ax.set_ylabel("validation loss after the run (nats/token)" + (", log scale" if ax.get_yscale() == "log" else ""))
        ax.set_title("Validation loss vs energy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        made.append(_save(fig, output / "val_loss_vs_energy.png"))
    # 4. trade-off curves, one panel per varied variable (tradeoff matrix)
    base = next((r for r in rows if r["name"] == "base"), None)
    groups = [g for g in TRADEOFF_RANGES if any(r["group"] == g for r in rows)]
    if base and groups:
        fig, axes = plt.subplots(3, len(groups), figsize=(3.2 * len(groups), 8), squeeze=False)
        for j, g in enumerate(groups):
            pts = [r for r in rows if r["group"] == g] + [base]
            numeric = all(isinstance(v, (int, float)) for v in TRADEOFF_RANGES[g])
            pts.sort(key=lambda r: r["recipe"][g] if numeric else TRADEOFF_RANGES[g].index(r["recipe"][g]))
            xs = [str(r["recipe"][g]) for r in pts]
            for i, (key, label) in enumerate((("val_loss_after", "val loss (nats/token)"),
                                              ("tokens_per_second", "tokens/s"),
                                              ("peak_memory_bytes", "peak memory (GiB)"))):
                ys = [r[key] / 2**30 if key == "peak_memory_bytes" else r[key] for r in pts]
                ax = axes[i][j]
                ax.plot(xs, ys, marker="o")
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(label)
                if i == 2:
                    ax.set_xlabel(g)
                ax.tick_params(axis="x", labelsize=7, rotation=30)
            axes[0][j].set_title(f"varying {g}", fontsize=9)
        fig.suptitle("Trade-offs from the study's initial values (LoRA r64, batch 2, seq 1024, lr 5e-5, all linear)",
                     fontsize=9)
        fig.tight_layout()
        made.append(_save(fig, output / "tradeoff_curves.png"))
    return made


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def render_budget(rows: list[dict], output: Path, command: str) -> str:
    from qtrain.io import atomic_write_json, atomic_write_text
    from qtrain.plan import format_bytes

    budgets = sorted({r["budget_gib"] for r in rows})
    lines = ["# What fits: the planner's pick per model and GPU memory (CUDA, no training)", "",
             f"Predicted peaks (qtrain plan, seq_len target 2048, effective batch 8, 10% safety margin). "
             f"Reproduce: `{command}`. Planner accuracy against published tables: see plan_anchors.", "",
             "| model | params (B) | " + " | ".join(f"{b} GB" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for b in budgets:
            r = next(x for x in rows if x["model"] == m and x["budget_gib"] == b)
            if r["method"] is None:
                cells.append(f"nothing (needs {r['needs']})")
            else:
                cells.append(f"{r['method']}{' +ckpt' if r['gradient_checkpointing'] else ''} seq {r['seq_len']} "
                             f"x{r['micro_batch_size']}: {format_bytes(r['predicted_peak_bytes'])}")
        size = next(x["params_b"] for x in rows if x["model"] == m)
        lines.append(f"| {m} | {size} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(output / "budget.json", rows)
    atomic_write_text(output / "report.md", text)
    return text
