"""The generate route's sft: prepared records -> VLM (+ LoRA / LoRA+ / QLoRA, or full) -> TRL SFTTrainer -> run dir.

Run dir: adapter (or full weights), processor + chat template, taxonomy.json, recipe.yaml,
vlmtax_meta.json (written last: its presence marks a finished run) and checkpoint-N folders.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from vlmtax.data.records import check_data_dir
from vlmtax.errors import VlmtaxError
from vlmtax.fileio import write_json
from vlmtax.generate.model import check_gpu_features, check_lora_targets, load_model, prepare_model
from vlmtax.meta import META_FILE, files_hash, run_meta
from vlmtax.models.loading import ADAPTER_WEIGHTS, Hardware, restore_full_weights
from vlmtax.train.recipe import dump_recipe
from vlmtax.train.run import check_logging, output_dir_state, resolve_precision, train_runtime
from vlmtax.train.schema import Recipe


def train_generate(recipe: Recipe, hw: Hardware) -> Path:
    """The generate route in this process: checks, model, LoRA, TRL's trainer, the run dir."""
    check_data_dir(recipe.data)
    precision = resolve_precision(recipe, hw)
    check_gpu_features(recipe, hw)
    check_logging(recipe)
    resume_from = output_dir_state(recipe)
    check_lora_targets(recipe)
    from transformers import set_seed

    from vlmtax.generate.trainer import build_trainer  # TRL's import: after the input checks, so that they fail fast

    set_seed(recipe.train.seed)  # LoRA initialisation draws from the global RNG: same seed, same run
    model, processor = load_model(recipe, precision)
    model = prepare_model(model, recipe, precision)
    if resume_from is not None:  # the Trainer's resume would leave a full fine-tune's weights at the base model's
        restore_full_weights(model, resume_from)
    trainer = build_trainer(recipe, model, processor, precision)
    trainer.train(resume_from_checkpoint=resume_from)
    save_run(trainer, recipe, processor, precision)
    return recipe.output_dir


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
