"""The recipe schema: one typed, validated set of pydantic models (unknown keys are errors)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Lora(_Strict):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # all-linear = every linear layer of the language model; the vision blocks get LoRA only when
    # freeze.vision is false.
    target: str | list[str] = "all-linear"
    plus_ratio: float | None = Field(16, gt=0)  # LoRA+: lr of B matrices = lr * ratio; null = plain LoRA
    modules_to_save: list[str] = Field(default_factory=list)


class Freeze(_Strict):
    vision: bool = True
    projector: bool = True  # the merger that maps vision features into the language model


class ImageCfg(_Strict):
    min_pixels: int = Field(3136, ge=784)
    max_pixels: int = Field(262144, ge=784)
    # timm backbones (task: classify): input side in px and centre-crop share; null = the model's pretrained_cfg
    size: int | None = Field(None, ge=16)
    crop_pct: float | None = Field(None, gt=0, le=1)


class Train(_Strict):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    # A floor in optimiser steps: on a catalogue too small for `epochs` to reach it, training runs this many
    # steps instead (more epochs). A budget in epochs of one catalogue learns nothing on a smaller one.
    min_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(4, ge=1)
    lr: float = Field(1.0e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = True
    liger: bool = False
    seed: int = 42
    max_length: int = Field(2048, ge=16)  # tokens per record; longer records are an error, never truncated
    # Off by default: lengths follow the category (its attribute list is in the prompt and the answer), so
    # length-grouped batches hold one category each. Measured on the demo catalogue, the model then learns
    # each category's label priors but not to read the images (colour gain over the baseline +0.00 vs +0.65
    # with random batches, same steps and speed).
    group_by_length: bool = False
    eval: bool = True  # evaluation loss on val.json every epoch
    # The official metric on val.csv at each evaluation (decoded by the run's own predict path), a fixed
    # stratified sample of eval_rows rows (null: all); best_by keeps the best checkpoint, patience stops early.
    eval_metric: bool = False
    eval_rows: int | None = Field(None, ge=1)
    best_by: Literal["score", "loss"] | None = None
    patience: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)  # null = a checkpoint per epoch
    save_total_limit: int = Field(2, ge=1)
    num_workers: int = Field(0, ge=0)
    # Processed images kept in memory between epochs, per process (pixel_cache.py); 0 = off. Not used with
    # num_workers > 0, with cached vision features, or for augmented rows.
    pixel_cache_mb: int = Field(1024, ge=0)
    # Frozen vision features computed once before training and read from disk every epoch (generate/vision_cache.py);
    # null = on when freeze.vision and freeze.projector are both on.
    cache_vision: bool | None = None
    # Stored in the dtype the model consumes (exact) or in fp8 with per-row scales (half the disk); auto = exact
    # when it fits, else fp8 (vision_cache_storage.py).
    cache_vision_storage: Literal["auto", "exact", "fp8"] = "auto"
    # The cache must fit in its folder's free disk less a headroom; a number also caps its whole size in GB.
    # Past either, train without the cache (one warning naming the sizes and the fix).
    cache_vision_max_gb: float | None = Field(None, gt=0)
    cache_vision_dir: Path | None = None  # null = <output_dir>/vision_cache
    packing: bool = False  # several records per row up to max_length, attention kept per record (packing.py)
    # Passed to TRL's SFTConfig as they are (checked in train/trainer_extra.py): optim, report_to, torch_compile, ...
    extra: dict[str, Any] = Field(default_factory=dict)


class Log(_Strict):
    every: int = Field(10, ge=1)
    tensorboard: bool = False


class Augment(_Strict):
    """Training-only geometric augmentation; never colour, since colour is a label."""

    enabled: bool = False
    crop_scale: float = Field(0.8, gt=0, le=1)  # random resized crop keeps at least this share of the area
    flip: bool = True
    rotation: float = Field(5.0, ge=0, le=45)  # degrees


class Heads(_Strict):
    """`task: classify`: a vision backbone with one head per (category, attribute); see docs/heads.md."""

    kind: Literal["mlp", "linear", "knn"] = "mlp"
    mode: Literal["frozen", "lora", "full"] = "frozen"
    width: int = Field(256, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    trunk: int | None = Field(None, ge=1)  # shared layer between features and every head (seed 001)
    loss: Literal["ce", "focal", "cb_focal", "ldam"] = "ce"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    beta: float | None = Field(None, ge=0, lt=1)  # class-balanced weights (effective number); null = none
    gamma: float = Field(2.0, ge=0)  # focal
    ldam_max_margin: float = Field(0.5, ge=0)
    ldam_scale: float = Field(30.0, gt=0)
    drw_start: float = Field(0.8, ge=0, le=1)  # LDAM: share of training before class-balanced re-weighting
    attribute_weights: dict[str, float] = Field(default_factory=dict)  # "color" or "Sarees/color": weight
    sampler: Literal["random", "category", "balanced"] = "random"
    augment: Augment = Field(default_factory=Augment)
    backbone_lr: float | None = Field(None, gt=0)  # full/lora: backbone learning rate (default train.lr / 10)
    k: int = Field(10, ge=1)  # knn: neighbours per vote
    cache_dir: Path | None = None  # frozen features; null = $VLMTAX_CACHE or ~/.cache/vlmtax/features
    extract_batch_size: int = Field(64, ge=1)
    cpu_threads: int | None = Field(None, ge=1)  # torch CPU threads while training; null = torch's (frozen: 1)

    @field_validator("attribute_weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        # A negative weight maximises that attribute's loss, zero or NaN silently drops or poisons it.
        bad = {k: w for k, w in v.items() if not (w > 0 and w != float("inf"))}
        if bad:
            raise ValueError(f"weights must be positive finite numbers, got {bad}")
        return v


class Recipe(_Strict):
    task: Literal["generate", "classify"] = "generate"
    model: str
    data: Path
    output_dir: Path
    finetuning: Literal["lora", "full"] = "lora"
    lora: Lora = Field(default_factory=Lora)
    quantization: Literal["4bit", "8bit"] | None = None
    freeze: Freeze = Field(default_factory=Freeze)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # The attention kernel training loads the model with. flash_attention_2 needs a CUDA GPU, the flash-attn
    # package and fp16/bf16; merge and predict always load sdpa (constrained decoding's 4D masks need it).
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    image: ImageCfg = Field(default_factory=ImageCfg)
    train: Train = Field(default_factory=Train)
    log: Log = Field(default_factory=Log)
    resume: bool | str = False  # true = last checkpoint in output_dir; a string = that checkpoint
    trust_remote_code: bool = False
    heads: Heads = Field(default_factory=Heads)  # task: classify only

    @field_validator("quantization", mode="before")
    @classmethod
    def _none_string(cls, v: Any) -> Any:
        return None if v in ("null", "none", "None") else v
