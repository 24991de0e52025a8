"""The classify route's training loop: transformers.Trainer over the heads (and backbone), with the seeds'
losses and samplers, separate backbone/head learning rates and the same non-finite-loss guard as sft.

Resume, checkpoints, logging, evaluation loss and multi-process runs (`accelerate launch`, as for the
generate route) are the Trainer's own; `train.eval_metric` / `best_by` / `patience` plug the heads forward
into vlmtax.train.evaluation as the generate route plugs in its constrained decoder.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from vlmtax.data.pixel_cache import pixel_cache
from vlmtax.heads.data import ClassifyData, Collate, Rows, augmenter
from vlmtax.heads.losses import CategoryLoss, LossCfg, category_loss, category_loss_table
from vlmtax.heads.model import Classifier, category_groups, values_mask
from vlmtax.heads.samplers import make_sampler
from vlmtax.train import console as train_console
from vlmtax.train.console import quiet_args
from vlmtax.train.evaluation import eval_args
from vlmtax.train.schema import Recipe
from vlmtax.train.steps import OwnOptimizer, StartStep, planned_max_steps, stop_if_non_finite


def heads_loss_tables(cfg: LossCfg, data: ClassifyData, attribute_weights: dict[str, float]) -> list[CategoryLoss]:
    """Per category, the loss tables of its heads (attribute weights keyed `Category/attribute` or `attribute`)."""
    counts = data.counts()
    tables = []
    for group in category_groups(data.layout):
        specs = [data.layout[i] for i in group]
        weights = [attribute_weights.get(f"{s.category}/{s.attribute}", attribute_weights.get(s.attribute, 1.0))
                   for s in specs]
        tables.append(category_loss_table(cfg, values_mask(data.layout, group), [counts[i] for i in group], weights))
    return tables


def heads_loss(outputs: list, targets: torch.Tensor, tables: list[CategoryLoss], cfg: LossCfg,
               progress: float) -> torch.Tensor:
    """Mean over every known label of the batch, each weighted by its class and attribute weights."""
    total, n = None, 0
    for c, rows, logits in outputs:
        loss_sum, k = category_loss(logits, targets[rows, : logits.shape[1]], tables[c], cfg, progress)
        total = loss_sum if total is None else total + loss_sum
        n += k
    return total / max(n, 1)


class HeadsTrainer(OwnOptimizer, Trainer):
    precision: str = "fp32"

    def setup(self, recipe: Recipe, data: ClassifyData) -> None:
        h = recipe.heads
        self.loss_cfg = LossCfg(kind=h.loss, label_smoothing=h.label_smoothing, beta=h.beta, gamma=h.gamma,
                                max_margin=h.ldam_max_margin, scale=h.ldam_scale, drw_start=h.drw_start)
        self.loss_tables = heads_loss_tables(self.loss_cfg, data, h.attribute_weights)
        self.sampler_kind, self.data = h.sampler, data

    def _get_train_sampler(self, train_dataset=None):
        return make_sampler(self.sampler_kind, self.data.train.categories, self.data.train.labels,
                            self.args.per_device_train_batch_size, self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop("targets")
        outputs = model(**inputs)
        progress = self.state.global_step / max(self.state.max_steps, 1)
        loss = heads_loss(outputs, targets, self.loss_tables, self.loss_cfg, progress)
        if model.training:
            fix = ("fp16 overflowed: use precision=bf16 or fp32, or a lower train.lr" if self.precision == "fp16"
                   else "lower train.lr (or heads.backbone_lr) or check the data")
            stop_if_non_finite(self, loss, fix)
        return (loss, outputs) if return_outputs else loss


def heads_args(recipe: Recipe, precision: str, has_eval: bool, n_train: int | None = None) -> TrainingArguments:
    t = recipe.train
    save = {"save_strategy": "steps", "save_steps": t.save_steps} if t.save_steps else {"save_strategy": "epoch"}
    return TrainingArguments(
        output_dir=str(recipe.output_dir), num_train_epochs=t.epochs, max_steps=planned_max_steps(t, n_train),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        seed=t.seed, bf16=precision == "bf16", fp16=precision == "fp16", logging_steps=recipe.log.every,
        report_to=["tensorboard"] if recipe.log.tensorboard else "none",
        save_total_limit=t.save_total_limit, **eval_args(recipe, has_eval),
        dataloader_num_workers=t.num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False, prediction_loss_only=True, label_names=["targets"],
        use_cpu=not torch.cuda.is_available(),  # launched ranks on a CPU join over gloo only when told so
        # the heads of a category absent from a batch get no gradient in that step, in every mode
        ddp_find_unused_parameters=True,
        **save,
        **quiet_args(),
    )


def heads_optimizer(model: Classifier, recipe: Recipe) -> torch.optim.Optimizer:
    """Heads at train.lr, the backbone (when trained) at heads.backbone_lr (default train.lr / 10)."""
    groups = [{"params": [p for p in model.heads.parameters() if p.requires_grad], "lr": recipe.train.lr}]
    if model.encoder is not None:
        backbone = [p for p in model.encoder.parameters() if p.requires_grad]
        if backbone:
            groups.append({"params": backbone, "lr": recipe.heads.backbone_lr or recipe.train.lr / 10})
    # fused: one kernel for every parameter instead of ~10 ops each; on the CPU that measured the
    # optimizer step 4x faster for the 20-odd head tensors (it supports CPU and CUDA alike)
    return torch.optim.AdamW(groups, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay,
                             fused=not torch.backends.mps.is_available())


def build_heads_trainer(recipe: Recipe, model: Classifier, data: ClassifyData, encoder: Any, processor: Any,
                        precision: str) -> HeadsTrainer:
    features, extracted = None, None
    if recipe.heads.mode == "frozen":
        from vlmtax.heads.features import FeatureCache, backbone_fingerprint, cached_features, default_cache_dir

        cache = FeatureCache(recipe.heads.cache_dir or default_cache_dir(),
                             backbone_fingerprint(recipe.model, processor, next(encoder.parameters()).dtype))
        args = heads_args(recipe, precision, bool(data.val.images), len(data.train.images))
        with args.main_process_first(desc="feature extraction"):  # rank 0 fills the cache, the others read it
            features, extracted = cached_features(encoder, processor, data.train.images + data.val.images, cache,
                                                  recipe.heads.extract_batch_size)
    augment = augmenter(recipe.heads.augment) if recipe.heads.augment.enabled else None
    collate = Collate(data, processor, features, augment, pixel_cache(recipe) if features is None else None)
    n_train, n_val = len(data.train.images), len(data.val.images)
    trainer = HeadsTrainer(model=model, args=heads_args(recipe, precision, n_val > 0, n_train), data_collator=collate,
                           train_dataset=Rows(n_train), eval_dataset=Rows(n_val, n_train) if n_val else None)
    trainer.build_optimizer = lambda prepared: heads_optimizer(prepared, recipe)
    trainer.setup(recipe, data)
    trainer.metric_callback = None
    if recipe.train.eval_metric or recipe.train.best_by:
        from vlmtax.data.records import load_records
        from vlmtax.heads.predictor import heads_route
        from vlmtax.train.evaluation import attach

        val_records = load_records(recipe.data, "val.json") if n_val else []
        route = heads_route(collate, [str(r.get("id")) for r in val_records], n_train, recipe.train.batch_size)
        trainer.metric_callback = attach(trainer, recipe, data.taxonomy, val_records, route)
    trainer.precision = precision
    trainer.features_extracted = extracted
    trainer.start_step = StartStep()
    trainer.add_callback(trainer.start_step)
    train_console.attach(trainer)
    return trainer
