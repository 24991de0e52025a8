"""`train.extra`: the recipe's escape hatch to the trainer's own arguments (TRL's SFTConfig).

The recipe maps its fields into SFTConfig by hand (generate/trainer.py: training_args). Anything else SFTConfig
accepts (`optim`, `report_to`, `torch_compile`, `dataloader_*`, ...) goes through `train.extra`, checked
when the recipe is loaded: an unknown key is an error with the closest field suggested, and a key the
recipe already sets is refused with the recipe field to use instead.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from vlmtax.errors import VlmtaxError
from vlmtax.train.schema import Recipe

# SFTConfig fields that recipe fields set, and the recipe field to use instead.
OWNED = {
    "output_dir": "output_dir",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler",
    "warmup_steps": "train.warmup_ratio",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing_kwargs": "train.gradient_checkpointing",
    "use_liger_kernel": "train.liger",
    "seed": "train.seed",
    "bf16": "precision",
    "fp16": "precision",
    "logging_steps": "log.every",
    "eval_strategy": "train.eval",
    "eval_steps": "train.save_steps",
    "load_best_model_at_end": "train.best_by",
    "metric_for_best_model": "train.best_by",
    "greater_is_better": "train.best_by",
    "save_strategy": "train.save_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "dataloader_num_workers": "train.num_workers",
    "train_sampling_strategy": "train.group_by_length",
    "resume_from_checkpoint": "resume",
}
# Fields vlmtax's own collator, loss and data path depend on: not settable at all.
FIXED = ("remove_unused_columns", "prediction_loss_only", "dataset_kwargs", "max_length", "length_column_name",
         "ddp_find_unused_parameters", "use_cpu")


def _sft_fields() -> list[str]:
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig) if f.init]


def check_extra(recipe: Recipe, source: str) -> None:
    """Refuse `train.extra` keys that SFTConfig lacks, that the recipe owns, or that vlmtax fixes."""
    extra = recipe.train.extra
    if not extra:
        return
    fields = _sft_fields()
    for key in extra:
        where = f"{source}: train.extra.{key}"
        if key in OWNED:
            raise VlmtaxError(f"{where} is set by the recipe", f"use the recipe key {OWNED[key]} instead")
        if key in FIXED:
            raise VlmtaxError(f"{where} is fixed by vlmtax (its collator and loss rely on it)",
                              "remove it from train.extra")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            raise VlmtaxError(f"{where} is not an SFTConfig argument",
                              f"did you mean {close[0]}?" if close else "see TRL's SFTConfig for the valid names")
    _check_types(extra, source)
    if "report_to" in extra:
        _check_report_to(extra["report_to"], source)
    if "optim" in extra and recipe.finetuning == "lora" and recipe.lora.plus_ratio:
        raise VlmtaxError(f"{source}: train.extra.optim is ignored while LoRA+ builds its own optimizer",
                          "set lora.plus_ratio: null to choose the optimizer with train.extra.optim")


def _check_types(extra: dict[str, Any], source: str) -> None:
    """Each value against its SFTConfig field's type (SFTConfig, a dataclass, checks none: `notabool` would be
    a true flag). Lax coercions (`"false"` -> False, `"8"` -> 8) replace the value, so the trainer gets them."""
    import typing

    from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    for key, value in extra.items():
        try:
            checked = TypeAdapter(hints[key]).validate_python(value)
        except PydanticSchemaGenerationError:  # a type pydantic cannot check: left to SFTConfig
            continue
        except ValidationError as exc:
            expected = getattr(hints[key], "__name__", None) or str(hints[key]).replace("typing.", "")
            raise VlmtaxError(f"{source}: train.extra.{key}={value!r} is not a valid {expected} "
                              f"({exc.errors()[0]['msg']})", f"give train.extra.{key} a {expected} value") from None
        if isinstance(checked, (bool, int, float)) and (type(checked) is not type(value) or checked != value):
            extra[key] = checked


def _check_report_to(value: Any, source: str) -> None:
    """Each logger named must be one the Trainer knows (whether it is installed is checked before training:
    `check_loggers_installed`)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in [value] if isinstance(value, str) else list(value or []):
        if name not in ("none", "all") and name not in INTEGRATION_TO_CALLBACK:
            raise VlmtaxError(f"{source}: train.extra.report_to names {name!r}, which the Trainer does not know",
                              f"use one of: {', '.join(INTEGRATION_TO_CALLBACK)}")


def check_loggers_installed(recipe: Recipe) -> None:
    """Before training: a logger report_to names but this machine lacks stops the Trainer with a RuntimeError."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    available, names = get_available_reporting_integrations(), report_to(recipe)
    for name in [] if isinstance(names, str) else names:
        if name not in ("none", "all", "tensorboard") and name not in available:  # tensorboard: check_logging's
            raise VlmtaxError(f"train.extra.report_to names {name!r}, which is not installed",
                              f"install the {name} package, or remove it from train.extra.report_to")


def report_to(recipe: Recipe) -> list[str] | str:
    """Loggers: tensorboard from `log.tensorboard`, plus any that `train.extra.report_to` names."""
    names = ["tensorboard"] if recipe.log.tensorboard else []
    extra = recipe.train.extra.get("report_to", [])
    for name in [extra] if isinstance(extra, str) else list(extra):
        if name != "none" and name not in names:
            names.append(name)
    return names or "none"


def extra_args(recipe: Recipe) -> dict[str, Any]:
    """The `train.extra` keys to pass to SFTConfig as they are (report_to is merged by `report_to`)."""
    return {k: v for k, v in recipe.train.extra.items() if k != "report_to"}
