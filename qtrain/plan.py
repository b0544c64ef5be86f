"""The memory model: model config + recipe + device -> predicted peak bytes, as a sum of named terms.

Every term is a formula of the config numbers (qtrain/shapes.py), never of loaded weights, so a 7B
config plans in milliseconds. Activation terms come from a census of the tensors autograd saves in a
Hugging Face Llama decoder layer (torch.autograd.graph.saved_tensors_hooks, parameters excluded, sdpa
attention), measured for six shapes and solved exactly for the coefficients below; see
tests/unit/test_plan.py, which re-runs that census on random shapes and checks the formula against it.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

from qtrain.flops import forward_flops_per_token, recompute_flops_per_token, train_flops_per_token
from qtrain.recipe import Recipe
from qtrain.shapes import ModelShape
from qtrain.errors import QtrainError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bitsandbytes NF4 with double quantisation: 4 bits per weight, one int8 absmax per 64-weight block,
# and one fp32 scale per 256 absmax values (Dettmers et al. 2023, QLoRA sec. 3).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# qtrain/loss.py's chunk sizes (repeated here so that planning imports no torch; tests/unit/test_plan.py checks them)
FUSED_CE_CHUNK_ROWS = 256
DISTILL_CHUNK_ROWS = 128
# MFU assumed when throughput must be predicted before measuring: LoRA and full fine-tuning measured
# 0.47-0.68 on a 2-core CPU (benchmarks/results/fit_vs_trainer.md); the planner and fit --time use it.
ASSUMED_MFU = 0.5

# Runtime overhead, calibrated per device kind. CPU: RSS of a Python process that has imported torch,
# transformers, peft and accelerate and built the model objects, minus the weights (measured on this
# project's machine with benchmarks/memory_calibration.py). CUDA: the context (kernels, cuBLAS workspace)
# as commonly measured on consumer cards, plus allocator fragmentation as a fraction of the rest.
# CPU: 620 MiB is what the tiny-model rows of memory_calibration leave above their terms (590-640 MiB, where the
# terms are small); the 10% fragmentation is the least-squares share of the rest on both models
# (benchmarks/results/memory_calibration.json).
RUNTIME_BYTES = {"cpu": 620 * 2**20, "cuda": 500 * 2**20}
FRAGMENTATION = {"cpu": 0.10, "cuda": 0.10}
# glibc's heap keeps freed activation memory in RSS during an adapter (LoRA/QLoRA) step on a CPU: peak RSS
# exceeded live memory by 0.72x and 0.77x the activation term on the default model (1x512 and 4x256, measured
# here with and without a fixed mmap threshold; see measure.bound_heap_retention). Full fine-tuning showed no
# such excess while its long-lived gradient and optimizer buffers can fill the holes; beyond them it retains
# too (see predict). Not applied when the threshold is fixed.
# With checkpointing the holes are relatively larger: 0.83-0.95x of the activations a non-checkpointed step
# would have made, in three of the four checkpointed adapter variants (the fourth, LoRA 1x512, retained 0.31x).
# Full fine-tuning at one micro-batch per step without checkpointing (see predict): 0.2 x the activations of
# gradients besides the LM head's were live at the peak, fitted on the default model at 1x512, 4x256 and 4x512
# (measured 3.30-3.38, 4.21 and 5.84-5.87 GiB; counting every gradient as live plus retention would predict
# 3.64, 4.37 and 6.27, 6-10% too high).
FULL_GRADIENT_OVERLAP = {"glibc": 0.2, "jemalloc": 0.0}
# With jemalloc (qtrain fit's allocator when the system has it, see measure.jemalloc_exec_env, one arena) freed
# memory is reused: no retention term, and the gradients of full fine-tuning land in freed activation memory. Its
# runtime baseline, 517 MiB, is fitted on the 24 variants of benchmarks/results/memory_calibration_jemalloc.json
# (`python benchmarks/memory_calibration.py --allocator jemalloc --fit-runtime`): the smallest with which no
# variant is under-predicted by more than 3% against its highest run (484 MiB would centre the median variant;
# the checkpointed adapter variants spread -5% to +6% around it). x1.1 for fragmentation, as with glibc; the
# held-out shapes of benchmarks/plan_heldout.py are the check, not part of the fit. Loading: the checkpointed
# adapter rows, whose whole peak was 1.32-1.44 GiB, bound it to at most ~1.55 copies of the weights beside the
# runtime; 1.5 is used.
HOST_HEAP = {"jemalloc": (517 * 2**20, 0.10)}  # heap -> (runtime bytes, fragmentation share)
LOAD_WEIGHT_COPIES = {"glibc": 2, "glibc-bounded": 2, "jemalloc": 1.5}
ALLOCATOR_RETENTION = 0.75
ALLOCATOR_RETENTION_CHECKPOINTED = 0.90
# Heaps whose freed blocks are reused for the next allocations of similar size, so the fused loss's logits chunks
# (freed at the end of the forward pass) and the backward's tensors (allocated after) share memory; measured on
# the held-out shapes of benchmarks/plan_heldout.py, where summing both over-predicted every checkpointed LoRA
# variant by 3-17% with jemalloc. glibc's heap keeps the summed form: it is what its retention constants were
# fitted with, and its runs spread by up to 9% from one to the next (planned to their upper spread).
LOSS_CHUNKS_REUSED = ("jemalloc",)
# Importing peft, which only the adapter methods do, adds 54 MiB of resident memory (its modules and the parts of
# transformers it pulls in; measured as the RSS before and after `import peft` in a process that has loaded qtrain
# and a model, the same under glibc and jemalloc). jemalloc's runtime constant is fitted with this term apart;
# glibc's constants were fitted with it inside them (and meet their bar on the held-out shapes), so it is not
# added there.
ADAPTER_IMPORT_BYTES = {"jemalloc": 54 * 2**20}
# The whole [tokens, vocab] logits of a head the fused loss cannot replace (Gemma 2, Cohere, gpt_bigcode) are a
# few tensors of 100-400 MiB, which jemalloc maps as whole extents: on the third held-out set taking the 10%
# fragmentation share of them too over-predicted all five unfused rows whose checkpointing worked, by 3-5% of
# the peak once their copies were counted as reused. So with jemalloc that share is taken of the other terms
# only. Fitted on that set; benchmarks/plan_heldout.py's fourth set is its check.
WHOLE_LOGITS_UNFRAGMENTED = ("jemalloc",)


class BudgetError(QtrainError, ValueError):
    """Nothing fits, or the budget is malformed; the message names the smallest budget that would fit, and
    ``needed_bytes`` holds it (None when the budget itself is malformed)."""

    def __init__(self, message: str, needed_bytes: int | None = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes


def parse_bytes(text: str | int | float) -> int:
    """'8GB', '7.5 GiB', '512MB', '1e9' -> bytes. GB and GiB both mean 2**30 bytes, as GPU makers and
    nvidia-smi use them ("an 8 GB card")."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise BudgetError(f"budget {text!r} is not a size; write it like 8GB, 7.5GiB or 512MB")
    value = float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    if value <= 0:
        raise BudgetError(f"budget {text!r} must be positive")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / 2**20:.0f} MiB"


def layer_activation_bytes(shape: ModelShape, recipe: Recipe, tokens: int) -> int:
    """Bytes autograd saves for one decoder layer over ``tokens`` positions (no checkpointing): from a census
    of the model's own code where its family can be built here (qtrain.census), else the Llama-family formula."""
    if recipe.method != "bitnet":  # BitNet's layers are qtrain's own; the formula below is their census
        from qtrain.census import census_layer_bytes

        seq = min(recipe.seq_len, tokens)
        counted = census_layer_bytes(shape, "lora" if recipe.method == "qlora" else recipe.method, recipe.lora_r,
                                     recipe.lora_dropout, recipe.target_modules, seq, max(1, tokens // seq),
                                     DTYPE_BYTES[recipe.dtype])
        if counted is not None:
            return counted
    return formula_layer_bytes(shape, recipe, tokens)


def formula_layer_bytes(shape: ModelShape, recipe: Recipe, tokens: int) -> int:
    """Bytes autograd saves for one decoder layer over ``tokens`` positions (no checkpointing), by formula.

    Llama-family census (per token, B = bytes of the compute dtype):
      full fine-tuning:  B * (6h + 2q + 2kv + 4i + heads + 2)
                         (q = heads x head_dim, which is h unless the config sets head_dim: attention's
                         output and o_proj's contiguous input; census in tests/unit/test_plan.py)
      LoRA, dropout 0:   full - 2h*B + 7r*B          (frozen matmuls keep no inputs; A outputs kept)
      LoRA, dropout > 0: + (6h + i) one-byte masks + 4h*B
    GELU-MLP families (GPT-2/BigCode/CodeGen/Falcon) keep 2 fewer intermediate-size tensors.
    """
    b = DTYPE_BYTES[recipe.dtype]
    h, kv, i, heads, q = shape.hidden, shape.kv_dim, shape.intermediate, shape.n_heads, shape.q_dim
    mlp_tensors = 4 if shape.gated_mlp else 2
    per_token = b * (6 * h + 2 * q + 2 * kv + mlp_tensors * i + heads + 2)
    if recipe.method in ("lora", "qlora"):
        frac = shape.adapted_fraction(recipe.target_modules)
        per_token += frac * (-2 * h * b + 7 * recipe.lora_r * b)
        if recipe.lora_dropout > 0:
            per_token += frac * ((6 * h + i) + 4 * h * b)
    fixed = 0
    if recipe.method == "bitnet":
        # each ternary layer keeps its own quantised input (+4h over full fine-tuning) and its quantised weight
        # copy for the backward pass (one copy of the layer's linear weights); with bitnet_rms_norm the 7 norms
        # also keep their inputs, normalised values and an rsqrt per token: +12h + 2i + 7 in all instead of
        # +4h (census, tests/unit/test_plan.py)
        per_token += (12 * h + 2 * i + 7) * b if recipe.bitnet_rms_norm else 4 * h * b
        fixed = sum(shape.layer_linear_params().values()) * b
    return int(per_token * tokens) + fixed


@dataclass
class Prediction:
    terms: dict[str, int]  # the forward/backward peak, by term; they sum to it
    peak_bytes: int  # max(forward/backward peak, optimizer-step peak, loading peak)
    tokens_per_second: float
    load_peak_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    step_terms: dict[str, int] = field(default_factory=dict)  # the optimizer step's, by term

    @property
    def step_peak_bytes(self) -> int:
        return sum(self.step_terms.values())

    @property
    def peak_terms(self) -> tuple[str, dict[str, int]]:
        """Which phase sets the peak ("backward", "optimizer step" or "loading") and its terms."""
        if self.peak_bytes == self.load_peak_bytes and self.peak_bytes > max(sum(self.terms.values()),
                                                                           self.step_peak_bytes):
            return "loading", {"weights while loading": self.load_peak_bytes}
        if self.step_terms and self.step_peak_bytes > sum(self.terms.values()):
            return "optimizer step", self.step_terms
        return "backward", self.terms


def host_heap(allocator: str | None = None) -> str:
    """How freed host memory behaves in the training process: "jemalloc", "glibc-bounded" (a fixed mmap
    threshold, see measure.bound_heap_retention) or "glibc". None: as in this process."""
    from qtrain.measure import heap_allocator, heap_bound_requested

    if allocator is None:
        allocator = heap_allocator()
    if allocator == "jemalloc":
        return "jemalloc"
    return "glibc-bounded" if heap_bound_requested() else "glibc"


def predict(shape: ModelShape, recipe: Recipe, device: str = "cpu", peak_flops: float = 168e9,
            allocator: str | None = None, devices: int = 1) -> Prediction:
    """Predicted peak memory per device (sum of named terms, bytes) and tokens/s of training ``recipe`` on
    ``shape``, with ``devices`` processes (one per device; the recipe's micro-batch is per process).

    ``allocator``: the host allocator of the training process ("jemalloc" or "glibc"; None: this process's).
    It matters on a CPU only, where glibc keeps freed activation memory in RSS (see ALLOCATOR_RETENTION)."""
    b = DTYPE_BYTES[recipe.dtype]
    # weights that train are fp32 masters under mixed precision (train.weights_dtype); frozen ones are in b
    wb = 4 if recipe.method in ("full", "bitnet") else b
    total = _trained_params(shape, recipe)
    linear = shape.n_layers * sum(shape.layer_linear_params().values())
    terms = {"weights": _weight_bytes(shape, recipe, device, wb)}
    if recipe.method in ("lora", "qlora"):
        trainable = shape.lora_params(recipe.lora_r, recipe.target_modules)
        terms["lora_parameters"] = trainable * 4  # adapters are kept in fp32
        grad_bytes = 4
    else:
        trainable = total
        grad_bytes = wb
        if wb != b:
            # autocast's copies of the matmul weights in the compute dtype, kept for the backward pass
            terms["autocast_weight_copies"] = (linear + shape.vocab * shape.hidden) * b
    terms["gradients"] = trainable * grad_bytes
    opt_bytes = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}[recipe.optimizer]
    terms["optimizer_states"] = trainable * opt_bytes
    tokens = recipe.micro_batch_size * recipe.seq_len
    one_layer = layer_activation_bytes(shape, recipe, tokens)
    if recipe.gradient_checkpointing:
        # only each layer's input is kept; one layer is recomputed at a time during backward
        terms["activations"] = shape.n_layers * tokens * shape.hidden * b + one_layer
    else:
        terms["activations"] = shape.n_layers * one_layer
    # while a layer runs backward, its activation gradients live beside the saved tensors
    terms["backward_workspace"] = one_layer
    # what the backward allocates once the loss is computed: the workspace, and with checkpointing the recomputed layer
    later = one_layer * (2 if recipe.gradient_checkpointing else 1)
    distill = recipe.distill_weight > 0
    unfragmented = 0  # bytes the fragmentation share is not taken of (see WHOLE_LOGITS_UNFRAGMENTED)
    # under FSDP the LM head's weight is a shard outside the module's own forward, so the loop runs the plain head
    fused = recipe.fused_cross_entropy and shape.fusable_head and not (recipe.fsdp and devices > 1)
    if fused:
        # distillation holds about six chunk-sized tensors (both models' log-probabilities, their softmaxes,
        # the gradient) in smaller chunks; cross-entropy two
        rows, copies = (min(tokens, DISTILL_CHUNK_ROWS), 6) if distill else (min(tokens, FUSED_CE_CHUNK_ROWS), 2)
        chunks = rows * shape.vocab * 4 * copies
        if device.startswith("cpu") and host_heap(allocator) in LOSS_CHUNKS_REUSED:
            # The fused loss computes its gradients during the forward pass and frees its logits chunks before
            # backward begins; the backward's recomputed layer and workspace are allocated after, from the memory
            # the chunks freed (jemalloc hands it back out). Only the chunks' excess over them adds to the peak.
            chunks = max(0, chunks - later)
        # + the fp32 last hidden states and their gradient (kept for backward)
        terms["logits_and_loss"] = chunks + tokens * shape.hidden * 4 * 2
    else:
        # logits, their log-softmax and its gradient, all [tokens, vocab] in fp32 (and the teacher's two), and
        # what a soft-capped head keeps besides
        terms["logits_and_loss"] = tokens * shape.vocab * 4 * ((5 if distill else 3) + shape.head_extra_logits)
    if distill:
        terms["teacher_weights"], teacher_b = _teacher_bytes(shape, recipe.distill_teacher_dtype, device)
        # its forward keeps no activations: one layer's tensors in flight, and its last hidden states
        terms["teacher_forward"] = tokens * (shape.hidden * 4 + (2 * shape.hidden + 2 * shape.intermediate) * teacher_b)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    heap = host_heap(allocator) if kind == "cpu" else "device"
    _host_heap_terms(terms, shape, recipe, heap, one_layer, grad_bytes)
    if not fused and heap in LOSS_CHUNKS_REUSED:
        # The whole logits: all copies but their gradient are freed before the head's backward, and the layers'
        # backward (and, with one micro-batch a step, the gradients live at the peak) is allocated after, from
        # their memory.
        one_copy = tokens * shape.vocab * 4
        reused = later + (terms["gradients"] if recipe.grad_accum_steps <= 1 else 0)
        terms["logits_and_loss"] = max(one_copy, terms["logits_and_loss"] - reused)
        if heap in WHOLE_LOGITS_UNFRAGMENTED:
            unfragmented = terms["logits_and_loss"]
    if heap in ADAPTER_IMPORT_BYTES and recipe.method in ("lora", "qlora"):
        terms["peft_modules"] = ADAPTER_IMPORT_BYTES[heap]
    if kind == "cpu" and recipe.method == "qlora":
        # bitsandbytes quantises on a CPU from fp32 weights loaded first; their pages stay resident (measured:
        # QLoRA's peak RSS was LoRA's plus 0.08-0.44 GiB on the default model, not 0.34 GiB less)
        terms["fp32_load_copy"] = int(linear * 4)
    if devices > 1:
        _several_devices(terms, shape, recipe, devices, b, grad_bytes, trainable)
    sharded = recipe.fsdp and devices > 1
    step = _optimizer_step_terms(terms, shape, recipe, kind, math.ceil(trainable * grad_bytes / (devices if sharded else 1)),
                                 devices if sharded else 1)
    runtime, fragmentation = HOST_HEAP.get(heap, (RUNTIME_BYTES[kind], FRAGMENTATION[kind]))
    terms["runtime_overhead"] = runtime + int(fragmentation * (sum(terms.values()) - unfragmented))
    step["runtime_overhead"] = runtime + int(STEP_FRAGMENTATION[kind] * sum(step.values()))
    train_peak = max(sum(terms.values()), sum(step.values()))
    # Loading: on a CPU the safetensors file is memory-mapped while its tensors are copied out, so for a
    # moment both count in RSS (QLoRA quantises from the full-precision copy, so the same holds).
    # On a GPU weights arrive shard by shard (quantised on the fly for QLoRA): no more than they end up as.
    full_weights = total * wb
    load_peak = runtime + (int(LOAD_WEIGHT_COPIES.get(heap, 2) * full_weights) if kind == "cpu" else terms["weights"])
    peak = max(train_peak, load_peak)
    matmul = linear + shape.vocab * shape.hidden  # the LM head is a matmul even when tied
    adapters = recipe.method in ("lora", "qlora")
    flops = train_flops_per_token(matmul if adapters else 0, trainable if adapters else matmul, shape.n_layers,
                                  shape.hidden, recipe.seq_len)
    if distill:  # model FLOPs of the objective, as the training loop counts them
        flops += forward_flops_per_token(matmul, shape.n_layers, shape.hidden, recipe.seq_len)
    if recipe.gradient_checkpointing:
        flops += recompute_flops_per_token(linear, shape.n_layers, shape.hidden, recipe.seq_len)
    # all devices together, as if communication hid behind compute (FSDP prefetches the next layer's all-gather;
    # DDP overlaps its bucketed all-reduce with backward): an upper bound on a slow interconnect
    tps = ASSUMED_MFU * peak_flops / flops * devices
    return Prediction(terms, peak, tps, load_peak, step_terms=step)


def _weight_bytes(shape: ModelShape, recipe: Recipe, device: str, wb: int) -> int:
    """Resident bytes of the model's weights while it trains (``wb``: bytes of a weight that trains)."""
    b = DTYPE_BYTES[recipe.dtype]
    total = _trained_params(shape, recipe)
    if recipe.method == "qlora":
        linear = shape.n_layers * sum(shape.layer_linear_params().values())
        return int(linear * NF4_BYTES_PER_PARAM + (total - linear) * b)
    weights = total * wb
    if (device.startswith("cpu") and recipe.method == "lora" and not shape.tied
            and 0 < shape.indexed_vocab < shape.vocab and shape.stored_dtype in (recipe.dtype, f"torch.{recipe.dtype}")):
        # Frozen weights stored in the dtype they train in stay memory-mapped from the safetensors file, and a
        # page of the input embedding becomes resident only when a token's row is read: rows past the
        # tokenizer's last id never are. (Rows inside it are counted: a long run reads most of them.) Measured
        # on a 100k-row embedding under a 49k tokenizer: RssFile grew by the embedding's size only when the
        # whole table was read. A dtype conversion at load copies every row into anonymous memory instead.
        # How much of the rest a short run makes resident depends on the page cache, not on qtrain: the kernel
        # maps a file's cached folios whole (large ones on this machine's ext4, Linux 6.18), so on a freshly
        # written file 607 distinct tokens made 118 of a 120 MiB embedding resident, while after the page cache
        # was dropped the same 2-step LoRA run (benchmarks/plan_heldout.py's wide Qwen2) peaked ~95 MiB lower
        # (910-911 against 1000-1009 MiB). Counting the whole table is the bound for both.
        weights -= (shape.vocab - shape.indexed_vocab) * shape.hidden * b
    return weights


def _trained_params(shape: ModelShape, recipe: Recipe) -> int:
    """The model's parameters as it trains: BitNet with ``bitnet_rms_norm`` adds the gains of its norms (the
    full-precision shadow weights are what the optimizer updates; the ternary values are derived each forward)."""
    total = shape.total_params()
    if recipe.method == "bitnet" and recipe.bitnet_rms_norm:
        total += shape.n_layers * (6 * shape.hidden + shape.intermediate)
    return total


# Bytes of temporaries the optimizer step allocates, in elements of the trainable weights: torch's AdamW runs
# its for-loop implementation on a CPU (foreach kernels are CUDA-only), where `exp_avg_sq.sqrt() / bc` holds two
# tensors of one parameter's size at once, so the largest parameter sets it; on CUDA it defaults to foreach,
# whose `_foreach_sqrt` makes one copy of every state at once. bitsandbytes' 8-bit optimizers update in place.
STEP_TEMPORARIES = {"cpu": ("largest", 2), "cuda": ("all", 1)}
STEP_FRAGMENTATION = {"cpu": 0.05, "cuda": FRAGMENTATION["cuda"]}


def _optimizer_step_terms(terms: dict[str, int], shape: ModelShape, recipe: Recipe, kind: str, all_gradients: int,
                          shards: int) -> dict[str, int]:
    """What is live while the optimizer steps: weights, every gradient, the optimizer's states and its
    temporaries; activations, the loss's chunks and the teacher's forward are gone. With one micro-batch a step
    and no checkpointing the forward/backward peak counts only the gradients that freed activations do not
    absorb (see _host_heap_terms), so when the gradients and the step's temporaries outweigh the activations (a
    large model at a short sequence, a large vocabulary) this phase sets the peak."""
    transient = ("gradients", "activations", "backward_workspace", "logits_and_loss", "teacher_forward",
                 "autocast_weight_copies", "fsdp_gathered_units")
    step = {k: v for k, v in terms.items() if k not in transient}
    step["gradients"] = all_gradients
    if recipe.optimizer == "adamw":
        wb = 4  # trainable weights and their states are fp32 (masters under mixed precision)
        which, copies = STEP_TEMPORARIES[kind]
        if recipe.method in ("lora", "qlora"):
            largest = recipe.lora_r * max(shape.hidden, shape.intermediate)
            every = shape.lora_params(recipe.lora_r, recipe.target_modules)
        else:
            largest = max(shape.vocab * shape.hidden, max(shape.layer_linear_params().values()))
            every = shape.total_params()
        step["optimizer_step_temporaries"] = copies * wb * (largest if which == "largest" else math.ceil(every / shards))
    return step


def _teacher_bytes(shape: ModelShape, dtype: str, device: str) -> tuple[int, int]:
    """A distillation teacher's weights in bytes, and the bytes per element its forward computes in. int8 and nf4
    hold the decoder's linear layers in bitsandbytes' formats (int8: one byte a weight and one fp32 scale a row;
    nf4 as QLoRA's) around embeddings, norms and LM head in the compute dtype (bf16 on CUDA, fp32 on a CPU)."""
    if dtype not in ("int8", "nf4"):
        return shape.total_params() * DTYPE_BYTES[dtype], DTYPE_BYTES[dtype]
    compute_b = 2 if device.startswith("cuda") else 4
    layers = shape.n_layers * sum(shape.layer_linear_params().values())
    per_weight = NF4_BYTES_PER_PARAM if dtype == "nf4" else 1 + 4 / shape.hidden
    return int(layers * per_weight + (shape.total_params() - layers) * compute_b), compute_b


def _host_heap_terms(terms: dict[str, int], shape: ModelShape, recipe: Recipe, heap: str, one_layer: int,
                     grad_bytes: int) -> None:
    """What a CPU process's C allocator adds to, or takes from, the tensors' sum (see ALLOCATOR_RETENTION and
    FULL_GRADIENT_OVERLAP; measured in benchmarks/memory_calibration.py)."""
    # Full fine-tuning, one micro-batch per step, no checkpointing: backward frees each layer's saved tensors as
    # it produces that layer's gradients, so the peak is at the start of backward, beside the LM head's gradient
    # (produced first) and only part of the rest: on a CPU, the share that freed activation memory does not
    # take back (FULL_GRADIENT_OVERLAP x the activations, at most all of them).
    full_overlap = (heap in FULL_GRADIENT_OVERLAP and recipe.method in ("full", "bitnet")
                    and not recipe.gradient_checkpointing and recipe.grad_accum_steps <= 1)
    if full_overlap:
        head_grad = min(terms["gradients"], shape.vocab * shape.hidden * grad_bytes)
        rest = terms["gradients"] - head_grad
        terms["gradients"] = head_grad + min(rest, int(FULL_GRADIENT_OVERLAP[heap] * terms["activations"]))
    if heap == "glibc" and not full_overlap:
        # with checkpointing the retained heap still scales with the activations a non-checkpointed step would
        # have made (the recomputed layers free and re-allocate the same sizes)
        full_acts = shape.n_layers * one_layer
        share = ALLOCATOR_RETENTION_CHECKPOINTED if recipe.gradient_checkpointing else ALLOCATOR_RETENTION
        retained = share * full_acts
        if recipe.method in ("full", "bitnet"):
            # the long-lived optimizer states, and with one micro-batch per step the gradients (allocated during
            # backward, freed at the step), settle into the freed activation memory: no excess while they are
            # larger (full 4x256 and 1x512 measured within 4-8%). With accumulation the gradients stay live through
            # the next micro-batch's forward and fill nothing: full 4x512 x2 peaked at 6.80-6.92 GiB (the README
            # command), 6.73 predicted; 5.84-5.87 GiB at 4x512 x1, 6.27 predicted.
            retained -= terms["optimizer_states"]
            if recipe.grad_accum_steps <= 1:
                retained -= terms["gradients"]
        if retained > 0:
            terms["allocator_retention"] = int(retained)


def _several_devices(terms: dict[str, int], shape: ModelShape, recipe: Recipe, devices: int, b: int,
                     grad_bytes: int, trainable: int) -> None:
    """Per-device terms with ``devices`` processes. DDP (fsdp false): every process holds the whole run, plus
    DDP's flat gradient buckets (accelerate keeps ``gradient_as_bucket_view`` off: a second copy of every
    gradient). FSDP: weights, adapters, gradients and optimizer states are sharded 1/N each; what is gathered
    whole is one unit at a time (a decoder layer, or the root: embeddings, final norm, LM head) in the compute
    dtype, the next one prefetched, and one unit's unsharded gradient before its reduce-scatter. Mixed precision
    then casts inside the all-gather, so autocast keeps no weight copies. Written from FSDP2's design, not
    measured on several GPUs (CPU processes under gloo check the mechanism, not these sizes)."""
    if not recipe.fsdp:
        terms["ddp_gradient_buckets"] = trainable * grad_bytes
        return
    for key in ("weights", "lora_parameters", "gradients", "optimizer_states"):
        if key in terms:
            terms[key] = math.ceil(terms[key] / devices)
    terms.pop("autocast_weight_copies", None)
    layer = sum(shape.layer_linear_params().values()) + 2 * shape.hidden
    root = shape.total_params() - shape.n_layers * layer
    unit = max(layer, root)
    terms["fsdp_gathered_units"] = (layer + unit) * b + unit * (grad_bytes if recipe.method in ("full", "bitnet") else 0)


# ---------------------------------------------------------------------------------------------- choice

METHOD_QUALITY = {"full": 3, "lora": 2, "qlora": 1}
METHOD_DEFAULTS = {"full": {"learning_rate": 2e-5}, "lora": {"learning_rate": 2e-4}, "qlora": {"learning_rate": 2e-4}}
SAFETY_MARGIN = 0.10


@dataclass
class Candidate:
    recipe: Recipe
    prediction: Prediction
    fits: bool

    def row(self) -> dict:
        r = self.recipe
        return {"method": r.method, "gradient_checkpointing": r.gradient_checkpointing, "seq_len": r.seq_len,
                "micro_batch_size": r.micro_batch_size, "grad_accum_steps": r.grad_accum_steps,
                "optimizer": r.optimizer, "lora_r": r.lora_r if r.method != "full" else None, "fsdp": r.fsdp,
                "predicted_peak_bytes": self.prediction.peak_bytes,
                "predicted_tokens_per_second": round(self.prediction.tokens_per_second, 1),
                "terms": self.prediction.terms, "fits": self.fits}


@dataclass
class Plan:
    model: str
    device: str
    budget_bytes: int
    usable_bytes: int
    chosen: Candidate | None
    candidates: list[Candidate]
    reason: str
    host_allocator: str = ""  # CPU plans: "jemalloc", "glibc" or "glibc-bounded" (see predict)
    devices: int = 1  # processes, one per device; budget and peaks are per device

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "devices": self.devices,
                "host_allocator": self.host_allocator,
                "budget_bytes": self.budget_bytes,
                "usable_bytes": self.usable_bytes, "safety_margin": SAFETY_MARGIN,
                "chosen": self.chosen.row() if self.chosen else None, "reason": self.reason,
                "candidates": [c.row() for c in self.candidates]}


def _sort_key(c: Candidate):
    r = c.recipe
    # best-quality method, then the longest sequence, then no sharding (its all-gathers cost time) and no
    # checkpointing (a recomputed forward, ~1/3 more compute) if they are not needed, then the largest
    # micro-batch, then the faster optimizer
    return (METHOD_QUALITY[r.method], r.seq_len, not r.fsdp, not r.gradient_checkpointing, r.micro_batch_size,
            r.optimizer == "adamw")


def compute_dtype(device: str, method: str) -> str:
    """The planner's compute dtype: bf16 autocast over fp32 masters on a GPU, fp32 on a CPU. On an AVX512-BF16
    CPU bf16 trained full fine-tuning 1.40x and LoRA 1.52x as fast (benchmarks/results/fit_vs_trainer.md), but the
    memory model under-predicts bf16 peaks there (full 8x512: -12%, LoRA: -8..-16%;
    benchmarks/results/memory_repeats_jemalloc.md), and an under-prediction crashes a run: `dtype=bfloat16`
    opts in until those terms are measured and fitted."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def candidate_recipes(base: Recipe, device: str, methods=("full", "lora", "qlora"), devices: int = 1) -> list[Recipe]:
    """The grid the planner searches: method x sharding (several devices) x checkpointing x seq_len (halving) x
    micro-batch x optimizer, keeping the base recipe's effective batch (micro-batch x accumulation x devices)."""
    effective = base.effective_batch_size
    seqs = []
    s = base.seq_len
    while s >= 128:
        seqs.append(s)
        s //= 2
    seqs = seqs or [base.seq_len]
    out = []
    for method in methods:
        optimizers = ["adamw"] + (["adamw_8bit"] if device.startswith("cuda") else [])
        shardings = (False, True) if devices > 1 and method in ("full", "lora") else (False,)
        for fsdp, gc, seq, mb, opt in itertools.product(shardings, (False, True), seqs, (8, 4, 2, 1), optimizers):
            if mb * devices > effective and mb > 1:
                continue
            values = {**base.to_dict(), **METHOD_DEFAULTS[method], "method": method, "fsdp": fsdp,
                      "gradient_checkpointing": gc, "seq_len": seq, "micro_batch_size": mb,
                      "grad_accum_steps": max(1, math.ceil(effective / (mb * devices))), "optimizer": opt,
                      "dtype": compute_dtype(device, method), "name": f"planned-{method}",
                      # a teacher is BitNet's alone (Recipe refuses it elsewhere)
                      **({} if method == "bitnet" else {"distill_weight": 0.0})}
            out.append(Recipe(**values))
    return out


# A declared (not measured) dense bf16 ceiling for throughput predictions on a GPU qtrain cannot see:
# roughly an RTX 4090's 165 TFLOP/s halved for what training kernels reach; a prediction, labelled as such.
CUDA_DECLARED_FLOPS = 80e12


def plan_for(model: str | None, budget: str | None, device: str, base: Recipe, allocator: str | None = "fit",
             devices: int = 1) -> Plan:
    """Plan from what a user types: the one path of `qtrain plan`, `qtrain fit --budget` and `qtrain bench
    --budget`, so they rank alike. Resolves the device and its memory, the budget (default: the device's memory
    less a margin), the FLOP/s (measured on a CPU, declared for CUDA) and the host allocator: ``"fit"`` predicts
    for the one `qtrain fit` would run on, None for this process's. ``devices``: processes, one per device, each
    with ``budget`` (several devices of one kind)."""
    if devices < 1:
        raise BudgetError(f"--devices {devices} must be at least 1")
    budget_bytes = parse_bytes(budget) if budget else None
    if device == "cuda" and budget_bytes is not None:
        dev, memory = "cuda", None  # planning for a GPU with a budget: no need to import torch (plan answers fast)
    else:
        dev, memory = detect_device(device)
    if budget_bytes is None:
        budget_bytes = default_budget(dev, memory)
    shape = model_shape(model)
    if dev == "cpu":
        import torch

        from qtrain.measure import peak_flops

        flops = peak_flops(torch.device("cpu"))[0]
    else:
        flops = CUDA_DECLARED_FLOPS
    if allocator == "fit":
        allocator = None
        if dev == "cpu":
            from qtrain.measure import fit_allocator

            allocator = fit_allocator()
    return plan_recipe(shape, budget_bytes, dev, base, flops, allocator=allocator, devices=devices)


def plan_recipe(shape: ModelShape, budget_bytes: int, device: str, base: Recipe, peak_flops: float = 168e9,
                methods=("full", "lora", "qlora"), allocator: str | None = None, devices: int = 1) -> Plan:
    """Rank the candidates that fit ``budget_bytes`` per device (minus a safety margin) and pick one, or say why
    none does. ``allocator``: the host allocator the training process will run on (see predict)."""
    usable = int(budget_bytes * (1 - SAFETY_MARGIN))
    cands = []
    for r in candidate_recipes(base, device, methods, devices):
        pred = predict(shape, r, device, peak_flops, allocator, devices)
        cands.append(Candidate(r, pred, pred.peak_bytes <= usable))
    fitting = sorted((c for c in cands if c.fits), key=_sort_key, reverse=True)
    if not fitting:
        smallest = min(cands, key=lambda c: c.prediction.peak_bytes)
        need = smallest.prediction.peak_bytes / (1 - SAFETY_MARGIN)
        r = smallest.recipe
        raise BudgetError(
            f"budget {format_bytes(budget_bytes)} is below the smallest recipe for {shape.name} on {device}"
            f"{f' x {devices} (sharded with FSDP)' if r.fsdp else ''}: "
            f"{r.method} r={r.lora_r} seq {r.seq_len} micro-batch {r.micro_batch_size}"
            f"{' with checkpointing' if r.gradient_checkpointing else ''} needs {format_bytes(smallest.prediction.peak_bytes)} "
            f"predicted (+{SAFETY_MARGIN:.0%} margin); try --budget {math.ceil(need / GiB * 10) / 10:g}GB or a smaller model",
            needed_bytes=int(math.ceil(need)))
    chosen = fitting[0]
    r = chosen.recipe
    better = [m for m in METHOD_QUALITY if METHOD_QUALITY[m] > METHOD_QUALITY[r.method]]
    why = [f"{r.method} is the best-quality method that fits"]
    if better:
        why.append(f"({', '.join(better)} would need more than {format_bytes(usable)})")
    if r.seq_len < base.seq_len:
        why.append(f"at seq_len {r.seq_len} (the target {base.seq_len} does not fit)")
    if r.fsdp:
        why.append(f"sharded over {devices} devices with FSDP (each would have to hold "
                   f"{format_bytes(predict(shape, r.replace(fsdp=False), device, peak_flops, allocator, devices).peak_bytes)}"
                   " as DDP replicas)")
    elif devices > 1:
        why.append(f"replicated on {devices} devices (DDP; no sharding needed)")
    if r.gradient_checkpointing:
        why.append("with gradient checkpointing (needed to fit)")
    reason = " ".join(why)
    return Plan(shape.name, device, budget_bytes, usable, chosen, fitting, reason,
                "" if device.startswith("cuda") else host_heap(allocator), devices)


# ---------------------------------------------------------------------------------------------- inputs

def model_shape(model: str | None) -> ModelShape:
    """The shape of ``model`` without loading weights: shipped config numbers, a local config.json, the
    embedded default, or (with a network) the hub's config."""
    import dataclasses
    import json
    from pathlib import Path

    from qtrain.models import DEFAULT_MODEL_NAME, ModelError
    from qtrain.shapes import complete_config, lookup_known, shape_from_config, tokenizer_rows

    if model is None:
        return shape_from_config(lookup_known("HuggingFaceTB/SmolLM2-135M"), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{path / 'config.json'} is not valid JSON ({e}); restore it from the model's source") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{path / 'config.json'} holds a {type(cfg).__name__}, not a JSON object of config keys; "
                             "restore it from the model's source")
        shape = shape_from_config(complete_config(cfg), path.name)
        return dataclasses.replace(shape, indexed_vocab=tokenizer_rows(path))
    if path.is_file() and path.suffix == ".gguf":
        from qtrain.models import ModelSource, load_config

        return shape_from_config(load_config(ModelSource("gguf", str(path.resolve()), path.stem)).to_dict(), path.stem)
    known = lookup_known(model)
    if known is not None:
        name = known.pop("_name")
        return shape_from_config(known, name)
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelError(f"--model {model!r} is not a model directory with config.json or a .gguf file")
    try:
        from transformers import AutoConfig

        from qtrain.models import hub_reachable

        return shape_from_config(AutoConfig.from_pretrained(model, local_files_only=not hub_reachable()).to_dict(), model)
    except OSError:
        from qtrain.shapes import known_models

        raise ModelError(f"model {model!r} is not among the shipped configs and the hub is not reachable; known "
                         f"offline: {', '.join(sorted(known_models()))}; or give a directory with config.json") from None


def detect_device(device: str = "auto") -> tuple[str, int | None]:
    """('cpu' | 'cuda:N', memory bytes of that device or None). auto: what torch sees."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise BudgetError(f"--device {device!r}: use cpu, cuda or auto")
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            idx = int(device.split(":")[1]) if ":" in device else 0
            return f"cuda:{idx}", torch.cuda.get_device_properties(idx).total_memory
        return "cuda", None  # planning for a GPU this machine does not have
    import psutil

    return "cpu", psutil.virtual_memory().available


def default_budget(device: str, memory: int | None) -> int:
    """On a CPU with no --budget: the memory available now, minus 10% for everything else."""
    if memory is None:
        raise BudgetError(f"no --budget given and the memory of {device} is unknown here; pass --budget (e.g. 8GB)")
    return int(memory * 0.9)


def render_plan(plan: Plan, limit: int = 12) -> str:
    """A ranked table of what fits, the terms of the pick, and why."""
    heap = f" (host allocator: {plan.host_allocator})" if plan.host_allocator else ""
    several = plan.devices > 1
    per = " per device" if several else ""
    lines = [f"plan for {plan.model} on {plan.device}{f' x {plan.devices}' if several else ''}{heap}: budget "
             f"{format_bytes(plan.budget_bytes)}{per}, usable {format_bytes(plan.usable_bytes)} after a "
             f"{SAFETY_MARGIN:.0%} safety margin", "",
             f"{'#':>3}  {'method':6} {'fsdp ' if several else ''}{'ckpt':4} {'seq':>5} {'batch':>7} {'optimizer':10} "
             f"{'peak':>10} {'tok/s':>8}"]
    for i, c in enumerate(plan.candidates[:limit], 1):
        r = c.recipe
        shard = f"{'yes' if r.fsdp else 'no':5}" if several else ""
        lines.append(f"{i:>3}  {r.method:6} {shard}{'yes' if r.gradient_checkpointing else 'no':4} {r.seq_len:>5} "
                     f"{f'{r.micro_batch_size}x{r.grad_accum_steps}':>7} {r.optimizer:10} "
                     f"{format_bytes(c.prediction.peak_bytes):>10} {c.prediction.tokens_per_second:>8.0f}")
    if len(plan.candidates) > limit:
        lines.append(f"     ... {len(plan.candidates) - limit} more that fit")
    c = plan.chosen
    phase, terms = c.prediction.peak_terms
    lines += ["", f"chosen: #1 {plan.reason}", f"predicted peak memory{per}, by term, during the {phase}:"]
    for k, v in terms.items():
        lines.append(f"  {k:26s} {format_bytes(v):>10}")
    lines.append(f"  {'total':26s} {format_bytes(c.prediction.peak_bytes):>10}")
    return "\n".join(lines)
