"""The sft stage: recipe -> model (+ LoRA / LoRA+ / QLoRA or full) -> TRL SFTTrainer -> run dir.

Run dir: adapter (or full weights), processor + chat template, taxonomy.json, recipe.yaml,
vlmtax_meta.json (written last: its presence marks a finished run) and checkpoint-N folders.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from vlmtax.errors import VlmtaxError, first_line
from vlmtax.families import Family, family_of, projector_modules, trainable_counts, wrapped_counts
from vlmtax.families import lora_target_regex as family_target_regex
from vlmtax.fileio import check_writable, disk_full, guard_outputs, remove_new_entries, write_json
from vlmtax.loading import ADAPTER_WEIGHTS, DTYPES, Hardware, load_processor, load_weights, restore_full_weights
from vlmtax.meta import META_FILE, files_hash, run_meta
from vlmtax.recipe import Recipe, dump_recipe, load_recipe
from vlmtax.records import check_data_dir
from vlmtax.runlog import TRAIN_LOG, library_output
from vlmtax.trainer_extra import check_loggers_installed


def resolve_precision(recipe: Recipe, hw: Hardware) -> str:
    """bf16 where the GPU has it, fp16 on older GPUs (T4, V100), fp32 on the CPU."""
    if recipe.precision == "auto":
        return "bf16" if hw.bf16_ok else "fp16" if hw.cuda else "fp32"
    if recipe.precision in ("bf16", "fp16") and not hw.cuda:
        raise VlmtaxError(f"precision={recipe.precision} needs a CUDA GPU", "use precision=auto or fp32 on the CPU")
    if recipe.precision == "bf16" and not hw.bf16_ok:
        raise VlmtaxError("this GPU has no bf16 support (T4/V100 class)", "use precision=fp16 or auto")
    return recipe.precision


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


def check_logging(recipe: Recipe) -> None:
    if recipe.log.tensorboard and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise VlmtaxError("log.tensorboard=true but tensorboard is not installed",
                          "pip install 'vlmtax[tensorboard]', or set log.tensorboard=false")
    if recipe.train.extra.get("report_to"):
        check_loggers_installed(recipe)


def _model_config(recipe: Recipe) -> Any:
    """The recipe's model config, of a supported family, before any weight loads."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(recipe.model, trust_remote_code=recipe.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise VlmtaxError(f"cannot read the model config in {recipe.model}: {first_line(exc)}",
                          "point model: at a model folder of a supported family") from None
    family_of(config, f"model {recipe.model}")
    return config


def _skeleton(recipe: Recipe) -> Any:
    """The model built on the meta device from its config: module names without loading a weight."""
    from transformers import AutoModelForImageTextToText

    config = _model_config(recipe)
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
    skeleton = _skeleton(recipe)
    pattern = re.compile(lora_target_regex(recipe, family_of(skeleton)))
    names = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
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
    quant = (quantization_config(recipe, DTYPES[precision], family_of(_model_config(recipe)))
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


_RUN_ENTRIES = re.compile(r"checkpoint-\d+|runs|vision_cache|" + re.escape(META_FILE))


def _check_output_dir(recipe: Recipe) -> None:
    """output_dir must not be (or hold, or sit in) the base model or the data, nor a folder of someone
    else's files: training writes weights, a model card and checkpoints there."""
    model = Path(recipe.model)
    guard_outputs({"model": model if model.exists() else None, "data": recipe.data}, {"output_dir": recipe.output_dir})
    check_writable(recipe.output_dir, "output_dir", "dir")
    out = recipe.output_dir
    # train.log alone is what another rank of this same launch may have written already
    entries = sorted(p.name for p in out.iterdir() if p.name != TRAIN_LOG) if out.is_dir() else []
    if entries and not any(_RUN_ENTRIES.fullmatch(name) for name in entries):
        raise VlmtaxError(f"output_dir {out} holds files that are not a vlmtax run ({', '.join(entries[:3])}"
                          f"{', ...' if len(entries) > 3 else ''}); training would overwrite them",
                          "choose a new or empty output_dir")


def _check_resume_kind(checkpoint: str, recipe: Recipe) -> None:
    """A LoRA checkpoint holds adapters only, a full one whole weights: resuming across kinds cannot work.
    (A classify checkpoint holds the heads model whatever heads.mode, so the check is the VLM route's.)"""
    if recipe.task == "classify":
        return
    is_lora = (Path(checkpoint) / "adapter_config.json").is_file()
    if is_lora != (recipe.finetuning == "lora"):
        kind = "LoRA" if is_lora else "full fine-tuning"
        raise VlmtaxError(f"checkpoint {checkpoint} is from {kind} but the recipe says finetuning={recipe.finetuning}",
                          f"resume with finetuning={'lora' if is_lora else 'full'}, or start a new output_dir")


def _output_dir_state(recipe: Recipe) -> str | bool | None:
    """What to resume from; refuses to silently overwrite a finished or interrupted run."""
    _check_output_dir(recipe)
    out = recipe.output_dir
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if out.is_dir() else []
    if isinstance(recipe.resume, str):
        if not Path(recipe.resume).is_dir():
            raise VlmtaxError(f"resume checkpoint {recipe.resume} not found", "pass a checkpoint-N folder or true")
        _check_resume_kind(recipe.resume, recipe)
        return recipe.resume
    if recipe.resume:
        if checkpoints:
            _check_resume_kind(str(checkpoints[-1]), recipe)
        return str(checkpoints[-1]) if checkpoints else None
    if (out / META_FILE).exists():
        raise VlmtaxError(f"output_dir {out} already holds a finished run", "choose another output_dir")
    if checkpoints:
        raise VlmtaxError(f"output_dir {out} holds checkpoints of an interrupted run",
                          "set resume=true to continue it, or choose another output_dir")
    return None


def _relaunch(recipe_path: Path, overrides: list[str], num_processes: int) -> None:
    """Data-parallel run: `accelerate launch` this same command (gloo on the CPU, NCCL on GPUs).

    `--multi_gpu` is accelerate's torchrun launcher on the CPU too: its `--cpu` launcher starts ONE process
    whatever --num_processes says. The ranks then find no GPU and join over gloo (training_args: use_cpu)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    cmd += ["-m", "vlmtax", "sft", str(recipe_path), *overrides]
    proc = subprocess.run(cmd, env={**os.environ, "VLMTAX_LAUNCHED": "1"})
    if proc.returncode != 0:
        raise VlmtaxError(f"distributed training exited with code {proc.returncode}", "see the log above")


def sft(recipe_path: str | Path, overrides: list[str] | None = None, num_processes: int = 1) -> Path:
    """Fine-tune as the recipe says; returns the run dir."""
    recipe = load_recipe(recipe_path, overrides)
    launched = "VLMTAX_LAUNCHED" in os.environ or "LOCAL_RANK" in os.environ
    if not launched:
        from vlmtax.loading import useful_processes
        from vlmtax.records import load_records

        if num_processes > 1:
            check_data_dir(recipe.data)  # before counting its rows
        rows = len(load_records(recipe.data, "train.json")) if num_processes > 1 else 1
        num_processes = useful_processes(num_processes, math.ceil(rows / recipe.train.batch_size), "batch", "sft")
    if num_processes > 1 and not launched:
        # Every check that needs no weights, before spawning: each rank would otherwise print the same error.
        _output_dir_state(recipe)  # refuse a finished or interrupted run before spawning processes
        check_logging(recipe)
        check_lora_targets(recipe)
        if recipe.task == "classify":
            from vlmtax.classify import check_classify_recipe

            check_classify_recipe(recipe)
        _relaunch(Path(recipe_path), list(overrides or []), num_processes)
        return recipe.output_dir
    return train(recipe)


def train(recipe: Recipe, hw: Hardware | None = None) -> Path:
    """Train either route in this process (one rank of a launched run, or the only process). The libraries'
    logs, warnings and bars go to the run dir's train.log (vlmtax.runlog), not to the terminal."""
    out = recipe.output_dir
    before = {p.name for p in out.iterdir()} if out.is_dir() else None
    try:
        with library_output(out / TRAIN_LOG):
            return _train(recipe, hw or Hardware.detect())
    except BaseException as exc:
        failed = disk_full(exc, out)
        if failed is not None and os.environ.get("RANK", "0") == "0":  # no half-written weights or checkpoint left
            remove_new_entries(out, before)
        if failed is not None:
            raise VlmtaxError(f"{failed.problem}; {out} is left as it was before this run", failed.fix) from None
        # a run refused before it began leaves no run dir behind, not even the log of its refusal
        if before is None and out.is_dir() and [p.name for p in out.iterdir()] == [TRAIN_LOG]:
            shutil.rmtree(out)
        raise
    finally:
        close_process_group()


def close_process_group() -> None:
    """Tear down torch.distributed before the interpreter exits: a gloo group left to the exit-time destructors
    aborted a rank ("terminate called without an active exception", exit -6) after a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(recipe: Recipe, hw: Hardware) -> Path:
    if recipe.task == "classify":
        from vlmtax.classify import train_classify

        return train_classify(recipe, hw)
    check_data_dir(recipe.data)
    precision = resolve_precision(recipe, hw)
    check_gpu_features(recipe, hw)
    check_logging(recipe)
    resume_from = _output_dir_state(recipe)
    check_lora_targets(recipe)
    from transformers import set_seed

    from vlmtax.train_loop import build_trainer  # TRL's import: after the input checks, so that they fail fast

    set_seed(recipe.train.seed)  # LoRA initialisation draws from the global RNG: same seed, same run
    model, processor = load_model(recipe, precision)
    model = prepare_model(model, recipe, precision)
    if resume_from is not None:  # the Trainer's resume would leave a full fine-tune's weights at the base model's
        restore_full_weights(model, resume_from)
    trainer = build_trainer(recipe, model, processor, precision)
    trainer.train(resume_from_checkpoint=resume_from)
    save_run(trainer, recipe, processor, precision)
    return recipe.output_dir


def train_runtime(log_history: list[dict]) -> float | None:
    """Seconds the Trainer spent in its training loop (no model loading or feature extraction), or None."""
    return next((h["train_runtime"] for h in reversed(log_history) if "train_runtime" in h), None)


WEIGHT_FILES = (ADAPTER_WEIGHTS, "model.safetensors", "model.safetensors.index.json")


def save_run(trainer: Any, recipe: Recipe, processor: Any, precision: str) -> None:
    out = recipe.output_dir
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        # Trainer.save_model writes weights under FSDP only for FULL_STATE_DICT; SHARDED_STATE_DICT (fine for the
        # checkpoints, which resume) left the run dir without weights. The final save gathers them whole.
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return
    if not any((out / name).is_file() for name in WEIGHT_FILES):  # vlmtax_meta.json marks a run merge/predict load
        raise VlmtaxError(f"training finished but saved no weights in {out} ({' or '.join(WEIGHT_FILES)})",
                          "under FSDP use fsdp_state_dict_type: FULL_STATE_DICT, or resume from the last checkpoint")
    processor.save_pretrained(str(out))
    shutil.copyfile(recipe.data / "taxonomy.json", out / "taxonomy.json")
    (out / "recipe.yaml").write_text(dump_recipe(recipe))
    history = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    data_files = [recipe.data / n for n in ("train.json", "val.json", "taxonomy.json") if (recipe.data / n).exists()]
    write_json(out / META_FILE, run_meta(
        stage="sft", base_model=str(Path(recipe.model).resolve()) if Path(recipe.model).exists() else recipe.model,
        finetuning=recipe.finetuning, precision=precision, trust_remote_code=recipe.trust_remote_code,
        quantization=recipe.quantization, data=str(recipe.data.resolve()), data_sha256=files_hash(data_files),
        global_step=trainer.state.global_step, started_at_step=trainer.start_step.step,
        final_loss=next((h["loss"] for h in reversed(history) if "loss" in h), None),
        train_runtime_s=train_runtime(trainer.state.log_history),
        history=history, eval_metric=callback.summary() if (callback := getattr(trainer, "metric_callback", None))
        else None))
