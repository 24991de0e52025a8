"""The training loop: TRL's SFTTrainer driving vlmtax's collator, with LoRA+ and a non-finite-loss guard."""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from vlmtax.data.pixel_cache import pixel_cache
from vlmtax.data.records import load_records
from vlmtax.data.taxonomy import Taxonomy
from vlmtax.errors import VlmtaxError, first_line
from vlmtax.generate import packing, vision_cache
from vlmtax.generate.collator import IGNORE, Collator, record_lengths
from vlmtax.generate.predictor import generate_route
from vlmtax.models.families import family_of
from vlmtax.train import console as train_console
from vlmtax.train.console import quiet_args
from vlmtax.train.evaluation import attach as attach_metric
from vlmtax.train.evaluation import eval_args
from vlmtax.train.schema import Recipe
from vlmtax.train.steps import OwnOptimizer, StartStep, planned_max_steps, stop_if_non_finite
from vlmtax.train.trainer_extra import extra_args, report_to


class GuardedTrainer(OwnOptimizer, SFTTrainer):
    """SFTTrainer whose loss projects only the answer positions onto the vocabulary, and that stops at
    the first non-finite loss with its likely cause instead of training on NaNs."""

    precision: str = "fp32"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        inputs = packing.model_inputs(model, vision_cache.model_inputs(inputs))
        targets = labels[:, 1:]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets != IGNORE
        # Prompt and image positions never carry loss, so their logits (most of a sequence) are never built.
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1]).float()
        gold = targets[keep[:, :-1]]
        n_items = num_items_in_batch if num_items_in_batch is not None else gold.numel()
        loss = torch.nn.functional.cross_entropy(logits, gold, reduction="sum") / torch.as_tensor(n_items).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count spans every rank
        mode = "train" if model.training else "eval"
        with torch.no_grad():
            correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == gold).sum()).sum()
            total = self.accelerator.gather_for_metrics(torch.tensor(gold.numel(), device=gold.device)).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / total.clamp(min=1)).item())
        if model.training:
            self._stop_if_non_finite(loss)
        return (loss, outputs) if return_outputs else loss

    def _stop_if_non_finite(self, loss: torch.Tensor) -> None:
        fix = ("fp16 overflows in Qwen2-VL: use precision=bf16 (Ampere or newer), precision=fp32, "
               "or a lower train.lr") if self.precision == "fp16" else "lower train.lr or check the data"
        stop_if_non_finite(self, loss, fix)


def drop_frozen_tower_input_grads(model: Any) -> int:
    """Take transformers' and PEFT's input-gradient hooks off a vision tower that trains nothing before its
    projector; returns how many came off.

    With gradient checkpointing (or PEFT) they hook every sub-model's input embeddings so that the output
    requires grad, the tower's patch embedding included: the backward pass then runs through the frozen
    tower for nothing, its gradients reaching no weight. A trainable projector's weights get theirs
    without it; the language model's hook stays."""
    tower = vision_cache.find_vision_tower(model)
    family = family_of(model)
    if tower is None or any(p.requires_grad and family.part(n) == "vision" for n, p in model.named_parameters()):
        return 0
    removed = 0
    for module in tower.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "").startswith("make_inputs_require_grad"):
                del module._forward_hooks[key]
                removed += 1
    return removed


class FrozenTower(TrainerCallback):
    """Runs drop_frozen_tower_input_grads once the Trainer has turned gradient checkpointing on."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        drop_frozen_tower_input_grads(model)


def training_args(recipe: Recipe, precision: str, has_eval: bool, n_train: int | None = None) -> SFTConfig:
    t = recipe.train
    save = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "epoch"}
    return SFTConfig(
        output_dir=str(recipe.output_dir),
        num_train_epochs=t.epochs,
        max_steps=planned_max_steps(t, n_train),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        use_liger_kernel=False,  # TRL's switch disables the fused loss for this trainer; sft patches liger itself
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=recipe.log.every,
        report_to=report_to(recipe),
        **eval_args(recipe, has_eval),
        save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.num_workers,
        use_cpu=not torch.cuda.is_available(),  # launched ranks on a CPU join over gloo only when told so
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies; warns on the CPU
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        prediction_loss_only=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,  # the collator never truncates; over-long records are errors
        ddp_find_unused_parameters=False if recipe.finetuning == "full" else None,
        **save,
        **{**quiet_args(), **extra_args(recipe)},  # train.extra may set disable_tqdm itself
    )


def loraplus_optimizer(recipe: Recipe) -> Any:
    """LoRA+: the B matrices learn `plus_ratio` times faster than the A matrices (PEFT's implementation), as a
    model -> optimizer builder for `OwnOptimizer`; None without LoRA+."""
    if recipe.finetuning != "lora" or not recipe.lora.plus_ratio:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return lambda model: create_loraplus_optimizer(model, torch.optim.AdamW, lr=recipe.train.lr,
                                                   loraplus_lr_ratio=recipe.lora.plus_ratio,
                                                   weight_decay=recipe.train.weight_decay)


def build_trainer(recipe: Recipe, model: Any, processor: Any, precision: str) -> GuardedTrainer:
    taxonomy = Taxonomy.load(recipe.data / "taxonomy.json")
    train_records = load_records(recipe.data, "train.json")
    val_path = recipe.data / "val.json"
    val_records = load_records(recipe.data, "val.json") if val_path.exists() else []
    records = train_records + val_records
    if not train_records:
        raise VlmtaxError(f"{recipe.data}/train.json holds no records", "prepare a catalogue with more rows")
    lengths = record_lengths(processor, taxonomy, records, recipe.image.min_pixels, recipe.image.max_pixels)
    too_long = [(r.get("id"), n) for r, n in zip(records, lengths) if n > recipe.train.max_length]
    if too_long:
        rid, n = too_long[0]
        raise VlmtaxError(
            f"{len(too_long)} record(s) exceed train.max_length={recipe.train.max_length} "
            f"(first: id {rid}, {n} tokens)",
            "raise train.max_length, lower image.max_pixels, or re-run prepare with --model and --max-length")
    n_train = len(train_records)
    train_ds = Dataset.from_dict({"index": list(range(n_train)), "length": lengths[:n_train]})
    eval_ds = Dataset.from_dict({"index": list(range(n_train, len(records))), "length": lengths[n_train:]}) \
        if val_records else None
    try:
        args = training_args(recipe, precision, eval_ds is not None, n_train)
    except (ValueError, TypeError) as exc:  # a train.extra value that SFTConfig refuses
        raise VlmtaxError(f"SFTConfig refused the training arguments: {first_line(exc)}",
                          "check the values in train.extra") from None
    if recipe.train.packing:
        packing.check_family(model)
    trainer = GuardedTrainer(
        model=model, args=args, data_collator=Collator(processor, taxonomy, records, recipe.train.max_length,
                                                      packing=recipe.train.packing, pixel_cache=pixel_cache(recipe)),
        train_dataset=train_ds, eval_dataset=eval_ds, processing_class=processor,
    )
    trainer.build_optimizer = loraplus_optimizer(recipe)
    trainer.precision = precision
    trainer.data_collator.vision_cache = vision_cache.setup(trainer, recipe, processor, records)
    if "flash" in str(getattr(model.config, "_attn_implementation", "")):
        trainer.data_collator.pack_capacity = recipe.train.max_length  # varlen attention: long rows cost nothing
    trainer.start_step = StartStep()
    trainer.add_callback(trainer.start_step)
    trainer.add_callback(FrozenTower())
    train_console.attach(trainer)
    trainer.metric_callback = attach_metric(trainer, recipe, taxonomy, val_records,
                                           generate_route(processor, recipe.train.batch_size, taxonomy.template))
    return trainer
