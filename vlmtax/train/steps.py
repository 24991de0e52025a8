"""Pieces both routes' trainers share: their own optimizer under FSDP, the non-finite-loss stop, the step a run
(re)started at, and the step budget (train.max_steps / train.min_steps)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers import TrainerCallback

from vlmtax.errors import VlmtaxError


class OwnOptimizer:
    """A Trainer mixin that builds vlmtax's optimizer (LoRA+, the heads' two learning rates) inside
    `create_optimizer`, the place the Trainer allows under FSDP: a passed-in optimizer is refused there
    ("Passing `optimizers` is not allowed if PyTorch FSDP is enabled"), since it must see the sharded parameters
    of the model that accelerate prepared, which is the `model` handed in here."""

    build_optimizer: Any = None  # model -> torch.optim.Optimizer, or None for the Trainer's own AdamW

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.build_optimizer is not None:
            self.optimizer = self.build_optimizer(self.model if model is None else model)
        return super().create_optimizer(model)


def stop_if_non_finite(trainer: Any, loss: torch.Tensor, fix: str) -> None:
    """Every rank stops with the same error: one rank raising alone would leave the others waiting in the
    next all-reduce. Costs one tiny all-reduce per step, and only with more than one process."""
    bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    processes = trainer.accelerator.num_processes
    if processes > 1:
        bad = trainer.accelerator.reduce(bad, reduction="sum")
    n_bad = int(bad.item())
    if n_bad:
        where = f" on {n_bad} of {processes} processes" if processes > 1 else ""
        raise VlmtaxError(f"non-finite loss at step {trainer.state.global_step}{where}", fix)


class StartStep(TrainerCallback):
    """Remembers the step training (re)started at, so a resumed run can prove where it picked up."""

    step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def planned_max_steps(t: Any, n_train: int | None) -> int:
    """TrainingArguments.max_steps: train.max_steps, else train.min_steps where train.epochs over `n_train`
    rows would take fewer optimiser steps (-1: the epochs decide)."""
    if t.max_steps:
        return t.max_steps
    if not t.min_steps or not n_train:
        return -1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = math.ceil(math.ceil(n_train / (t.batch_size * world)) / t.grad_accum)
    return t.min_steps if per_epoch * t.epochs < t.min_steps else -1
