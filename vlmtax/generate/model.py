"""The generate route's model: the VLM loaded for training (16-bit, 4/8-bit QLoRA or fp32 master weights), Liger's
kernels, the LoRA targets in the family's module names, and what trains (frozen parts, LoRA, modules_to_save)."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import torch

from vlmtax.errors import VlmtaxError, first_line
from vlmtax.models.families import Family, family_of, projector_modules, trainable_counts, wrapped_counts
from vlmtax.models.families import lora_target_regex as family_target_regex
from vlmtax.models.loading import DTYPES, Hardware, load_processor, load_weights
from vlmtax.train.schema import Recipe


def check_gpu_features(recipe: Recipe, hw: Hardware) -> None:
    if recipe.quantization and not hw.cuda:
        raise VlmtaxError(f"quantization={recipe.quantization} (bitsandbytes) needs a CUDA GPU",
                          "set quantization=null on the CPU, or train on a GPU")
    if recipe.quantization and recipe.finetuning == "full":
        raise VlmtaxError("quantised weights cannot be fully fine-tuned", "use finetuning=lora with quantization")
    if recipe.attn_implementation == "flash_attention_2" and not hw.cuda:
        raise VlmtaxError("attn_implementation=flash_attention_2 needs a CUDA GPU",
                          "use attn_implementation=sdpa (the default) on the CPU")
    if recipe.attn_implementation == "flash_attention_2" and recipe.precision == "fp32":
        raise VlmtaxError("flash_attention_2 runs in fp16 or bf16 only, not precision=fp32",
                          "use precision=auto (bf16 or fp16 on a GPU) or attn_implementation=sdpa")
    if recipe.train.liger and not hw.cuda:
        raise VlmtaxError("train.liger needs a CUDA GPU (Triton kernels)", "set train.liger=false on the CPU")
    gpu = "pip install 'vlmtax[gpu]'"
    for flag, module, fix in ((recipe.quantization, "bitsandbytes", gpu), (recipe.train.liger, "liger_kernel", gpu),
                              (recipe.attn_implementation == "flash_attention_2", "flash_attn",
                               "pip install flash-attn --no-build-isolation (it builds against your torch and CUDA)")):
        if flag:
            try:
                __import__(module)
            except ImportError:
                raise VlmtaxError(f"{module} is not installed", fix) from None


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype, family: Family) -> Any:
    """QLoRA: nf4 with double quantisation; the vision tower (merger included) and the output layer stay in
    16 bits. Skip names are full module paths: transformers matches them as a prefix or suffix, as a regex."""
    if recipe.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    skip = [re.escape(family.tower), "lm_head"]
    if recipe.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)


def lora_target_regex(recipe: Recipe, family: Family) -> str:
    """The recipe's LoRA targets in `family`'s module names (families.lora_target_regex)."""
    target = recipe.lora.target
    names = None if target == "all-linear" else tuple([target] if isinstance(target, str) else target)
    return family_target_regex(family, names, vision=not recipe.freeze.vision)


def model_config(recipe: Recipe) -> Any:
    """The recipe's model config, of a supported family, before any weight loads."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(recipe.model, trust_remote_code=recipe.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise VlmtaxError(f"cannot read the model config in {recipe.model}: {first_line(exc)}",
                          "point model: at a model folder of a supported family") from None
    family_of(config, f"model {recipe.model}")
    return config


def skeleton(recipe: Recipe) -> Any:
    """The model built on the meta device from its config: module names without loading a weight."""
    from transformers import AutoModelForImageTextToText

    config = model_config(recipe)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=recipe.trust_remote_code)


def check_lora_targets(recipe: Recipe) -> None:
    """Before any weights load: the model's family must be supported and the LoRA target regex must match a
    linear layer of its language model (and of its vision blocks when those are trained), else PEFT fails deep
    inside, or wraps only some of what the recipe meant. Classify runs put LoRA on a vision backbone instead."""
    if recipe.task == "classify" or recipe.finetuning != "lora":
        return
    if isinstance(recipe.lora.target, list) and not recipe.lora.target:
        raise VlmtaxError("lora.target is an empty list", "use all-linear or module names such as [q_proj, v_proj]")
    if not Path(recipe.model).is_dir():
        return  # a hub id: its config may not be reachable; the wrapped-module check applies after loading
    model = skeleton(recipe)
    pattern = re.compile(lora_target_regex(recipe, family_of(model)))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not any(pattern.fullmatch(n) for n in names if ".language_model." in f".{n}"):
        wanted = [recipe.lora.target] if isinstance(recipe.lora.target, str) else recipe.lora.target
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names if ".language_model." in f".{n}"})
        near = sorted({c for w in wanted for c in difflib.get_close_matches(str(w), leaves, n=3, cutoff=0.3)})
        raise VlmtaxError(f"lora.target {wanted} matches no linear layer of the language model in {recipe.model}"
                          f" (nearest: {', '.join(near or leaves[:5])})",
                          f"use all-linear or names from: {', '.join(leaves)}")


def lora_config(recipe: Recipe, model: Any) -> Any:
    """LoRA on the recipe's targets; an unfrozen projector (merger and DeepStack mergers) is trained whole."""
    from peft import LoraConfig

    family = family_of(model)
    modules_to_save = list(recipe.lora.modules_to_save)
    if not recipe.freeze.projector:
        modules_to_save += [n.split(".visual.", 1)[-1] for n in projector_modules(family, model)
                            if n.split(".visual.", 1)[-1] not in modules_to_save]
    return LoraConfig(r=recipe.lora.rank, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                      target_modules=lora_target_regex(recipe, family), modules_to_save=modules_to_save or None,
                      task_type="CAUSAL_LM")


def model_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """Weights dtype at load. Full fine-tuning under fp16 or bf16 autocast keeps fp32 master weights: in pure
    bf16 (8-bit mantissa) most AdamW updates, about lr x weight, round away. LoRA keeps the frozen base in
    16 bits and only its trainable weights in fp32 (`prepare_model`)."""
    if precision == "fp32" or recipe.finetuning == "full":
        return torch.float32
    return DTYPES[precision]


def load_model(recipe: Recipe, precision: str) -> tuple[Any, Any]:
    source = recipe.model
    if not Path(source).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise VlmtaxError(f"model path {source} does not exist", "set model: to a local folder or a hub id")
    kwargs: dict[str, Any] = {}
    quant = (quantization_config(recipe, DTYPES[precision], family_of(model_config(recipe)))
             if recipe.quantization else None)
    if quant is not None:
        # bitsandbytes quantises onto the device the weights are loaded to: each rank its own GPU, not all GPU 0.
        kwargs.update(quantization_config=quant, device_map={"": int(os.environ.get("LOCAL_RANK", "0"))})
    processor = load_processor(source, padding_side=None, trust_remote_code=recipe.trust_remote_code)
    model = load_weights(source, model_dtype(recipe, precision), trust_remote_code=recipe.trust_remote_code,
                         attn_implementation=recipe.attn_implementation, **kwargs)
    if recipe.train.liger:
        apply_liger(model)
    # The pixel budget is saved with the run's processor, so predict sees images exactly as training did.
    processor.image_processor.size = {"shortest_edge": recipe.image.min_pixels,
                                      "longest_edge": recipe.image.max_pixels}
    return model, processor


def apply_liger(model: Any) -> None:
    """liger's Triton kernels (RoPE where the family has one, RMSNorm, SwiGLU) patched into this model instance.
    Its fused linear cross-entropy and cross-entropy stay off: they replace the model's own loss, and vlmtax
    computes its loss itself on the answer positions only."""
    import liger_kernel.transformers as liger

    family = family_of(model)
    if not hasattr(liger, family.liger_patch):
        raise VlmtaxError(f"the installed liger-kernel has no {family.liger_patch} ({family.label})",
                          "upgrade liger-kernel, or set train.liger=false")
    getattr(liger, family.liger_patch)(rope=family.liger_rope, rms_norm=True, swiglu=True, cross_entropy=False,
                                       fused_linear_cross_entropy=False, model=model)


def _report_parts(what: str, counts: dict[str, int]) -> None:
    print(f"sft: {what}: " + ", ".join(f"{part} {n}" for part, n in counts.items()), flush=True)


def prepare_model(model: Any, recipe: Recipe, precision: str) -> Any:
    """Freeze what the recipe freezes, wrap LoRA, keep trainable weights fp32 under fp16 or bf16 autocast.
    Prints what is trained per part (language / vision / projector), and refuses a LoRA that misses a part the
    recipe trains."""
    family = family_of(model)
    if recipe.finetuning == "full":
        for name, p in model.named_parameters():
            part = family.part(name)
            p.requires_grad = not ((part == "vision" and recipe.freeze.vision)
                                   or (part == "projector" and recipe.freeze.projector))
        _report_parts("trainable tensors", trainable_counts(family, model))
        return model
    from peft import get_peft_model

    # No prepare_model_for_kbit_training: it upcasts every 16-bit tensor left (embeddings, an untied lm_head,
    # the tower) to fp32, about 2 GB on a 7B. get_peft_model freezes the base; the loop below upcasts only what
    # trains; the Trainer turns on gradient checkpointing (use_reentrant=False needs no input-grad hook).
    model = get_peft_model(model, lora_config(recipe, model))
    counts = wrapped_counts(family, model)
    _report_parts("LoRA-wrapped linear layers (whole: trained as modules_to_save)", counts)
    missed = [part for part, wanted in (("language", True), ("vision", not recipe.freeze.vision),
                                        ("projector", not recipe.freeze.projector))
              if wanted and not counts.get(part) and not counts.get(f"{part} whole")]
    if missed:
        raise VlmtaxError(f"lora.target {recipe.lora.target} wraps no module of the {' or '.join(missed)} in "
                          f"{recipe.model} ({family.label})",
                          f"use all-linear or names from: {', '.join(family.language_linear)}")
    if precision in ("fp16", "bf16"):  # adapters and modules_to_save copies (lm_head, merger) alike
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model
