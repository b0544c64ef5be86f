"""``qtrain bench``: run a matrix of recipes, one subprocess per row, and turn the results into tables and plots.

A row is a recipe (a shipped YAML plus ``key=value`` overrides) trained for a few steps in its own process (clean
memory figures), with CodeCarbon's offline tracker around the whole run. Each finished row is one JSON file in
``OUTPUT/rows/`` (git sha, package versions, machine, recipe, figures); a row that failed is kept with its error.
Running the same matrix again into the same directory skips the rows that finished and retries the rest.

Matrices: ``methods`` (full / LoRA / QLoRA / BitNet x gradient checkpointing), ``tradeoff`` (a full-vs-LoRA trade-off study's variables: LoRA
rank, batch size, sequence length, learning rate and target modules, one varied at a time from its initial values),
``budget`` (what the planner picks in 4 / 8 / 16 / 24 GB for a list of models on CUDA: no training), or a YAML file
``{rows: [{name, recipe, overrides: {key: value}}]}``.

Energy: CodeCarbon measures with RAPL where the kernel exposes it; otherwise it *estimates* CPU power from the
CPU's TDP (scaled by this process's CPU load) and RAM power from a constant. The mode is recorded per row and the
report labels estimates; a sanity check recomputes the CPU energy as CPU seconds x (TDP / cores).

Modules: ``matrix`` (the matrices and the row runner), ``energy`` (CodeCarbon), ``report`` (tables and plots),
``budget`` (what fits a budget).
"""

from qtrain.bench.budget import answer_budget, budget_table, measured_quality
from qtrain.bench.matrix import (BUDGET_MODELS, BUDGETS_GIB, MATRICES, TRADEOFF_RANGES, BenchError, load_rows,
                                 matrix_rows, row_recipe, run_matrix, run_row)
from qtrain.bench.report import render_budget, render_report

__all__ = ["BUDGET_MODELS", "BUDGETS_GIB", "MATRICES", "TRADEOFF_RANGES", "BenchError", "answer_budget", "budget_table",
           "load_rows", "matrix_rows", "measured_quality", "render_budget", "render_report", "row_recipe", "run_matrix",
           "run_row"]
