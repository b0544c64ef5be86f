"""The run directory that ``qtrain fit`` writes: its marker (``run.json``), reading it, and loading the trained
model (unmerged, or merged for inference and export)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from qtrain.io import make_tmp_dir
from qtrain.models import ModelError, ModelSource, load_model


RUN_MARKER = "run.json"  # written by qtrain fit; the only file that makes a directory a qtrain run


def read_marker(run_dir: str | Path) -> dict | None:
    """The run's marker when ``run_dir`` holds a valid one (a JSON object with ``"qtrain_run": 1``), else None.
    Anything else named run.json (another tool's, a damaged one) does not make a directory a qtrain run, so
    ``--overwrite`` will not delete it."""
    marker = Path(run_dir) / RUN_MARKER
    try:
        if not marker.is_file() or marker.stat().st_size > 1 << 20:
            return None
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("qtrain_run") == 1 else None


def is_run_dir(path: str | Path | None) -> bool:
    return path is not None and read_marker(path) is not None


def read_run(run_dir: str | Path) -> dict:
    meta = read_marker(run_dir)
    if meta is None:
        raise ModelError(f"{str(run_dir)!r} is not a qtrain run directory (no valid run.json); give the --output of "
                         "`qtrain fit`")
    return meta


def load_trained(run_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The fine-tuned model of a run as it trained, unmerged: base + adapter for LoRA and QLoRA (embeddings
    resized if tokens were added), the packed ternary model for BitNet, or the full model.

    A QLoRA adapter learned against the NF4 base, so that base is loaded in the same NF4 form and dequantized
    to ``dtype`` (transformers' ``dequantize``), as peft documents for merging; the original full-precision
    weights would be weights the adapter never saw.
    """
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    if (run_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        kwargs = {}
        if meta.get("method") == "qlora":
            from qtrain.methods import quantization_config
            from qtrain.recipe import load_recipe

            kwargs["quantization_config"] = quantization_config(load_recipe(run_dir / "recipe.yaml"), "cpu")
        base = load_model(ModelSource(meta["model_source"], meta["base_model"], meta["model"]), dtype=dtype, **kwargs)
        if kwargs:
            base = base.dequantize().to(dtype)
        from qtrain import bitnet

        if bitnet.is_bitnet_config(base.config):  # adapters trained on a frozen ternary base (bitnet.from_packed)
            bitnet.from_packed(base)
            base.requires_grad_(False)
        if base.get_input_embeddings().num_embeddings != meta["vocab_size"]:
            base.resize_token_embeddings(meta["vocab_size"])
        try:
            return PeftModel.from_pretrained(base, run_dir)
        except Exception as exc:  # noqa: BLE001 - any failure to read it means the same to the user
            raise ModelError(f"the adapter in {str(run_dir)!r} could not be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); it is corrupt or from another model. Re-run "
                             "`qtrain fit`, or resume it from a checkpoint") from None
    if (run_dir / "config.json").is_file():
        from qtrain.bitnet import is_bitnet_dir, load_packed

        try:
            if is_bitnet_dir(run_dir):  # packed ternary layers, loaded by transformers' BitNet support
                return load_packed(run_dir)
            return AutoModelForCausalLM.from_pretrained(run_dir, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"the model in {str(run_dir)!r} could not be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); re-run `qtrain fit` to rewrite it") from None
    raise ModelError(f"run directory {str(run_dir)!r} holds no trained model (no adapter_config.json or config.json): "
                     "the run did not finish; continue it with `qtrain fit -o DIR --resume`")


def load_merged(run_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, info): the run's model with any adapter merged into its base (peft's ``merge_and_unload``), in
    eval mode. ``info`` says whether there was an adapter and how far the merged logits moved on a fixed probe."""
    model = load_trained(run_dir, dtype)
    meta = read_run(run_dir)
    info = {"source": str(run_dir), "adapter": False, "method": meta.get("method")}
    if not hasattr(model, "merge_and_unload"):
        return model.eval(), info
    from qtrain import bitnet

    if bitnet.layers(model):
        raise ModelError(f"{str(run_dir)!r} holds LoRA adapters on a ternary (BitNet) base: merging is refused, "
                         "since the merged weights are no longer ternary and re-ternarising them changes what was "
                         "trained. Use the run as it is (qtrain eval / serve load base + adapter), or train with "
                         "method=bitnet (ternary QAT) for a packed ternary model to export")
    model.eval()
    vocab = model.get_input_embeddings().num_embeddings
    probe = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(probe).logits
        merged = model.merge_and_unload()
        after = merged(probe).logits
    info.update(adapter=True, merge_max_abs_logit_diff=float((before - after).abs().max()))
    return merged.eval(), info


def _move_into(tmp: Path, run_dir: Path) -> None:
    for p in sorted(tmp.iterdir()):
        os.replace(p, run_dir / p.name)
    tmp.rmdir()


def save_final(model, tokenizer, run_dir: Path, recipe, state_dict: dict | None = None) -> None:
    """Save the trained model in Hugging Face format: a PEFT adapter, the full model, or (bitnet) the packed
    ternary model that transformers' BitNet support loads. ``state_dict``: the whole model's state when the
    model itself holds shards (FSDP, see qtrain/sharding.py)."""
    tmp = make_tmp_dir(run_dir / "final")
    try:
        if recipe.method == "bitnet":
            from qtrain import bitnet

            bitnet.save_packed(model, tokenizer, tmp, recipe.bitnet_rms_norm or bitnet.has_rms_norm(model),
                               getattr(model.config, "rms_norm_eps", 1e-6))
        else:
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(tmp)
        _move_into(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
