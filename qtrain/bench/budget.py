"""What fits a budget: the planner's table across models, and `qtrain bench --budget`'s answer, ranked by
measured quality where a quality matrix ran and by the planner elsewhere."""

from __future__ import annotations

import math
from pathlib import Path

from qtrain.bench.matrix import BUDGET_MODELS, BUDGETS_GIB, load_rows

# ---------------------------------------------------------------------------------------------- budget matrix

def budget_table(models=BUDGET_MODELS, budgets=BUDGETS_GIB, device: str = "cuda", base=None) -> list[dict]:
    """What the planner picks for each model and budget (no training): the planner's answer as data."""
    from qtrain.plan import BudgetError, model_shape, plan_for
    from qtrain.recipe import Recipe

    base = base or Recipe(seq_len=2048, micro_batch_size=1, grad_accum_steps=8)
    out = []
    for m in models:
        shape = model_shape(m)
        for b in budgets:
            row = {"model": m, "params_b": round(shape.total_params() / 1e9, 2), "budget_gib": b}
            try:
                p = plan_for(m, f"{b}GB", device, base)
                c = p.chosen.recipe
                row.update(method=c.method, gradient_checkpointing=c.gradient_checkpointing, seq_len=c.seq_len,
                           micro_batch_size=c.micro_batch_size, optimizer=c.optimizer,
                           predicted_peak_bytes=p.chosen.prediction.peak_bytes,
                           predicted_tokens_per_second=round(p.chosen.prediction.tokens_per_second, 1))
            except BudgetError as exc:
                need = exc.needed_bytes
                row.update(method=None, needs=f"{math.ceil(need / 2**30 * 10) / 10:g}GB" if need else "?")
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- --budget answer

def measured_quality(rows: list[dict]) -> dict[str, dict]:
    """Method -> the best quality row of that method (by MBPP pass@1, then perplexity), for ranking a budget."""
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("status") != "ok" or not r.get("quality") or not r.get("steps"):
            continue
        key = (r["quality"]["pass@1"], -(r["quality"]["val_perplexity"] or float("inf")))
        cur = best.get(r["method"])
        if cur is None or key > (cur["quality"]["pass@1"], -(cur["quality"]["val_perplexity"] or float("inf"))):
            best[r["method"]] = r
    return best


def answer_budget(budget: str, model: str | None, device: str, results: list[Path], limit: int = 10) -> str:
    """The recipes that fit ``budget``. Where a quality matrix measured a method (MBPP pass@1 after equal
    wall-clock training, qtrain/quality.py), those come first, best measured quality first; the rest follow in the
    planner's order, marked as planned only. Memory and speed are measured where a bench row ran the same method /
    checkpointing / sequence length / micro-batch on this kind of device."""
    from qtrain.plan import format_bytes, plan_for
    from qtrain.recipe import Recipe

    plan = plan_for(model, budget, device, Recipe())  # as `qtrain plan` ranks: same FLOP/s, same allocator
    dev, budget_bytes = plan.device, plan.budget_bytes
    measured = []
    for d in results:
        if (Path(d) / "rows").is_dir():
            measured += [r for r in load_rows(Path(d)) if r.get("status") == "ok"]
    # a row counts for this question when it ran on this kind of device and the same model (None: the default)
    same_device = lambda m: (m.get("device", "cpu").split(":")[0] == dev.split(":")[0]  # noqa: E731
                             and m.get("model_ref") == model)
    quality = measured_quality([m for m in measured if same_device(m)])

    def match(c):
        r = c.recipe
        for m in measured:
            x = m.get("recipe")
            if x and (x["method"], x["gradient_checkpointing"], x["seq_len"], x["micro_batch_size"]) == \
                    (r.method, r.gradient_checkpointing, r.seq_len, r.micro_batch_size) and same_device(m):
                return m
        return None

    candidates = plan.candidates
    order = sorted(range(len(candidates)), key=lambda i: (
        candidates[i].recipe.method not in quality,
        -quality[candidates[i].recipe.method]["quality"]["pass@1"] if candidates[i].recipe.method in quality else 0,
        i))[:limit]
    lines = [f"recipes that fit {format_bytes(budget_bytes)} on {dev} for {plan.model}; ranked by measured quality "
             "(MBPP pass@1 after equal wall-clock training, a quality bench row of the same method) where it exists, "
             "then as the planner ranks (method, sequence length, speed); peak and tok/s measured where a bench row "
             "of the same shape ran on this device kind", "",
             f"{'#':>3}  {'method':7}{'ckpt':5}{'seq':>6}{'batch':>7}  {'peak':>10}  {'tok/s':>7}  {'quality':>22}  source"]
    for rank, i in enumerate(order, 1):
        c = candidates[i]
        r, m = c.recipe, match(c)
        peak = m["peak_memory_bytes"] if m else c.prediction.peak_bytes
        tps = m["tokens_per_second"] if m else c.prediction.tokens_per_second
        q = quality.get(r.method)
        qtext = (f"{q['quality']['pass@1']:.1%} MBPP ({q['name']})" if q else "planned only")
        src = f"measured ({m['name']}, predicted {format_bytes(c.prediction.peak_bytes)})" if m else "predicted"
        lines.append(f"{rank:>3}  {r.method:7}{'yes' if r.gradient_checkpointing else 'no':5}{r.seq_len:>6}"
                     f"{f'{r.micro_batch_size}x{r.grad_accum_steps}':>7}  {format_bytes(peak):>10}  {tps:>7.1f}  "
                     f"{qtext:>22}  {src}")
    pick = candidates[order[0]] if order else plan.chosen
    why = (f"the best measured quality that fits ({quality[pick.recipe.method]['name']})"
           if pick.recipe.method in quality else plan.reason)
    lines += ["", f"pick: #1 ({why}); `qtrain fit --budget {budget or format_bytes(budget_bytes)}` trains the planner's "
              f"pick ({plan.chosen.recipe.method})" + (f"; for this one pass method={pick.recipe.method} and its shape"
                                                       if pick is not plan.chosen else "")]
    return "\n".join(lines)
