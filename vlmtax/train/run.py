"""Rules every training run keeps, whichever route: the precision for the hardware, the output dir (never the
model's or the data's, never someone else's files, never a finished run overwritten), what to resume from, the
loggers, and the Trainer's own training time."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from vlmtax.errors import VlmtaxError
from vlmtax.fileio import check_writable, guard_outputs
from vlmtax.meta import META_FILE
from vlmtax.models.loading import Hardware
from vlmtax.runlog import TRAIN_LOG
from vlmtax.train.schema import Recipe
from vlmtax.train.trainer_extra import check_loggers_installed


def resolve_precision(recipe: Recipe, hw: Hardware) -> str:
    """bf16 where the GPU has it, fp16 on older GPUs (T4, V100), fp32 on the CPU."""
    if recipe.precision == "auto":
        return "bf16" if hw.bf16_ok else "fp16" if hw.cuda else "fp32"
    if recipe.precision in ("bf16", "fp16") and not hw.cuda:
        raise VlmtaxError(f"precision={recipe.precision} needs a CUDA GPU", "use precision=auto or fp32 on the CPU")
    if recipe.precision == "bf16" and not hw.bf16_ok:
        raise VlmtaxError("this GPU has no bf16 support (T4/V100 class)", "use precision=fp16 or auto")
    return recipe.precision


def check_logging(recipe: Recipe) -> None:
    if recipe.log.tensorboard and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        raise VlmtaxError("log.tensorboard=true but tensorboard is not installed",
                          "pip install 'vlmtax[tensorboard]', or set log.tensorboard=false")
    if recipe.train.extra.get("report_to"):
        check_loggers_installed(recipe)


_RUN_ENTRIES = re.compile(r"checkpoint-\d+|runs|vision_cache|" + re.escape(META_FILE))


def check_output_dir(recipe: Recipe) -> None:
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


def check_resume_kind(checkpoint: str, recipe: Recipe) -> None:
    """A LoRA checkpoint holds adapters only, a full one whole weights: resuming across kinds cannot work.
    (A classify checkpoint holds the heads model whatever heads.mode, so the check is the VLM route's.)"""
    if recipe.task == "classify":
        return
    is_lora = (Path(checkpoint) / "adapter_config.json").is_file()
    if is_lora != (recipe.finetuning == "lora"):
        kind = "LoRA" if is_lora else "full fine-tuning"
        raise VlmtaxError(f"checkpoint {checkpoint} is from {kind} but the recipe says finetuning={recipe.finetuning}",
                          f"resume with finetuning={'lora' if is_lora else 'full'}, or start a new output_dir")


def output_dir_state(recipe: Recipe) -> str | bool | None:
    """What to resume from; refuses to silently overwrite a finished or interrupted run."""
    check_output_dir(recipe)
    out = recipe.output_dir
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])) if out.is_dir() else []
    if isinstance(recipe.resume, str):
        if not Path(recipe.resume).is_dir():
            raise VlmtaxError(f"resume checkpoint {recipe.resume} not found", "pass a checkpoint-N folder or true")
        check_resume_kind(recipe.resume, recipe)
        return recipe.resume
    if recipe.resume:
        if checkpoints:
            check_resume_kind(str(checkpoints[-1]), recipe)
        return str(checkpoints[-1]) if checkpoints else None
    if (out / META_FILE).exists():
        raise VlmtaxError(f"output_dir {out} already holds a finished run", "choose another output_dir")
    if checkpoints:
        raise VlmtaxError(f"output_dir {out} holds checkpoints of an interrupted run",
                          "set resume=true to continue it, or choose another output_dir")
    return None


def train_runtime(log_history: list[dict]) -> float | None:
    """Seconds the Trainer spent in its training loop (no model loading or feature extraction), or None."""
    return next((h["train_runtime"] for h in reversed(log_history) if "train_runtime" in h), None)
